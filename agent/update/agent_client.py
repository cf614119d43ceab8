"""The running agent, as the update lifecycle sees it: reload a model, read its metrics.

The serving process (`edgefleet-agent serve`) re-reads a model's versions from disk on
`POST /v2/repository/models/{name}/load`; an update switches files atomically and then asks it
to reload, so serving moves from the old version to the new one between two requests. Metrics
come from its Prometheus endpoint. `url` is `http://127.0.0.1:8000` or `unix:/path/agent.sock`.
"""

from __future__ import annotations

import http.client
import socket
import time
from urllib.parse import quote, urlsplit

from agent.update.errors import ActivationFailed

_TIMEOUT_S = 120.0  # loading a large model can take a while
# Most bytes read from one reply; /metrics of a busy agent is a few hundred KiB.
MAX_REPLY_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024


class AgentUnreachable(ActivationFailed):
    pass


class AgentClient:
    def __init__(self, url: str, timeout: float = _TIMEOUT_S) -> None:
        self.url = url
        self.timeout = timeout

    def reload(self, model: str) -> None:
        """Have the agent load every version of `model` now on disk (and drop removed ones)."""
        status, body = self._request("POST", f"/v2/repository/models/{quote(model, safe='')}/load")
        if status != 200:
            raise ActivationFailed(
                f"the agent did not reload {model} (HTTP {status}): "
                f"{body[:300].decode(errors='replace')}"
            )

    def metrics(self) -> str:
        status, body = self._request("GET", "/metrics")
        if status != 200:
            raise AgentUnreachable(f"the agent's /metrics answered HTTP {status}")
        return body.decode("utf-8", errors="replace")

    def _request(self, method: str, path: str) -> tuple[int, bytes]:
        """One request, answered within `timeout` seconds in all (not per socket read)."""
        deadline = time.monotonic() + self.timeout
        connection = self._connection()
        try:
            connection.request(method, path, body=b"" if method == "POST" else None)
            sock = connection.sock  # getresponse() drops it when the reply closes the connection
            response = connection.getresponse()
            return response.status, self._read(sock, response, deadline)
        except (OSError, http.client.HTTPException) as exc:
            # HTTPException: something on the agent's address that does not speak HTTP.
            raise AgentUnreachable(
                f"cannot reach the agent at {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            connection.close()

    def _read(
        self,
        sock: socket.socket | None,
        response: http.client.HTTPResponse,
        deadline: float,
    ) -> bytes:
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnreachable(
                    f"the agent at {self.url} did not answer within {self.timeout:g} s"
                )
            if sock is not None:
                sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                if response.length:  # read1 does not raise for a reply cut short
                    raise http.client.IncompleteRead(b"".join(chunks), response.length)
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise AgentUnreachable(
                    f"the agent at {self.url} answered more than {MAX_REPLY_BYTES} bytes"
                )
            chunks.append(chunk)

    def _connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url.removeprefix("unix:"), self.timeout)
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise AgentUnreachable(
                f"agent URL {self.url!r}: expected http://HOST:PORT or unix:PATH"
            )
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
