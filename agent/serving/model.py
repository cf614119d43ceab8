"""A loaded model version: its metadata, request validation and scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.serving.classification import class_count, read_labels
from agent.serving.config import ModelConfig, ModelConfigError
from agent.serving.errors import InvalidInput
from agent.serving.metrics import ModelMetrics
from agent.serving.repository import ModelVersionSource
from agent.serving.scheduler import Scheduler
from agent.serving.tensors import InferenceRequest
from runtimes.base import Session, TensorSpec

# Beyond these a request is refused before any allocation happens.
MAX_DIMS = 16
MAX_ELEMENTS = 1 << 30


class ModelIncompatible(ValueError):
    """The model cannot be served with its config (e.g. batching without a batch dimension)."""


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ServedModel:
    def __init__(
        self,
        source: ModelVersionSource,
        session: Session,
        scheduler: Scheduler,
        metrics: ModelMetrics,
        model_file: Path,
        labels: dict[str, tuple[str, ...]] | None = None,
    ):
        self.name = source.name
        self.version = source.version
        self.source = source
        self.config: ModelConfig = source.config
        self.session = session
        self.scheduler = scheduler
        self.metrics = metrics
        self.inputs = {s.name: s for s in session.inputs}
        self.outputs = {s.name: s for s in session.outputs}
        self.model_file = model_file  # the variant actually loaded
        self.labels = labels or {}  # output name -> class labels (classification extension)
        self.platform = f"{session.runtime}_{model_file.suffix.lstrip('.')}"
        self._text_inputs = getattr(session, "text_inputs", frozenset())

    @staticmethod
    def check_compatible(session: Session, config: ModelConfig) -> None:
        inputs = {spec.name: spec for spec in session.inputs}
        for name in config.input_formats or {}:
            spec = inputs.get(name)
            if spec is None:
                raise ModelIncompatible(
                    f"model.toml gives a format for {name!r}, which is not an input of the "
                    f"model; its inputs are {', '.join(sorted(inputs))}"
                )
            image_dims = len(spec.shape) - (1 if config.max_batch_size > 0 else 0)
            if image_dims != 3:
                raise ModelIncompatible(
                    f"input_formats.{name}: an image layout needs 3 dimensions besides the "
                    f"batch, but {name} has shape {list(spec.shape)}"
                )
        if config.max_batch_size > 0:
            for spec in [*session.inputs, *session.outputs]:
                if not spec.shape or spec.shape[0] != -1:
                    raise ModelIncompatible(
                        f"max_batch_size > 0 needs a dynamic first (batch) dimension, but "
                        f"{spec.name} has shape {list(spec.shape)}"
                    )

    @staticmethod
    def load_labels(
        directory: Path, config: ModelConfig, session: Session
    ) -> dict[str, tuple[str, ...]]:
        """The class labels model.toml names, for outputs the model has; ModelIncompatible
        naming the output or the file otherwise."""
        files = config.labels or {}
        outputs = {spec.name for spec in session.outputs}
        unknown = [name for name in files if name not in outputs]
        if unknown:
            raise ModelIncompatible(
                f"model.toml has labels for {', '.join(map(repr, unknown))}, which the model "
                f"does not output; its outputs are {', '.join(sorted(outputs))}"
            )
        try:
            return read_labels(directory, files)
        except ModelConfigError as exc:
            raise ModelIncompatible(str(exc)) from None

    def validate(self, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
        """Check the request's inputs against the model; returns (inputs, batch rows)."""
        inputs: dict[str, np.ndarray] = {}
        rows = None
        for tensor in request.inputs:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                raise InvalidInput(
                    f"unexpected input {tensor.name!r} for model {self.name}; "
                    f"expected {', '.join(self.inputs)}"
                )
            if tensor.name in inputs:
                raise InvalidInput(f"input {tensor.name!r} given more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, "
                    f"model expects {spec.datatype}"
                )
            if not _shape_matches(tensor.shape, spec.shape):
                raise InvalidInput(
                    f"input {tensor.name!r} has shape {list(tensor.shape)}, "
                    f"model expects {list(spec.shape)} (-1: any size)"
                )
            if tensor.name in self._text_inputs:
                _check_text(tensor.name, tensor.data, self.session.runtime)
            if self.config.max_batch_size:
                n = tensor.shape[0]
                if rows is not None and n != rows:
                    raise InvalidInput("inputs disagree on the batch size (first dimension)")
                rows = n
            inputs[tensor.name] = tensor.data
        if len(inputs) != len(self.inputs):  # each one known and given once: some are missing
            missing = [n for n in self.inputs if n not in inputs]
            raise InvalidInput(f"missing input(s) {', '.join(missing)} for model {self.name}")
        if len(inputs) > 1:  # in the model's order, which the scheduler's batch key relies on
            inputs = {name: inputs[name] for name in self.inputs}
        if self.config.max_batch_size:
            if not 1 <= rows <= self.config.max_batch_size:
                raise InvalidInput(
                    f"batch size {rows} outside 1..{self.config.max_batch_size} "
                    f"(max_batch_size of model {self.name})"
                )
        else:
            rows = 1
        if request.outputs is not None:
            if len(request.outputs) > 1:
                _check_unique(request.outputs)
            for out in request.outputs:
                if out.name not in self.outputs:
                    raise InvalidInput(
                        f"unknown output {out.name!r} for model {self.name}; "
                        f"outputs are {', '.join(self.outputs)}"
                    )
                params = out.parameters
                if params:
                    self._check_output_parameters(out.name, params)
        return inputs, rows

    def _check_output_parameters(self, name: str, params: dict) -> None:
        if "shared_memory_region" in params:
            raise InvalidInput(
                f"output {name!r} asks for shared memory, an extension this server does not "
                "have (see GET /v2 for its extensions)"
            )
        if "classification" in params:
            try:
                class_count(name, params["classification"])
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            if self.outputs[name].datatype == "BYTES":
                raise InvalidInput(f"output {name!r} is BYTES: it has no values to classify by")


