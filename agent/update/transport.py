"""HTTPS to the control plane with the device certificate: TUF metadata and resumable downloads.

One urllib3 pool with the device's mutual-TLS context carries both python-tuf's metadata
requests (`MutualTlsFetcher`, a `tuf.ngclient.FetcherInterface`: the shipped fetcher cannot
present a client certificate) and the artifact downloads (`download_resumable`), which python-tuf
does not resume: they continue a partial file with an HTTP Range request and never accept more
bytes than the signed metadata declares.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from agent.update.config import UpdateLimits
from agent.update.errors import DownloadFailed

Progress = Callable[[int], None]


class Transport:
    def __init__(self, ssl_context: ssl.SSLContext, limits: UpdateLimits) -> None:
        self.limits = limits
        self.pool = urllib3.PoolManager(
            ssl_context=ssl_context,
            retries=False,
            timeout=urllib3.Timeout(connect=limits.connect_timeout_s, read=limits.read_timeout_s),
        )

    def get(self, url: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        return self.pool.request(
            "GET", url, headers=headers or {}, preload_content=False, redirect=False
        )

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
        try:
            yield from response.stream(self.transport.limits.download_chunk_bytes)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"transfer failed: {exc}") from exc
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

    Raises DownloadFailed (retryable) when the transfer breaks off, TargetTooLong when the
    server keeps sending past `length`. The caller checks the hashes.
    """
    limits = transport.limits
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
        _receive(response, partial, mode, offset, length, limits, progress)
        complete = True
    finally:
        if complete:
            response.release_conn()
        else:  # never drain an unread body (it may not end): drop the connection
            response.close()


def _receive(
    response: urllib3.BaseHTTPResponse,
    partial: Path,
    mode: str,
    offset: int,
    length: int,
    limits: UpdateLimits,
    progress: Progress | None,
) -> None:
    unsynced = 0
    with open(partial, mode) as out:
        try:
            for chunk in response.stream(limits.download_chunk_bytes):
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
        except urllib3.exceptions.HTTPError as exc:
            _sync(out)
            raise DownloadFailed(
                f"transfer broke off at byte {offset}: {exc}", retryable=True
            ) from exc
        _sync(out)
    if offset < length:
        raise DownloadFailed(f"the connection closed at byte {offset} of {length}", retryable=True)


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
