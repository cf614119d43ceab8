"""KServe v2 REST front end: translates HTTP to data-plane calls and back (on `http1`)."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.serving import rest_codec
from agent.serving.dataplane import DataPlane, check_repository_parameters
from agent.serving.errors import InvalidInput, ServingError
from agent.serving.http1 import Handler, HttpServer, Reply, Request, Response
from agent.serving.tensors import InferenceResponse
from agent.serving.triton_extensions import config_document, statistics_document
from runtimes.base import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024
MAX_KNOWN_ROUTES = 1024  # paths whose routing is remembered; others are routed every time
_JSON = "application/json"
_OCTET_STREAM = "application/octet-stream"
_INFERENCE_HEADER = rest_codec.HEADER_LENGTH.lower()


def _json(doc, status: int = 200) -> Response:
    return Response(status, orjson.dumps(doc), _JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, rest_codec.error_body(message), _JSON, headers)


def _specs(specs: list[TensorSpec]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


class RestFrontEnd:
    """The KServe v2 REST endpoints, as an `http1.Application`.

    A request is routed as soon as its head is in, by splitting the path: an unknown path gets
    404 and a known path asked with the wrong method 405 with `Allow`, both with a KServe
    `{"error": ...}` body, before any body is read.
    """

    def __init__(self, dataplane: DataPlane, max_body: int = DEFAULT_MAX_BODY):
        self.dataplane = dataplane
        self.max_body = max_body
        self._tasks: set[asyncio.Task] = set()
        # raw path -> what _route found for it: splitting the path cost more than a lookup
        self._routes: dict[str, tuple[str, Handler, tuple]] = {}
        self._static = {
            ("v2", "health", "live"): ("GET", self.live),
            ("v2", "health", "ready"): ("GET", self.ready),
            ("v2",): ("GET", self.server_metadata),
            ("v2", "repository", "index"): ("POST", self.repository_index),
            ("metrics",): ("GET", self.metrics),
        }

    def server(self, **options) -> HttpServer:
        """The HTTP server to listen with; options go to `HttpServer`."""
        return HttpServer(
            self, max_body=self.max_body, body_limit_hint="raise it with serve --max-body-mb",
            **options,
        )  # fmt: skip

    # http1.Application

    def route(self, request: Request) -> tuple[Handler, tuple] | Response:
        found = self._routes.get(request.path)
        if found is None:
            found = self._route(request.path)
            if found is not None and len(self._routes) < MAX_KNOWN_ROUTES:
                self._routes[request.path] = found
        if found is None:
            return _error(404, f"no such endpoint: {request.method} {request.path}")
        method, handler, args = found
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            allow = "GET, HEAD" if method == "GET" else method
            message = f"{request.method} is not allowed on {request.path}"
            return _error(405, message, {"Allow": allow})
        return handler, args

    def respond(
        self, request: Request, handler: Handler, args: tuple, reply: Reply
    ) -> Response | None:
        try:
            return handler(request, reply, *args)
        except ServingError as exc:
            return _error(exc.http_status, str(exc))

    def error(self, status: int, message: str) -> Response:
        return _error(status, message)

    def _route(self, raw_path: str) -> tuple[str, Handler, tuple] | None:
        """(method, handler, path arguments) for a raw (percent-encoded) path."""
        parts = raw_path.split("/")
        if parts[0] or not all(parts[1:]):  # no leading "/", or an empty segment
            return None
        if "%" in raw_path:
            parts = [unquote(p) for p in parts]
        parts = parts[1:]
        n = len(parts)
        if n >= 3 and parts[0] == "v2" and parts[1] == "models":
            name = parts[2]
            if n == 3:
                # As in Triton, /v2/models/stats is every model's statistics: the metadata of
                # a model named "stats" is at /v2/models/stats/versions/{v}.
                if name == "stats":
                    return "GET", self.model_statistics, (None, None)
                return "GET", self.model_metadata, (name, None)
            if n == 4:
                return self._model_route(parts[3], name, None)
            if n in (5, 6) and parts[3] == "versions":
                return self._model_route(parts[5] if n == 6 else "", name, parts[4])
        elif n == 5 and parts[:3] == ["v2", "repository", "models"]:
            if parts[4] == "load":
                return "POST", self.load, (parts[3],)
            if parts[4] == "unload":
                return "POST", self.unload, (parts[3],)
        else:
            found = self._static.get(tuple(parts))
            if found is not None:
                return found[0], found[1], ()
        return None

    def _model_route(self, action: str, name: str, version: str | None):
        """`/v2/models/{name}[/versions/{version}]` + `""` (metadata), `/ready`, `/infer`,
        `/config` or `/stats`."""
        if action == "infer":
            return "POST", self.infer, (name, version)
        if action == "ready":
            return "GET", self.model_ready, (name, version)
        if action == "config":
            return "GET", self.model_config, (name, version)
        if action == "stats":
            return "GET", self.model_statistics, (name, version)
        if action == "":
            return "GET", self.model_metadata, (name, version)
        return None

    def live(self, request: Request, reply: Reply) -> Response:
        return Response(200 if self.dataplane.live() else 503)

    def ready(self, request: Request, reply: Reply) -> Response:
        return Response(200 if self.dataplane.ready() else 503)

    def server_metadata(self, request: Request, reply: Reply) -> Response:
        return _json(self.dataplane.server_metadata())

    def model_metadata(
        self, request: Request, reply: Reply, name: str, version: str | None
    ) -> Response:
        md = self.dataplane.model_metadata(name, version)
        return _json(
            {
                "name": md.name,
                "versions": md.versions,
                "platform": md.platform,
                "inputs": _specs(md.inputs),
                "outputs": _specs(md.outputs),
            }
        )

    def model_config(
        self, request: Request, reply: Reply, name: str, version: str | None
    ) -> Response:
        return _json(config_document(self.dataplane.model(name, version)))

    def model_statistics(
        self, request: Request, reply: Reply, name: str | None, version: str | None
    ) -> Response:
        return _json(statistics_document(self.dataplane.statistics(name, version)))

    def model_ready(
        self, request: Request, reply: Reply, name: str, version: str | None
    ) -> Response:
        ready = self.dataplane.model_ready(name, version)
        return Response(200 if ready else 503)

    def infer(
        self, request: Request, reply: Reply, name: str, version: str | None
    ) -> Response | None:
        body = request.body
        encoding = request.headers.get("content-encoding")
        try:
            if encoding is not None:
                body = self._inflate(body, encoding)
                if isinstance(body, Response):
                    return body
            infer_request = rest_codec.decode_request(
                body, request.headers.get(_INFERENCE_HEADER), name, version
            )
        except InvalidInput as exc:
            self.dataplane.count_rejected(name, version, exc)
            raise
        parameters = infer_request.parameters

        def done(response: InferenceResponse | None, error: ServingError | None) -> None:
            if error is not None:
                reply(_error(error.http_status, str(error)))
                return
            try:
                payload, header_length = rest_codec.encode_response(response, parameters)
                if header_length is None:
                    answer = Response(200, payload, _JSON)
                else:
                    headers = {rest_codec.HEADER_LENGTH: str(header_length)}
                    answer = Response(200, payload, _OCTET_STREAM, headers)
            except Exception:  # a bug, not bad input: answer, keep serving
                log.exception("encoding the response of model %s failed", name)
                answer = _error(500, "internal error encoding the response")
            reply(answer)

        self.dataplane.submit(infer_request, done)
        return None

    def _inflate(self, body: bytes | memoryview, encoding: str) -> bytes | memoryview | Response:
        """A request body sent with Content-Encoding (tritonclient's request_compression_algorithm),
        inflated to at most the body limit (413 beyond); 415 for an encoding other than gzip or
        deflate."""
        kind = encoding.strip().lower()
        if kind == "identity":
            return body
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(kind)
        if wbits is None:
            message = f"Content-Encoding {encoding!r} is not supported: use gzip or deflate"
            return _error(415, message)
        inflater = zlib.decompressobj(wbits)
        try:
            inflated = inflater.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            raise InvalidInput(f"the {kind} request body is corrupt: {exc}") from None
        if len(inflated) > self.max_body:
            return _error(413, f"the {kind} request body inflates beyond {self.max_body} bytes")
        if not inflater.eof:
            raise InvalidInput(f"the {kind} request body is truncated")
        if inflater.unused_data:
            raise InvalidInput(
                f"the {kind} request body has {len(inflater.unused_data)} bytes after its end"
            )
        return inflated

    def repository_index(self, request: Request, reply: Reply) -> None:
        doc = _json_body(request)
        ready_only = doc.get("ready", False)
        if type(ready_only) is not bool:
            raise InvalidInput(f"'ready' must be true or false, got {ready_only!r}")

        def answer(entries: list) -> Response:
            return _json(
                [
                    {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                    for e in entries
                ]
            )

        self._in_background(self.dataplane.read_repository_index(ready_only), reply, answer)

    def load(self, request: Request, reply: Reply, name: str) -> None:
        check_repository_parameters("load", _repository_parameters(request))
        self._in_background(self.dataplane.load_model(name), reply)

    def unload(self, request: Request, reply: Reply, name: str) -> None:
        check_repository_parameters("unload", _repository_parameters(request))
        self._in_background(self.dataplane.unload_model(name), reply)

    def _in_background(
        self,
        work: Coroutine[Any, Any, Any],
        reply: Reply,
        answer: Callable[[Any], Response] = lambda _: Response(200),
    ) -> None:
        """Run `work` as a task; reply `answer(its result)` when it ends (200 with no body by
        default), or with the error it raised."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop holds tasks weakly

        def finished(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            try:
                result = task.result()
            except ServingError as exc:
                reply(_error(exc.http_status, str(exc)))
            except (Exception, asyncio.CancelledError) as exc:
                log.error("%s failed", work.__qualname__, exc_info=exc)
                reply(_error(500, f"internal error: {type(exc).__name__}"))
            else:
                reply(answer(result))

        task.add_done_callback(finished)

    def metrics(self, request: Request, reply: Reply) -> Response:
        body = generate_latest(self.dataplane.metrics.registry)
        return Response(200, body, CONTENT_TYPE_LATEST)


def _repository_parameters(request: Request) -> dict:
    parameters = _json_body(request).get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    return parameters or {}


def _json_body(request: Request) -> dict:
    """Optional JSON object body of the repository endpoints."""
    body = bytes(request.body)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc
