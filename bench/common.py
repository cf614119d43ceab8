"""Helpers shared by the benchmarks: progress lines, percentiles, free ports, server processes.

Nothing here knows about EdgeFleet or any peer server: a benchmark script describes what to run
and measure, these helpers start processes, wait for them and read their memory and CPU use.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

STOP_GRACE_S = 10.0
READY_POLL_S = 0.1


def say(message: str) -> None:
    """One progress line on stderr, so stdout stays the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by a process and its live descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def tree_cpu_seconds_fine(pid: int) -> float:
    """As tree_cpu_seconds, to the nanosecond where Linux keeps schedstat (what psutil reads
    comes in clock ticks, 10 ms: too coarse for a request of a few ms). Threads that ended
    are not counted: for long-lived servers, between measurements."""
    root = psutil.Process(pid)
    total_ns = 0
    try:
        for process in [root, *root.children(recursive=True)]:
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    total_ns += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, NotADirectoryError, psutil.NoSuchProcess):
        return tree_cpu_seconds(pid)  # no /proc schedstat here
    return total_ns / 1e9


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread: a Python server's event loop."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for thread in psutil.Process(pid).threads():
            if thread.id == pid:
                return thread.user_time + thread.system_time
    return 0.0


def children_cpu_seconds() -> float:
    """CPU time of this process's finished (waited-for) children, e.g. a load generator."""
    usage = os.times()
    return usage.children_user + usage.children_system


def own_cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent running processes, summed over CPUs, plus time the
    hypervisor stole. Interrupt time is left out: it is mostly the benchmark's own traffic."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "steal", 0.0)


@dataclass(frozen=True)
class CpuUse:
    """Cores used during a measurement, by whom."""

    server: float
    loadgen: float
    this_process: float
    foreign: float
    server_main_thread_s: float  # CPU seconds of the server's main thread during the measurement


class CpuMeter:
    """Splits the machine's CPU use during a measurement between the server measured, the load
    generators this process ran (children, waited for), this process itself, and everything
    else: other people's work on a shared machine, which makes a measurement noisy."""

    def __init__(self, server_pid: int | None):
        self._pid = server_pid
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float, float]:
        server = tree_cpu_seconds(self._pid) if self._pid else 0.0
        return (
            time.monotonic(),
            server,
            children_cpu_seconds(),
            own_cpu_seconds(),
            machine_busy_seconds(),
            main_thread_cpu_seconds(self._pid) if self._pid else 0.0,
        )

    def stop(self) -> CpuUse:
        end = self._sample()
        deltas = (b - a for a, b in zip(self._start, end, strict=True))
        wall, server, loadgen, own, busy, main = deltas
        foreign = max(0.0, busy - server - loadgen - own)
        return CpuUse(server / wall, loadgen / wall, own / wall, foreign / wall, main)


class ServerFailed(RuntimeError):
    """A server process exited or did not become ready in time."""


@dataclass
class ServerProcess:
    """A server started in its own process group, with stdout and stderr in a log file."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the whole group, SIGKILL it if it has not exited within the grace period."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def start_server(
    name: str,
    command: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start a server in a new session: a Ctrl-C on the terminal reaches only the benchmark,
    which then stops the server itself."""
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()
    return ServerProcess(name, process, log_path)


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop the server on the way out, whatever happened (exceptions, Ctrl-C)."""
    try:
        yield server
    finally:
        server.stop()


def wait_http_ready(server: ServerProcess, port: int, path: str, timeout_s: float) -> None:
    """Poll GET `path` on 127.0.0.1:`port` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerFailed(
                f"{server.name} exited with status {server.process.returncode}:\n"
                f"{server.log_tail()}"
            )
        if _http_status(port, path) == 200:
            return
        time.sleep(READY_POLL_S)
    raise ServerFailed(f"{server.name} not ready after {timeout_s:g} s:\n{server.log_tail()}")


def _http_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()
