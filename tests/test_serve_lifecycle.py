"""`edgefleet-agent serve` coming up and going down: its unix socket, signals while it starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from agent.samples import write_sample_repository
from tests.test_serve_command import rest_port, start_agent, stop, wait_for_log


def ask_ready(path) -> bytes:
    """The status line of GET /v2/health/ready over the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return conn.makefile("rb").readline()


def serve_on(models, sock, tmp_path) -> tuple[subprocess.Popen, object]:
    state = {"EDGEFLEET_STATE_DIR": str(tmp_path / "state")}
    return start_agent("--models", str(models), "--socket", str(sock), env=state)


def outcome(proc: subprocess.Popen, log) -> str:
    """Wait until the agent either serves or exits; the log either way."""
    try:
        return wait_for_log(proc, log, r"serving REST")
    except AssertionError:
        proc.wait(30)
        return log.read_text()


def test_a_socket_another_agent_serves_on_is_refused_not_taken(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    first, first_log = serve_on(sample_repo, sock, tmp_path)
    try:
        wait_for_log(first, first_log, r"serving REST")
        second, second_log = serve_on(sample_repo, sock, tmp_path)
        try:
            text = outcome(second, second_log)
        finally:
            if second.poll() is None:
                stop(second)
        assert second.returncode == 1, text
        assert f"cannot listen: {sock} is in use by another process" in text
        assert "Traceback" not in text
        assert ask_ready(sock).startswith(b"HTTP/1.1 200")  # still the first agent's
    finally:
        assert stop(first) == 0
    assert not sock.exists()


def test_a_stale_socket_file_is_replaced(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_over:
        left_over.bind(str(sock))  # bound, never listening: what a killed agent leaves
    proc, log = serve_on(sample_repo, sock, tmp_path)
    try:
        wait_for_log(proc, log, r"serving REST")
        assert ask_ready(sock).startswith(b"HTTP/1.1 200")
    finally:
        assert stop(proc) == 0
    assert not sock.exists()


def test_a_socket_path_that_is_not_a_socket_is_refused_and_left_alone(sample_repo, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    for path in (a_file, a_dir):
        proc, log = serve_on(sample_repo, path, tmp_path)
        text = outcome(proc, log)
        if proc.poll() is None:
            stop(proc)
        assert proc.returncode == 1, text
        assert f"cannot listen: {path} exists and is not a socket" in text
        assert "Traceback" not in text
    assert a_file.read_text() == "keep me"
    assert a_dir.is_dir()


def test_stopping_leaves_a_socket_file_that_is_no_longer_its_own(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    proc, log = serve_on(sample_repo, sock, tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        try:
            wait_for_log(proc, log, r"serving REST")
            sock.unlink()  # someone else now serves on the path
            successor.bind(str(sock))
            successor.listen()
            theirs = os.stat(sock).st_ino
        finally:
            assert stop(proc) == 0
        assert sock.is_socket()
        assert os.stat(sock).st_ino == theirs


def test_sigterm_while_the_models_load_stops_cleanly(tmp_path):
    models = tmp_path / "models"
    write_sample_repository(models)
    original = models / "cnn" / "1" / "model.onnx"
    for i in range(60):  # enough models that loading them takes a while; hard links: no space
        (models / f"cnn{i:02}" / "1").mkdir(parents=True)
        os.link(original, models / f"cnn{i:02}" / "1" / "model.onnx")
    sock = tmp_path / "agent.sock"
    proc, log = serve_on(models, sock, tmp_path)
    try:
        wait_for_log(proc, log, r"model cnn: ")  # listening, first model loaded, the rest not
        assert sock.is_socket()
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert "serving REST" not in text  # the signal did come while loading
    assert rc == 0, text
    assert "stopping" in text and "Traceback" not in text
    assert not sock.exists()


def test_a_start_that_fails_after_binding_the_socket_removes_it(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, log = start_agent(
            "--models",
            str(sample_repo),
            "--socket",
            str(sock),
            "--grpc",
            f"127.0.0.1:{port}",
            env={"EDGEFLEET_STATE_DIR": str(tmp_path / "state")},
        )
        assert proc.wait(60) == 1, log.read_text()
    assert "cannot listen" in log.read_text()
    assert not sock.exists()


def test_a_second_signal_while_draining_stops_at_once(sample_repo, tmp_path):
    proc, log = start_agent("--models", str(sample_repo))
    text = wait_for_log(proc, log, r"serving REST")
    # a request whose body never comes keeps the drain waiting for its grace period
    held = socket.create_connection(("127.0.0.1", rest_port(text)))
    held.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n{")
    try:
        proc.send_signal(signal.SIGTERM)
        wait_for_log(proc, log, r"stopping: draining requests")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
        assert "stopping at once: signalled again while draining" in log.read_text()
    finally:
        held.close()


def test_sighup_neither_kills_nor_stops_the_agent(sample_repo, tmp_path):
    sock = tmp_path / "agent.sock"
    proc, log = serve_on(sample_repo, sock, tmp_path)
    wait_for_log(proc, log, r"serving REST")
    proc.send_signal(signal.SIGHUP)
    wait_for_log(proc, log, r"SIGHUP ignored")
    assert ask_ready(sock).startswith(b"HTTP/1.1 200")
    assert stop(proc) == 0
    assert not sock.exists()


async def test_both_front_ends_drain_within_one_grace_period():
    """REST and gRPC drain at once: one stop waits for the other's end."""
    import asyncio

    from agent.serving.server import RunningServer

    rest_draining = asyncio.Event()

    class Rest:
        async def close(self, grace):
            rest_draining.set()

    class Grpc:
        async def stop(self, grace):
            await asyncio.wait_for(rest_draining.wait(), 10)  # one after the other: times out

    class Plane:
        async def stop(self):
            pass

    server = RunningServer(Plane(), None, None, None, Rest(), Grpc())
    await server.stop(grace=5)
    assert rest_draining.is_set()
