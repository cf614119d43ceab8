"""The agent's side of the selection worker: send a request, wait at most so long, kill on overrun.

    with Sandbox() as sandbox:
        reply = sandbox.call({"op": "load", ...}, timeout=60)   # SandboxTimeout after 60 s

A timed-out or crashed worker is killed and the next call starts a fresh one, so one bad
candidate costs its own time limit and nothing else. The worker runs in a session of its own,
and killing it kills its process group: helpers a runtime started (a compiler daemon) go too.

The worker runs code from the model's runtime, so its replies are read as untrusted: the whole
reply (not only its first byte) must arrive within the call's time limit, a reply may declare
at most MAX_REPLY_BYTES, and each must have the shape its request calls for (`replies`).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from agent.selection.replies import ReplyError, check_reply

_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the agent package
# Starting Python and importing numpy can be slow on a small board; it is not the candidate's time.
STARTUP_SECONDS = 60.0
# select() cannot wait past ~2**63 ns; no step of a selection waits a week.
LONGEST_WAIT_SECONDS = 7 * 86_400.0
# A line Python's warnings module writes ("path:line: SomeWarning: message"): not why a worker died.
_WARNING_LINE = re.compile(r"\S.*:\d+: \w*Warning: ")
# The largest reply the agent reads. The biggest legitimate ones are a reference run's outputs,
# which must also fit a golden file (provisioning.package.MAX_GOLDEN_BYTES, 256 MiB) to be
# compared; the header's size is read before anything is allocated for the body.
MAX_REPLY_BYTES = 256 * 2**20
_READ_CHUNK = 1 << 20
# Bytes of a reply's length prefix (agent.selection.worker writes "!Q").
_HEADER_SIZE = 8


class SandboxError(Exception):
    """The worker could not answer; the message says why."""


class SandboxTimeout(SandboxError):
    pass


class SandboxCrashed(SandboxError):
    pass


class Sandbox:
    def __init__(self, startup_seconds: float = STARTUP_SECONDS):
        self.startup_seconds = startup_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._started = False
        self.restarts = 0  # workers started after the first: sessions of older ones are gone

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and return the reply; raise SandboxTimeout/SandboxCrashed."""
        if not self.running:
            self._start()
        assert self._process is not None and self._process.stdin is not None
        try:
            _write(self._process.stdin, request)
        except (BrokenPipeError, OSError):
            raise SandboxCrashed(self._crash_reason()) from None
        what = f"{request['op']} did not finish within {timeout:g} s"
        return self._receive(request["op"], timeout, what)

    def kill(self) -> None:
        """Kill the worker and whatever it started (its process group)."""
        if self._process is None:
            return
        # Before the worker is reaped its pid, and so its group id, cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream:
                stream.close()
        self._process = None
        if self._stderr:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        if self.running:
            assert self._process is not None and self._process.stdin is not None
            try:
                _write(self._process.stdin, {"op": "exit"})
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _start(self) -> None:
        self.kill()
        if self._started:
            self.restarts += 1
        self._started = True
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        # Kept for the crash message; closed in kill(). A pipe could fill up and block the worker.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, "-m", "agent.selection.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # its own process group, killed as one
        )
        assert self._process.stdin is not None
        _write(self._process.stdin, {"op": "ping"})
        self._receive("ping", self.startup_seconds, what="the selection worker did not start")

    def _receive(self, op: str, timeout: float, what: str) -> dict[str, Any]:
        """The reply to `op`, all of it read within `timeout` seconds."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        wait = min(timeout, LONGEST_WAIT_SECONDS) if timeout > 0 else 0.0  # nan: no wait
        deadline = time.monotonic() + wait
        try:
            body = None
            header = _read_exactly(fd, _HEADER_SIZE, deadline)
            if header is not None:
                size = int.from_bytes(header, "big")
                if size > MAX_REPLY_BYTES:
                    raise ReplyError(
                        f"it declares {size} bytes, over the cap of {MAX_REPLY_BYTES >> 20} MiB"
                    )
                body = _read_exactly(fd, size, deadline)
            # A worker that dies mid-reply shows up as a short read.
            reply = None if body is None else check_reply(op, _unpickle(body))
        except TimeoutError:
            self.kill()
            raise SandboxTimeout(what) from None
        except Exception as exc:  # not plain data, not a pickle, not its shape: not trusted
            self.kill()
            message = f"the selection worker sent a reply the agent refuses: {exc}"
            raise SandboxCrashed(message) from None
        if reply is None:
            reason = self._crash_reason()
            self.kill()
            raise SandboxCrashed(reason)
        return reply

    def _crash_reason(self) -> str:
        assert self._process is not None
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        tail = ""
        if self._stderr:
            self._stderr.seek(0)
            tail = _last_words(self._stderr.read().decode(errors="replace"))
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return f"the selection worker died ({how}){': ' + tail if tail else ''}"


def _last_words(stderr: str) -> str:
    """The worker's last stderr line that says something: not blank, not a Python warning (nor
    the source line a warning quotes under it)."""
    last, after_warning = "", False
    for line in stderr.splitlines():
        quoted = after_warning and line[:1].isspace()
        after_warning = bool(_WARNING_LINE.match(line))
        if line.strip() and not after_warning and not quoted:
            last = line.strip()
    return last


# The worker's module is imported when first used, not by this module: `python -m
# agent.selection.worker` imports this package first, and runpy warns (on every worker start)
# when the module it is about to run as __main__ has been imported already.
def _write(stream: BinaryIO, message: Any) -> None:
    from agent.selection.worker import write_message

    write_message(stream, message)


def _unpickle(body: bytes) -> Any:
    from agent.selection.worker import unpickle_reply

    return unpickle_reply(body)


def _read_exactly(fd: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from `fd`, or None if it ends first; TimeoutError at `deadline` (monotonic).

    Read with os.read after select(): a buffered read would block until all `size` bytes came,
    however long a stalled worker takes to send them.
    """
    data = bytearray()
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, min(size - len(data), _READ_CHUNK))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
