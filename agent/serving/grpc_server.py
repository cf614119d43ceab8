"""KServe v2 gRPC front end (grpc.aio): `inference.GRPCInferenceService` over the data plane.

Each method translates one protobuf request into a data-plane call and the result back; tensor
encoding lives in grpc_codec.py. Data-plane errors become the gRPC status their class names
(NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...); anything unexpected becomes INTERNAL
with a message, and the server keeps serving.

    server, port = await start_grpc_server(dataplane, "127.0.0.1:0")
    ...
    await server.stop(grace=5)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import grpc

from agent.serving import grpc_codec
from agent.serving.dataplane import DataPlane
from agent.serving.errors import InvalidInput, ServingError
from protocol import inference_pb2 as pb
from protocol import inference_pb2_grpc as pb_grpc
from runtimes.base import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Streams one client connection may have open at once; more wait in the client. Together with
# the message size limit this bounds what a single connection can make the server buffer.
MAX_CONCURRENT_STREAMS = 128

_Method = Callable[..., Awaitable]


def _reports_errors(method: _Method) -> _Method:
    """End the call with the error's gRPC status instead of letting an exception escape."""

    @functools.wraps(method)
    async def wrapped(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ServingError as exc:
            code, message = grpc.StatusCode[exc.grpc_code], str(exc)
        except Exception as exc:  # a bug, not bad input: log it, answer, keep serving
            log.exception("gRPC %s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        await context.abort(code, message)

    return wrapped


def _tensor_metadata(specs: list[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer: protobuf in, data plane call, protobuf out."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    @_reports_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @_reports_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @_reports_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        # An unknown model is simply not ready, as in Triton's gRPC server and as
        # tritonclient.http reports it for the REST front end's 404.
        try:
            ready = self.dataplane.model_ready(request.name, request.version or None)
        except ServingError:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @_reports_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        md = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=md["name"], version=md["version"], extensions=md["extensions"]
        )

    @_reports_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        md = self.dataplane.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=md.name,
            versions=md.versions,
            platform=md.platform,
            inputs=_tensor_metadata(md.inputs),
            outputs=_tensor_metadata(md.outputs),
        )

    @_reports_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        try:
            decoded = grpc_codec.decode_request(request)
        except InvalidInput as exc:
            self.dataplane.count_rejected(request.model_name, request.model_version, exc)
            raise
        return grpc_codec.encode_response(await self.dataplane.infer(decoded))

    @_reports_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        # The agent has one repository, so repository_name selects nothing.
        entries = self.dataplane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    @_reports_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_request(request, "load")
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_reports_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_request(request, "unload")
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


# Repository parameters the agent accepts and ignores. tritonclient sends unload_dependents on
# every unload; it concerns ensembles, which the agent does not have.
_IGNORED_PARAMETERS = {"load": frozenset(), "unload": frozenset({"unload_dependents"})}


def _check_repository_request(request, action: str) -> None:
    if not request.model_name:
        raise InvalidInput(f"model_name is empty: name the model to {action}")
    unsupported = sorted(set(request.parameters) - _IGNORED_PARAMETERS[action])
    if unsupported:
        # Triton's config override and in-request model files would bypass the signed,
        # verified repository; models reach a node only through it.
        raise InvalidInput(
            f"{action} parameters ({', '.join(unsupported)}) are not supported; "
            "models are loaded from the model repository as they are"
        )


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        # With SO_REUSEPORT a second agent started on the same port would silently take half
        # the connections instead of failing to start.
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc_server(
    dataplane: DataPlane,
    address: str = DEFAULT_ADDRESS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """Serve the data plane on `address` (port 0: any free port); returns (server, bound port).

    Messages beyond `max_message_bytes` are refused by gRPC itself with RESOURCE_EXHAUSTED.
    """
    server = grpc.aio.server(options=_options(max_message_bytes))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(dataplane), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's own message only points at GRPC_VERBOSITY
        raise OSError(
            f"cannot serve gRPC on {address}: the address is in use or not a valid HOST:PORT"
        ) from None
    await server.start()
    log.info("gRPC inference service listening on %s (port %d)", address, port)
    return server, port
