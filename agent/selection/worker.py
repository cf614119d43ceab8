"""The process that loads and measures candidates for accelerator selection.

A compile that hangs, a driver that crashes or a model that eats the memory must not take the
agent down, so `agent.selection.sandbox.Sandbox` runs this module as a child process
(`python -m agent.selection.worker`) and kills it when a request overruns its time limit.
Requests arrive on stdin and replies leave on the original stdout, one length-prefixed pickle
each; fd 1 is pointed at stderr first, so a runtime that prints cannot corrupt the replies. The
agent reads replies with `read_reply`, whose unpickler builds nothing but plain data and numpy
arrays: a worker subverted by the model it loads cannot run code in the agent through them.
Sessions stay open between requests (keyed by the caller's id) so that a candidate is loaded
once, then verified, benchmarked and, if it is a finalist, measured again in the run-off.
"""

from __future__ import annotations

import gc
import importlib
import io
import os
import pickle
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_HEADER = struct.Struct("!Q")  # the body's length; agent.selection.sandbox reads it too


# What a reply may reference besides plain data: numpy arrays, dtypes and scalars (numpy 2
# names, and numpy 1's for devices pinned to it).
_REPLY_GLOBALS = frozenset(
    (module, name)
    for core in ("numpy._core", "numpy.core")
    for module, name in (
        (f"{core}.multiarray", "_reconstruct"),
        (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer"),
    )
) | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ReplyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _REPLY_GLOBALS:
            raise pickle.UnpicklingError(f"a worker reply may not build {module}.{name}")
        return super().find_class(module, name)


def read_message(stream: BinaryIO) -> Any:
    """A request from the agent (trusted: it wrote it), or None at the end of the stream."""
    body = _read_body(stream)
    return None if body is None else pickle.loads(body)


def read_reply(stream: BinaryIO) -> Any:
    """A worker's reply: plain data and numpy arrays only, else UnpicklingError. None when the
    stream ends before a whole reply."""
    body = _read_body(stream)
    return None if body is None else unpickle_reply(body)


def unpickle_reply(body: bytes) -> Any:
    """The reply in `body` (a reply without its header): plain data and numpy arrays only."""
    return _ReplyUnpickler(io.BytesIO(body)).load()


def _read_body(stream: BinaryIO) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    return body if len(body) == size else None


def write_message(stream: BinaryIO, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _placement(session: Any) -> list[str]:
    """Where the session says it runs: ORT providers, OpenVINO EXECUTION_DEVICES, or its device."""
    for attribute in ("providers", "execution_devices"):
        value = getattr(session, attribute, None)
        if value:
            return [str(v) for v in value]
    return [str(session.device)]


class Worker:
    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self.rss_before: dict[str, int] = {}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}"}
        return handler(request)

    def op_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    def op_discover(self, request: dict[str, Any]) -> dict[str, Any]:
        from runtimes.discovery import discover

        devices = [
            {"runtime": d.runtime, "device": d.device, "details": d.details} for d in discover()
        ]
        return {"ok": True, "devices": devices}

    def op_load(self, request: dict[str, Any]) -> dict[str, Any]:
        from runtimes.loader import RUNTIMES, load

        key = request["id"]
        if request["runtime"] in RUNTIMES:
            # Import first, so neither the load time nor the memory growth counts the library.
            importlib.import_module(RUNTIMES[request["runtime"]])
        gc.collect()
        before = _rss()
        started = time.perf_counter()
        session = load(
            Path(request["path"]), runtime=request["runtime"], options=request["options"]
        )
        seconds = time.perf_counter() - started
        self.sessions[key] = session
        self.rss_before[key] = before
        return {
            "ok": True,
            "load_seconds": seconds,
            "inputs": [(s.name, s.datatype, s.shape) for s in session.inputs],
            "outputs": [(s.name, s.datatype, s.shape) for s in session.outputs],
            "placement": _placement(session),
            "memory_mb": (_rss() - before) / 2**20,
        }

    def op_infer(self, request: dict[str, Any]) -> dict[str, Any]:
        key = request["id"]
        session = self.sessions[key]
        started = time.perf_counter()
        outputs = session.infer(request["inputs"])
        seconds = time.perf_counter() - started
        return {
            "ok": True,
            "outputs": {k: np.asarray(v) for k, v in outputs.items()},
            "seconds": seconds,
            # After a first inference: weights, compiled kernels and scratch buffers all counted.
            "memory_mb": (_rss() - self.rss_before[key]) / 2**20,
        }

    def op_try_run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One run on seeded random inputs of the session's declared shapes (dynamic dims 1).

        For the serving agent's trial loads: a file that loads but crashes or hangs its runtime
        on its first run does that here. An error the runtime raises is no crash: random inputs
        can lie outside a model's domain (token ids past a vocabulary), so the reply is ok with
        `ran` false and the reason; so it is when no inputs can be made (BYTES, too large).
        """
        from agent.selection.inputs import InputError, random_inputs

        session = self.sessions[request["id"]]
        try:
            inputs = random_inputs([(s.name, s.datatype, s.shape) for s in session.inputs])
        except InputError as exc:
            return {"ok": True, "ran": False, "why": str(exc)}
        try:
            session.infer(inputs)
        except Exception as exc:  # the runtime's own error: a clean refusal, not a crash
            return {"ok": True, "ran": False, "why": str(exc) or type(exc).__name__}
        return {"ok": True, "ran": True}

    def op_benchmark(self, request: dict[str, Any]) -> dict[str, Any]:
        """Warm-up runs, then timed runs until the time budget is spent and `min_runs` are done.

        `stop_above` (seconds, optional) ends the runs early once `min_runs` are done and even
        their fast decile is above it: a candidate that cannot win need not use its budget.
        """
        infer = self.sessions[request["id"]].infer
        inputs = request["inputs"]
        for _ in range(request["warmup"]):
            infer(inputs)
        latencies: list[float] = []
        min_runs, stop_above = request["min_runs"], request.get("stop_above")
        deadline = time.perf_counter() + request["seconds"]
        clock = time.perf_counter
        stopped_early = False
        while len(latencies) < request["max_runs"] and (
            len(latencies) < min_runs or clock() < deadline
        ):
            started = clock()
            infer(inputs)
            latencies.append(clock() - started)
            checkpoint = len(latencies) >= min_runs and len(latencies) % min_runs == 0
            if stop_above and checkpoint and float(np.percentile(latencies, 10)) > stop_above:
                stopped_early = True
                break
        return {"ok": True, "latencies": latencies, "stopped_early": stopped_early}

    def op_runoff(self, request: dict[str, Any]) -> dict[str, Any]:
        """Finalists in turn, a short slice each per round, in a rotating order.

        Load from elsewhere on the machine then hits every finalist alike. Slices rather than
        single runs: a runtime's thread pool keeps spinning for a moment after a run, which
        would slow whichever candidate runs next; the first run of each slice is not timed.
        """
        keys = request["ids"]
        rounds, min_runs = request["rounds"], request["min_runs_per_slice"]
        slice_seconds = request["seconds"] / (rounds * len(keys))
        latencies: dict[str, list[float]] = {key: [] for key in keys}
        clock = time.perf_counter
        for round_index in range(rounds):
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                infer, inputs = self.sessions[key].infer, request["inputs"][key]
                infer(inputs)  # settles the runtime's threads after the previous finalist
                timed = latencies[key]
                done, deadline = 0, clock() + slice_seconds
                while done < min_runs or clock() < deadline:
                    started = clock()
                    infer(inputs)
                    timed.append(clock() - started)
                    done += 1
        return {"ok": True, "latencies": latencies}

    def op_close(self, request: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.pop(request["id"], None)
        self.rss_before.pop(request["id"], None)
        if session is not None:
            session.close()
            del session
            gc.collect()
        return {"ok": True}


def main() -> int:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    worker = Worker()
    while True:
        request = read_message(requests)
        if request is None or request.get("op") == "exit":
            return 0
        try:
            reply = worker.handle(request)
        except Exception as exc:  # every failure becomes the candidate's recorded reason
            reply = {
                "ok": False,
                "error": str(exc) or type(exc).__name__,
                "type": type(exc).__name__,
            }
        write_message(replies, reply)


if __name__ == "__main__":
    sys.exit(main())
