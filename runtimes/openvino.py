"""OpenVINO adapter: OpenVINO IR (.xml with its .bin), ONNX and TFLite files on any OpenVINO device.

The model is compiled once for `LoadOptions.device` (CPU, GPU, NPU, AUTO, HETERO:GPU,CPU, ...).
An InferRequest holds its inputs and outputs between `set_input_tensor` and `get_output_tensor`,
so each thread calling `infer` gets its own, made from the (thread-safe) compiled model on the
thread's first call. `execution_devices` tells where the compiled model really runs (AUTO may
pick any of its targets).

On CPUs with bf16 support the CPU plugin computes in bf16 by default, which moves outputs by about
1e-3; the adapter asks for f32 unless `LoadOptions.extra` sets INFERENCE_PRECISION_HINT itself.
Every other key of `extra` is passed to `compile_model` as an OpenVINO property.

The CPU plugin computes INT64 and UINT64 in 32 bits (and FP64 in FP32) while the model's metadata
still says 64: `infer` refuses 64-bit integer inputs outside the 32-bit range rather than answer
with wrapped values (results a model computes from in-range inputs can still wrap).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.base import (
    InputRejected,
    LoadOptions,
    ModelLoadError,
    RuntimeUnavailable,
    TensorSpec,
)

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - depends on the node's packages
    raise RuntimeUnavailable("openvino is not installed (pip install openvino)") from exc

# OpenVINO element type names -> KServe datatypes (bf16, u4, string... have no KServe peer here).
_OV_TYPES = {
    "boolean": "BOOL",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
}

# Devices that dispatch to others ("AUTO:GPU,CPU"); they forward hints to their targets.
_VIRTUAL_DEVICES = frozenset({"AUTO", "MULTI", "HETERO", "BATCH"})

# Properties the adapter sets unless `LoadOptions.extra` says otherwise.
_DEFAULT_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32"}


@functools.cache
def _core() -> ov.Core:
    """One Core per process: it holds the loaded device plugins."""
    return ov.Core()


# 64-bit integer types the plugins compute in 32 bits, and the range that survives it.
_NARROWED_INTEGERS = frozenset({np.dtype(np.int64), np.dtype(np.uint64)})
_INT32 = np.iinfo(np.int32)


def _name(port) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:  # a tensor without names: fall back to its node's name
        return port.get_node().get_friendly_name()


def _output_names(core: ov.Core, path: Path, compiled: ov.CompiledModel) -> list[str]:
    """The outputs' names as the model file gives them.

    Compiling folds an Identity into the op before it, whose tensor then carries both names
    ("hidden" and "y" for `Relu -> hidden -> Identity -> y`), and `get_any_name()` picks the
    first in sort order, not the graph's output. The model as read, before compile-time
    transformations, names only the file's outputs, in the same order: ONNX Runtime and LiteRT
    report those, so clients see the same names whichever runtime serves the file. Reading the
    file again costs a load's time and memory, so only when some output has several names.
    """
    ports = compiled.outputs
    if all(len(port.get_names()) <= 1 for port in ports):
        return [_name(port) for port in ports]
    read = core.read_model(str(path)).outputs
    return [
        _name(as_read) if as_read.get_names() & port.get_names() else _name(port)
        for port, as_read in zip(ports, read, strict=True)
    ]


def _spec(port, name: str) -> TensorSpec:
    type_name = port.get_element_type().get_type_name()
    datatype = _OV_TYPES.get(type_name)
    if datatype is None:
        raise ModelLoadError(f"tensor {name!r} has unsupported element type {type_name}")
    partial_shape = port.get_partial_shape()
    if partial_shape.rank.is_dynamic:
        raise ModelLoadError(
            f"tensor {name!r} has a dynamic rank; reshape the model to a fixed rank "
            "(dynamic dimensions are fine)"
        )
    shape = tuple(dim.get_length() if dim.is_static else -1 for dim in partial_shape)
    return TensorSpec(name, datatype, shape)


def _reason(exc: Exception) -> str:
    """OpenVINO's message without its C++ source locations ("Exception from src/...")."""
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and not line.startswith(("Exception from ", "Check '"))
    ]
    return " ".join(lines) or type(exc).__name__


def _check_files(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path.name} is empty")
    if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
        raise ModelLoadError(
            f"{path.name}: OpenVINO IR needs its weights in {path.with_suffix('.bin').name} "
            "next to it"
        )


