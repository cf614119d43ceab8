"""KServe v2 gRPC front end: `inference.GRPCInferenceService` over the data plane.

gRPC here is the protocol as written (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md)
over the HTTP/2 connections of http2.py: unary calls only, which is all the service has.
`tritonclient.grpc` and any gRPC client work unchanged; see http2.py for why not grpc.aio.

Each method translates one protobuf request into a data-plane call and the result back; tensor
encoding lives in grpc_codec.py. Data-plane errors become the gRPC status their class names
(NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...); anything unexpected becomes INTERNAL
with a message, and the server keeps serving. What the gRPC layer itself refuses:
- not POST: HTTP 405; a content-type other than application/grpc[+proto]: HTTP 415 (as the spec);
- an unknown method: UNIMPLEMENTED;
- a message that is not one length-prefixed frame, or not the method's protobuf message:
  INVALID_ARGUMENT naming the problem;
- a message (compressed or not) beyond the size limit: RESOURCE_EXHAUSTED, before it is all read;
  so is one that inflates past what its connection may hold (as much as its bodies) or while
  the server already inflates 2 messages' worth in all;
- a compression other than identity / gzip / deflate: UNIMPLEMENTED.
A message that inflates past INLINE_INFLATE goes on inflating in a thread, step by step, so
that a bomb neither stops the event loop nor grows unaccounted for. `grpc-timeout` bounds the
data plane's wait for an inference (DEADLINE_EXCEEDED; 0 is expired before the call runs); a
client that resets its stream or goes away cancels its call.

    server, port = await start_grpc_server(dataplane, "127.0.0.1:0")
    ...
    await server.stop(grace=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from agent.serving import grpc_codec, http2
from agent.serving.dataplane import DataPlane, check_repository_parameters
from agent.serving.errors import InvalidInput, RequestTimeout, ServingError
from agent.serving.scheduler import Job
from agent.serving.server import bind
from agent.serving.tensors import InferenceResponse
from agent.serving.triton_extensions import config_document, statistics_document
from protocol import inference_pb2 as pb
from runtimes.base import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Streams one client connection may have open at once; more wait in the client. Together with
# the message size limit this bounds what a single connection can make the server buffer.
MAX_CONCURRENT_STREAMS = 128
# Characters of an error message sent in grpc-message (up to 12 bytes each once encoded).
MAX_STATUS_MESSAGE = 512

# A compressed message inflates this far on the event loop (about a millisecond); the rest of
# it, INFLATE_STEP at a time, in a thread.
INLINE_INFLATE = 1 << 20
INFLATE_STEP = 4 << 20

SERVICE = "inference.GRPCInferenceService"
ACCEPTED_ENCODINGS = b"identity,deflate,gzip"


class Status(enum.IntEnum):
    """gRPC status codes (grpc/include/grpc/impl/codegen/status.h)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CallError(Exception):
    """Ends a call with this status and message."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


_RESPONSE_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", ACCEPTED_ENCODINGS),
]
_OK_TRAILERS = [(b"grpc-status", b"0")]
STOPPING = "the server is stopping; retry the call"

# What ModelInfer calls with its answer: (the serialized ModelInferResponse, None) or
# (None, error).
InferDone = Callable[[bytes | None, ServingError | None], None]


def _tensor_metadata(specs: list[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


class InferenceService:
    """The service's methods: protobuf in, data plane call, protobuf out."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    def methods(self) -> dict[bytes, tuple[type[Message], Callable]]:
        """`/inference.GRPCInferenceService/<Method>` -> (request message class, method)."""
        table = {
            "ServerLive": (pb.ServerLiveRequest, self.ServerLive),
            "ServerReady": (pb.ServerReadyRequest, self.ServerReady),
            "ModelReady": (pb.ModelReadyRequest, self.ModelReady),
            "ServerMetadata": (pb.ServerMetadataRequest, self.ServerMetadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.ModelMetadata),
            "ModelInfer": (pb.ModelInferRequest, self.ModelInfer),
            "ModelConfig": (pb.ModelConfigRequest, self.ModelConfig),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.ModelStatistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.RepositoryIndex),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.RepositoryModelLoad),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.RepositoryModelUnload),
        }
        return {f"/{SERVICE}/{name}".encode(): entry for name, entry in table.items()}

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        # An unknown model is simply not ready, as in Triton's gRPC server and as
        # tritonclient.http reports it for the REST front end's 404.
        try:
            ready = self.dataplane.model_ready(request.name, request.version or None)
        except ServingError:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        md = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=md["name"], version=md["version"], extensions=md["extensions"]
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        md = self.dataplane.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=md.name,
            versions=md.versions,
            platform=md.platform,
            inputs=_tensor_metadata(md.inputs),
            outputs=_tensor_metadata(md.outputs),
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        model = self.dataplane.model(request.name, request.version or None)
        return json_format.ParseDict({"config": config_document(model)}, pb.ModelConfigResponse())

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest
    ) -> pb.ModelStatisticsResponse:
        entries = self.dataplane.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(statistics_document(entries), pb.ModelStatisticsResponse())

    def ModelInfer(
        self, message: bytes | memoryview, done: InferDone, timeout: float | None = None
    ) -> Job:
        """Queue the inference; `done(serialized response, None)` or `done(None, error)`
        follows on the loop. Unlike the other methods, not a coroutine: a task per call costs
        a small model a tenth of its throughput."""
        try:
            decoded = _decoded(pb.ModelInferRequest, grpc_codec.decode_message, message)
        except InvalidInput as exc:
            name, version = grpc_codec.model_of(message)
            self.dataplane.count_rejected(name, version, exc)
            raise
        del message  # only the decoded tensors (views of the body) wait in the queue

        def answered(response: InferenceResponse | None, error: ServingError | None) -> None:
            if error is not None:
                done(None, error)
                return
            try:
                message = grpc_codec.encode_response(response)
            except Exception as exc:  # a bug, not bad input: answer, keep serving
                log.exception("encoding the response of model %s failed", response.model_name)
                done(None, ServingError(f"internal error: {type(exc).__name__}: {exc}"))
                return
            done(message, None)

        return self.dataplane.submit(decoded, answered, timeout)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        # The agent has one repository, so repository_name selects nothing.
        entries = await self.dataplane.read_repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_request(request, "load")
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_request(request, "unload")
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _check_repository_request(request, action: str) -> None:
    if not request.model_name:
        raise InvalidInput(f"model_name is empty: name the model to {action}")
    check_repository_parameters(action, request.parameters)


