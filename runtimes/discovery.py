"""Which (runtime, device) pairs this node can really run models on.

`discover()` asks each installed runtime itself: ONNX Runtime for its execution providers,
OpenVINO for `available_devices`, LiteRT for its CPU interpreter. A runtime whose package is
missing is simply absent from the list. Unlike serving, discovery imports every runtime it finds;
it is an explicit command, run at start-up or by accelerator selection, not on a request path.

    from runtimes.discovery import discover
    for found in discover():
        print(found.runtime, found.device, found.details)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtimes.base import RuntimeUnavailable

log = logging.getLogger(__name__)

# ONNX Runtime execution provider -> the device name `runtimes.onnx` accepts in LoadOptions.
_ORT_DEVICES = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TENSORRT",
    "OpenVINOExecutionProvider": "OPENVINO",
    "ROCMExecutionProvider": "ROCM",
    "MIGraphXExecutionProvider": "MIGRAPHX",
    "DmlExecutionProvider": "DML",
    "CoreMLExecutionProvider": "COREML",
    "QNNExecutionProvider": "QNN",
    "NnapiExecutionProvider": "NNAPI",
    "XnnpackExecutionProvider": "XNNPACK",
    "VitisAIExecutionProvider": "VITISAI",
    "WebGpuExecutionProvider": "WEBGPU",
}
# Providers that are not a local device (Azure sends requests to a cloud endpoint).
_ORT_SKIPPED = frozenset({"AzureExecutionProvider"})


@dataclass(frozen=True)
class RuntimeDevice:
    """A device one runtime can run on. Identity is (runtime, device); details only describe."""

    runtime: str
    device: str
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def discover() -> list[RuntimeDevice]:
    """Every (runtime, device) pair usable on this node, runtime by runtime."""
    found: list[RuntimeDevice] = []
    for runtime, probe in _PROBES.items():
        try:
            found.extend(probe())
        except (ImportError, RuntimeUnavailable):
            continue  # not installed on this node
        except Exception as exc:  # a broken install must not hide the other runtimes
            log.warning("discovery of %s failed: %s", runtime, exc)
    return found


def _onnxruntime() -> list[RuntimeDevice]:
    import onnxruntime as ort

    hardware = _ort_hardware(ort)
    found = []
    for provider in ort.get_available_providers():
        if provider in _ORT_SKIPPED:
            continue
        device = _ORT_DEVICES.get(provider) or provider.removesuffix("ExecutionProvider").upper()
        details = {"provider": provider, "version": ort.__version__}
        if provider in hardware:
            details["hardware"] = hardware[provider]
        found.append(RuntimeDevice("onnxruntime", device, details))
    return found


def _ort_hardware(ort) -> dict[str, list[dict[str, Any]]]:
    """The hardware behind each provider, where this onnxruntime can tell (1.22+)."""
    if not hasattr(ort, "get_ep_devices"):
        return {}
    hardware: dict[str, list[dict[str, Any]]] = {}
    for ep_device in ort.get_ep_devices():
        device = ep_device.device
        hardware.setdefault(ep_device.ep_name, []).append(
            {
                "type": getattr(device.type, "name", str(device.type)),
                "vendor": device.vendor,
                "vendor_id": device.vendor_id,
                "device_id": device.device_id,
            }
        )
    return hardware


def _openvino() -> list[RuntimeDevice]:
    import openvino as ov

    core = ov.Core()
    found = []
    for device in core.available_devices:
        details: dict[str, Any] = {"version": ov.get_version()}
        for name in ("FULL_DEVICE_NAME", "DEVICE_TYPE", "OPTIMIZATION_CAPABILITIES"):
            try:
                value = core.get_property(device, name)
            except RuntimeError:
                continue  # not every plugin reports every property
            details[name] = _plain(value)
        found.append(RuntimeDevice("openvino", device, details))
    return found


def _litert() -> list[RuntimeDevice]:
    # The adapter module picks ai_edge_litert or tflite_runtime, so ask it which one it found.
    litert = importlib.import_module("runtimes.litert")
    details = {"package": litert.PACKAGE, "version": _package_version(litert.PACKAGE)}
    found = [RuntimeDevice("litert", device, dict(details)) for device in litert.DEVICES]
    for device, library in litert.delegates().items():
        found.append(RuntimeDevice("litert", device, {**details, "delegate": str(library)}))
    return found


def _plain(value: Any) -> Any:
    """A property value as JSON-friendly data (OpenVINO returns enums for some)."""
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return getattr(value, "name", str(value))


def _package_version(module_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    distribution = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
    try:
        return version(distribution.get(module_name, module_name))
    except PackageNotFoundError:
        return None


_PROBES: dict[str, Callable[[], list[RuntimeDevice]]] = {
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
    "litert": _litert,
}
