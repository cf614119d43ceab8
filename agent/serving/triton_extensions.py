"""Triton's model_configuration and statistics extensions: a served model's config and its
counters, as a Triton client reads them.

Clients built for Triton ask a server for these before they infer: tritonclient's
`get_model_config` (Triton's own image_client example reads max_batch_size, the dims without
the batch dimension and the input format from it) and `get_inference_statistics` (what
monitoring and load tools read). Each view is built here once, as the JSON document the REST
front end answers; the gRPC front end parses the same document into its protobuf message (the
keys are the proto's field names), so the two cannot drift apart.

    config_document(dataplane.model("cnn"))  # {"name": "cnn", "max_batch_size": 0, ...}
    statistics_document(dataplane.statistics("cnn", None))  # {"model_stats": [...]}
"""

from __future__ import annotations

from agent.serving.metrics import ModelMetrics
from agent.serving.model import ServedModel
from runtimes.base import TensorSpec

_DATA_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}
# Triton's instance kinds: a CPU or an NVIDIA GPU by name; any other device (an NPU, an
# integrated GPU through OpenVINO) is placed by the model's runtime, which is KIND_MODEL.
_KINDS = {"CPU": "KIND_CPU", "CUDA": "KIND_GPU", "TENSORRT": "KIND_GPU"}


def config_document(model: ServedModel) -> dict:
    """The model version's configuration in the JSON form of Triton's ModelConfig."""
    config = model.config
    batching = config.max_batch_size > 0
    doc = {
        "name": model.name,
        "platform": model.platform,
        "backend": model.session.runtime,
        # Every version in the repository is served; requests without one get the latest.
        "version_policy": {"all": {}},
        "max_batch_size": config.max_batch_size,
        "input": _tensors(model.inputs.values(), batching),
        "output": _tensors(model.outputs.values(), batching),
        "instance_group": [
            {
                "name": f"{model.name}_0",
                "kind": _KINDS.get(model.session.device.upper(), "KIND_MODEL"),
                "count": config.instances,
            }
        ],
        "default_model_filename": model.model_file.name,
        "parameters": {
            key: {"string_value": str(value)}
            for key, value in (
                ("device", model.session.device),
                ("max_queue_size", config.max_queue_size),
                ("timeout_ms", config.timeout_ms),
            )
        },
    }
    for tensor in doc["input"]:
        layout = (config.input_formats or {}).get(tensor["name"])
        if layout:
            tensor["format"] = f"FORMAT_{layout}"
    for output in doc["output"]:
        label_file = (config.labels or {}).get(output["name"])
        if label_file:
            output["label_filename"] = label_file
    if batching:
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(config.preferred_batch_sizes),
            "max_queue_delay_microseconds": config.max_queue_delay_us,
        }
    return doc


def _tensors(specs, batching: bool) -> list[dict]:
    """Triton leaves the batch dimension out of dims when the server batches the model."""
    return [_tensor(spec, batching) for spec in specs]


def _tensor(spec: TensorSpec, batching: bool) -> dict:
    dims = spec.shape[1:] if batching else spec.shape
    return {"name": spec.name, "data_type": _DATA_TYPES[spec.datatype], "dims": list(dims)}


def statistics_document(entries: list[tuple[str, str, ModelMetrics]]) -> dict:
    """Triton's ModelStatisticsResponse in JSON for (name, version, counters) entries."""
    return {"model_stats": [_model_statistics(*entry) for entry in entries]}


def _model_statistics(name: str, version: str, m: ModelMetrics) -> dict:
    failed = sum(m.failures.values())
    return {
        "name": name,
        "version": version,
        "last_inference": m.last_inference_ms,
        "inference_count": m.inference_count,
        "execution_count": m.exec_count,
        "inference_stats": {
            "success": _duration(m.success, m.request_us),
            "fail": _duration(failed, m.failure_us),
            "queue": _duration(m.success, m.queue_us),
            "compute_input": _duration(0, 0),
            "compute_infer": _duration(m.success, m.request_compute_us),
            "compute_output": _duration(0, 0),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(0, 0),
                "compute_infer": {"count": count, "ns": ns},
                "compute_output": _duration(0, 0),
            }
            for size, (count, ns) in sorted(m.batches.items())
        ],
    }


def _duration(count: int, us: float) -> dict:
    return {"count": count, "ns": round(us * 1000)}
