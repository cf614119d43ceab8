"""LiteRT (TensorFlow Lite) adapter for .tflite models: the CPU through XNNPACK, and accelerators
through delegate libraries found on the node (Coral Edge TPU, the TFLite GPU delegate, NPU
delegates such as VeriSilicon VX or Arm Ethos-U).

The interpreter comes from `ai_edge_litert` (current, numpy 2) or, on older nodes still on
numpy 1, from `tflite_runtime`. A dimension that is -1 in a tensor's shape signature is dynamic:
when a request's input shape differs from the interpreter's current one, the input is resized and
the tensors reallocated, so one session serves every batch size the model allows.

An interpreter holds its input and output tensors between `set_tensor` and `get_tensor`, so a
session runs one `infer` at a time (a lock) rather than keep an interpreter per calling thread:
each interpreter holds its own tensor arena and XNNPACK's repacked copy of the weights, and a
delegate its own device context, which an edge device's memory pays for per `instances`. The
`threads` option parallelises within one call.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from runtimes.base import LoadOptions, ModelLoadError, RuntimeUnavailable, TensorSpec
from runtimes.datatypes import from_numpy
from runtimes.delegates import (
    _SYSTEM_LIBRARY_DIRS,
    DELEGATE_LIBRARIES,
    DELEGATE_PATH_ENV,
    delegates,
)

try:
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    PACKAGE = "ai_edge_litert"
except ImportError:
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate

        PACKAGE = "tflite_runtime"
    except ImportError as exc:  # pragma: no cover - depends on the node's packages
        raise RuntimeUnavailable(
            "LiteRT is not installed (pip install ai-edge-litert; tflite-runtime on numpy 1 nodes)"
        ) from exc

DEVICES = ("CPU",)  # always there; delegate devices are found at run time (delegates())


def devices() -> tuple[str, ...]:
    return (*DEVICES, *delegates())


def _spec(detail: dict) -> TensorSpec:
    name = detail["name"]
    try:
        datatype = from_numpy(np.dtype(detail["dtype"]))
    except (TypeError, ValueError):
        raise ModelLoadError(f"tensor {name!r} has unsupported type {detail['dtype']}") from None
    signature = detail.get("shape_signature")
    if signature is None or len(signature) == 0:
        signature = detail["shape"]
    return TensorSpec(name, datatype, tuple(int(d) for d in signature))


class LiteRtSession:
    runtime = "litert"

    def __init__(self, path: Path, options: LoadOptions):
        device = options.device.upper()
        delegate = None if device == "CPU" else _delegate_for(device)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path.name} is empty")
        try:
            self._interpreter = Interpreter(
                model_path=str(path),
                num_threads=options.threads,
                experimental_delegates=[delegate] if delegate is not None else None,
            )
            self._interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError
            raise ModelLoadError(f"LiteRT could not load {path.name}: {exc}") from exc
        self.device = device
        input_details = self._interpreter.get_input_details()
        output_details = self._interpreter.get_output_details()
        self.inputs = [_spec(d) for d in input_details]
        self.outputs = [_spec(d) for d in output_details]
        self._input_indices = [d["index"] for d in input_details]
        self._input_dtypes = [_array_dtype(d) for d in input_details]
        self._output_indices = [d["index"] for d in output_details]
        # get_tensor gives a numpy scalar, not a 0-d array, for these.
        self._scalar_outputs = [s.name for s in self.outputs if s.shape == ()]
        # Current shape of each input, to notice when a request needs a resize.
        self._input_shapes = [tuple(int(x) for x in d["shape"]) for d in input_details]
        self._lock = threading.Lock()  # one infer at a time: see the module docstring

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.inputs) or any(s.name not in inputs for s in self.inputs):
            raise ValueError(
                f"expected inputs {sorted(s.name for s in self.inputs)}, got {sorted(inputs)}"
            )
        interpreter = self._interpreter
        arrays = [
            np.asarray(inputs[spec.name], dtype=dtype)
            for spec, dtype in zip(self.inputs, self._input_dtypes, strict=True)
        ]
        with self._lock:
            self._resize_if_needed(arrays)
            for index, array in zip(self._input_indices, arrays, strict=True):
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            # get_tensor returns a copy, so later calls cannot overwrite what we hand out.
            outputs = {
                spec.name: interpreter.get_tensor(index)
                for spec, index in zip(self.outputs, self._output_indices, strict=True)
            }
        for name in self._scalar_outputs:
            outputs[name] = np.asarray(outputs[name])
        return outputs

    def _resize_if_needed(self, arrays: list[np.ndarray]) -> None:
        changed = [i for i, a in enumerate(arrays) if a.shape != self._input_shapes[i]]
        if not changed:
            return
        for position in changed:  # check them all first: a failed resize leaves no half state
            spec, shape = self.inputs[position], arrays[position].shape
            if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
            ):
                raise ValueError(
                    f"input {spec.name!r} has shape {list(shape)}; "
                    f"the model accepts {list(spec.shape)}"
                )
        for position in changed:
            shape = arrays[position].shape
            # Checked above against the shape signature read at load time. Not strict=True:
            # set_tensor on a string tensor overwrites its signature with the shape it was given,
            # and the strict resize would then refuse every other batch size.
            self._interpreter.resize_tensor_input(
                self._input_indices[position], list(shape), strict=False
            )
            self._input_shapes[position] = shape
        self._interpreter.allocate_tensors()

    def close(self) -> None:
        self._interpreter = None


def _array_dtype(detail: dict) -> np.dtype:
    """The numpy dtype to hand the interpreter an input in. String tensors take object arrays of
    bytes: a fixed-width bytes array (np.bytes_) would drop each value's trailing NUL bytes."""
    dtype = np.dtype(detail["dtype"])
    return np.dtype(object) if dtype.kind in "SO" else dtype


def _delegate_for(device: str):
    library = delegates().get(device)
    if library is None:
        names = ", ".join(DELEGATE_LIBRARIES.get(device, ())) or "none known"
        raise ModelLoadError(
            f"LiteRT has no {device} device on this node: no delegate library found ({names}; "
            f"searched ${DELEGATE_PATH_ENV} and {', '.join(_SYSTEM_LIBRARY_DIRS)})"
        )
    try:
        return load_delegate(str(library))
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(
            f"LiteRT could not load the {device} delegate {library}: {exc}"
        ) from exc


def open_session(path: Path, options: LoadOptions) -> LiteRtSession:
    return LiteRtSession(path, options)
