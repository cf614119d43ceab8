"""How a model is served, as its publisher may set it: batching, queueing, deadlines, instances.

The same keys mean the same in a package's manifest (`[serving]` in edgefleet.toml, see
provisioning.package) and in a node's model.toml (agent.serving.config), and one check here
serves both, so a package the control plane accepts never carries a value a node refuses. How
to run the model (runtime, device, threads, variant) is not among them: accelerator selection
chooses that on each node. Label files and input formats name files and tensors, which each
side checks in its own terms.
"""

from __future__ import annotations

from typing import Any

# key -> (lowest, highest) for the integer settings
LIMITS = {
    "max_batch_size": (0, 4096),
    "max_queue_delay_us": (0, 10_000_000),
    "max_queue_size": (1, 1_000_000),
    "timeout_ms": (1, 3_600_000),
    "instances": (1, 64),
    "threads": (1, 1024),
}
INPUT_FORMATS = ("NCHW", "NHWC")
MAX_LABEL_FILES = 64

# What a publisher may set in a package (the rest of model.toml is the node's to choose).
PUBLISHER_KEYS = frozenset(
    {
        "max_batch_size",
        "max_queue_delay_us",
        "preferred_batch_sizes",
        "max_queue_size",
        "timeout_ms",
        "instances",
        "idle_spin",
        "labels",
        "input_formats",
    }
)


def check_value(key: str, value: Any) -> Any:
    """`value` for `key`, normalized (preferred sizes sorted, tables copied); ValueError naming
    the key and what it must be. Keys this module does not know are returned as they are."""
    if key in LIMITS:
        lo, hi = LIMITS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{key} must be an integer in [{lo}, {hi}]")
        return value
    if key == "preferred_batch_sizes":
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ValueError(f"{key} must be a list of positive integers")
        return tuple(sorted(set(value)))
    if key == "idle_spin":
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    if key == "input_formats":
        if not isinstance(value, dict) or not all(v in INPUT_FORMATS for v in value.values()):
            raise ValueError(
                f"{key} must be a table of input name -> NCHW or NHWC, "
                'e.g. input_formats = { input = "NCHW" }'
            )
        return dict(value)
    if key == "labels":
        if not isinstance(value, dict) or len(value) > MAX_LABEL_FILES:
            raise ValueError(
                f"{key} must be a table of at most {MAX_LABEL_FILES} entries, "
                'e.g. labels = { output = "labels.txt" }'
            )
        if not all(isinstance(name, str) and name for name in value.values()):
            raise ValueError(f"{key} must map each output to a file name")
        return dict(value)
    return value


def check_combination(values: dict[str, Any]) -> None:
    """Settings that are fine alone but not together; ValueError saying which."""
    max_batch = values.get("max_batch_size", 0)
    if max_batch == 0 and (values.get("preferred_batch_sizes") or values.get("max_queue_delay_us")):
        raise ValueError("preferred_batch_sizes / max_queue_delay_us need max_batch_size > 0")
    if any(size > max_batch for size in values.get("preferred_batch_sizes", ())):
        raise ValueError("a preferred batch size exceeds max_batch_size")
