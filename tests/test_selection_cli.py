"""`edgefleet-agent accelerators` and `edgefleet-agent select`, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.cli import main

PROFILES = Path(__file__).resolve().parent.parent / "firmware-profiles"
QUICK_PROFILE = """
name = "quick-cpu"
description = "generic-cpu with a test-sized time budget"
[match]
[selection]
objective = "latency"
warmup_runs = 1
benchmark_seconds = 0.02
runoff_seconds = 0.03
min_runs = 3
[[allow]]
runtime = "onnxruntime"
device = "CPU"
threads = [0, 1]
[[allow]]
runtime = "openvino"
device = "CPU"
hints = ["LATENCY"]
precisions = ["f32"]
"""


@pytest.fixture
def quick_profile(tmp_path) -> Path:
    path = tmp_path / "quick-cpu.toml"
    path.write_text(QUICK_PROFILE)
    return path


def test_accelerators_json(capsys):
    assert main(["accelerators", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hardware"]["fingerprint"].startswith("hw-")
    assert report["profile"]["name"]
    assert {"onnxruntime", "openvino"} <= {r["runtime"] for r in report["runtimes"]}
    assert any(c["available"] for c in report["candidates"])
    assert any(p["matches"] for p in report["profiles"])


def test_accelerators_text_with_a_forced_profile_and_a_recording(capsys, tmp_path):
    recording = tmp_path / "node.json"
    assert main(["accelerators", "--profile", "coral-edgetpu", "--record", str(recording)]) == 0
    out = capsys.readouterr().out
    assert "profile   coral-edgetpu (forced; objective efficiency)" in out
    assert "litert       EDGETPU" in out and "unavailable: litert has no EDGETPU device" in out
    assert json.loads(recording.read_text())["files"]["/proc/cpuinfo"]


def test_select_prints_the_table_then_reuses_the_decision(
    capsys, tmp_path, sample_repo, quick_profile
):
    model = tmp_path / "mlp"
    shutil.copytree(sample_repo / "mlp", model)
    (model / "1" / "model.toml").write_text("max_batch_size = 8\n")  # no pin: every candidate runs
    args = ["select", str(model), "--profile", str(quick_profile), "--state-dir", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "discovering runtimes and devices" in captured.err  # progress while it runs
    assert "[1/3] onnxruntime CPU threads=auto [model.onnx]" in captured.err
    header = captured.out.splitlines()[2].split()
    assert header[:5] == ["#", "variant", "runtime", "device", "options"]
    assert "verdict" in header
    assert "chosen *" in captured.out
    assert "measured now" in captured.out

    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    decision = json.loads(captured.out)
    assert decision["from_cache"] is True
    assert "reusing the decision" in captured.err
    assert len(decision["results"]) == 3
    assert [r["verdict"] for r in decision["results"]].count("chosen") == 1


def test_select_honours_the_model_toml_tolerance_and_pin(
    capsys, tmp_path, sample_repo, quick_profile
):
    model = tmp_path / "mlp"
    shutil.copytree(sample_repo / "mlp", model)
    (model / "1" / "model.toml").write_text(
        'runtime = "openvino"\n[tolerance]\nFP32 = { atol = 1e-3 }\n'
    )
    args = ["select", str(model), "--profile", str(quick_profile), "--state-dir", str(tmp_path)]
    assert main([*args, "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    decision = json.loads(captured.out)
    assert decision["runtime"] == "openvino"
    skipped = [r for r in decision["results"] if r["verdict"] == "skipped"]
    assert {r["reason"] for r in skipped} == {"model.toml pins runtime=openvino"}


def test_select_errors_are_one_line_without_traceback(capsys, tmp_path, sample_repo):
    broken = tmp_path / "broken.toml"
    broken.write_text(QUICK_PROFILE.replace('"latency"', '"soonest"'))
    assert main(["select", str(sample_repo / "mlp"), "--profile", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edgefleet-agent: error: {broken}: selection.objective: expected one of")
    assert "Traceback" not in err

    assert main(["select", str(tmp_path / "nowhere")]) == 1
    assert "no such model directory" in capsys.readouterr().err

    empty = tmp_path / "empty" / "1"
    empty.mkdir(parents=True)
    assert main(["select", str(empty), "--state-dir", str(tmp_path)]) == 1
    assert "no model file" in capsys.readouterr().err


def test_select_with_a_state_dir_it_cannot_open_is_one_line(
    capsys, tmp_path, sample_repo, quick_profile
):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "agent.db").write_bytes(b"not a database" * 100)
    for state_dir, reason in ((a_file, "File exists"), (damaged, "file is not a database")):
        model = str(sample_repo / "mlp")
        args = ["select", model, "--profile", str(quick_profile), "--state-dir", str(state_dir)]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"edgefleet-agent: error: cannot open the agent state in {state_dir}")
        assert reason in err


@pytest.mark.parametrize(
    ("setting", "allowed"),
    [('precision = "fp64"', "f32, bf16, f16"), ('hint = "FAST"', "LATENCY, THROUGHPUT")],
)
def test_a_model_toml_pin_to_an_unknown_option_is_one_line(
    capsys, tmp_path, sample_repo, quick_profile, setting, allowed
):
    directory = tmp_path / "mlp" / "1"
    shutil.copytree(sample_repo / "mlp" / "1", directory)
    (directory / "model.toml").write_text(f'runtime = "openvino"\n{setting}\n')
    args = ["select", str(directory), "--profile", str(quick_profile), "--quiet"]
    assert main([*args, "--state-dir", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"edgefleet-agent: error: {setting.split()[0]}: expected one of {allowed}"
    )
    assert "Traceback" not in err
