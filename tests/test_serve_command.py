"""`edgefleet-agent serve` as a user runs it: a real process, its config, its signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from agent.samples import sample_input

ROOT = Path(__file__).resolve().parent.parent


def start_agent(*argv: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"agent-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "serve",
            "--grpc",
            "off",
            "--http",
            "127.0.0.1:0",
            "--no-select",
            *argv,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, **(env or {})},
    )
    return proc, log


def wait_for_log(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{log.read_text()}")


def rest_port(text: str) -> int:
    return int(re.search(r"REST http://127\.0\.0\.1:(\d+)", text).group(1))


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_serves_locally_and_stops_cleanly_on_sigterm(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    proc, log = start_agent(
        "--models",
        str(sample_repo),
        "--socket",
        str(sock),
        env={"EDGEFLEET_STATE_DIR": str(tmp_path / "state")},
    )
    try:
        text = wait_for_log(proc, log, r"serving REST")
        assert "serving locally only" in text
        with httpclient.InferenceServerClient(f"127.0.0.1:{rest_port(text)}") as client:
            inp = httpclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(sample_input("mlp")["input"])
            assert client.infer("mlp", [inp]).as_numpy("output").shape == (1, 10)
        assert sock.is_socket()
    finally:
        rc = stop(proc)
    assert rc == 0
    assert "stopping: draining requests" in log.read_text()
    assert not sock.exists()
    for line in log.read_text().splitlines():  # structured logs: one JSON object per line
        if line.startswith("{"):
            assert '"level"' in line and '"message"' in line


async def test_enrolled_node_schedules_certificate_renewal(control_plane, sample_repo, tmp_path):
    root = tmp_path / "root"
    token = control_plane.token(uses=1)
    rc, _, err = await control_plane.agent(
        "install",
        "--server",
        control_plane.endpoints.enroll_url,
        "--token",
        token,
        "--root",
        str(root),
    )
    assert rc == 0, err
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{root}/var/lib/edgefleet"\n[serving]\nhttp = "127.0.0.1:0"\n')
    proc, log = start_agent("--config", str(config), "--models", str(sample_repo))
    try:
        text = wait_for_log(proc, log, r"certificate renewal due")
        assert re.search(r"device dev-[\w-]+: certificate renewal due \d{4}-", text)
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        (["--models", "/nonexistent/models"], None, "does not exist"),
        (["--http", "localhost"], None, "must be HOST:PORT"),
        (["--http", "127.0.0.1:\u0668\u0660"], None, "must be HOST:PORT"),  # Arabic-Indic 80
        (["--http", "127.0.0.1:\u00b2"], None, "must be HOST:PORT"),
        (["--max-body-mb", "0"], None, "--max-body-mb"),
        ([], "bogus = 1\n", "unknown setting(s) bogus"),
        ([], "state_dir = [\n", "cannot read config file"),
        ([], "state_dir = " + "[" * 100_000 + "]" * 100_000 + "\n", "cannot read config file"),
        ([], "[serving]\nhttp = 80\n", "http has a bad value"),
        ([], 'state_dir = ""\n', "state_dir is empty; give it a path"),
        ([], 'state_dir = "/tmp/st\\u0000b"\n', "state_dir holds a NUL character"),
        ([], '[serving]\nmodels = "/tmp/a\\u0000b"\n', "models holds a NUL character"),
        (["--http", ""], None, "--http is empty; give HOST:PORT, or 'off'"),
        ([], '[serving]\nhttp = ""\n', "the http setting is empty; give HOST:PORT, or 'off'"),
        ([], '[serving]\ngrpc = ""\n', "the grpc setting is empty"),
    ],
)
def test_bad_flags_and_config_fail_clearly(sample_repo, tmp_path, argv, config, message):
    args = [sys.executable, "-m", "agent.cli", "serve", "--no-select"]
    if config is not None:
        (tmp_path / "agent.toml").write_text(config)
        args += ["--config", str(tmp_path / "agent.toml")]
    if "--models" not in argv:
        args += ["--models", str(sample_repo)]
    result = subprocess.run([*args, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_state_dir_that_cannot_hold_decisions_is_a_clear_error(sample_repo, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "agent.db").write_bytes(b"not a database" * 100)
    serve = [sys.executable, "-m", "agent.cli", "serve", "--models", str(sample_repo)]
    for state_dir, reason in ((a_file, "File exists"), (damaged, "file is not a database")):
        result = subprocess.run(
            [*serve, "--http", "127.0.0.1:0", "--grpc", "off", "--select"],
            cwd=ROOT,
            env={**os.environ, "EDGEFLEET_STATE_DIR": str(state_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert f"cannot open the agent state in {state_dir}: " in result.stderr
        assert reason in result.stderr and "Traceback" not in result.stderr


def test_address_in_use_is_a_clear_error(sample_repo):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "serve",
                "--models",
                str(sample_repo),
                "--grpc",
                "off",
                "--http",
                f"127.0.0.1:{port}",
                "--no-select",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def _serve(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--no-select", *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_nul_in_the_socket_path_is_a_config_error_and_creates_nothing(sample_repo, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[serving]\nsocket = "{tmp_path}/s\\u0000x"\n')
    result = _serve("--config", str(config), "--models", str(sample_repo), "--grpc", "off")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"edgefleet-agent: error: {config}: socket holds a NUL character"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]  # no socket file at .../s


def test_serving_nothing_at_all_is_a_usage_error(sample_repo):
    result = _serve("--models", str(sample_repo), "--http", "off", "--grpc", "off")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "edgefleet-agent: error: nothing to serve: REST and gRPC are both off and no --socket "
        "is given"
    ]


def test_models_that_is_a_file_is_not_a_directory(sample_repo):
    model_file = sample_repo / "mlp" / "1" / "model.onnx"
    result = _serve("--models", str(model_file))
    assert result.returncode == 1
    assert f"model repository {model_file} is not a directory" in result.stderr
    assert "does not exist" not in result.stderr


def test_an_empty_models_path_is_refused_not_read_as_the_current_directory(tmp_path):
    result = _serve("--models", "", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --models: empty path" in result.stderr
