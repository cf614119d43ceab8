"""Selection's parts that need no runtime: tolerance, candidate grid, placement, choice, keys,
compile-cache pruning, model settings."""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.profiles import load_profile
from agent.selection import DecisionCache, Pin, Tolerance, ToleranceError, model_settings, pick
from agent.selection.candidates import Candidate, build, confirm_placement
from agent.selection.compile_cache import GRACE_SECONDS, CompileCache
from agent.selection.decision import (
    CHOSEN,
    REJECTED,
    VERIFIED,
    CandidateResult,
    Decision,
    DecisionError,
)
from agent.selection.key import SelectionKey
from agent.selection.tolerance import Bound, compare
from agent.selection.variants import Variant
from runtimes.discovery import RuntimeDevice

PROFILES = Path(__file__).resolve().parent.parent / "firmware-profiles"


# --- tolerance -------------------------------------------------------------------------------


def logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((1, 1000)) * 0.3).astype(np.float32)


def test_bf16_sized_errors_fail_the_default_fp32_tolerance():
    # FACTS: OpenVINO bf16 on a small CNN moves outputs (up to 0.3) by up to 1.2e-3.
    reference = logits()
    bf16_like = reference + np.float32(1.2e-3)
    result = compare({"y": bf16_like}, {"y": reference}, {"y": "FP32"}, Tolerance())
    assert not result.ok
    assert result.max_error == pytest.approx(1.2e-3, rel=1e-2)
    assert "over the FP32 tolerance: atol 0.0001 + rtol 0.001" in result.problem


def test_a_model_can_accept_bf16_and_f32_noise_always_passes():
    reference = logits()
    loose = Tolerance.from_mapping({"FP32": {"atol": 2e-3}})
    assert compare({"y": reference + 1.2e-3}, {"y": reference}, {"y": "FP32"}, loose).ok
    f32_noise = reference + np.float32(9e-8)
    assert compare({"y": f32_noise}, {"y": reference}, {"y": "FP32"}, Tolerance()).ok


def test_integer_outputs_per_datatype():
    reference = np.array([[10, 20, 30]], dtype=np.int8)
    assert compare({"q": reference + 1}, {"q": reference}, {"q": "INT8"}, Tolerance()).ok
    assert not compare({"q": reference + 2}, {"q": reference}, {"q": "INT8"}, Tolerance()).ok
    labels = np.array([3, 1], dtype=np.int64)
    assert not compare({"l": labels + 1}, {"l": labels}, {"l": "INT64"}, Tolerance()).ok


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_integers_are_compared_as_integers(dtype):
    # As float64, 2**53 + 1 is 2**53 and 2**62 + 100 is 2**62: both would pass exactly.
    reference = np.array([2**53 + 1, 2**62 + 100], dtype=dtype)
    close = np.array([2**53, 2**62], dtype=dtype)
    comparison = compare({"i": close}, {"i": reference}, {"i": "INT64"}, Tolerance())
    assert not comparison.ok and comparison.max_error == 100
    assert "2 of 2 values over the INT64 tolerance" in comparison.problem
    assert compare({"i": reference}, {"i": reference.copy()}, {"i": "INT64"}, Tolerance()).ok
    within = Tolerance.from_mapping({"INT64": {"atol": 100}})
    assert compare({"i": close}, {"i": reference}, {"i": "INT64"}, within).ok
    extremes = np.array([np.iinfo(dtype).min, np.iinfo(dtype).max], dtype=dtype)
    swapped = extremes[::-1].copy()
    assert not compare({"i": swapped}, {"i": extremes}, {"i": "INT64"}, Tolerance()).ok


def test_int64_against_uint64_is_compared_exactly():
    reference = np.array([2**63 + 1], dtype=np.uint64)
    candidate = np.array([2**62], dtype=np.int64)
    assert not compare({"i": candidate}, {"i": reference}, {"i": "UINT64"}, Tolerance()).ok
    same = np.array([2**62], dtype=np.uint64)
    assert compare({"i": candidate}, {"i": same}, {"i": "UINT64"}, Tolerance()).ok


def test_shape_missing_output_and_nan_are_failures():
    reference = logits()
    assert (
        "shape [1, 999]"
        in compare({"y": reference[:, :999]}, {"y": reference}, {"y": "FP32"}, Tolerance()).problem
    )
    assert "missing" in compare({}, {"y": reference}, {"y": "FP32"}, Tolerance()).problem
    broken = reference.copy()
    broken[0, 5] = np.nan
    assert "NaN" in compare({"y": broken}, {"y": reference}, {"y": "FP32"}, Tolerance()).problem