# --- the gRPC protocol over HTTP/2 ----------------------------------------------------------


class GrpcProtocol:
    """Turns HTTP/2 requests into unary calls of the service and their results into responses
    (an http2.Handler)."""

    def __init__(self, service: InferenceService, max_message_bytes: int):
        self.methods = service.methods()
        self.max_message_bytes = max_message_bytes
        # The body is a 5-byte prefix and the message; a compressed message may inflate to
        # max_message_bytes, and its compressed form is bounded by the same limit.
        self.max_body = max_message_bytes + 5
        # Bytes being inflated in threads, all connections together, and the most there may
        # be: a few KB of gzip each make 64 MiB, so connections alone bound nothing.
        self.inflating = 0
        self.inflate_budget = 2 * max_message_bytes

    head_bytes = 5

    def body_size(self, head: bytes) -> int:
        return 5 + struct.unpack_from(">I", head, 1)[0]

    def handle(self, connection: http2.Connection, request: http2.Request) -> http2.Call | None:
        headers = request.headers
        if headers.get(b":method") != b"POST":
            connection.respond(request, [(b":status", b"405"), (b"allow", b"POST")], b"", [])
            return None
        content_type = headers.get(b"content-type", b"")
        if content_type != b"application/grpc" and not content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        ):
            connection.respond(request, [(b":status", b"415")], b"", [])
            return None
        try:
            return self._start(connection, request)
        except Exception as exc:
            self._fail_with(connection, request, exc)
            return None

    def _start(self, connection: http2.Connection, request: http2.Request) -> http2.Call:
        path = request.headers.get(b":path", b"")
        entry = self.methods.get(path)
        if entry is None:
            name = path.decode(errors="replace")
            message = f"unknown method {name}: this server has {SERVICE}"
            raise CallError(Status.UNIMPLEMENTED, message)
        timeout = _timeout_s(request.headers.get(b"grpc-timeout"))
        if timeout is not None and timeout <= 0:  # nothing can answer in time, however fast
            raise RequestTimeout("deadline of 0 s exceeded before the call started")
        compressed, payload = self._message(request)
        if not compressed:
            return self._run(connection, request, entry, payload, timeout)
        inflation = _Inflation(request.headers.get(b"grpc-encoding", b"identity"))
        # At most one byte past the limit: enough to tell a bomb from a large message.
        step = min(INLINE_INFLATE, self.max_message_bytes + 1)
        self._inflated(connection, request, inflation, inflation.step(payload, step), step)
        if inflation.done:
            return self._run(connection, request, entry, inflation.message, timeout)
        return asyncio.get_running_loop().create_task(
            self._inflate_rest(connection, request, entry, inflation, timeout)
        )

    def _run(self, connection, request, entry, payload, timeout: float | None) -> http2.Call:
        """Start the call of `entry` (message class, method) on the message `payload`."""
        message_class, method = entry
        if message_class is not pb.ModelInferRequest:
            message = _decoded(message_class, message_class.FromString, payload)
            return asyncio.get_running_loop().create_task(
                self._call(connection, request, method, message, timeout)
            )
        # ModelInfer: the tensors stay where they arrived, and no task is made for the call

        def done(response: bytes | None, error: ServingError | None) -> None:
            if error is None:
                self._ok(connection, request, response)
            else:
                self.fail(connection, request, Status[error.grpc_code], str(error))

        return method(payload, done, timeout)

    async def _inflate_rest(self, connection, request, entry, inflation, timeout) -> None:
        """Inflate the rest of a message in a thread, a step at a time within the server's
        budget, then start its call (which a reset cancels from then on)."""
        reserved = 0
        try:
            while not inflation.done:
                step = min(INFLATE_STEP, self.max_message_bytes + 1 - len(inflation.message))
                if self.inflating + step > self.inflate_budget:
                    raise CallError(
                        Status.RESOURCE_EXHAUSTED,
                        "the server is inflating too many large messages at once; retry the call",
                    )
                self.inflating += step
                reserved += step
                chunk = await asyncio.to_thread(inflation.step, inflation.unread, step)
                self._inflated(connection, request, inflation, chunk, step)
            request.call = self._run(connection, request, entry, inflation.message, timeout)
        except asyncio.CancelledError:
            connection.reset(request)  # as _call: nobody waits for this answer
        except Exception as exc:
            self._fail_with(connection, request, exc)
        finally:
            self.inflating -= reserved

    async def _call(
        self,
        connection: http2.Connection,
        request: http2.Request,
        method: Callable[[Message], Awaitable[Message]],
        message: Message,
        timeout: float | None,
    ) -> None:
        try:
            if timeout is None:
                body = (await method(message)).SerializeToString()
            else:
                body = await self._within(method(message), timeout)
        except asyncio.CancelledError:
            # The client reset the stream or went away, or the server stops: nobody waits for
            # this answer. Ending quietly leaves no exception on the task, whose traceback would
            # hold the call's frames in a reference cycle.
            connection.reset(request)
            return
        except Exception as exc:
            self._fail_with(connection, request, exc)
            return
        self._ok(connection, request, body)

    @staticmethod
    async def _within(call: Awaitable[Message], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                return (await call).SerializeToString()
        except TimeoutError:
            late = time.monotonic() - deadline
            raise RequestTimeout(
                f"deadline of {timeout:g} s exceeded (by {late * 1000:.0f} ms)"
            ) from None

    def _ok(self, connection: http2.Connection, request: http2.Request, body: bytes) -> None:
        connection.respond(
            request, _RESPONSE_HEADERS, struct.pack(">BI", 0, len(body)) + body, _OK_TRAILERS
        )

    def _fail_with(self, connection, request, exc: Exception) -> None:
        if isinstance(exc, CallError):
            self.fail(connection, request, exc.status, str(exc))
        elif isinstance(exc, ServingError):
            self.fail(connection, request, Status[exc.grpc_code], str(exc))
        else:  # a bug, not bad input: log it, answer, keep serving
            path = request.headers.get(b":path", b"?").decode(errors="replace")
            log.error("gRPC %s failed", path, exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
            self.fail(connection, request, Status.INTERNAL, message)

    def _message(self, request: http2.Request) -> tuple[bool, memoryview]:
        """The one length-prefixed message of a unary call, and whether it is compressed."""
        body = request.body
        if len(body) < 5:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"the request body has {len(body)} bytes: a gRPC message needs a 5-byte prefix",
            )
        compressed, length = struct.unpack_from(">BI", body)
        if length != len(body) - 5:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"the message prefix announces {length} bytes but {len(body) - 5} came: "
                "a unary call carries exactly one whole message",
            )
        if compressed > 1:
            raise CallError(Status.INVALID_ARGUMENT, f"invalid compressed flag {compressed}")
        return bool(compressed), memoryview(body)[5:]

    def _inflated(self, connection, request, inflation, chunk: bytes, step: int) -> None:
        """Add an inflated `chunk` (of at most `step` bytes asked for) to the message, counted
        against the connection as its body is; RESOURCE_EXHAUSTED past either limit."""
        if len(inflation.message) + len(chunk) > self.max_message_bytes:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"the message inflates beyond the limit of {self.max_message_bytes} bytes",
            )
        if not connection.hold(request, len(chunk)):
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                "the message inflates beyond what the connection may hold at once "
                "(it holds too many large requests)",
            )
        inflation.message += chunk
        if not inflation.done and len(chunk) < step:  # all its input taken, and no end
            raise CallError(Status.INVALID_ARGUMENT, f"the {inflation.name} message is truncated")

    def too_large(self, connection: http2.Connection, request: http2.Request, limit: int) -> None:
        message = (
            f"the request exceeds the limit of {self.max_message_bytes} bytes per message "
            "(or the connection holds too many large requests at once)"
        )
        self.fail(connection, request, Status.RESOURCE_EXHAUSTED, message)

    def headers_too_large(
        self, connection: http2.Connection, request: http2.Request, size: int
    ) -> None:
        message = (
            f"the request's metadata takes {size} bytes, over the limit of "
            f"{http2.MAX_HEADER_BYTES} (counted as HTTP/2 does: 32 per entry plus names and values)"
        )
        self.fail(connection, request, Status.RESOURCE_EXHAUSTED, message)

    def body_stalled(
        self, connection: http2.Connection, request: http2.Request, seconds: float
    ) -> None:
        message = f"no more of the request came for {seconds:g} s; send the message whole"
        self.fail(connection, request, Status.DEADLINE_EXCEEDED, message)

    def fail(self, connection, request, status: Status, message: str) -> None:
        """A Trailers-Only response: the status in the only HEADERS frame."""
        headers = [
            *_RESPONSE_HEADERS,
            (b"grpc-status", str(int(status)).encode()),
            (b"grpc-message", _percent_encode(message)),
        ]
        connection.respond(request, headers, b"", [])


