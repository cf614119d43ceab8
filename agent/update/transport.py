"""HTTPS to the control plane with the device certificate: TUF metadata and resumable downloads.

One urllib3 pool with the device's mutual-TLS context carries both python-tuf's metadata
requests (`MutualTlsFetcher`, a `tuf.ngclient.FetcherInterface`: the shipped fetcher cannot
present a client certificate) and the artifact downloads (`download_resumable`), which python-tuf
does not resume: they continue a partial file with an HTTP Range request and never accept more
bytes than the signed metadata declares.

Both read the body as it arrives (each piece as soon as the socket has it, never waiting for a
full chunk) and hold it to a `MinimumRate`: a per-read timeout alone lets a server that sends a
byte now and then keep a download open for ever.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from agent.update.config import UpdateLimits
from agent.update.errors import DownloadFailed

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class MinimumRate:
    """A transfer that brings fewer than `min_bytes` in `window_s` is given up (retryable).

    Generous on purpose: a slow but live link (1 KiB/s) passes; a server dripping a few bytes a
    second does not."""

    min_bytes: int = 16 * 1024
    window_s: float = 60.0


class TransferTooSlow(DownloadFailed):
    """Bytes still arrive, but too few to ever finish: the connection is dropped and resumed."""


class RateWatch:
    """Counts one transfer's bytes as they arrive, window after window of `floor.window_s`."""

    def __init__(self, floor: MinimumRate, clock: Callable[[], float] = time.monotonic) -> None:
        self.floor = floor
        self._clock = clock
        self._window_start = clock()
        self._window_bytes = 0

    def arrived(self, count: int, at_byte: int) -> None:
        """Record `count` more bytes; raise TransferTooSlow when a window ended under the floor."""
        self._window_bytes += count
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.floor.window_s:
            return
        if self._window_bytes < self.floor.min_bytes:
            raise TransferTooSlow(
                f"the transfer slowed to {self._window_bytes} bytes in {elapsed:.1f} s at byte "
                f"{at_byte}, under the floor of {self.floor.min_bytes} bytes per "
                f"{self.floor.window_s:g} s; dropping the connection",
                retryable=True,
            )
        self._window_start, self._window_bytes = now, 0


class Transport:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        limits: UpdateLimits,
        *,
        min_rate: MinimumRate = MinimumRate(),
    ) -> None:
        self.limits = limits
        self.min_rate = min_rate
        self.pool = urllib3.PoolManager(
            ssl_context=ssl_context,
            retries=False,
            timeout=urllib3.Timeout(connect=limits.connect_timeout_s, read=limits.read_timeout_s),
        )

    def get(self, url: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        return self.pool.request(
            "GET", url, headers=headers or {}, preload_content=False, redirect=False
        )

    def arrivals(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        """The body's bytes as they come off the wire, each piece as soon as it is read.

        Not decoded: the signed metadata describes the bytes the server sends, and a
        Content-Encoding would only let a small body stand for a huge one."""
        while chunk := response.read1(self.limits.download_chunk_bytes, decode_content=False):
            yield chunk

    def close(self) -> None:
        self.pool.clear()


class MutualTlsFetcher(FetcherInterface):
    """python-tuf's transport seam, over the device's mutual TLS."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self.transport.get(url)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status != 200:
            response.release_conn()
            raise tuf_exceptions.DownloadHTTPError(
                f"GET {url}: HTTP {response.status}", response.status
            )
        return self._chunks(response)

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        watch, received = RateWatch(self.transport.min_rate), 0
        try:
            for chunk in self.transport.arrivals(response):
                received += len(chunk)
                watch.arrived(len(chunk), received)
                yield chunk
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"transfer failed: {exc}") from exc
        except TransferTooSlow as exc:
            raise tuf_exceptions.DownloadError(str(exc)) from exc
        finally:
            response.release_conn()


class TargetTooLong(DownloadFailed):
    """The server sent more bytes than the signed metadata declares (endless-data attack)."""


def download_resumable(
    transport: Transport,
    url: str,
    partial: Path,
    length: int,
    progress: Progress | None = None,
) -> None:
    """Bring `partial` to `length` bytes from `url`, continuing where it stopped.

    Raises DownloadFailed (retryable) when the transfer breaks off or slows below the
    transport's MinimumRate, TargetTooLong when the server keeps sending past `length`. The
    caller checks the hashes.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > length:  # cannot be ours: start over
        partial.unlink()
        offset = 0
    if offset == length:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = transport.get(url, headers)
    except urllib3.exceptions.HTTPError as exc:
        raise DownloadFailed(f"cannot reach {url}: {exc}", retryable=True) from exc
    complete = False
    try:
        if response.status == 206 and offset:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise DownloadFailed(
                    f"{url}: the server resumed at the wrong offset", retryable=True
                )
            mode = "ab"
        elif response.status == 200:
            offset, mode = 0, "wb"  # the server ignored the range: take the whole file again
        elif response.status == 416:
            partial.unlink(missing_ok=True)
            raise DownloadFailed(f"{url}: the server has no bytes past {offset}", retryable=True)
        else:
            raise DownloadFailed(
                f"GET {url}: HTTP {response.status}", retryable=response.status >= 500
            )
        _receive(transport, response, partial, mode, offset, length, progress)
        complete = True
    finally:
        if complete:
            response.release_conn()
        else:  # never drain an unread body (it may not end): drop the connection
            response.close()


def _receive(
    transport: Transport,
    response: urllib3.BaseHTTPResponse,
    partial: Path,
    mode: str,
    offset: int,
    length: int,
    progress: Progress | None,
) -> None:
    limits, watch, unsynced = transport.limits, RateWatch(transport.min_rate), 0
    with open(partial, mode) as out:
        try:
            for chunk in transport.arrivals(response):
                if offset + len(chunk) > length:
                    out.write(chunk[: length - offset])
                    raise TargetTooLong(
                        f"the server sent more than the {length} bytes the signed metadata "
                        "declares; refusing the target"
                    )
                out.write(chunk)
                offset += len(chunk)
                unsynced += len(chunk)
                if unsynced >= limits.fsync_every_bytes:
                    _sync(out)
                    unsynced = 0
                if progress is not None:
                    out.flush()
                    progress(offset)
                if offset < length:  # all there: only the end of the body is still to come
                    watch.arrived(len(chunk), offset)
        except urllib3.exceptions.HTTPError as exc:
            _sync(out)
            raise DownloadFailed(
                f"transfer broke off at byte {offset}: {exc}", retryable=True
            ) from exc
        except TransferTooSlow:
            _sync(out)  # what did arrive is kept: the next attempt resumes after it
            raise
        _sync(out)
    if offset < length:
        raise DownloadFailed(f"the connection closed at byte {offset} of {length}", retryable=True)


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