def test_tolerance_settings_are_checked():
    with pytest.raises(ToleranceError, match=r"tolerance\.FP32\.atol: expected a finite number"):
        Tolerance.from_mapping({"FP32": {"atol": -1}})
    with pytest.raises(ToleranceError, match="expected a table with atol and/or rtol"):
        Tolerance.from_mapping({"FP32": {"abs": 1}})
    # Lower case is the same datatype, over the same defaults: FP32's rtol stays.
    assert Tolerance.from_mapping({"fp32": {"atol": 1e-2}}).bound("FP32") == Bound(1e-2, 1e-3)
    with pytest.raises(
        ToleranceError, match=r"tolerance\.FLOAT32: not a datatype; expected one of"
    ):
        Tolerance.from_mapping({"FLOAT32": {"atol": 1.0}})


@pytest.mark.parametrize("value", ["nan", "inf", "-nan", "1" + "0" * 400])
def test_a_tolerance_must_be_a_finite_number(value):
    # `error > atol + rtol * |reference|` is never true for nan: any output would pass.
    table = tomllib.loads(f"[tolerance]\nFP32 = {{ atol = {value} }}\n")
    with pytest.raises(ToleranceError, match=r"tolerance\.FP32\.atol: expected a finite number"):
        model_settings(table)


def test_model_settings_from_model_toml():
    tolerance, pin = model_settings({"max_batch_size": 8, "tolerance": {"FP32": {"rtol": 0.05}}})
    assert tolerance.bound("FP32").rtol == 0.05 and tolerance.bound("FP32").atol == 1e-4
    assert pin is None
    _, pin = model_settings({"runtime": "openvino", "device": "cpu", "threads": 2})
    assert pin == Pin("openvino", "cpu", None, {"threads": 2})
    with pytest.raises(ValueError, match="precision: expected one of f32, bf16, f16; got 'fp64'"):
        model_settings({"runtime": "openvino", "precision": "fp64"})
    with pytest.raises(ValueError, match="hint: expected one of LATENCY, THROUGHPUT"):
        model_settings({"hint": "latency"})


# --- candidates --------------------------------------------------------------------------------


def variant(name: str, fmt: str) -> Variant:
    return Variant(name, Path("/models/m/1") / name, fmt, "0" * 64)


# Devices OpenVINO and ONNX Runtime report on a Core Ultra 7 155H (no such hardware here).
CORE_ULTRA_DEVICES = [
    RuntimeDevice("onnxruntime", "CPU", {"provider": "CPUExecutionProvider"}),
    RuntimeDevice("openvino", "CPU", {"OPTIMIZATION_CAPABILITIES": ["FP32", "INT8", "FP16"]}),
    RuntimeDevice("openvino", "GPU", {"OPTIMIZATION_CAPABILITIES": ["FP32", "FP16", "INT8"]}),
    RuntimeDevice("openvino", "NPU", {"OPTIMIZATION_CAPABILITIES": ["FP16", "INT8"]}),
]


def test_core_ultra_grid_rules_out_what_this_hardware_cannot_do():
    profile = load_profile(PROFILES / "intel-core-ultra.toml")
    considered = build([variant("model.onnx", "onnx")], CORE_ULTRA_DEVICES, profile)
    runnable = [c.candidate.label() for c in considered if c.reason is None]
    assert runnable[0] == "openvino NPU hint=LATENCY precision=f16 threads=auto [model.onnx]"
    assert "openvino GPU hint=THROUGHPUT precision=f16 threads=auto [model.onnx]" in runnable
    reasons = {c.candidate.label(): c.reason for c in considered if c.reason}
    assert reasons["openvino CPU hint=LATENCY precision=bf16 threads=auto [model.onnx]"] == (
        "CPU does not support bf16 (OPTIMIZATION_CAPABILITIES: FP32, INT8, FP16)"
    )
    assert reasons["onnxruntime OPENVINO threads=auto [model.onnx]"] == (
        "onnxruntime has no OPENVINO device here (found: CPU)"
    )
    # preference follows the [[allow]] order
    assert [c.candidate.preference for c in considered] == sorted(
        c.candidate.preference for c in considered
    )


def test_format_runtime_and_pin_rules():
    profile = load_profile(PROFILES / "generic-cpu.toml")
    devices = [RuntimeDevice("onnxruntime", "CPU"), RuntimeDevice("openvino", "CPU")]
    considered = build([variant("model.tflite", "tflite")], devices, profile)
    reasons = {c.candidate.runtime: c.reason for c in considered}
    assert reasons["onnxruntime"] == "onnxruntime cannot read tflite files"
    assert reasons["litert"] == "litert is not installed on this node"
    pin = Pin(runtime="openvino", options={"hint": "LATENCY"})
    pinned = build([variant("model.onnx", "onnx")], devices, profile, pin)
    runnable = [c.candidate for c in pinned if c.reason is None]
    assert {(c.runtime, dict(c.options)["hint"]) for c in runnable} == {("openvino", "LATENCY")}
    assert any(c.reason == "model.toml pins runtime=openvino hint=LATENCY" for c in pinned)


