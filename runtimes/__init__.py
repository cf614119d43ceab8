"""Inference runtimes behind one interface.

Each adapter (ONNX Runtime, OpenVINO, LiteRT) turns a model file into a `Session` that exposes its
input/output metadata in KServe v2 terms and runs `infer(dict[str, ndarray]) -> dict[str, ndarray]`.
Runtimes are imported lazily: an agent serving only ONNX never imports OpenVINO.

    from runtimes import load
    session = load("models/mlp/1/model.onnx")
    outputs = session.infer({"input": x})
"""

from runtimes.base import (
    ModelLoadError,
    RuntimeUnavailable,
    Session,
    TensorSpec,
    UnsupportedModel,
)
from runtimes.loader import RUNTIMES, default_runtime_for, load

__all__ = [
    "RUNTIMES",
    "ModelLoadError",
    "RuntimeUnavailable",
    "Session",
    "TensorSpec",
    "UnsupportedModel",
    "default_runtime_for",
    "load",
]
