"""Selection given hostile or absurd inputs: a golden.npz that is no zip, declares terabytes or is
a zip bomb; a model whose static input shape is terabytes; a batch size past memory; a worker
that dies. Each is refused or recorded with its reason, and the agent stays up."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from agent.profiles import AllowedDevice, RuntimeOptions, SelectionSettings, load_profile
from agent.selection import DecisionCache, SelectionError, choose, load_golden
from agent.selection.inputs import MAX_INPUT_ELEMENTS, InputError, batched, random_inputs
from agent.selection.replies import ReplyError, check_reply
from agent.selection.sandbox import Sandbox, SandboxCrashed, SandboxTimeout
from agent.selection.variants import VariantError
from agent.serving.server import ServeOptions
from runtimes.discovery import RuntimeDevice
from tests.conftest import ServerThread

PROFILES = Path(__file__).resolve().parent.parent / "firmware-profiles"
ORT = AllowedDevice("onnxruntime", "CPU", RuntimeOptions(), 60)
ORT_DEVICES = [RuntimeDevice("onnxruntime", "CPU")]


def ort_profile():
    quick = SelectionSettings(warmup_runs=1, benchmark_seconds=0.02, runoff_seconds=0.03)
    loaded = load_profile(PROFILES / "generic-cpu.toml")
    return replace(loaded, selection=replace(quick, min_runs=3), allow=(ORT,))


def identity_model(path: Path, shape: list[int]) -> Path:
    """y = x in float32 with this static input shape: a few bytes whatever the shape says."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy version 1.0 header declaring `shape`, with no array data after it."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# --- golden.npz ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"PK\x03\x04" + b"\0" * 100, b"not a zip at all", b""],
    ids=["zip-magic-then-garbage", "text", "empty"],
)
def test_a_golden_file_that_is_no_zip_is_an_input_error(tmp_path, content):
    path = tmp_path / "golden.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"golden\.npz: not a readable \.npz file"):
        load_golden(path)


def test_a_truncated_golden_file_is_an_input_error(tmp_path):
    path = tmp_path / "golden.npz"
    np.savez(path, **{"input/x": np.zeros((1, 16), np.float32), "output/y": np.zeros(4)})
    path.write_bytes(path.read_bytes()[:-40])  # the central directory cut off
    with pytest.raises(InputError, match=r"not a readable \.npz file"):
        load_golden(path)


@pytest.mark.parametrize(
    "members",
    [
        # 128 TiB declared in a 500-byte file: numpy would try to allocate it.
        {"input/x.npy": npy_header((1 << 45,)), "output/y.npy": npy_header((1,)) + bytes(4)},
        # Two arrays of 160 MiB each: every array is small enough, the file is not.
        {"input/x.npy": npy_header((40 << 20,)), "output/y.npy": npy_header((40 << 20,))},
    ],
    ids=["one-huge-array", "over-the-cap-together"],
)
def test_golden_arrays_over_the_cap_are_refused_from_their_headers(tmp_path, members):
    path = write_npz(tmp_path / "golden.npz", members)
    with pytest.raises(InputError, match="over the cap of 256 MiB per golden file"):
        load_golden(path)


