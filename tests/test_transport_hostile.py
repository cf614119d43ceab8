"""Downloads against a server that keeps the connection alive but hardly sends: the transport
gives up below its minimum rate (retryable, keeping what arrived) and reports progress as bytes
arrive, while a server at normal speed is unaffected.

The servers are plain HTTP over a loopback socket, written byte by byte, so a test decides what
arrives when; floors are shrunk to half-second windows so the tests stay quick. Tests never
assert on durations.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from tuf.api import exceptions as tuf_exceptions

from agent.update.config import UpdateLimits
from agent.update.errors import DownloadFailed
from agent.update.transport import (
    MinimumRate,
    MutualTlsFetcher,
    RateWatch,
    TransferTooSlow,
    Transport,
    download_resumable,
)

WAIT = 15.0  # upper bound for anything to happen
LENGTH = 4096
BODY = bytes(range(256)) * (LENGTH // 256)
FLOOR = MinimumRate(min_bytes=1000, window_s=0.5)

Handler = Callable[[socket.socket], None]


@contextlib.contextmanager
def http_server(handler: Handler) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `handler(connection)`; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                head += data
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {LENGTH}\r\n\r\n".encode())
            with contextlib.suppress(OSError):  # the client hung up: what the test is about
                handler(conn)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/tuf/targets/model.tar"
    finally:
        stop.set()
        listener.close()


def drip(conn: socket.socket) -> None:
    """One byte every 20 ms (50 B/s), until the client gives up or WAIT runs out."""
    deadline = time.monotonic() + WAIT
    for i in range(LENGTH):
        if time.monotonic() > deadline:
            return
        conn.sendall(BODY[i : i + 1])
        time.sleep(0.02)


def at_once(conn: socket.socket) -> None:
    conn.sendall(BODY)


def transport() -> Transport:
    limits = UpdateLimits(read_timeout_s=WAIT, download_chunk_bytes=1 << 20)
    return Transport(ssl.create_default_context(), limits, min_rate=FLOOR)


def test_a_dripping_server_is_dropped_and_what_arrived_is_kept(tmp_path):
    partial, seen = tmp_path / "model.tar.partial", []
    with http_server(drip) as url, pytest.raises(TransferTooSlow) as failure:
        download_resumable(transport(), url, partial, LENGTH, progress=seen.append)
    assert isinstance(failure.value, DownloadFailed) and failure.value.retryable
    assert "under the floor of 1000 bytes per 0.5 s" in str(failure.value)
    assert 0 < partial.stat().st_size < LENGTH
    assert partial.read_bytes() == BODY[: partial.stat().st_size]
    assert seen == sorted(seen) and seen[-1] == partial.stat().st_size


def test_a_server_at_normal_speed_completes_under_the_same_floor(tmp_path):
    partial = tmp_path / "model.tar.partial"
    with http_server(at_once) as url:
        download_resumable(transport(), url, partial, LENGTH)
    assert partial.read_bytes() == BODY


def test_progress_is_reported_as_bytes_arrive_not_per_full_chunk(tmp_path):
    """The server sends the rest only once the client has reported the first part: a client
    that waits for a full (1 MiB) chunk before reporting would never get it."""
    first, reported = 100, threading.Event()

    def in_two_parts(conn: socket.socket) -> None:
        conn.sendall(BODY[:first])
        if reported.wait(WAIT):
            conn.sendall(BODY[first:])

    def progress(offset: int) -> None:
        seen.append(offset)
        if offset >= first:
            reported.set()

    partial, seen = tmp_path / "model.tar.partial", []
    with http_server(in_two_parts) as url:
        download_resumable(transport(), url, partial, LENGTH, progress=progress)
    assert partial.read_bytes() == BODY
    assert seen[0] <= first and seen[-1] == LENGTH


def test_tuf_metadata_from_a_dripping_server_is_refused_as_a_download_error():
    with http_server(drip) as url, pytest.raises(tuf_exceptions.DownloadError) as failure:
        for _ in MutualTlsFetcher(transport()).fetch(url):
            pass
    assert "under the floor of 1000 bytes per 0.5 s" in str(failure.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("bytes_per_second", "finishes"), [(1024, True), (16 * 1024, True), (64, False)]
)
def test_the_default_floor_lets_a_slow_live_link_through(bytes_per_second, finishes):
    clock, received = FakeClock(), 0
    watch = RateWatch(MinimumRate(), clock)
    try:
        for _ in range(600):  # ten minutes, one arrival a second
            clock.now += 1.0
            received += bytes_per_second
            watch.arrived(bytes_per_second, received)
    except TransferTooSlow:
        assert not finishes
    else:
        assert finishes