def _check_unique(outputs: list) -> None:
    seen = set()
    for out in outputs:
        if out.name in seen:
            raise InvalidInput(f"output {out.name!r} asked for more than once")
        seen.add(out.name)


def _check_text(name: str, data: np.ndarray, runtime: str) -> None:
    for i, item in enumerate(data.flat):
        try:
            item.decode()
        except UnicodeDecodeError:
            raise InvalidInput(
                f"input {name!r}: element {i} is not UTF-8 text, which {runtime} string "
                "tensors require"
            ) from None


def _shape_matches(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if len(shape) != len(expected):
        return False
    # a loop, not all() over a generator: this runs per request
    for s, e in zip(shape, expected):  # noqa: B905, SIM110 (lengths checked above)
        if s != e and e != -1:
            return False
    return True


def check_shape(name: str, shape: list) -> tuple[int, ...]:
    """Validate a client-supplied shape before anything is allocated for it.

    On every request, so written for speed: `type(d) is int` refuses bools (and floats) the
    way isinstance could not alone, and the element count is multiplied out in the same loop.
    """
    if type(shape) not in _SEQUENCE_TYPES or len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_DIMS} integers")
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise InvalidInput(f"input {name!r}: shape {shape} has a non-integer or negative dim")
        count *= d
    if count > MAX_ELEMENTS or (count == 0 and _non_zero_count(shape) > MAX_ELEMENTS):
        # (an empty tensor's other dimensions are bounded too: numpy cannot shape [0, 2**62])
        raise InvalidInput(f"input {name!r}: shape {shape} is larger than {MAX_ELEMENTS} elements")
    return tuple(shape)


def _non_zero_count(shape: list) -> int:
    count = 1
    for d in shape:
        count *= d or 1
    return count


_SEQUENCE_TYPES = frozenset({list, tuple})