def _check_device(core: ov.Core, device: str) -> None:
    """Refuse a device this node lacks before OpenVINO fails with a plugin-loading error."""
    available = core.available_devices
    virtual, _, targets = device.partition(":")
    if virtual in _VIRTUAL_DEVICES:
        # "AUTO:GPU,CPU", "BATCH:GPU(4)"; "AUTO:-GPU" excludes a device rather than naming one.
        wanted = [t.split("(")[0] for t in targets.split(",") if t and not t.startswith("-")]
    else:
        wanted = [device]
    for name in wanted:
        if name not in available and name not in {a.split(".")[0] for a in available}:
            raise ModelLoadError(
                f"OpenVINO has no device {name!r} on this node; available: "
                f"{', '.join(available) or 'none'}"
            )


def _properties(core: ov.Core, device: str, options: LoadOptions) -> dict[str, Any]:
    """compile_model properties: the adapter's defaults, then threads, then `extra` verbatim."""
    supported = _supported_properties(core, device)
    properties = {k: v for k, v in _DEFAULT_PROPERTIES.items() if k in supported}
    if options.threads and "INFERENCE_NUM_THREADS" in supported:
        properties["INFERENCE_NUM_THREADS"] = int(options.threads)
    properties.update({str(k): v for k, v in options.extra.items()})
    return properties


def _supported_properties(core: ov.Core, device: str) -> set[str]:
    if device.partition(":")[0] in _VIRTUAL_DEVICES:
        # Virtual devices pass unknown properties on to the device they pick.
        return set(_DEFAULT_PROPERTIES) | {"INFERENCE_NUM_THREADS"}
    try:
        return set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    except RuntimeError:
        return set()


class OpenVinoSession:
    runtime = "openvino"

    def __init__(self, path: Path, options: LoadOptions):
        device = options.device.upper()
        _check_files(path)
        core = _core()
        _check_device(core, device)
        properties = _properties(core, device, options)
        try:
            self._compiled = core.compile_model(str(path), device, properties)
        except Exception as exc:  # OpenVINO raises RuntimeError for every failure
            raise ModelLoadError(
                f"OpenVINO could not compile {path.name} for {device}: {_reason(exc)}"
            ) from exc
        self.device = device
        self.execution_devices: list[str] = list(self._compiled.get_property("EXECUTION_DEVICES"))
        self.properties = properties
        self.inputs = [_spec(port, _name(port)) for port in self._compiled.inputs]
        names = _output_names(core, path, self._compiled)
        self.outputs = [_spec(p, n) for p, n in zip(self._compiled.outputs, names, strict=True)]
        self._input_dtypes = [port.get_element_type().to_dtype() for port in self._compiled.inputs]
        self._narrowed = {i for i, d in enumerate(self._input_dtypes) if d in _NARROWED_INTEGERS}
        self._local = threading.local()  # .request: this thread's InferRequest

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.inputs) or any(s.name not in inputs for s in self.inputs):
            # An input left unset would silently reuse the previous request's tensor.
            raise ValueError(
                f"expected inputs {sorted(s.name for s in self.inputs)}, got {sorted(inputs)}"
            )
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        for index, spec in enumerate(self.inputs):
            array = np.asarray(inputs[spec.name], dtype=self._input_dtypes[index])
            if not array.flags.c_contiguous:  # not np.ascontiguousarray: it makes 0-d arrays 1-d
                array = np.ascontiguousarray(array)
            if index in self._narrowed:
                self._check_narrowed(spec, array)
            # Sharing memory is safe since infer() is synchronous and the next call replaces
            # the tensor; OpenVINO refuses to share a read-only array (np.frombuffer), so copy it.
            tensor = ov.Tensor(array, shared_memory=array.flags.writeable)
            request.set_input_tensor(index, tensor)
        request.infer()
        # OpenVINO reuses output tensors across calls, so hand out copies.
        return {
            spec.name: request.get_output_tensor(index).data.copy()
            for index, spec in enumerate(self.outputs)
        }

    def _check_narrowed(self, spec: TensorSpec, array: np.ndarray) -> None:
        if array.size == 0:
            return
        low, high = array.min(), array.max()
        if low < _INT32.min or high > _INT32.max:
            value = high if high > _INT32.max else low
            raise InputRejected(
                f"input {spec.name!r} holds {value}: OpenVINO computes {spec.datatype} in 32 "
                f"bits on {self.device} (values {_INT32.min}..{_INT32.max}); serve this model "
                "with onnxruntime for larger values"
            )

    def close(self) -> None:
        self._local = threading.local()  # drops this session's requests held by any thread
        self._compiled = None


def open_session(path: Path, options: LoadOptions) -> OpenVinoSession:
    return OpenVinoSession(path, options)
