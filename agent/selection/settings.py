"""What a model's own model.toml says about selection: its tolerance and any pinned choice.

    runtime = "openvino"     # pin: only this runtime ...
    device = "CPU"           # ... on this device ...
    variant = "model.xml"    # ... with this variant ...
    threads = 2              # ... and this option
    [tolerance]
    FP32 = { atol = 1e-2, rtol = 1e-2 }   # accept bf16/fp16 inference for this model

Other keys (batching, timeouts) belong to serving and are ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.profiles import OPENVINO_HINTS, OPENVINO_PRECISIONS
from agent.selection.candidates import Pin
from agent.selection.tolerance import Tolerance, ToleranceError

_PIN_KEYS = ("runtime", "device", "variant")
_PIN_OPTIONS = ("threads", "hint", "precision")
# The values an OpenVINO option may be pinned to, as a profile may list them.
_ALLOWED = {"hint": OPENVINO_HINTS, "precision": OPENVINO_PRECISIONS}


class ModelSettingsError(ValueError):
    """model.toml pins an option to a value selection does not know."""


def model_settings(config: Mapping[str, Any]) -> tuple[Tolerance, Pin | None]:
    """Tolerance and pin from a parsed model.toml (keys absent: defaults, no pin)."""
    table = config.get("tolerance")
    if table is not None and not isinstance(table, Mapping):
        raise ToleranceError("tolerance: expected a table such as { FP32 = { atol = 1e-3 } }")
    tolerance = Tolerance.from_mapping(table)
    fields = {k: config[k] for k in _PIN_KEYS if config.get(k)}
    options = {k: config[k] for k in _PIN_OPTIONS if config.get(k) is not None}
    for key, allowed in _ALLOWED.items():
        if key in options and options[key] not in allowed:
            raise ModelSettingsError(
                f"{key}: expected one of {', '.join(allowed)}; got {options[key]!r}"
            )
    if not fields and not options:
        return tolerance, None
    return tolerance, Pin(**fields, options=options)
