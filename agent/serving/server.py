"""Runs the REST and gRPC front ends over one data plane.

REST listens on TCP (127.0.0.1 by default) and optionally a unix socket; gRPC on TCP. The front
ends come up first (live, not ready), then the models load and the server turns ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from agent import memory
from agent.serving.dataplane import DataPlane
from agent.serving.http1 import HttpServer
from agent.serving.repository import ModelRepository
from agent.serving.rest import DEFAULT_MAX_BODY, RestFrontEnd

log = logging.getLogger(__name__)

_SOCKET_PROBE_TIMEOUT = 1.0  # s to wait for a listener on an existing socket file to accept


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
    _socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound

    async def stop(self, grace: float = 5.0) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        # Both front ends drain at once: the grace period is the whole stop's, not each one's.
        draining = [self._http.close(grace)]
        if self._grpc is not None:
            draining.append(self._grpc.stop(grace))
        await asyncio.gather(*draining)
        await self.dataplane.stop()
        if self.socket is not None and self._socket_file is not None:
            _unlink_if_same(self.socket, self._socket_file)


class SocketPathError(OSError):
    """The unix socket path is taken: another process serves on it, or it is not a socket."""


def split_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"address {address!r} must be HOST:PORT (PORT 0..65535)")
    return host.strip("[]") or default_host, int(port)


def bind(address: str) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: any free port)."""
    host, port = split_address(address)
    return socket.create_server((host, port), family=_family(host), reuse_port=False)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at `path`. A socket file left by a run that did not stop cleanly
    is replaced; one another process still answers on, or a path that is not a socket, is refused
    (SocketPathError) rather than taken over."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale_socket(path)
            sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


async def start(options: ServeOptions) -> RunningServer:
    """Bind the front ends, then load the models. If that fails or is cancelled (a signal while
    the models load), whatever was started is stopped again and the socket file removed."""
    selector = await asyncio.to_thread(_selector, options) if options.select else None
    dataplane = DataPlane(ModelRepository(options.models), selector=selector)
    rest = RestFrontEnd(dataplane, max_body=options.max_body_bytes)
    running = RunningServer(dataplane, None, None, None, rest.server(), None)
    try:
        if options.http:
            sock = bind(options.http)
            await running._http.listen(sock)
            running.http_port = sock.getsockname()[1]
        if options.socket:
            path = Path(options.socket)
            sock = bind_unix(path)
            running.socket = path
            bound = os.stat(path)
            running._socket_file = (bound.st_dev, bound.st_ino)
            await running._http.listen(sock)
        if options.grpc:
            from agent.serving.grpc_server import start_grpc_server

            running._grpc, running.grpc_port = await start_grpc_server(
                dataplane, options.grpc, options.max_body_bytes
            )
        await dataplane.start()
    except BaseException:
        try:
            await running.stop(grace=0)
        except Exception:  # the start's own error is the one to report
            log.exception("cleaning up after a failed start")
        raise
    running._housekeeping = asyncio.create_task(_return_memory_when_idle(dataplane))
    return running


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_SOCKET_PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            # nobody listens: left over from a run that did not stop cleanly
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        except TimeoutError:  # a listener too busy to accept is still a listener
            pass
    raise SocketPathError(f"{path} is in use by another process")


def _unlink_if_same(path: Path, bound: tuple[int, int]) -> None:
    """Remove our socket file, not one another process has bound at the same path since."""
    with contextlib.suppress(FileNotFoundError):
        now = path.lstat()
        if (now.st_dev, now.st_ino) == bound:
            path.unlink()


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
