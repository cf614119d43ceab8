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

from agent.selection.cache import DecisionCache
from agent.selection.candidates import Candidate, Pin
from agent.selection.decide import choose, pick
from agent.selection.decision import CandidateResult, Decision
from agent.selection.inputs import Reference, load_golden
from agent.selection.key import SelectionKey
from agent.selection.selector import Selector
from agent.selection.settings import model_settings
from agent.selection.tolerance import Tolerance, ToleranceError
from agent.selection.trials import SelectionError

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
