"""ONNX Runtime adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import LoadOptions, ModelLoadError, RuntimeUnavailable, TensorSpec

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the node's packages
    raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc

# ONNX Runtime reports element types as strings like "tensor(float)".
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# device name -> execution providers. No CPU EP behind an accelerator: the session is created
# with CPU fallback disabled, so a model the accelerator cannot run whole fails to load (and
# selection records why) instead of quietly running part of the graph on the CPU.
_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "CUDA": ["CUDAExecutionProvider"],
    "TENSORRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "OPENVINO": ["OpenVINOExecutionProvider"],
}


def _spec(arg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, options: LoadOptions):
        device = options.device.upper()
        providers = _PROVIDERS.get(device)
        if providers is None:
            raise ModelLoadError(f"onnxruntime has no device {options.device!r}")
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise ModelLoadError(f"onnxruntime on this node lacks {', '.join(missing)}")
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        # The arena keeps activation buffers for the session's life; without it, runs can map
        # and fault them in afresh (589 page faults per run of the sample CNN when glibc's mmap
        # threshold is low): worth its few MiB. extra={"memory_arena": False} opts out.
        so.enable_cpu_mem_arena = bool(options.extra.get("memory_arena", True))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device != "CPU":
            # A silent fallback to CPU would hide that the accelerator is not used.
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # ONNX Runtime's intra-op threads spin between a run's operators (worth it: a sleeping
        # thread takes tens of µs to wake) and by default go on spinning after the run ends:
        # ~40 ms of a core burned after every request of the sample CNN, 5x the work itself
        # at 10 requests/s, taken from the node's other apps and models. They stop at the end
        # of each run unless options.idle_spin (model.toml `idle_spin = true`) asks for that.
        config = {
            "session.force_spinning_stop": "0" if options.idle_spin else "1",
            **options.extra.get("session_config", {}),
        }
        for key, value in config.items():
            so.add_session_config_entry(str(key), str(value))
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=so, providers=_with_options(providers, options)
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime could not load {path.name}: {exc}") from exc
        self.device = device
        self.providers = self._session.get_providers()
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        # ONNX Runtime's string tensors take UTF-8 text only; the data plane checks these.
        self.text_inputs = frozenset(i.name for i in self.inputs if i.datatype == "BYTES")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_inputs:
            inputs = {**inputs, **{n: _as_text(inputs[n]) for n in self.text_inputs}}
        results = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None


def _with_options(providers: list[str], options: LoadOptions) -> list:
    """CUDA computes FP32 convolutions and matmuls in TF32 unless told not to: results then
    differ from the CPU by ~1e-3. Strict FP32 by default; `extra={"tf32": True}` opts in, as
    a precision choice that selection's tolerance check decides on (like OpenVINO's bf16)."""
    tf32 = "1" if options.extra.get("tf32") else "0"
    return [
        (p, {"use_tf32": tf32})
        if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        else p
        for p in providers
    ]


def _as_text(array: np.ndarray) -> np.ndarray:
    """ONNX Runtime takes string tensors as str; given bytes it would store their repr."""
    flat = [v.decode() if isinstance(v, bytes) else v for v in array.flat]
    return np.array(flat, dtype=object).reshape(array.shape)


def open_session(path: Path, options: LoadOptions) -> OnnxSession:
    return OnnxSession(path, options)
