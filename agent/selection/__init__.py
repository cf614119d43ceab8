"""Accelerator selection: measure which runtime, device and options serve a model best here.

ONNX Runtime's device policy and OpenVINO's AUTO pick by a fixed order and fall back to the CPU
silently; this package measures instead. For a model with one or more variants (fp32 ONNX,
OpenVINO IR, int8, tflite) it builds the candidates the node's firmware profile allows, loads
each in a worker process under a time limit, confirms where it really runs, checks its outputs
against golden vectors or the CPU fp32 reference within a per-datatype tolerance, benchmarks it,
and chooses by the profile's objective. The decision persists in the agent's SQLite state, keyed
by model digest, hardware fingerprint, runtime versions and profile, so a restart reuses it.

    from agent.selection import Selector

    selector = Selector(state_dir)           # hardware facts, firmware profile, decision cache
    decision = selector.decide("models/cnn/1", model="cnn", config=model_toml_dict)
    session = decision.load()                # runtimes.load(variant_path, runtime=, options=)

`choose()` is the same with every input explicit (profile, cache, facts, devices, tolerance,
golden vectors, pin), which is what tests and the bench use.
"""

from importlib import import_module

# name -> module. Imported on first use (PEP 562): the serving agent imports only
# agent.selection.sandbox for its trial loads, and the package's other modules (SQLite cache,
# profiles, packages) would cost it ~7 MiB of RSS and ~100 modules it never uses.
_EXPORTS = {
    "DecisionCache": "cache",
    "Candidate": "candidates",
    "Pin": "candidates",
    "choose": "decide",
    "pick": "decide",
    "CandidateResult": "decision",
    "Decision": "decision",
    "Reference": "inputs",
    "load_golden": "inputs",
    "SelectionKey": "key",
    "Selector": "selector",
    "model_settings": "settings",
    "Tolerance": "tolerance",
    "ToleranceError": "tolerance",
    "SelectionError": "trials",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Candidate",
    "CandidateResult",
    "Decision",
    "DecisionCache",
    "Pin",
    "Reference",
    "SelectionError",
    "SelectionKey",
    "Selector",
    "Tolerance",
    "ToleranceError",
    "choose",
    "load_golden",
    "model_settings",
    "pick",
]