class _Inflation:
    """A compressed message being inflated: the message so far, and the inflater's state."""

    def __init__(self, encoding: bytes):
        if encoding == b"identity":
            raise CallError(
                Status.INVALID_ARGUMENT,
                "the message is flagged compressed but grpc-encoding is identity",
            )
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            raise CallError(
                Status.UNIMPLEMENTED,
                f"grpc-encoding {encoding.decode(errors='replace')!r} is not supported; "
                f"use one of {ACCEPTED_ENCODINGS.decode()}",
            )
        self.name = encoding.decode()
        self.message = bytearray()
        self._inflater = zlib.decompressobj(wbits)

    @property
    def done(self) -> bool:
        return self._inflater.eof

    @property
    def unread(self) -> bytes:
        """The compressed input a step left for the next."""
        return self._inflater.unconsumed_tail

    def step(self, data: bytes | memoryview, size: int) -> bytes:
        """Up to `size` more bytes of the message, from `data` (the input, then `unread`).
        Touches no shared state: it may run in a thread."""
        try:
            return self._inflater.decompress(data, size)
        except zlib.error as exc:
            message = f"the {self.name} message is corrupt: {exc}"
            raise CallError(Status.INVALID_ARGUMENT, message) from None


def _decoded(message_class: type[Message], parse: Callable, payload):
    """`parse(payload)`, a message that does not parse being the call's INVALID_ARGUMENT."""
    try:
        return parse(payload)
    except DecodeError:
        raise CallError(
            Status.INVALID_ARGUMENT,
            f"the request is not a valid {message_class.DESCRIPTOR.full_name} message",
        ) from None


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def _timeout_s(value: bytes | None) -> float | None:
    """grpc-timeout: up to 8 digits and a unit (H, M, S, m, u, n)."""
    if value is None:
        return None
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit() and unit in _TIMEOUT_UNITS):
        raise CallError(
            Status.INVALID_ARGUMENT,
            f"grpc-timeout {value.decode(errors='replace')!r} is not 1-8 digits and a unit "
            "(H, M, S, m, u, n)",
        )
    return int(digits) * _TIMEOUT_UNITS[unit]


