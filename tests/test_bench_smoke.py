"""Smoke test of the serving benchmark: a --quick run without MLServer yields every agent figure.

Timings on a shared machine say nothing here, so nothing is asserted about them; the test only
proves that the benchmark starts and stops the agent, drives it over REST and gRPC with wrk and
h2load, and reports positive figures.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "serving.py"
TIMEOUT_S = 150


@pytest.fixture(autouse=True)
def load_generators() -> None:
    """wrk and h2load come from Debian; `python3 tasks.py test` installs them. Without them the
    benchmark cannot run, which is a failure to fix, not a test to skip."""
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: apt-get install -y wrk nghttp2-client "
            "(python3 tasks.py test does it)"
        )


def run_quick_benchmark(json_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--quick", "--skip-mlserver", "--json", str(json_path)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the benchmark stops its servers on SIGTERM
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"benchmark did not finish within {TIMEOUT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def setup(document: dict, server: str, protocol: str, model: str) -> dict:
    for figures in document["setups"]:
        if (figures["server"], figures["protocol"], figures["model"]) == (server, protocol, model):
            return figures
    raise AssertionError(f"no figures for {server} {protocol} {model}")


def test_quick_run_reports_every_agent_figure(tmp_path: Path) -> None:
    json_path = tmp_path / "serving.json"
    result = run_quick_benchmark(json_path)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(json_path.read_text())

    for model in ("mlp", "cnn"):
        raw = setup(document, "onnxruntime", "session.run", model)
        assert raw["p50_us"] > 0 and raw["p99_us"] > 0
        for protocol in ("rest-json", "rest-binary", "grpc"):
            figures = setup(document, "agent", protocol, model)
            assert figures["errors"] == 0
            assert figures["p50_us"] > 0 and figures["p99_us"] > 0
            assert figures["throughput"]["8"] > 0 and figures["throughput"]["32"] > 0
    for protocol in ("rest-json", "rest-binary", "grpc"):
        assert setup(document, "agent-nobatch", protocol, "mlp")["throughput"]["32"] > 0

    # every 1-client latency is bracketed by session.run measurements of its model
    for model in ("mlp", "cnn"):
        raw_orders = [
            r["order"] for r in setup(document, "onnxruntime", "session.run", model)["runs"]
        ]
        for protocol in ("rest-json", "rest-binary", "grpc"):
            (run,) = [
                r for r in setup(document, "agent", protocol, model)["runs"] if r["clients"] == 1
            ]
            assert run["order"] - 1 in raw_orders and run["order"] + 1 in raw_orders
    assert document["rss_mb"]["agent"]["after_load"] > 0
    assert "mlserver" not in document["rss_mb"]
    names = [target["name"] for target in document["targets"]]
    assert any("batching on / off" in name for name in names)
    assert "agent rest-json mlp" in result.stderr  # progress went to stderr
    assert "REST JSON" in result.stdout  # the table went to stdout


def test_batching_benchmark_drives_both_agents() -> None:
    command = [
        sys.executable, str(ROOT / "bench" / "batching.py"),
        "--widths", "64", "--rounds", "1", "--duration", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64-64-64-10" in result.stdout
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["width"] == 64 and row["run_us"][0] > 0 and row["run_us"][1] > 0
    assert row["on"][0] > 0 and row["off"][0] > 0 and row["ratio"] > 0


def test_sparse_load_benchmark_measures_every_setup(tmp_path: Path) -> None:
    json_path = tmp_path / "sparse.json"
    command = [
        sys.executable, str(ROOT / "bench" / "sparse_load.py"),
        "--quick", "--skip-mlserver", "--json", str(json_path),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(json_path.read_text())
    setups = ("ort-defaults", "ort-agent-options", "agent")
    for model in ("mlp", "cnn"):
        rows = document["summary"][model]
        assert sorted(rows) == sorted(setups)
        for row in rows.values():
            assert row["cpu_ms_per_request"] > 0 and row["p50_ms"] > 0
        assert rows["ort-agent-options"]["cpu_vs_work"] == 1.0
        assert all(len(document["samples"][model][name]) == 1 for name in setups)
    assert "| cnn | agent, gRPC |" in result.stdout


def test_a_latency_is_compared_with_the_raw_runs_around_it() -> None:
    """The host's speed drifts: a p50 is divided by the mean of the session.run p50s measured
    just before and after it, not by a round's single raw figure."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from serving import _bracketed_ratio
    finally:
        sys.path.remove(str(ROOT / "bench"))
    raw = [
        {"clients": 1, "order": 0, "p50_us": 1000.0},
        {"clients": 1, "order": 2, "p50_us": 3000.0},  # the host slowed down meanwhile
        {"clients": 1, "order": 4, "p50_us": 3000.0},
    ]
    agent = [
        {"clients": 1, "order": 1, "p50_us": 2200.0},  # against (1000 + 3000) / 2
        {"clients": 1, "order": 3, "p50_us": 3300.0},  # against 3000
        {"clients": 8, "order": 5, "p50_us": None},  # throughput runs are not latencies
    ]
    assert _bracketed_ratio(agent, raw) == pytest.approx((1.1 + 1.1) / 2)
    assert _bracketed_ratio(agent[:1], raw[:1]) == pytest.approx(2.2)  # only one raw run near
    assert _bracketed_ratio(agent, []) is None
