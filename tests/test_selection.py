"""Accelerator selection with the real runtimes on this CPU: ONNX Runtime, OpenVINO with its
LATENCY and THROUGHPUT hints, LiteRT. Devices that cannot exist here (NPU, GPU, CUDA) are only
announced to selection; loading them still goes through the real adapters, which refuse."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import agent.selection.decide as decide_module
from agent.profiles import AllowedDevice, Profile, RuntimeOptions, SelectionSettings, load_profile
from agent.samples import reference_output, sample_input
from agent.selection import DecisionCache, Pin, SelectionError, Selector, Tolerance, choose
from agent.selection.decision import CHOSEN, REJECTED, SKIPPED, VERIFIED
from agent.selection.key import runtime_versions
from agent.selection.sandbox import Sandbox, SandboxTimeout
from agent.selection.worker import read_reply
from runtimes.base import LoadOptions
from runtimes.discovery import RuntimeDevice, discover

PROFILES = Path(__file__).resolve().parent.parent / "firmware-profiles"
# Small budgets: tests check behaviour, never speed.
QUICK = SelectionSettings(
    warmup_runs=1, benchmark_seconds=0.02, runoff_seconds=0.03, min_runs=3, batch_size=4
)


def profile(name: str = "generic-cpu", *allow: AllowedDevice, **settings) -> Profile:
    loaded = load_profile(PROFILES / f"{name}.toml")
    return replace(loaded, selection=replace(QUICK, **settings), allow=allow or loaded.allow)


def ort(threads: tuple[int, ...] = (0,), limit: float = 60) -> AllowedDevice:
    return AllowedDevice("onnxruntime", "CPU", RuntimeOptions(threads=threads), limit)


def openvino(hints=("LATENCY", "THROUGHPUT"), precisions=("f32",), limit=60.0, cache=False):
    options = RuntimeOptions(hints=hints, precisions=precisions, compile_cache=cache)
    return AllowedDevice("openvino", "CPU", options, limit)


LITERT = AllowedDevice("litert", "CPU", RuntimeOptions(), 60)


@pytest.fixture(scope="module")
def devices() -> list[RuntimeDevice]:
    """This node's real runtime devices, discovered once for the module."""
    return discover()


def model_dir(tmp_path: Path, sample_repo: Path, *samples: str) -> Path:
    """A version directory holding the files of the given sample models as variants."""
    target = tmp_path / "model" / "1"
    target.mkdir(parents=True)
    for sample in samples:
        for path in (sample_repo / sample / "1").iterdir():
            if path.suffix != ".toml":
                shutil.copy(path, target / path.name)
    return target


def perturbed_copy(source: Path, target: Path, amount: float) -> None:
    """The same ONNX graph with every weight moved by `amount`: a badly quantized variant."""
    model = onnx.load(str(source))
    for index, tensor in enumerate(model.graph.initializer):
        moved = numpy_helper.to_array(tensor) + np.float32(amount)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(moved, tensor.name))
    target.write_bytes(model.SerializeToString())


def by_label(decision_or_results) -> dict:
    results = getattr(decision_or_results, "results", decision_or_results)
    return {r.candidate.label(): r for r in results}


def test_cnn_on_onnxruntime_and_openvino_hints(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "cnn", "cnn-openvino")
    decision = choose(directory, profile=profile("generic-cpu", ort(), openvino()), devices=devices)
    results = by_label(decision)
    expected = {
        "onnxruntime CPU threads=auto [model.onnx]",
        "openvino CPU hint=LATENCY precision=f32 threads=auto [model.onnx]",
        "openvino CPU hint=THROUGHPUT precision=f32 threads=auto [model.onnx]",
        "openvino CPU hint=LATENCY precision=f32 threads=auto [model.xml]",
        "openvino CPU hint=THROUGHPUT precision=f32 threads=auto [model.xml]",
    }
    assert {label for label, r in results.items() if r.verdict in (VERIFIED, CHOSEN)} == expected
    for label in expected:
        result = results[label]
        assert result.max_error < 1e-4
        assert result.runs >= 3 and result.p50_ms > 0 and result.p99_ms >= result.p50_ms
        assert result.placement == (
            ["CPUExecutionProvider"] if label.startswith("onnxruntime") else ["CPU"]
        )
    assert results["onnxruntime CPU threads=auto [model.xml]"].reason == (
        "onnxruntime cannot read openvino-ir files"
    )
    assert decision.chosen.candidate.label() in expected
    assert decision.variant_path.parent == directory
    session = decision.load()
    outputs = session.infer(sample_input("cnn"))
    assert outputs["output"].shape == (1, 1000)


