"""KServe v2 REST front end (aiohttp): translates HTTP to data-plane calls and back."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.serving import rest_codec
from agent.serving.dataplane import DataPlane
from agent.serving.errors import InvalidInput, ServingError
from runtimes.base import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(doc, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        body=rest_codec.error_body(message), status=status, content_type="application/json"
    )


def _reports_errors(handler: Handler) -> Handler:
    """Turn data-plane errors into KServe `{"error": ...}` bodies with their HTTP status."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServingError as exc:
            return _error(exc.http_status, str(exc))

    return wrapped


def _specs(specs: list[TensorSpec]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


class RestFrontEnd:
    def __init__(self, dataplane: DataPlane, max_body: int = DEFAULT_MAX_BODY):
        self.dataplane = dataplane
        self.max_body = max_body

    def app(self) -> web.Application:
        # client_max_size is enforced by aiohttp itself; read_body() turns it into a 400.
        app = web.Application(client_max_size=self.max_body)
        r = app.router
        e = _reports_errors
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/{model}", e(self.model_metadata))
        r.add_get("/v2/models/{model}/versions/{version}", e(self.model_metadata))
        r.add_get("/v2/models/{model}/ready", e(self.model_ready))
        r.add_get("/v2/models/{model}/versions/{version}/ready", e(self.model_ready))
        r.add_post("/v2/models/{model}/infer", e(self.infer))
        r.add_post("/v2/models/{model}/versions/{version}/infer", e(self.infer))
        r.add_post("/v2/repository/index", e(self.repository_index))
        r.add_post("/v2/repository/models/{model}/load", e(self.load))
        r.add_post("/v2/repository/models/{model}/unload", e(self.unload))
        r.add_get("/metrics", self.metrics)
        r.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.dataplane.live() else 503)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.dataplane.ready() else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(self.dataplane.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        md = self.dataplane.model_metadata(
            request.match_info["model"], request.match_info.get("version")
        )
        return _json(
            {
                "name": md.name,
                "versions": md.versions,
                "platform": md.platform,
                "inputs": _specs(md.inputs),
                "outputs": _specs(md.outputs),
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self.dataplane.model_ready(
            request.match_info["model"], request.match_info.get("version")
        )
        return web.Response(status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version")
        try:
            body = await self._read_body(request)
            infer_request = rest_codec.decode_request(
                body, request.headers.get(rest_codec.HEADER_LENGTH), name, version
            )
        except InvalidInput as exc:
            self.dataplane.count_rejected(name, version, exc)
            raise
        response = await self.dataplane.infer(infer_request)
        payload, header_length = rest_codec.encode_response(response, infer_request.parameters)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={rest_codec.HEADER_LENGTH: str(header_length)},
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await self._read_json(request)
        ready_only = bool(doc.get("ready", False))
        entries = self.dataplane.repository_index(ready_only=ready_only)
        return _json(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in entries
            ]
        )

    async def load(self, request: web.Request) -> web.Response:
        await self._read_json(request)
        await self.dataplane.load_model(request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self._read_json(request)
        await self.dataplane.unload_model(request.match_info["model"])
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.dataplane.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"no such endpoint: {request.method} {request.path}")

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise InvalidInput(
                f"request body exceeds the limit of {self.max_body} bytes "
                "(raise it with serve --max-body-mb)"
            ) from None

    async def _read_json(self, request: web.Request) -> dict:
        """Optional JSON object body of the repository endpoints."""
        body = await self._read_body(request)
        if not body.strip():
            return {}
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidInput("request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise InvalidInput("request body must be a JSON object")
        return doc
