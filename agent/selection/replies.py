"""What the agent accepts from the selection worker: each reply checked against its request.

The worker runs a model's runtime, and a model that subverts its runtime writes the replies. The
unpickler already builds nothing but plain data and numpy arrays; this module checks that a
reply also has the shape its request calls for before the agent keeps any of it, so no list,
string or nesting the agent stores, compares or serialises can be unbounded. A few hundred
bytes of pickle can build a list of 2**40 elements out of shared references: each check walks
a bounded number of items, never the whole structure.

    reply = check_reply("load", reply)     # ReplyError when it is not a load reply
"""

from __future__ import annotations

from collections.abc import Callable
from types import NoneType
from typing import Any

import numpy as np

# Names the worker reports: devices, execution providers, tensors, datatypes.
MAX_NAME = 256
MAX_PLACEMENT = 64  # entries of a placement list (execution providers, OpenVINO devices)
MAX_TENSORS = 1024  # a model's inputs or outputs
MAX_DIMS = 32
MAX_TEXT = 16 * 1024  # an error message; longer ones are cut, not refused
MAX_LATENCIES = 1_000_000  # timed runs of one benchmark or run-off (each run takes >= ~1 µs)
MAX_DEVICES = 256
# Items walked in a free-form value (a device's details from discovery).
MAX_ITEMS = 4096
MAX_DEPTH = 4


class ReplyError(ValueError):
    """A reply is not what its request calls for."""


def check_reply(op: str, reply: Any) -> dict[str, Any]:
    """`reply` if it is a well-formed reply to `op` (an error's text cut to MAX_TEXT)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ReplyError(f"a reply to {op} is not a table with ok = true or false")
    if not reply["ok"]:
        error = _text(reply.get("error"), "error")
        return {"ok": False, "error": error[:MAX_TEXT], "type": _name(reply.get("type", ""))}
    check = _CHECKS.get(op)
    if check is None:
        raise ReplyError(f"no reply is expected to {op}")
    check(reply)
    return reply


def _ping(reply: dict[str, Any]) -> None:
    _integer(reply.get("pid"), "pid")


def _discover(reply: dict[str, Any]) -> None:
    devices = _list(reply.get("devices"), "devices", MAX_DEVICES)
    for device in devices:
        if not isinstance(device, dict):
            raise ReplyError("a discovered device is not a table")
        _name(device.get("runtime"), "runtime")
        _name(device.get("device"), "device")
        _plain(device.get("details"), "details", [MAX_ITEMS], 0)


def _load(reply: dict[str, Any]) -> None:
    _number(reply.get("load_seconds"), "load_seconds")
    _number(reply.get("memory_mb"), "memory_mb")
    for name in _list(reply.get("placement"), "placement", MAX_PLACEMENT):
        _name(name, "placement")
    for group in ("inputs", "outputs"):
        for spec in _list(reply.get(group), group, MAX_TENSORS):
            if not isinstance(spec, tuple | list) or len(spec) != 3:
                raise ReplyError(f"{group}: an entry is not (name, datatype, shape)")
            _name(spec[0], f"{group} name")
            _name(spec[1], f"{group} datatype")
            for dim in _list(spec[2], f"{group} shape", MAX_DIMS):
                _integer(dim, f"{group} shape")


def _infer(reply: dict[str, Any]) -> None:
    outputs = reply.get("outputs")
    if not isinstance(outputs, dict) or len(outputs) > MAX_TENSORS:
        raise ReplyError(f"outputs is not a table of at most {MAX_TENSORS} arrays")
    for name, array in outputs.items():
        _name(name, "output name")
        if not isinstance(array, np.ndarray):
            raise ReplyError(f"output {name!r} is not an array")
        # BYTES outputs come as object arrays; their elements must be bytes or text too.
        if array.dtype == object and not all(isinstance(v, bytes | str) for v in array.flat):
            raise ReplyError(f"output {name!r} holds objects other than bytes and text")
    _number(reply.get("seconds"), "seconds")
    _number(reply.get("memory_mb"), "memory_mb")


def _try_run(reply: dict[str, Any]) -> None:
    if not isinstance(reply.get("ran"), bool):
        raise ReplyError("ran is not true or false")
    if "why" in reply:
        reply["why"] = _text(reply["why"], "why")[:MAX_TEXT]


def _benchmark(reply: dict[str, Any]) -> None:
    _latencies(reply.get("latencies"))
    if not isinstance(reply.get("stopped_early"), bool):
        raise ReplyError("stopped_early is not true or false")


def _runoff(reply: dict[str, Any]) -> None:
    latencies = reply.get("latencies")
    if not isinstance(latencies, dict) or len(latencies) > MAX_TENSORS:
        raise ReplyError("latencies is not a table of candidates")
    for key, values in latencies.items():
        _name(key, "candidate")
        _latencies(values)


def _nothing(reply: dict[str, Any]) -> None:
    pass


_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "ping": _ping,
    "discover": _discover,
    "load": _load,
    "infer": _infer,
    "try_run": _try_run,
    "benchmark": _benchmark,
    "runoff": _runoff,
    "close": _nothing,
}


def _latencies(values: Any) -> None:
    for value in _list(values, "latencies", MAX_LATENCIES):
        _number(value, "latencies")


def _list(value: Any, what: str, most: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple) or len(value) > most:
        raise ReplyError(f"{what} is not a list of at most {most} items")
    return value


def _name(value: Any, what: str = "type") -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ReplyError(f"{what} {_shown(value)} is not a name of at most {MAX_NAME} characters")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ReplyError(f"{what} is not text")
    return value


def _number(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ReplyError(f"{what} {_shown(value)} is not a number")


def _integer(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ReplyError(f"{what} {_shown(value)} is not an integer")


def _plain(value: Any, what: str, budget: list[int], depth: int) -> None:
    """Scalars, text, and lists and tables of them: at most MAX_ITEMS items, MAX_DEPTH deep."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise ReplyError(f"{what} holds over {MAX_ITEMS} items or nests over {MAX_DEPTH} deep")
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ReplyError(f"{what} holds text over {MAX_TEXT} characters")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _name(key, f"{what} key")
            _plain(item, what, budget, depth + 1)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _plain(item, what, budget, depth + 1)
        return
    raise ReplyError(f"{what} holds a {type(value).__name__}")


def _shown(value: Any) -> str:
    """A value for an error message without walking it: repr of a list bomb never ends."""
    if isinstance(value, str):
        return repr(value[:80])
    if isinstance(value, bool | int | float | NoneType):
        return repr(value)
    return f"(a {type(value).__name__})"