def test_variant_exceeding_tolerance_is_rejected(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    perturbed_copy(directory / "model.onnx", directory / "model-int8.onnx", 0.01)
    decision = choose(directory, profile=profile("generic-cpu", ort()), devices=devices)
    bad = by_label(decision)["onnxruntime CPU threads=auto [model-int8.onnx]"]
    assert bad.verdict == REJECTED
    assert bad.reason.startswith("output 'output' differs from the reference by up to")
    assert bad.max_error > 1e-2
    assert decision.variant == "model.onnx"

    # The model's own tolerance decides: loose enough, the variant is a candidate like any other.
    loose = Tolerance.from_mapping({"FP32": {"atol": 10.0}})
    decision = choose(
        directory, profile=profile("generic-cpu", ort()), devices=devices, tolerance=loose
    )
    assert by_label(decision)["onnxruntime CPU threads=auto [model-int8.onnx]"].verdict in (
        VERIFIED,
        CHOSEN,
    )


def test_failing_and_overtime_candidates_are_skipped_with_reasons(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    (directory / "broken.onnx").write_bytes(b"this is not a protobuf")
    slow_openvino = openvino(hints=("LATENCY",), limit=0.001)
    decision = choose(
        directory, profile=profile("generic-cpu", ort(), slow_openvino), devices=devices
    )
    results = by_label(decision)
    broken = results["onnxruntime CPU threads=auto [broken.onnx]"]
    assert broken.verdict == SKIPPED
    assert broken.reason.startswith("failed to load: onnxruntime could not load broken.onnx")
    for variant in ("model.onnx", "broken.onnx"):
        overtime = results[f"openvino CPU hint=LATENCY precision=f32 threads=auto [{variant}]"]
        assert overtime.verdict == SKIPPED
        assert overtime.reason == (
            "over its time limit: load did not finish within 0.001 s (worker stopped)"
        )
    assert decision.chosen.candidate.label() == "onnxruntime CPU threads=auto [model.onnx]"


def test_a_hung_load_is_killed_and_the_worker_replaced(tmp_path):
    # Opening a FIFO blocks until a writer appears: ONNX Runtime hangs inside its own loader.
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with Sandbox() as sandbox:
        first = sandbox.call({"op": "ping"}, timeout=60)["pid"]
        request = {
            "op": "load",
            "id": "hung",
            "path": str(fifo),
            "runtime": "onnxruntime",
            "options": LoadOptions(),
        }
        with pytest.raises(SandboxTimeout, match="load did not finish within 1 s"):
            sandbox.call(request, timeout=1)
        assert not sandbox.running
        assert sandbox.call({"op": "ping"}, timeout=60)["pid"] != first
        assert sandbox.restarts == 1


def test_second_start_reuses_the_decision_without_measuring(
    tmp_path, sample_repo, devices, monkeypatch
):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    (directory / "broken.onnx").write_bytes(b"junk")
    cache = DecisionCache(tmp_path / "state" / "agent.db")
    chosen_profile = profile("generic-cpu", ort(threads=(0, 1)))
    first = choose(directory, profile=chosen_profile, cache=cache, devices=devices)
    assert not first.from_cache

    class NoWorker:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a cached decision must not start the selection worker")

    monkeypatch.setattr(decide_module, "Sandbox", NoWorker)
    messages: list[str] = []
    # A fresh cache object over the same file: what a restarted agent sees.
    again = choose(
        directory,
        profile=chosen_profile,
        cache=DecisionCache(tmp_path / "state" / "agent.db"),
        progress=messages.append,
    )
    assert again.from_cache
    assert (again.runtime, again.options, again.decided_at) == (
        first.runtime,
        first.options,
        first.decided_at,
    )
    assert "reusing the decision" in messages[0]
    rows = cache.candidates(first.key)
    assert len(rows) == len(first.results) == 4
    skipped = [r for r in rows if r["variant"] == "broken.onnx"]
    assert all(r["verdict"] == SKIPPED and "could not load" in r["reason"] for r in skipped)


def test_changed_digest_or_runtime_version_selects_again(
    tmp_path, sample_repo, devices, monkeypatch
):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    cache = DecisionCache(tmp_path / "agent.db")
    chosen_profile = profile("generic-cpu", ort())
    first = choose(directory, profile=chosen_profile, cache=cache, devices=devices)

    messages: list[str] = []
    perturbed_copy(directory / "model.onnx", directory / "model.onnx", 1e-6)
    new_model = choose(
        directory, profile=chosen_profile, cache=cache, devices=devices, progress=messages.append
    )
    assert not new_model.from_cache
    assert new_model.key.model_digest != first.key.model_digest
    assert any("measuring again: model digest" in m for m in messages)

    upgraded = {**runtime_versions(), "onnxruntime": "99.0.0"}
    monkeypatch.setattr(decide_module, "runtime_versions", lambda: upgraded)
    messages.clear()
    new_runtime = choose(
        directory, profile=chosen_profile, cache=cache, devices=devices, progress=messages.append
    )
    assert not new_runtime.from_cache
    assert any("onnxruntime" in m and "-> 99.0.0" in m for m in messages)
    assert dict(new_runtime.key.runtimes)["onnxruntime"] == "99.0.0"

    # Back on the previous runtime version, the decision measured for it is still there.
    monkeypatch.setattr(decide_module, "runtime_versions", runtime_versions)
    assert choose(directory, profile=chosen_profile, cache=cache).from_cache


def test_litert_variant_checked_against_golden_vectors(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp-tflite")
    inputs = sample_input("mlp-tflite")
    outputs = reference_output("mlp-tflite", inputs)
    np.savez(
        directory / "golden.npz",
        **{"input/input": inputs["input"], "output/output": outputs["output"]},
    )
    messages: list[str] = []
    decision = choose(
        directory,
        profile=profile("generic-cpu", LITERT, openvino(("LATENCY",))),
        devices=devices,
        progress=messages.append,
    )
    assert "reference outputs from golden.npz" in messages
    results = by_label(decision)
    litert = results["litert CPU threads=auto [model.tflite]"]
    assert litert.verdict in (VERIFIED, CHOSEN) and litert.placement == ["CPU"]
    assert litert.max_error < 1e-5
    # OpenVINO reads .tflite too: a second real candidate for the same variant.
    assert results[
        "openvino CPU hint=LATENCY precision=f32 threads=auto [model.tflite]"
    ].verdict in (
        VERIFIED,
        CHOSEN,
    )


def test_npu_and_gpu_announced_but_absent_are_skipped_by_the_real_adapter(
    tmp_path, sample_repo, devices
):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    # What OpenVINO would report on a Core Ultra; this machine has neither device.
    announced = [
        *devices,
        RuntimeDevice("openvino", "NPU", {"OPTIMIZATION_CAPABILITIES": ["FP16", "INT8"]}),
        RuntimeDevice("openvino", "GPU", {"OPTIMIZATION_CAPABILITIES": ["FP32", "FP16"]}),
    ]
    core_ultra = profile("intel-core-ultra")
    core_ultra = replace(core_ultra, allow=core_ultra.allow[:3])  # NPU, GPU, CPU
    decision = choose(directory, profile=core_ultra, devices=announced)
    results = by_label(decision)
    npu = results["openvino NPU hint=LATENCY precision=f16 threads=auto [model.onnx]"]
    assert npu.verdict == SKIPPED
    assert npu.reason.startswith("failed to load: OpenVINO has no device 'NPU' on this node")
    gpu = [r for label, r in results.items() if " GPU " in label]
    assert gpu and all("OpenVINO has no device 'GPU'" in r.reason for r in gpu)
    assert decision.device == "CPU"


def test_cuda_announced_but_absent_is_skipped_and_a_pin_to_it_fails(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    cuda = RuntimeDevice("onnxruntime", "CUDA", {"provider": "CUDAExecutionProvider"})
    announced = [*devices, cuda]
    gpu_box = profile("x86-nvidia-gpu")
    gpu_box = replace(gpu_box, allow=gpu_box.allow[1:2] + gpu_box.allow[3:])  # CUDA, ORT CPU
    decision = choose(directory, profile=gpu_box, devices=announced)
    result = by_label(decision)["onnxruntime CUDA threads=auto [model.onnx]"]
    assert result.verdict == SKIPPED
    assert "lacks CUDAExecutionProvider" in result.reason
    assert decision.device == "CPU"

    with pytest.raises(SelectionError, match="no candidate can run on this node") as raised:
        choose(directory, profile=gpu_box, devices=devices, pin=Pin("onnxruntime", "CUDA"))
    assert {r.reason for r in raised.value.results} >= {
        "onnxruntime has no CUDA device here (found: CPU)"
    }


def test_pinned_openvino_uses_and_prunes_the_compile_cache(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    state = tmp_path / "state"
    decision = choose(
        directory,
        profile=profile("generic-cpu", ort(), openvino(cache=True)),
        devices=devices,
        state_dir=state,
        pin=Pin(runtime="openvino"),
    )
    assert decision.runtime == "openvino"
    cache_dir = Path(decision.options.extra["CACHE_DIR"])
    assert cache_dir.parent == state / "openvino-cache"
    assert any(cache_dir.iterdir())  # the compiled blob the serving load will read
    assert list((state / "openvino-cache").iterdir()) == [cache_dir]  # the loser's is gone
    session = decision.load()
    expected = reference_output("mlp", sample_input("mlp"))["output"]
    np.testing.assert_allclose(session.infer(sample_input("mlp"))["output"], expected, atol=1e-4)


def test_throughput_objective_scores_per_item(tmp_path, sample_repo, devices):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    decision = choose(
        directory, profile=profile("generic-cpu", ort(), objective="throughput"), devices=devices
    )
    chosen = decision.chosen
    assert decision.score_unit == "ms per item (p50 / batch)"
    assert chosen.score == pytest.approx(chosen.p50_ms / QUICK.batch_size)


def test_selector_decides_from_worker_threads(tmp_path, sample_repo):
    """The data plane runs `decide` in a thread pool; the stored decision serves any thread."""
    quick = tmp_path / "quick.toml"
    text = (PROFILES / "generic-cpu.toml").read_text()
    text = text.replace("benchmark_seconds = 0.15", "benchmark_seconds = 0.02")
    quick.write_text(text.replace("runoff_seconds = 0.8", "runoff_seconds = 0.03"))
    selector = Selector(tmp_path / "state", profile=str(quick))
    directory = model_dir(tmp_path, sample_repo, "mlp")
    with ThreadPoolExecutor(max_workers=1) as first, ThreadPoolExecutor(max_workers=1) as second:
        measured = first.submit(selector.decide, directory, config={"runtime": "onnxruntime"})
        decision = measured.result()
        cached = second.submit(selector.decide, directory, config={"runtime": "onnxruntime"})
        assert cached.result().from_cache
    assert decision.runtime == "onnxruntime"
    assert (tmp_path / "state" / "agent.db").exists()


class _RunsCode:
    """What a subverted worker could pickle: a call made while the agent unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _framed(message: object) -> io.BytesIO:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return io.BytesIO(struct.pack("!Q", len(body)) + body)


def test_the_agent_unpickles_only_plain_data_and_arrays_from_its_worker(tmp_path):
    """The worker loads models the agent has not run yet; if one subverts it, its replies must
    not become code in the agent."""
    reply = {
        "ok": True,
        "inputs": [("input", "FP32", (-1, 64))],
        "outputs": {
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
            "f16": np.ones(3, np.float16),
            "strided": np.ones((3, 3))[:, 1],
            "bool": np.array([True, False]),
            "text": np.array([b"a", "b"], dtype=object),
        },
        "latencies": [0.001, 0.002],
        "scalar": np.float64(2.5),
        "details": {"name": "cpu", "set": frozenset({1}), "raw": bytearray(b"x")},
    }
    got = read_reply(_framed(reply))
    assert got.keys() == reply.keys() and got["latencies"] == reply["latencies"]
    for name, array in reply["outputs"].items():
        assert np.array_equal(got["outputs"][name], array), name
        assert got["outputs"][name].dtype == array.dtype
    assert read_reply(io.BytesIO(b"\x00\x00")) is None  # the stream ended mid-reply

    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match=r"may not build (posix|os)\.system"):
        read_reply(_framed({"ok": True, "outputs": {"x": _RunsCode(marker)}}))
    for module, name in (("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load")):
        gadget = b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n."
        with pytest.raises(pickle.UnpicklingError, match="may not build"):
            read_reply(io.BytesIO(struct.pack("!Q", len(gadget)) + gadget))
    assert not marker.exists()


# --- what the key holds -------------------------------------------------------------------------


def test_changed_golden_vectors_select_again_even_with_the_same_bytes(tmp_path, sample_repo):
    directory = model_dir(tmp_path, sample_repo, "mlp")
    inputs = sample_input("mlp")
    output = reference_output("mlp", inputs)["output"]
    cache = DecisionCache(tmp_path / "agent.db")
    chosen_profile = profile("generic-cpu", ort())

    def golden(array: np.ndarray):
        np.savez(
            directory / "golden.npz", **{"input/input": inputs["input"], "output/output": array}
        )
        return choose(directory, profile=chosen_profile, cache=cache)

    assert not golden(output).from_cache
    assert golden(output).from_cache
    # The same bytes read as int32, or in another shape, are not the vectors the choice passed.
    for changed in (output.view(np.int32), output.reshape(-1, 1)):
        with pytest.raises(SelectionError, match="no candidate passed"):
            golden(changed)


def test_a_litert_delegate_appearing_selects_again(tmp_path, sample_repo, monkeypatch):
    directory = model_dir(tmp_path, sample_repo, "mlp-tflite")
    libraries = tmp_path / "delegates"
    libraries.mkdir()
    monkeypatch.setenv("EDGEFLEET_LITERT_DELEGATE_PATH", str(libraries))
    gpu = AllowedDevice("litert", "GPU", RuntimeOptions(), 60)
    chosen_profile = profile("generic-cpu", gpu, LITERT)
    cache = DecisionCache(tmp_path / "agent.db")
    first = choose(directory, profile=chosen_profile, cache=cache)
    assert by_label(first)["litert GPU threads=auto [model.tflite]"].reason.startswith(
        "litert has no GPU device here"
    )
    assert choose(directory, profile=chosen_profile, cache=cache).from_cache

    # Not a real delegate: it fails to load, and that is measured and recorded.
    shutil.copy("/bin/true", libraries / "libtensorflowlite_gpu_delegate.so")
    messages: list[str] = []
    again = choose(directory, profile=chosen_profile, cache=cache, progress=messages.append)
    assert not again.from_cache
    assert any("LiteRT delegates none -> ['GPU']" in m for m in messages), messages
    tried = by_label(again)["litert GPU threads=auto [model.tflite]"]
    assert tried.reason.startswith("failed to load"), tried.reason


def test_models_with_the_same_files_keep_decisions_of_their_own(tmp_path, sample_repo):
    source = model_dir(tmp_path, sample_repo, "mlp")
    for name in ("a", "b"):
        shutil.copytree(source, tmp_path / name / "1")
    cache = DecisionCache(tmp_path / "agent.db")
    chosen_profile = profile("generic-cpu", ort())
    a = choose(tmp_path / "a", profile=chosen_profile, cache=cache)
    b = choose(tmp_path / "b", profile=chosen_profile, cache=cache)
    assert (a.model, b.model) == ("a", "b") and not b.from_cache
    again = choose(tmp_path / "b", profile=chosen_profile, cache=cache, reuse=False)
    assert again.model == "b"
    assert cache.latest("a").key == a.key  # measuring b again left a's decision alone
    assert choose(tmp_path / "a", profile=chosen_profile, cache=cache).model == "a"
