"""Pick the adapter for a model file and load it, importing the runtime only when needed."""

from __future__ import annotations

import importlib
from pathlib import Path

from runtimes.base import LoadOptions, Session, UnsupportedModel

# runtime name -> module implementing `open_session(path, options) -> Session`
RUNTIMES: dict[str, str] = {
    "onnxruntime": "runtimes.onnx",
    "openvino": "runtimes.openvino",
    "litert": "runtimes.litert",
}

# which runtimes can read which model file suffix, default first
_READERS: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnxruntime", "openvino"),
    ".xml": ("openvino",),
    ".tflite": ("litert", "openvino"),
}

MODEL_SUFFIXES: tuple[str, ...] = tuple(_READERS)


def runtimes_for(path: str | Path) -> tuple[str, ...]:
    """Runtimes able to read this file, the default first."""
    return _READERS.get(Path(path).suffix.lower(), ())


def default_runtime_for(path: str | Path) -> str:
    readers = runtimes_for(path)
    if not readers:
        raise UnsupportedModel(
            f"{Path(path).name}: unknown model format; expected one of {', '.join(MODEL_SUFFIXES)}"
        )
    return readers[0]


def load(
    path: str | Path, *, runtime: str | None = None, options: LoadOptions | None = None
) -> Session:
    """Load `path` with `runtime` (default: the format's usual runtime) and return a Session."""
    path = Path(path)
    runtime = runtime or default_runtime_for(path)
    if runtime not in RUNTIMES:
        raise UnsupportedModel(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if runtime not in runtimes_for(path):
        raise UnsupportedModel(f"runtime {runtime} cannot read {path.suffix} files")
    module = importlib.import_module(RUNTIMES[runtime])
    return module.open_session(path, options or LoadOptions())
