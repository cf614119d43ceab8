"""The errors the data plane raises; each front end maps them to its status codes."""

from __future__ import annotations


class ServingError(Exception):
    """Base class. `http_status` and `grpc_code` (a grpc.StatusCode name) say how to report it."""

    http_status = 500
    grpc_code = "INTERNAL"


class InvalidInput(ServingError):
    """The request is malformed or does not match the model's metadata."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(ServingError):
    """The model exists in the repository but is not loaded (unloaded, loading, failed)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ModelLoadFailed(ServingError):
    """A load request found the model's files or config unusable (the reason says which)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class QueueFull(ServingError):
    """Backpressure: the model's queue is at its bound. Clients should retry later."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class RequestTimeout(ServingError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class InferenceFailed(ServingError):
    """The runtime raised while running a (validated) request."""

    http_status = 500
    grpc_code = "INTERNAL"
