"""The running agent, as the update lifecycle sees it: reload a model, read its metrics.

The serving process (`edgefleet-agent serve`) re-reads a model's versions from disk on
`POST /v2/repository/models/{name}/load`; an update switches files atomically and then asks it
to reload, so serving moves from the old version to the new one between two requests. Metrics
come from its Prometheus endpoint. `url` is `http://127.0.0.1:8000` or `unix:/path/agent.sock`.
"""

from __future__ import annotations

import http.client
import socket
from urllib.parse import quote, urlsplit

from agent.update.errors import ActivationFailed

_TIMEOUT_S = 120.0  # loading a large model can take a while


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
        connection = self._connection()
        try:
            connection.request(method, path, body=b"" if method == "POST" else None)
            response = connection.getresponse()
            return response.status, response.read()
        except OSError as exc:
            raise AgentUnreachable(f"cannot reach the agent at {self.url}: {exc}") from None
        finally:
            connection.close()

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
