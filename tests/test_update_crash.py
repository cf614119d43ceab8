"""Crash safety: `edgefleet-agent apply` killed with SIGKILL at every journal step and at random
offsets of the download, then run again.

Each case starts from a node serving cnn@1 and asks for cnn@2. The apply process is paused at
one point (EDGEFLEET_UPDATE_PAUSE_AT) and killed there, process group and all, like a power cut.
Then: the agent must still serve a fully verified version (every version directory complete,
its model file the publisher signed), and a second apply must finish the update, serving cnn@2
with no scratch file left anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.serving.server import ServeOptions
from agent.update import ACTIVE, ROLLED_BACK, journal
from agent.update.checkpoints import ANNOUNCE, PAUSE_ENV
from agent.update.journal import Journal
from tests.conftest import ServerThread
from tests.fleet import Fleet

AGENT_CLI = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]
# Every journal state, plus the moment between renaming into serving and recording ACTIVE.
STEPS = [*journal.STEPS[:-1], "SWITCHING", journal.ACTIVE]
# Seeded, so a failure names a reproducible offset; three offsets into the ~6 MB archive.
OFFSETS = sorted(random.Random(20261122).sample(range(1, 6_000_000), 3))
PAUSE_LIMIT_S = 120  # a guard against a hang, not a timing assertion


@pytest.fixture(scope="module")
def crash_world(sample_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    with Fleet.create(root / "fleet", sample_repo) as fleet:
        for version in (1, 2):
            fleet.publish(version, name="cnn", sample="cnn", variants=("onnx-fp32",))
        baseline = fleet.node(root / "baseline")
        (outcome,) = fleet.apply(baseline, {"cnn": 1})
        assert outcome.state == ACTIVE
        yield fleet, baseline


def signed_digest(package: Path) -> str:
    return hashlib.sha256((package / "model.onnx").read_bytes()).hexdigest()


def assert_serving_is_verified(fleet: Fleet, models: Path, agent: ServerThread) -> str:
    """Every cnn version on disk is complete and exactly what the publisher signed; the agent
    answers with one of them. Returns the version it answers with."""
    versions = sorted(p.name for p in (models / "cnn").iterdir())
    assert versions and all(v.isdigit() for v in versions), versions
    for version in versions:
        directory = models / "cnn" / version
        assert sorted(p.name for p in directory.iterdir()) == ["model.onnx", "model.toml"]
        digest = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
        assert digest == signed_digest(fleet.packages[int(version)])
    status, served = infer_cnn(agent)
    assert status == 200 and served in versions
    return served


def infer_cnn(agent: ServerThread) -> tuple[int, str]:
    import http.client
    import json

    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 224, 224],
                    "datatype": "FP32",
                    "data": [0.5] * (3 * 224 * 224),
                }
            ]
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", agent.server.http_port, timeout=60)
    try:
        connection.request(
            "POST", "/v2/models/cnn/infer", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        reply = json.loads(response.read() or b"{}")
    finally:
        connection.close()
    return response.status, reply.get("model_version", "")


def assert_no_scratch(node: Path) -> None:
    update = node / "state" / "update"
    for scratch in (update / "downloads", update / "jobs"):
        assert list(scratch.iterdir()) == [], scratch
    for root in (update, node / "models"):
        leftovers = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part"))]
        assert leftovers == []
    for hidden in (node / "models" / ".edgefleet-staging", node / "models" / ".edgefleet-trash"):
        assert not hidden.exists() or list(hidden.iterdir()) == []
    assert sorted(p.name for p in (update / "store" / "cnn").iterdir()) == ["1", "2"]


def run_apply(fleet: Fleet, node: Path, agent_url: str, pause_at: str | None, health: str = ""):
    desired = node / "desired.toml"
    desired.write_text('generation = 2\n[[models]]\nname = "cnn"\nversion = 2\n' + health)
    tls = fleet.tls_dir
    command = [
        *AGENT_CLI,
        "apply",
        str(desired),
        "--state-dir",
        str(node / "state"),
        "--models",
        str(node / "models"),
        "--server",
        fleet.server.url,
        "--ca",
        str(tls / "ca.pem"),
        "--cert",
        str(tls / "device.pem"),
        "--key",
        str(tls / "device.key"),
        "--region",
        "ae",
        "--profile",
        str(fleet.profile),
        "--agent",
        agent_url,
    ]
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    if pause_at:
        env[PAUSE_ENV] = pause_at
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes the children too
    )


def wait_for_pause(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            if line.startswith(ANNOUNCE):
                return line.split()[1]
            if not line and process.poll() is not None:
                break
    process.kill()
    raise AssertionError(f"apply never paused: rc={process.poll()} {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("pause_at", [*STEPS, *(f"DOWNLOADING:{offset}" for offset in OFFSETS)])
def test_sigkill_at_any_point_then_restart(crash_world, tmp_path, pause_at):
    fleet, baseline = crash_world
    node = tmp_path / "node"
    shutil.copytree(baseline.state_dir.parent, node)
    with ServerThread(ServeOptions(node / "models", "127.0.0.1:0", None, None)) as agent:
        agent_url = f"http://{agent.http_url}"
        process = run_apply(fleet, node, agent_url, pause_at)
        try:
            paused_at = wait_for_pause(process)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            process.stdout.close()
            process.stderr.close()
        assert paused_at.split(":")[0] == pause_at.split(":")[0]

        served = assert_serving_is_verified(fleet, node / "models", agent)
        assert served == ("2" if pause_at == "ACTIVE" else "1")
        partial = sum(p.stat().st_size for p in (node / "state/update/downloads").glob("*.part"))
        if ":" in pause_at:
            assert partial > 0  # killed mid-download: the partial file is there

        fleet.server.requests.clear()
        restart = run_apply(fleet, node, agent_url, None)
        out, err = restart.communicate(timeout=300)
        assert restart.returncode == 0, err[-3000:]
        expected = "UP_TO_DATE" if pause_at == "ACTIVE" else "ACTIVE"
        assert out.startswith(f"cnn@2: {expected}"), out

        assert assert_serving_is_verified(fleet, node / "models", agent) == "2"
        assert_no_scratch(node)
        if partial:  # the partial download survived the kill and was resumed, not restarted
            ranges = [r.range for r in fleet.server.requests if "/targets/cnn/2/" in r.path]
            assert ranges == [f"bytes={partial}-"], ranges
        journal = Journal(node / "state" / "agent.db")
        assert journal.role("cnn", "active").version == 2
        assert journal.role("cnn", "previous").version == 1
        assert journal.open_jobs() == []


# --- a kill during the health watch, or inside the rollback ------------------------------------

# No real model answers in a nanosecond: with traffic, the first poll's p95 breaks the limit.
UNHEALTHY = (
    "[health]\nwindow_seconds = {window}\npoll_seconds = 0.1\nmax_p95_ms = 0.000001\n"
    "min_requests = 3\n"
)


@contextlib.contextmanager
def traffic(agent: ServerThread):
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                infer_cnn(agent)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(60)


def kill_at(fleet: Fleet, node: Path, agent_url: str, pause_at: str, health: str) -> None:
    process = run_apply(fleet, node, agent_url, pause_at, health)
    try:
        assert wait_for_pause(process) == pause_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        process.stdout.close()
        process.stderr.close()


def assert_rolled_back(fleet: Fleet, node: Path, agent: ServerThread) -> None:
    assert assert_serving_is_verified(fleet, node / "models", agent) == "1"
    assert sorted(p.name for p in (node / "models" / "cnn").iterdir()) == ["1"]
    journal = Journal(node / "state" / "agent.db")
    assert journal.role("cnn", "active").version == 1
    assert journal.last_job("cnn", 2).state == ROLLED_BACK
    assert journal.open_jobs() == []


@pytest.mark.parametrize("window", [600, 0.001], ids=["window-left", "window-passed"])
def test_sigkill_during_the_health_window_then_restart_judges_the_version(
    crash_world, tmp_path, window
):
    """Killed after the switch, before the watch's verdict: the next run watches what is left
    of the window (and rolls the slow version back), or, with the window over and no verdict,
    rolls it back at once. Either way it is not left serving unjudged."""
    fleet, baseline = crash_world
    node = tmp_path / "node"
    shutil.copytree(baseline.state_dir.parent, node)
    health = UNHEALTHY.format(window=window)
    with ServerThread(ServeOptions(node / "models", "127.0.0.1:0", None, None)) as agent:
        agent_url = f"http://{agent.http_url}"
        kill_at(fleet, node, agent_url, "ACTIVE", health)
        assert assert_serving_is_verified(fleet, node / "models", agent) == "2"
        with traffic(agent):
            restart = run_apply(fleet, node, agent_url, None, health)
            out, err = restart.communicate(timeout=300)
        assert restart.returncode == 1, err[-3000:]
        assert out.startswith("cnn@2: ROLLED_BACK  health: "), out
        if window < 1:
            assert "the run watching it was stopped" in out, out
        else:
            assert "p95 latency" in out, out
        assert_rolled_back(fleet, node, agent)


def test_sigkill_inside_the_rollback_then_restart_finishes_it(crash_world, tmp_path):
    """Killed after the previous version is served again, before the journal records the
    rollback: recovery finishes the rollback, and the version is not installed again."""
    fleet, baseline = crash_world
    node = tmp_path / "node"
    shutil.copytree(baseline.state_dir.parent, node)
    health = UNHEALTHY.format(window=600)
    with ServerThread(ServeOptions(node / "models", "127.0.0.1:0", None, None)) as agent:
        agent_url = f"http://{agent.http_url}"
        with traffic(agent):
            kill_at(fleet, node, agent_url, "ROLLING_BACK", health)
        assert_serving_is_verified(fleet, node / "models", agent)
        restart = run_apply(fleet, node, agent_url, None, health)
        out, err = restart.communicate(timeout=300)
        assert restart.returncode == 1, err[-3000:]
        assert out.startswith("cnn@2: REFUSED"), out
        assert_rolled_back(fleet, node, agent)