def _percent_encode(message: str) -> bytes:
    """grpc-message: printable ASCII except '%' as is, everything else %XX of its UTF-8; cut
    to MAX_STATUS_MESSAGE characters, as a message may quote what the client sent (a 100 KB
    model name) and gRPC clients drop a response whose metadata passes 8-16 KiB."""
    if len(message) > MAX_STATUS_MESSAGE:
        cut = len(message) - MAX_STATUS_MESSAGE
        message = f"{message[:MAX_STATUS_MESSAGE]}... ({cut} more characters)"
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode()
    )


# --- the server -----------------------------------------------------------------------------


class GrpcServer:
    """A listening socket and its connections."""

    def __init__(self, protocol: GrpcProtocol):
        self._protocol = protocol
        self._connections: set[http2.Connection] = set()
        self._server: asyncio.Server | None = None
        self._read_buffer = http2.ReadBuffer()
        self._sweeper: asyncio.Task | None = None

    async def listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connect, sock=sock)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Once a second: handshakes and request bodies past their time (http2.check_time)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for connection in list(self._connections):
                connection.check_time(now)

    def _connect(self) -> http2.Connection:
        connection = http2.Connection(
            self._protocol, MAX_CONCURRENT_STREAMS, self._connections.discard, self._read_buffer
        )
        self._connections.add(connection)
        return connection

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop listening, let calls in flight finish for up to `grace` s, then close."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.shutdown_notice()
        deadline = time.monotonic() + (grace or 0)
        while any(c.busy for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cut = 0
        for connection in list(self._connections):
            # Calls still unanswered get a status of their own, as REST requests get 503,
            # rather than a connection closed under them.
            for request in connection.unanswered():
                self._protocol.fail(connection, request, Status.UNAVAILABLE, STOPPING)
                if request.call is not None:
                    request.call.cancel()
                cut += 1
            connection.goaway()
        if cut:
            log.warning(
                "stopping: %d gRPC call(s) unanswered after %g s got UNAVAILABLE", cut, grace
            )
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()


async def start_grpc_server(
    dataplane: DataPlane,
    address: str = DEFAULT_ADDRESS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[GrpcServer, int]:
    """Serve the data plane on `address` (port 0: any free port); returns (server, bound port).

    Messages beyond `max_message_bytes` are refused with RESOURCE_EXHAUSTED.
    """
    try:
        sock = bind(address)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise OSError(
            f"cannot serve gRPC on {address}: the address is in use or not a valid HOST:PORT "
            f"({reason})"
        ) from None
    server = GrpcServer(GrpcProtocol(InferenceService(dataplane), max_message_bytes))
    await server.listen(sock)
    port = sock.getsockname()[1]
    log.info("gRPC inference service listening on %s (port %d)", address, port)
    return server, port
