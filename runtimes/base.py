"""The interface every runtime adapter implements, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class RuntimeAdapterError(Exception):
    """Base of the errors a runtime adapter raises."""


class RuntimeUnavailable(RuntimeAdapterError):
    """The runtime's Python package is not installed on this node."""


class UnsupportedModel(RuntimeAdapterError):
    """No adapter can load this file, or the chosen one cannot."""


class ModelLoadError(RuntimeAdapterError):
    """The runtime failed to load or compile the model."""


class InputRejected(RuntimeAdapterError, ValueError):
    """`infer` refuses these input values: the runtime would compute them wrongly (the caller's
    input, not a failure of the model: the server answers it as bad input)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: KServe datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Runtime knobs that the model config, a firmware profile or accelerator selection may set."""

    device: str = "CPU"
    threads: int | None = None  # intra-op threads; None lets the runtime decide
    extra: dict[str, Any] = field(default_factory=dict)  # runtime-specific (e.g. OpenVINO hints)
    # Keep the runtime's threads spinning once a run ends (ONNX Runtime's own default): a
    # request close behind the last one may start a little sooner, for a core kept busy.
    idle_spin: bool = False


class Session(Protocol):
    """A loaded model, ready to run.

    `infer` may be called from several threads at once (model.toml's `instances` runs that many
    workers on one session), and each caller gets the answer to its own inputs: an adapter whose
    runtime keeps per-run state (OpenVINO's infer request, LiteRT's interpreter) keeps it per
    thread or runs one call at a time. The arrays it returns are the caller's; a later call does
    not overwrite them. `close` is called once no `infer` runs any more.
    """

    runtime: str
    device: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    # BYTES inputs the runtime accepts as UTF-8 text only (optional; empty if absent).
    text_inputs: frozenset[str]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