def test_a_pin_may_name_a_device_the_profile_does_not_list():
    profile = load_profile(PROFILES / "generic-cpu.toml")
    devices = [RuntimeDevice("onnxruntime", "CPU"), RuntimeDevice("onnxruntime", "CUDA")]
    pinned = build([variant("model.onnx", "onnx")], devices, profile, Pin("onnxruntime", "CUDA"))
    assert [c.candidate.device for c in pinned if c.reason is None] == ["CUDA"]


def candidate(runtime: str, device: str, preference: int = 0, **options) -> Candidate:
    return Candidate("model.onnx", runtime, device, tuple(sorted(options.items())), 60, preference)


def test_placement_must_be_confirmed():
    assert (
        confirm_placement(
            candidate("onnxruntime", "CUDA"), ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        is None
    )
    assert confirm_placement(candidate("onnxruntime", "CUDA"), ["CPUExecutionProvider"]) == (
        "asked for CUDAExecutionProvider but the session runs on CPUExecutionProvider"
    )
    assert confirm_placement(candidate("openvino", "GPU"), ["GPU.0"]) is None
    assert confirm_placement(candidate("openvino", "NPU"), ["CPU"]) == (
        "asked for NPU but the session runs on CPU"
    )
    assert confirm_placement(candidate("openvino", "AUTO"), ["GPU.0"]) is None


def test_load_options_carry_hints_precision_threads_and_cache_dir(tmp_path):
    options = candidate("openvino", "CPU", hint="THROUGHPUT", precision="bf16", threads=0)
    loaded = options.load_options(tmp_path)
    assert loaded.threads is None
    assert loaded.extra == {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": "bf16",
        "CACHE_DIR": str(tmp_path),
    }
    assert candidate("onnxruntime", "CPU", threads=1).load_options(tmp_path).extra == {}


# --- choosing -------------------------------------------------------------------------------


def measured(c: Candidate, score: float, verdict: str = VERIFIED) -> CandidateResult:
    return CandidateResult(c, verdict, p50_ms=score, score=score)


def test_pick_takes_the_best_score_and_prefers_the_profile_order_in_a_near_tie():
    profile = load_profile(PROFILES / "generic-cpu.toml")
    ort = candidate("onnxruntime", "CPU", 0)
    ov = candidate("openvino", "CPU", 1)
    assert pick([measured(ort, 5.0), measured(ov, 4.0)], profile).candidate == ov
    # 2% apart is measurement noise on a shared machine: the earlier [[allow]] entry wins
    assert pick([measured(ort, 4.08), measured(ov, 4.0)], profile).candidate == ort
    assert pick([measured(ov, 1.0, REJECTED)], profile) is None


def test_efficiency_prefers_energy_over_speed():
    # The Jetson profile's objective: p50 x nominal watts (the trials compute scores that way).
    profile = load_profile(PROFILES / "nvidia-jetson-orin.toml")
    cuda = candidate("onnxruntime", "CUDA", 1)
    cpu = candidate("onnxruntime", "CPU", 2)
    fast_gpu = measured(cuda, 2.0 * profile.power["CUDA"])
    slow_cpu = measured(cpu, 2.5 * profile.power["CPU"])
    assert pick([fast_gpu, slow_cpu], profile).candidate == cpu


# --- keys ---------------------------------------------------------------------------------------


def test_key_changes_are_explained():
    key = SelectionKey("a" * 64, ("model.onnx",), "hw-1", (("openvino", "2026.4.1"),), "p@1", "x")
    newer = replace(key, model_digest="b" * 64, runtimes=(("openvino", "2026.5.0"),))
    assert newer.ident != key.ident
    assert newer.changes_from(key) == [
        "model digest aaaaaaaaaaaa -> bbbbbbbbbbbb",
        "openvino 2026.4.1 -> 2026.5.0",
    ]
    assert SelectionKey.from_dict(key.to_dict()) == key


# --- stored decisions -----------------------------------------------------------------------


def decision_for(directory: Path) -> Decision:
    chosen = candidate("onnxruntime", "CPU", threads=2)
    result = CandidateResult(chosen, CHOSEN, p50_ms=1.0, placement=["CPUExecutionProvider"])
    key = SelectionKey("a" * 64, ("model.onnx",), "hw-1", (("onnxruntime", "1.0"),), "p@1", "x")
    return Decision(
        model="mlp",
        variant="model.onnx",
        variant_path=directory / "model.onnx",
        runtime="onnxruntime",
        device="CPU",
        options=chosen.load_options(),
        candidate=chosen,
        objective="latency",
        score_unit="ms",
        profile="p@1",
        key=key,
        results=[result],
        selection_seconds=0.5,
        decided_at="2026-01-01T00:00:00+00:00",
    )


def store(cache: DecisionCache, decision: Decision, text: str) -> None:
    """Replace the stored JSON of a decision, as a damaged row or another agent version has it."""
    cache.put(decision)
    cache.db["selection_decisions"].update(decision.key.ident, {"decision": text})


def test_a_decision_reads_back_as_it_was_stored(tmp_path):
    decision = decision_for(tmp_path)
    assert Decision.from_dict(decision.to_dict()) == decision


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["results"][0].update(energy_mj=1.0), "unknown field"),  # another version's
        (lambda d: d.pop("options"), "'options' is missing"),
        (lambda d: d["options"].update(threads="x"), "threads is 'x'"),
        (lambda d: d["options"].update(threads=True), "threads is True"),
        (lambda d: d["options"].update(threads=10**30), "threads 1000"),
        (lambda d: d["options"]["extra"].update(CACHE_DIR=7), "extra options"),
        (lambda d: d["results"][0].update(verdict=REJECTED), "exactly one candidate"),
        (lambda d: d.update(key=[]), "stored decision"),
    ],
)
def test_a_stored_decision_this_agent_cannot_use_is_measured_again(
    tmp_path, caplog, change, reason
):
    cache = DecisionCache(tmp_path / "agent.db")
    decision = decision_for(tmp_path)
    data = decision.to_dict()
    change(data)
    with pytest.raises(DecisionError, match=reason):
        Decision.from_dict(data)
    store(cache, decision, json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="agent.selection.cache"):
        assert cache.get(decision.key) is None
    assert "model mlp: dropped a stored selection decision" in caplog.text
    assert cache.candidates(decision.key) == []  # the row is gone with its candidates
    cache.put(decision)
    assert cache.get(decision.key).options == decision.options


