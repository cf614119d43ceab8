"""Shared fixtures: generated sample models and a real agent server on free loopback ports."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from agent.samples import write_sample_repository
from agent.serving.server import RunningServer, ServeOptions, start

pytest_plugins = ["tests.trust_fixtures"]


class LoopThread:
    """An asyncio event loop running in a background thread; `call` runs a coroutine on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start_loop(self) -> None:
        self._thread.start()

    def stop_loop(self) -> None:
        """Cancel what is still running, as asyncio.run (and `serve`) does on exit, then stop.

        aiohttp may still hold a task lingering over an unread request body (up to 10 s).
        """
        self.call(_cancel_remaining_tasks(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the loop and wait for its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)


async def _cancel_remaining_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ServerThread(LoopThread):
    """Runs an agent server on its own event loop in a background thread, as a test peer."""

    def __init__(self, options: ServeOptions):
        super().__init__()
        self.options = options
        self.server: RunningServer | None = None

    def __enter__(self) -> ServerThread:
        self.start_loop()
        self.server = self.call(start(self.options))
        return self

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop(grace=1))
        self.stop_loop()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def dataplane(self):
        return self.server.dataplane


@pytest.fixture(scope="session")
def sample_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_sample_repository(root)
    return root


@pytest.fixture(scope="module")
def agent(sample_repo, tmp_path_factory) -> Iterator[ServerThread]:
    """One agent serving the sample repository (REST, gRPC and a unix socket)."""
    sock = tmp_path_factory.mktemp("sock") / "agent.sock"
    options = ServeOptions(sample_repo, "127.0.0.1:0", "127.0.0.1:0", sock, 4 * 1024 * 1024)
    with ServerThread(options) as server:
        yield server


@pytest.fixture
def private_repo(sample_repo, tmp_path) -> Path:
    """A copy of the sample repository that a test may change."""
    root = tmp_path / "models"
    shutil.copytree(sample_repo, root)
    return root


@pytest.fixture
def private_agent(private_repo) -> Iterator[ServerThread]:
    """An agent of its own over `private_repo`, REST only."""
    with ServerThread(ServeOptions(private_repo, "127.0.0.1:0", None, None)) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    """A tritonclient.http client of the module's `server` (a ServerThread)."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    """A tritonclient.grpc client of the module's `server` (a ServerThread with gRPC on)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client
