"""Runs the REST and gRPC front ends over one data plane.

REST listens on TCP (127.0.0.1 by default) and optionally a unix socket; gRPC on TCP. The front
ends come up first (live, not ready), then the models load and the server turns ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from agent import memory
from agent.serving.dataplane import DataPlane
from agent.serving.http1 import HttpServer
from agent.serving.repository import ModelRepository
from agent.serving.rest import DEFAULT_MAX_BODY, RestFrontEnd

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    models: Path
    http: str | None = "127.0.0.1:8000"
    grpc: str | None = "127.0.0.1:8001"
    socket: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    # Accelerator selection: measure where each model runs best, decisions kept in state_dir.
    select: bool = False
    state_dir: Path | None = None
    profile: str | None = None  # force a firmware profile (name or path)


@dataclass(slots=True)
class RunningServer:
    dataplane: DataPlane
    http_port: int | None
    grpc_port: int | None
    socket: Path | None
    _http: HttpServer
    _grpc: object | None
    _housekeeping: asyncio.Task | None = None

    async def stop(self, grace: float = 5.0) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self._http.close(grace)
        await self.dataplane.stop()
        if self.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()


def split_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"address {address!r} must be HOST:PORT (PORT 0..65535)")
    return host.strip("[]") or default_host, int(port)


def bind(address: str) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: any free port)."""
    host, port = split_address(address)
    return socket.create_server((host, port), family=_family(host), reuse_port=False)


async def start(options: ServeOptions) -> RunningServer:
    selector = await asyncio.to_thread(_selector, options) if options.select else None
    dataplane = DataPlane(ModelRepository(options.models), selector=selector)
    rest = RestFrontEnd(dataplane, max_body=options.max_body_bytes)
    http = rest.server()
    http_port = None
    if options.http:
        sock = bind(options.http)
        await http.listen(sock)
        http_port = sock.getsockname()[1]
    if options.socket:
        path = Path(options.socket)
        if path.exists() and path.is_socket():
            path.unlink()  # left over from a previous run that did not stop cleanly
        await http.listen_unix(str(path))
        os.chmod(path, 0o660)
    grpc_server = grpc_port = None
    if options.grpc:
        from agent.serving.grpc_server import start_grpc_server

        grpc_server, grpc_port = await start_grpc_server(
            dataplane, options.grpc, options.max_body_bytes
        )
    await dataplane.start()
    running = RunningServer(dataplane, http_port, grpc_port, options.socket, http, grpc_server)
    running._housekeeping = asyncio.create_task(_return_memory_when_idle(dataplane))
    return running


async def _return_memory_when_idle(dataplane: DataPlane, every: float = 1.0) -> None:
    """After a burst, hand the memory the burst freed back to the system once the node has been
    quiet (no new request) for a whole `every` s: 32 concurrent image requests leave ~60 MB of
    freed heap resident otherwise. Not while requests keep coming, even one at a time: the
    cycle collection it starts with would stall them for milliseconds."""
    released = last = dataplane.requests_seen
    while True:
        await asyncio.sleep(every)
        seen = dataplane.requests_seen
        if seen == last and seen != released and dataplane.idle():
            released = seen
            await asyncio.to_thread(memory.release_free_memory)
        last = seen


def _selector(options: ServeOptions):
    from agent.selection import Selector

    selector = Selector(options.state_dir, profile=options.profile or None, progress=_log_progress)
    log.info(
        "accelerator selection on: profile %s, decisions in %s",
        selector.profile.name,
        selector.state_dir,
    )
    return selector


def _log_progress(message: str) -> None:
    log.info("selection: %s", message)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