def test_a_damaged_row_stops_neither_latest_nor_compile_cache_pruning(tmp_path):
    cache = DecisionCache(tmp_path / "agent.db")
    decision = decision_for(tmp_path)
    store(cache, decision, "{not json")
    assert cache.latest("mlp") is None
    store(cache, decision, json.dumps({"options": None}))
    assert cache.compile_dirs_in_use() == set()
    assert cache.get(decision.key) is None


# --- compile cache --------------------------------------------------------------------------


def blob(directory: Path, size: int, age: float) -> Path:
    directory.mkdir(parents=True)
    (directory / "1234.blob").write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(directory / "1234.blob", (stamp, stamp))
    os.utime(directory, (stamp, stamp))
    return directory


def test_compile_cache_pruning(tmp_path):
    cache = CompileCache(tmp_path, max_bytes=2500)
    chosen = blob(tmp_path / "chosen", 1000, age=10)
    loser = blob(tmp_path / "loser", 1000, age=5)
    in_flight = blob(tmp_path / "in-flight", 1000, age=1)  # another selection is filling it
    stale = blob(tmp_path / "stale", 1000, age=GRACE_SECONDS + 60)
    report = cache.prune({str(chosen)}, discard={loser})
    assert set(report.removed) == {loser, stale}
    assert chosen.exists() and in_flight.exists()
    assert report.total_bytes == 2000


def test_compile_cache_cap_removes_least_recently_used_even_in_use(tmp_path):
    cache = CompileCache(tmp_path, max_bytes=1500)
    old = blob(tmp_path / "old", 1000, age=100)
    new = blob(tmp_path / "new", 1000, age=1)
    report = cache.prune({str(old), str(new)})
    assert report.removed == [old]
    assert new.exists()


def test_a_pinned_option_value_replaces_the_profiles_axis():
    profile = load_profile(PROFILES / "generic-cpu.toml")  # onnxruntime threads = [0, 1]
    devices = [RuntimeDevice("onnxruntime", "CPU")]
    pinned = build([variant("model.onnx", "onnx")], devices, profile, Pin(options={"threads": 3}))
    runnable = [c.candidate for c in pinned if c.reason is None]
    assert [dict(c.options) for c in runnable] == [{"threads": 3}]


def test_only_ascii_digit_directories_are_versions_to_select_among(tmp_path):
    from agent.selection.variants import version_dir

    model = tmp_path / "mlp"
    (model / "1").mkdir(parents=True)
    (model / "\u00b2").mkdir()  # str.isdigit() is true for it; int() refuses it
    assert version_dir(model) == model / "1"