def test_a_golden_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    # 512 MiB of zeros deflates to ~0.5 MiB; the header alone says how much it would take.
    path = tmp_path / "golden.npz"
    count = 1 << 27
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("input/x.npy", "w", force_zip64=True) as member:
            member.write(npy_header((count,)))
            chunk = bytes(1 << 24)
            for _ in range(4 * count // len(chunk)):
                member.write(chunk)
        archive.writestr("output/y.npy", npy_header((1,)) + bytes(4))
    assert path.stat().st_size < 4 << 20
    with pytest.raises(InputError, match=r"'input/x\.npy' takes its arrays to 536870912 bytes"):
        load_golden(path)


def test_golden_arrays_of_python_objects_are_refused(tmp_path):
    path = tmp_path / "golden.npz"
    objects = np.array([{"a": 1}], dtype=object)
    np.savez(path, **{"input/x": objects, "output/y": np.zeros(1, np.float32)})
    with pytest.raises(InputError, match="holds Python objects"):
        load_golden(path)


@pytest.mark.parametrize(
    "output",
    [
        np.array([["a", "b"]]),
        np.array([[b"a", b"b"]]),
        np.ones((1, 2), np.complex64),
        np.zeros((1, 2), "M8[s]"),
        np.zeros((1, 2), [("a", "f4")]),
    ],
    ids=["unicode", "bytes", "complex", "datetime", "structured"],
)
def test_golden_arrays_of_anything_but_numbers_are_refused(tmp_path, output):
    path = tmp_path / "golden.npz"
    np.savez(path, **{"input/x": np.ones((1, 2), np.float32), "output/y": output})
    with pytest.raises(InputError, match=r"golden\.npz: 'output/y\.npy' holds .* values; golden"):
        load_golden(path)


def test_golden_items_of_no_size_cannot_declare_any_shape(tmp_path):
    # |V0 x 2**60: zero bytes by the cap's count, and numpy's own error when read.
    members = {
        "input/x.npy": npy_header((1,)) + bytes(4),
        "output/y.npy": npy_header((1 << 60,), "|V0"),
    }
    path = write_npz(tmp_path / "golden.npz", members)
    with pytest.raises(InputError, match=r"'output/y\.npy' holds \|V0 values"):
        load_golden(path)


def test_a_golden_output_with_no_tensor_datatype_is_an_input_error(tmp_path):
    path = tmp_path / "golden.npz"
    np.savez(path, **{"input/x": np.ones(2, np.float32), "output/y": np.ones(2, ">f4")})
    with pytest.raises(InputError, match=r"golden\.npz: numpy dtype >f4 has no KServe datatype"):
        load_golden(path)


def _many_members(path: Path, count: int) -> Path:
    empty = io.BytesIO()
    np.save(empty, np.zeros((0,), np.uint8))
    members = {"input/x.npy": empty.getvalue()}
    members.update((f"output/{i}.npy", empty.getvalue()) for i in range(count))
    return write_npz(path, members)


def _end_record_says(path: Path, entries: int) -> None:
    """Rewrite the entry counts of the zip's end-of-central-directory record."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, at + 8, entries, entries)
    path.write_bytes(bytes(data))


def test_a_golden_file_of_too_many_arrays_is_refused_from_its_end_record(tmp_path):
    path = _many_members(tmp_path / "golden.npz", 5000)
    started = time.perf_counter()
    with pytest.raises(
        InputError, match=r"5001 arrays \(\d+ bytes of zip directory\), over the cap"
    ):
        load_golden(path)
    assert time.perf_counter() - started < 30


def test_a_golden_end_record_that_understates_its_arrays_is_caught_by_the_count(tmp_path):
    path = _many_members(tmp_path / "golden.npz", 2000)
    _end_record_says(path, 2)
    with pytest.raises(InputError, match="2001 arrays, over the cap of 1024 per golden file"):
        load_golden(path)


def test_a_zip64_golden_file_is_refused(tmp_path):
    path = _many_members(tmp_path / "golden.npz", 1)
    _end_record_says(path, 0xFFFF)
    with pytest.raises(InputError, match=r"a zip64 archive; golden vectors fit a plain \.npz"):
        load_golden(path)


def test_a_good_golden_file_still_loads(tmp_path):
    path = tmp_path / "golden.npz"
    x, y = np.ones((1, 16), np.float32), np.zeros((1, 4), np.float32)
    np.savez(path, **{"input/x": x, "output/y": y})
    golden = load_golden(path)
    assert golden is not None
    assert golden.inputs["x"].shape == (1, 16) and golden.datatypes == {"y": "FP32"}


def test_a_broken_golden_file_makes_its_model_unavailable_not_the_agent_fail(tmp_path):
    repo = tmp_path / "repo"
    identity_model(repo / "broken" / "1" / "model.onnx", [1, 4])
    (repo / "broken" / "1" / "golden.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    options = ServeOptions(
        repo, "127.0.0.1:0", None, None, select=True, state_dir=tmp_path, profile="generic-cpu"
    )
    with ServerThread(options) as agent:
        (entry,) = agent.dataplane.repository_index()
    assert entry.state == "UNAVAILABLE"
    assert "golden.npz: not a readable .npz file" in entry.reason


# --- random inputs and batches ------------------------------------------------------------------


def test_random_inputs_over_the_cap_are_refused_before_allocation():
    # 2**20 x 2**20 floats: numpy would raise MemoryError, which no caller handles.
    with pytest.raises(InputError, match=f"1099511627776 elements, over the cap of {1 << 25}"):
        random_inputs([("x", "FP32", (1 << 20, 1 << 20))])
    # The cap is on all inputs together.
    half = (MAX_INPUT_ELEMENTS // 2 + 1,)
    with pytest.raises(InputError, match="over the cap"):
        random_inputs([("a", "FP32", half), ("b", "INT64", half)])


def test_a_model_declaring_a_huge_static_input_fails_selection_with_the_reason(tmp_path):
    directory = tmp_path / "huge" / "1"
    identity_model(directory / "model.onnx", [1 << 20, 1 << 20])
    with pytest.raises(SelectionError, match="over the cap of 33554432 for random inputs"):
        choose(directory, profile=ort_profile(), devices=ORT_DEVICES)


def test_a_static_zero_dimension_stays_zero_and_a_dynamic_one_becomes_one():
    inputs = random_inputs([("x", "FP32", (0, 4)), ("y", "INT64", (-1, 3))])
    assert inputs["x"].shape == (0, 4)
    assert inputs["y"].shape == (1, 3)


def test_a_model_with_a_static_zero_dimension_is_selected(tmp_path):
    directory = tmp_path / "empty" / "1"
    identity_model(directory / "model.onnx", [0, 4])
    decision = choose(directory, profile=ort_profile(), devices=ORT_DEVICES)
    assert decision.chosen.candidate.runtime == "onnxruntime"


def test_a_throughput_batch_is_cut_to_fit_the_input_cap():
    inputs = {"x": np.ones((1, 1024), np.float32)}
    specs = [("x", "FP32", (-1, 1024))]
    assert batched(inputs, specs, 8)["x"].shape == (8, 1024)
    # 10**9 items of 1024 floats would be 4 TiB.
    assert batched(inputs, specs, 10**9)["x"].shape == (MAX_INPUT_ELEMENTS // 1024, 1024)


# --- the worker ---------------------------------------------------------------------------------


class RunsInTheWorker:
    """Unpickled by the worker as part of a request, runs `code` there: a crashing runtime."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_the_worker_starts_without_a_warning(monkeypatch):
    # runpy warns when the module it runs was imported by its own package first.
    monkeypatch.setenv("PYTHONWARNINGS", "error::RuntimeWarning")
    with Sandbox() as sandbox:
        assert sandbox.call({"op": "ping"}, timeout=60)["ok"]


def test_a_dead_worker_is_recorded_with_its_last_words_not_a_warning():
    dies = RunsInTheWorker(
        "import os, sys, warnings\n"
        "print('RuntimeError: the driver lost the device', file=sys.stderr)\n"
        "warnings.warn('a runtime cleaning up as it goes')\n"
        "sys.stderr.flush()\n"
        "os.abort()\n"
    )
    with Sandbox() as sandbox, pytest.raises(SandboxCrashed) as crashed:
        sandbox.call({"op": "ping", "payload": dies}, timeout=60)
    assert str(crashed.value) == (
        "the selection worker died (signal 6): RuntimeError: the driver lost the device"
    )


def test_a_worker_dying_silently_has_no_tail_in_its_reason():
    with Sandbox() as sandbox, pytest.raises(SandboxCrashed) as crashed:
        sandbox.call({"op": "ping", "payload": RunsInTheWorker("import os; os.abort()")}, 60)
    assert str(crashed.value) == "the selection worker died (signal 6)"


def test_an_unbounded_wait_is_clamped_not_an_overflow():
    with Sandbox() as sandbox:
        assert sandbox.call({"op": "ping"}, timeout=math.inf)["ok"]


# --- what the worker replies ----------------------------------------------------------------------

# Code run in the worker finds the stream its replies go to: a subverted runtime can write it.
_REPLIES = (
    "import struct, sys, time\n"
    "frame = sys._getframe()\n"
    "while frame.f_code.co_name != 'main':\n"
    "    frame = frame.f_back\n"
    "replies = frame.f_locals['replies']\n"
)


def _call_in_thread(sandbox: Sandbox, request: dict, timeout: float, within: float):
    """sandbox.call's reply or exception, or AssertionError if it is still waiting `within` s on."""
    outcome: list = []

    def call():
        try:
            outcome.append(sandbox.call(request, timeout=timeout))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(within)
    if not outcome:
        os.kill(sandbox._process.pid, 9)  # let the stuck read end
        raise AssertionError(f"call(timeout={timeout}) still waiting after {within} s")
    return outcome[0]


def test_a_reply_header_without_its_body_times_out_with_the_call():
    stalls = RunsInTheWorker(
        _REPLIES + "replies.write(struct.pack('!Q', 100))\nreplies.flush()\ntime.sleep(3600)\n"
    )
    with Sandbox() as sandbox:
        sandbox.call({"op": "ping"}, timeout=60)
        outcome = _call_in_thread(sandbox, {"op": "ping", "payload": stalls}, 2, within=30)
        assert isinstance(outcome, SandboxTimeout), outcome
        assert not sandbox.running
        assert sandbox.call({"op": "ping"}, timeout=60)["ok"]  # a fresh worker


def test_a_reply_declaring_gigabytes_is_refused_before_it_is_read():
    huge = RunsInTheWorker(
        _REPLIES + "replies.write(struct.pack('!Q', 8 << 30) + b'x')\n"
        "replies.flush()\ntime.sleep(3600)\n"
    )
    with Sandbox() as sandbox:
        outcome = _call_in_thread(sandbox, {"op": "ping", "payload": huge}, 60, within=30)
    assert isinstance(outcome, SandboxCrashed), outcome
    assert "reply the agent refuses: it declares 8589934592 bytes, over the cap of 256 MiB" in str(
        outcome
    )


_BOMB = "bomb = ['x']\nfor _ in range(40):\n    bomb = [bomb, bomb]\n"


def test_a_placement_list_bomb_is_refused_not_walked():
    # About 1 KB of pickle, 2**40 leaves: the agent must not walk, compare or serialise it.
    writes = RunsInTheWorker(
        _REPLIES + _BOMB + "import pickle\n"
        "reply = {'ok': True, 'load_seconds': 0.1, 'memory_mb': 1.0, 'inputs': [],\n"
        "         'outputs': [], 'placement': ['CPUExecutionProvider', bomb]}\n"
        "body = pickle.dumps(reply)\n"
        "replies.write(struct.pack('!Q', len(body)) + body)\n"
        "replies.flush()\n"
    )
    with Sandbox() as sandbox:
        outcome = _call_in_thread(sandbox, {"op": "load", "payload": writes}, 60, within=30)
    assert isinstance(outcome, SandboxCrashed), outcome
    assert "reply the agent refuses: placement (a list) is not a name" in str(outcome)


@pytest.mark.parametrize(
    ("op", "reply", "problem"),
    [
        (
            "load",
            {"ok": True, "load_seconds": 0.1, "memory_mb": 1, "placement": ["CPU"] * 65},
            "placement is not a list of at most 64",
        ),
        ("benchmark", {"ok": True, "latencies": ["1"], "stopped_early": False}, "not a number"),
        ("infer", {"ok": True, "outputs": {"y": [1.0]}}, "is not an array"),
        (
            "discover",
            {
                "ok": True,
                "devices": [
                    {"runtime": "x", "device": "CPU", "details": {"deep": [[[[[["too deep"]]]]]]}}
                ],
            },
            "nests over 4 deep",
        ),
        ("ping", ["not", "a", "table"], "is not a table"),
        ("ping", {"ok": False, "error": 7}, "error is not text"),
    ],
    ids=["long-placement", "latency-text", "output-list", "deep-details", "list", "error-number"],
)
def test_replies_of_the_wrong_shape_are_refused(op, reply, problem):
    with pytest.raises(ReplyError, match=problem):
        check_reply(op, reply)


_SUBVERTED_WORKER = """
if b"agent.selection.worker" in open("/proc/self/cmdline", "rb").read():
    import pickle

    _dumps = pickle.dumps

    def dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and isinstance(obj.get("placement"), list):
            bomb = ["x"]
            for _ in range(40):
                bomb = [bomb, bomb]
            obj = {**obj, "placement": [obj["placement"][0], bomb]}
        return _dumps(obj, *args, **kwargs)

    pickle.dumps = dumps
"""


def test_a_candidate_whose_worker_sends_a_bomb_is_recorded_and_selection_ends(
    tmp_path, monkeypatch
):
    # As if the model subverted its runtime: every load reply of the worker carries the bomb.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SUBVERTED_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(site))
    directory = tmp_path / "bomb" / "1"
    identity_model(directory / "model.onnx", [1, 4])
    x = np.ones((1, 4), np.float32)
    np.savez(directory / "golden.npz", **{"input/x": x, "output/y": x})  # no reference run
    outcome = _choose_in_thread(directory, 60)
    assert isinstance(outcome[0], SelectionError)
    (result,) = [r for r in outcome[0].results if r.candidate.runtime == "onnxruntime"]
    assert result.reason.startswith("crashed: the selection worker sent a reply the agent refuses")


def test_a_timed_out_worker_takes_the_processes_it_started_along(tmp_path):
    pid_file = tmp_path / "helper.pid"
    starts_a_helper = RunsInTheWorker(
        "import subprocess, time\n"
        f"helper = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "time.sleep(3600)\n"
    )
    with Sandbox() as sandbox:
        outcome = _call_in_thread(sandbox, {"op": "load", "payload": starts_a_helper}, 2, 30)
    assert isinstance(outcome, SandboxTimeout), outcome
    helper = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(helper):
            break
        time.sleep(0.1)
    else:
        os.kill(helper, 9)
        raise AssertionError("the worker's helper process outlived it")


def _choose_in_thread(directory: Path, seconds: float) -> list:
    """choose() on `directory` in a thread; what it raised. A hang fails after `seconds`."""
    outcome: list = []

    def select():
        try:
            choose(directory, profile=ort_profile(), devices=ORT_DEVICES)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=select, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"selection still running after {seconds} s"
    return outcome


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


# --- model files --------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["fifo", "dev-zero"])
def test_an_ir_whose_weights_are_no_regular_file_is_refused_not_read(tmp_path, weights):
    directory = tmp_path / "ir" / "1"
    directory.mkdir(parents=True)
    (directory / "model.xml").write_text('<?xml version="1.0"?><net name="x" version="11"/>')
    if weights == "fifo":
        os.mkfifo(directory / "model.bin")  # opened for reading, it waits for a writer
    else:
        (directory / "model.bin").symlink_to("/dev/zero")  # never ends
    outcome = _choose_in_thread(directory, 30)
    assert isinstance(outcome[0], VariantError)
    assert (
        str(outcome[0])
        == f"{directory / 'model.bin'}: not a regular file; a model's files must be files"
    )


# --- agent.db -----------------------------------------------------------------------------------


def test_selection_tables_of_another_schema_are_replaced_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "m" / "1"
    identity_model(directory / "model.onnx", [1, 4])
    with sqlite3.connect(tmp_path / "agent.db") as db:
        db.executescript(
            "create table selection_decisions(key text primary key, x);"
            "create table selection_candidates(key, position);"
            "create table selection_file_digests(path text primary key, other);"
        )
    with caplog.at_level(logging.WARNING, logger="agent.selection.cache"):
        cache = DecisionCache(tmp_path / "agent.db")
    assert "table selection_decisions has columns this agent does not use" in caplog.text
    first = choose(directory, profile=ort_profile(), cache=cache, devices=ORT_DEVICES)
    again = choose(directory, profile=ort_profile(), cache=DecisionCache(tmp_path / "agent.db"))
    assert not first.from_cache and again.from_cache


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(variant="other.onnx", key={**d["key"], "variants": ["other.onnx"]}),
        lambda d: d.update(model="someone-else", key={**d["key"], "model": "someone-else"}),
    ],
    ids=["variant-not-in-the-model", "key-of-another-model"],
)
def test_a_stored_row_not_stored_for_its_key_is_measured_again(tmp_path, caplog, tamper):
    directory = tmp_path / "m" / "1"
    identity_model(directory / "model.onnx", [1, 4])
    cache = DecisionCache(tmp_path / "agent.db")
    first = choose(directory, profile=ort_profile(), cache=cache, devices=ORT_DEVICES)
    data = first.to_dict()
    tamper(data)
    with sqlite3.connect(tmp_path / "agent.db") as db:
        db.execute("update selection_decisions set decision = ?", [json.dumps(data)])
    with caplog.at_level(logging.WARNING, logger="agent.selection.cache"):
        again = choose(directory, profile=ort_profile(), cache=cache, devices=ORT_DEVICES)
    assert not again.from_cache and again.model == "m" and again.variant == "model.onnx"
    assert "its key is not the one it is stored under" in caplog.text


def test_an_unreadable_database_is_a_cache_miss_not_a_crash(tmp_path, caplog):
    directory = tmp_path / "m" / "1"
    identity_model(directory / "model.onnx", [1, 4])
    cache = DecisionCache(tmp_path / "agent.db")
    cache.db.execute("drop table selection_decisions")  # as if another process broke it
    with caplog.at_level(logging.WARNING, logger="agent.selection.cache"):
        assert cache.latest("m") is None and cache.compile_dirs_in_use() == set()
    assert "stored selection decisions cannot be read" in caplog.text
