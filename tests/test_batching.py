"""Dynamic batching, backpressure and deadlines of the scheduler, through the real server."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time

import aiohttp
import numpy as np
import pytest

from agent.serving.config import ModelConfig
from agent.serving.errors import InferenceFailed, QueueFull, RequestTimeout
from agent.serving.metrics import Metrics
from agent.serving.scheduler import Scheduler, hand_over_queue
from runtimes import load


def _body(x: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()


async def _fire(url: str, bodies: list[bytes], concurrency: int) -> list[list[float]]:
    results: list = [None] * len(bodies)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            async with sem, s.post(url, data=bodies[i]) as r:
                assert r.status == 200, await r.text()
                results[i] = (await r.json())["outputs"][0]["data"]

        await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return results


def test_concurrent_requests_form_batches_with_unbatched_results(private_agent, private_repo):
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(240)]
    url = f"http://{private_agent.http_url}/v2/models/mlp/infer"
    got = asyncio.run(_fire(url, [_body(x) for x in xs], concurrency=32))

    session = load(private_repo / "mlp" / "1" / "model.onnx")
    for x, data in zip(xs, got, strict=True):
        want = session.infer({"input": x})["output"]
        np.testing.assert_allclose(
            np.array(data, np.float32).reshape(want.shape), want, rtol=1e-5, atol=1e-6
        )
    registry = private_agent.dataplane.metrics.registry
    labels = {"model": "mlp", "version": "1"}
    rows = registry.get_sample_value("edgefleet_inference_count_total", labels)
    execs = registry.get_sample_value("edgefleet_inference_exec_count_total", labels)
    assert rows == sum(x.shape[0] for x in xs)
    assert rows / execs > 1.0, "no batch of more than one request formed under load"


class _Gate:
    """A model whose every run waits for the test to open the gate: queue states on demand."""

    def __init__(self):
        self.open = threading.Event()
        self.batches: list[int] = []

    def infer(self, inputs):
        self.open.wait(10)
        x = inputs["input"]
        self.batches.append(x.shape[0])
        return {"output": x * 2}


def _submit(scheduler: Scheduler, inputs: dict, timeout: float | None = None) -> asyncio.Future:
    """The job's answer as a future."""
    future = asyncio.get_running_loop().create_future()

    def done(outcome, error):
        future.set_result(outcome) if error is None else future.set_exception(error)

    scheduler.submit(inputs, 1, done, timeout)
    return future


async def _drained(scheduler: Scheduler) -> None:
    for _ in range(500):
        if scheduler.pending == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{scheduler.pending} requests still pending")


def _scheduler(gate: _Gate, **config) -> Scheduler:
    metrics = Metrics().for_model("gate", "1")
    return Scheduler("gate", gate.infer, ModelConfig(**config), metrics, asyncio.get_running_loop())


async def test_full_queue_refuses_with_queue_full():
    gate = _Gate()
    scheduler = _scheduler(gate, max_queue_size=3)
    x = np.ones((1, 4), np.float32)
    futures = [_submit(scheduler, {"input": x}) for _ in range(3)]
    with pytest.raises(QueueFull, match="max_queue_size 3"):
        _submit(scheduler, {"input": x})
    gate.open.set()
    outcomes = await asyncio.gather(*futures)
    assert all((o.outputs["output"] == 2).all() for o in outcomes)
    _submit(scheduler, {"input": x})  # room again once the queue drained
    await scheduler.close()


async def test_batches_respect_max_size_and_preferred_sizes():
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=4, max_queue_size=64)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    first = _submit(scheduler, {"input": x})  # holds the worker at the gate
    await asyncio.sleep(0.05)
    rest = [_submit(scheduler, {"input": x + i}) for i in range(9)]
    gate.open.set()
    outcomes = await asyncio.gather(first, *rest)
    assert max(gate.batches) <= 4 and sum(gate.batches) == 10
    assert len(gate.batches) < 10
    for i, o in enumerate(outcomes[1:]):
        np.testing.assert_array_equal(o.outputs["output"], (x + i) * 2)
    await scheduler.close()


async def test_incompatible_shapes_do_not_share_a_batch():
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=8)
    held = _submit(scheduler, {"input": np.ones((1, 4), np.float32)})
    await asyncio.sleep(0.05)
    a = _submit(scheduler, {"input": np.ones((1, 4), np.float32)})
    b = _submit(scheduler, {"input": np.ones((1, 5), np.float32)})
    gate.open.set()
    oa, ob, _ = await asyncio.gather(a, b, held)
    assert oa.outputs["output"].shape == (1, 4) and ob.outputs["output"].shape == (1, 5)
    await scheduler.close()


async def test_queue_delay_waits_for_more_requests():
    gate = _Gate()
    gate.open.set()
    scheduler = _scheduler(gate, max_batch_size=8, max_queue_delay_us=200_000)
    x = np.ones((1, 4), np.float32)
    first = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.02)  # well inside the 200 ms window
    second = _submit(scheduler, {"input": x})
    await asyncio.gather(first, second)
    assert gate.batches == [2]
    await scheduler.close()


async def test_deadlines_expire_in_order_on_one_timer():
    """One timer per model: a shorter deadline submitted later still expires first, a longer one
    than the model's is cut to the model's, and the worker drops what expired."""
    gate = _Gate()  # closed: nothing finishes until the end
    scheduler = _scheduler(gate, max_batch_size=8, timeout_ms=300)
    x = np.ones((1, 4), np.float32)
    first = _submit(scheduler, {"input": x})  # the model's 0.3 s
    short = _submit(scheduler, {"input": x}, timeout=0.03)
    capped = _submit(scheduler, {"input": x}, timeout=60.0)
    with pytest.raises(RequestTimeout, match=r"within 0\.03 s"):
        await short
    assert not first.done() and not capped.done()
    for future in (first, capped):
        with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
            await future
    assert not scheduler._deadlines, "expired requests left in the deadline queues"
    gate.open.set()
    await _drained(scheduler)
    assert sum(gate.batches) <= 3  # at most what was already running or queued
    await scheduler.close()


async def test_answered_requests_leave_no_deadline_behind():
    gate = _Gate()
    gate.open.set()
    scheduler = _scheduler(gate, max_batch_size=8)
    x = np.ones((1, 4), np.float32)
    for _ in range(5):
        await asyncio.gather(*[_submit(scheduler, {"input": x}) for _ in range(40)])
        await asyncio.gather(*[_submit(scheduler, {"input": x}, timeout=5.0) for _ in range(40)])
    waiting = sum(len(jobs) for jobs in scheduler._deadlines.values())
    assert waiting == 0, f"{waiting} answered requests still held for their deadlines"
    await scheduler.close()


async def test_a_cancelled_request_is_not_answered_and_frees_its_place():
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=8, max_queue_size=2)
    x = np.ones((1, 4), np.float32)
    first = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.05)  # the worker holds it at the gate
    answers = []
    job = scheduler.submit({"input": x}, 1, lambda *answer: answers.append(answer))
    with pytest.raises(QueueFull):
        _submit(scheduler, {"input": x})
    job.cancel()
    gate.open.set()
    await first
    await _drained(scheduler)
    assert answers == []
    assert sum(gate.batches) == 1  # the cancelled one never ran
    await _submit(scheduler, {"input": x})
    await scheduler.close()


async def test_a_timed_out_request_frees_its_place_at_once():
    """It holds no place in max_queue_size once answered 504, even before a worker drops it."""
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=8, max_queue_size=2)
    x = np.ones((1, 4), np.float32)
    held = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.05)  # the worker holds it at the gate
    with pytest.raises(RequestTimeout):
        await _submit(scheduler, {"input": x}, timeout=0.03)
    assert scheduler.pending == 1
    after = _submit(scheduler, {"input": x + 1})  # was QueueFull: the expired one still counted
    gate.open.set()
    await held
    np.testing.assert_array_equal((await after).outputs["output"], (x + 1) * 2)
    await _drained(scheduler)
    await scheduler.close()


async def test_a_failed_batch_runs_its_requests_one_by_one():
    """One request's bad values fail only that request, not the others batched with it."""
    runs: list[int] = []
    gate = threading.Event()

    def picky(inputs):
        gate.wait(10)
        x = inputs["input"]
        runs.append(x.shape[0])
        if (x < 0).any():
            raise ValueError("indices element out of data bounds")
        return {"output": x * 2}

    metrics = Metrics().for_model("picky", "1")
    config = ModelConfig(max_batch_size=8)
    scheduler = Scheduler("picky", picky, config, metrics, asyncio.get_running_loop())
    x = np.ones((1, 4), np.float32)
    held = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.05)
    good, bad, also_good = (
        _submit(scheduler, {"input": x + 1}),
        _submit(scheduler, {"input": -x}),
        _submit(scheduler, {"input": x + 2}),
    )
    gate.set()
    await held
    np.testing.assert_array_equal((await good).outputs["output"], (x + 1) * 2)
    np.testing.assert_array_equal((await also_good).outputs["output"], (x + 2) * 2)
    with pytest.raises(InferenceFailed, match="out of data bounds"):
        await bad
    assert runs == [1, 3, 1, 1, 1]  # the batch of three failed, then each ran alone
    await _drained(scheduler)
    await scheduler.close()


async def test_a_batch_closes_at_the_largest_preferred_size_the_queue_makes():
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=8, preferred_batch_sizes=(2, 4))
    x = np.ones((1, 4), np.float32)
    held = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.05)
    waiting = [_submit(scheduler, {"input": x + i}) for i in range(7)]
    gate.open.set()
    await asyncio.gather(held, *waiting)
    # 7 waiting: 4 (the largest preferred size they reach), 2, then the last one alone
    assert gate.batches == [1, 4, 2, 1]
    await scheduler.close()


async def test_a_failing_answer_callback_costs_the_batch_nothing(caplog):
    gate = _Gate()
    scheduler = _scheduler(gate, max_batch_size=8)
    x = np.ones((1, 4), np.float32)
    held = _submit(scheduler, {"input": x})
    await asyncio.sleep(0.05)

    def broken(outcome, error):
        raise RuntimeError("a bug in a front end")

    scheduler.submit({"input": x}, 1, broken)
    after = _submit(scheduler, {"input": x + 1})
    gate.open.set()
    await held
    np.testing.assert_array_equal((await after).outputs["output"], (x + 1) * 2)
    assert "answering a request failed" in caplog.text
    await scheduler.close()


def test_request_past_its_deadline_times_out(private_agent):
    """A request whose `timeout` (µs) expires while queued gets 504 and the server goes on."""
    gate = _Gate()
    model = private_agent.dataplane.model("mlp")
    real_infer = model.scheduler._infer
    model.scheduler._infer = gate.infer
    url = f"http://{private_agent.http_url}/v2/models/mlp/infer"
    body = json.dumps(
        {
            "parameters": {"timeout": 50_000},
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
        }
    ).encode()

    async def call():
        async with aiohttp.ClientSession() as s, s.post(url, data=body) as r:
            return r.status, await r.json()

    try:
        status, doc = asyncio.run(call())
    finally:
        gate.open.set()
        model.scheduler._infer = real_infer
    assert status == 504 and "within 0.05 s" in doc["error"]
    status, _ = asyncio.run(call())
    assert status == 200


def test_queue_full_is_http_429(private_agent, private_repo):
    (private_repo / "mlp" / "1" / "model.toml").write_text(
        "max_batch_size = 4\nmax_queue_size = 2\n"
    )
    private_agent.call(private_agent.dataplane.load_model("mlp"))
    gate = _Gate()
    model = private_agent.dataplane.model("mlp")
    model.scheduler._infer = gate.infer
    url = f"http://{private_agent.http_url}/v2/models/mlp/infer"
    body = _body(np.zeros((1, 64), np.float32))

    async def burst():
        async with aiohttp.ClientSession() as s:

            async def one():
                async with s.post(url, data=body) as r:
                    return r.status, await r.json()

            tasks = [asyncio.create_task(one()) for _ in range(6)]
            await asyncio.sleep(0.5)
            gate.open.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(burst())
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) == 2 and statuses.count(429) == 4
    assert all("retry later" in d["error"] for s, d in results if s == 429)


async def test_runtime_error_is_reported_not_crashing():
    def broken(inputs):
        raise RuntimeError("kernel exploded")

    scheduler = Scheduler(
        "broken",
        broken,
        ModelConfig(),
        Metrics().for_model("broken", "1"),
        asyncio.get_running_loop(),
    )
    with pytest.raises(InferenceFailed, match="kernel exploded"):
        await _submit(scheduler, {"input": np.ones((1, 2))})
    await scheduler.close()


def test_freed_heap_goes_back_once_the_queues_drain(private_repo, monkeypatch):
    from agent.serving import server as server_module
    from agent.serving.server import ServeOptions
    from tests.conftest import ServerThread

    calls = []
    with ServerThread(ServeOptions(private_repo, "127.0.0.1:0", None, None)) as agent:
        # loading trims too; count from here on
        monkeypatch.setattr(server_module.memory, "release_free_memory", lambda: calls.append(1))
        time.sleep(1.5)
        assert not calls  # nothing served yet: nothing to return
        url = f"http://{agent.http_url}/v2/models/mlp/infer"
        body = _body(np.zeros((1, 64), np.float32))
        asyncio.run(_fire(url, [body] * 20, concurrency=4))
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.1)
        assert calls, "no memory returned after the burst"
        time.sleep(2.5)  # idle, nothing new served: no further trimming
        assert len(calls) == 1
        # a steady trickle, one request every 0.3 s: never quiet for a second, never stalled
        for _ in range(10):
            asyncio.run(_fire(url, [body], concurrency=1))
            time.sleep(0.3)
        assert len(calls) == 1
        deadline = time.monotonic() + 30
        while len(calls) == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(calls) == 2, "nothing returned once the trickle stopped"


def test_grpc_reports_full_queue_and_deadline(private_repo):
    """The same backpressure and deadline over gRPC: RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from agent.serving.server import ServeOptions
    from protocol import inference_pb2 as pb
    from protocol import inference_pb2_grpc as pb_grpc
    from tests.conftest import ServerThread

    (private_repo / "mlp" / "1" / "model.toml").write_text(
        "max_batch_size = 4\nmax_queue_size = 2\n"
    )
    row = np.zeros((1, 64), np.float32).tobytes()

    def request(timeout_us: int | None = None) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="mlp")
        msg.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        msg.raw_input_contents.append(row)
        if timeout_us:
            msg.parameters["timeout"].int64_param = timeout_us
        return msg

    options = ServeOptions(private_repo, "127.0.0.1:0", "127.0.0.1:0", None)
    with ServerThread(options) as agent, grpc.insecure_channel(agent.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        gate = _Gate()
        scheduler = agent.dataplane.model("mlp").scheduler
        scheduler._infer = gate.infer

        def call(_):
            try:
                stub.ModelInfer(request(), timeout=30)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name

        with ThreadPoolExecutor(6) as pool:
            results = pool.map(call, range(6))
            time.sleep(0.5)
            gate.open.set()
            codes = sorted(results)
        assert codes.count("OK") == 2 and codes.count("RESOURCE_EXHAUSTED") == 4

        gate.open.clear()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(timeout_us=50_000), timeout=30)
        gate.open.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "within 0.05 s" in err.value.details()


def test_requests_listing_inputs_in_another_order_batch_by_name(
    private_agent, private_repo, caplog
):
    """The batch key follows the model's input order: {a: [1, 2], b: [1, 3]} and
    {b: [1, 2], a: [1, 3]} have different shapes per input and must not share a batch."""
    caplog.set_level(logging.INFO, logger="agent.serving.scheduler")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["ya"]), helper.make_node("Identity", ["b"], ["yb"])],
        "pair",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "p"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "q"]),
        ],
        [
            helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["n", "p"]),
            helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["n", "q"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version_dir = private_repo / "pair" / "1"
    version_dir.mkdir(parents=True)
    onnx.save(model, version_dir / "model.onnx")
    # a long delay: the two requests wait together, so only their keys keep them apart
    (version_dir / "model.toml").write_text("max_batch_size = 8\nmax_queue_delay_us = 300000\n")
    private_agent.call(private_agent.dataplane.load_model("pair"))

    def tensor(name, width, value):
        return {"name": name, "datatype": "FP32", "shape": [1, width], "data": [value] * width}

    bodies = [
        json.dumps({"inputs": [tensor("a", 2, 1.0), tensor("b", 3, 2.0)]}).encode(),
        json.dumps({"inputs": [tensor("b", 2, 3.0), tensor("a", 3, 4.0)]}).encode(),
    ]

    async def both():
        url = f"http://{private_agent.http_url}/v2/models/pair/infer"
        async with aiohttp.ClientSession() as session:

            async def post(body):
                async with session.post(url, data=body) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(post(b) for b in bodies))

    (s1, d1), (s2, d2) = asyncio.run(both())
    assert (s1, s2) == (200, 200), (d1, d2)
    out1 = {o["name"]: o["data"] for o in d1["outputs"]}
    out2 = {o["name"]: o["data"] for o in d2["outputs"]}
    assert out1 == {"ya": [1.0] * 2, "yb": [2.0] * 3}
    assert out2 == {"ya": [4.0] * 3, "yb": [3.0] * 2}
    assert "failed on a batch" not in caplog.text  # answered right the first time


def test_a_worker_waiting_out_the_queue_delay_wakes_at_its_timeout():
    """The race that held batches open until the next request (CPython's SimpleQueue before
    3.13), made to happen every time: a worker waits on the hand-over queue with a timeout; a
    hand-over wakes it, but another worker takes it first; by the time the waiter runs again
    its time is up. It must see Empty then, not sleep on until the next hand-over."""
    hand_overs = hand_over_queue()
    outcome = []

    def waiter() -> None:
        try:
            hand_overs.get(True, 0.05)
            outcome.append("item")
        except queue.Empty:
            outcome.append("empty")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # this thread keeps the GIL while it spins below
    try:
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.01)  # the waiter is now blocked in get()
        hand_overs.put(["hand-over"])  # wakes it ...
        assert hand_overs.get_nowait() == ["hand-over"]  # ... but another worker took it
        spin_until = time.monotonic() + 0.1
        while time.monotonic() < spin_until:  # past the waiter's timeout, holding the GIL
            pass
    finally:
        sys.setswitchinterval(interval)
    thread.join(5)
    stuck = thread.is_alive()
    if stuck:
        hand_overs.put(None)  # let it go
        thread.join(5)
    assert not stuck and outcome == ["empty"]


async def test_closing_while_a_worker_holds_a_batch_open_stops_every_worker(monkeypatch):
    """close() queues one STOP per worker. A worker collecting a batch (queue delay on) that
    found a STOP must not wait for more: its next take got the STOP meant for a worker blocked
    in get(), which then never ended, and an unload or reload under load hung in close()
    forever (holding the model's lock). The interleaving is made to happen every time: worker 0
    gets its hand-over only once close() queued the STOPs, worker 1 reaches get() after worker 0
    ended."""
    from agent.serving import scheduler as scheduler_module

    class Staggered(queue.Queue):
        def get(self, block=True, timeout=None):
            me = threading.current_thread().name
            if me == "model-stop-race-1":
                until = time.monotonic() + 30
                while time.monotonic() < until and any(
                    t.name == "model-stop-race-0" for t in threading.enumerate()
                ):
                    time.sleep(0.005)
            item = super().get(block, timeout)
            if me == "model-stop-race-0" and isinstance(item, list):
                until = time.monotonic() + 30
                while self.qsize() < 2 and time.monotonic() < until:  # close()'s two STOPs
                    time.sleep(0.005)
            return item

    monkeypatch.setattr(scheduler_module, "hand_over_queue", Staggered)
    gate = _Gate()
    gate.open.set()
    config = ModelConfig(max_batch_size=8, max_queue_delay_us=100_000, instances=2)
    metrics = Metrics().for_model("stop-race", "1")
    loop = asyncio.get_running_loop()
    scheduler = Scheduler("stop-race", gate.infer, config, metrics, loop)
    x = np.ones((1, 4), np.float32)
    answer = _submit(scheduler, {"input": x})
    closing = asyncio.ensure_future(scheduler.close())
    done, _ = await asyncio.wait([closing], timeout=30)
    stuck = [w.name for w in scheduler._workers if w.is_alive()]
    if not done:  # let the stuck worker go, so that the test ends
        scheduler._queue.put(scheduler_module._STOP)
        await closing
    assert done and not stuck, f"close() never ended: {stuck} waited for a STOP taken by another"
    np.testing.assert_array_equal((await answer).outputs["output"], x * 2)


async def test_clients_own_timeouts_leave_no_deadline_lists_behind():
    """Each distinct per-request timeout has its list of jobs; once its jobs are answered the
    list goes, not when the timer next fires (a client sending random timeouts kept ~2,000
    lists alive that every batch's answer walked)."""
    gate = _Gate()
    gate.open.set()
    scheduler = _scheduler(gate, max_batch_size=8)
    x = np.ones((1, 4), np.float32)
    answers = [_submit(scheduler, {"input": x}, timeout=10 + i / 1000) for i in range(200)]
    await asyncio.gather(*answers)
    assert len(scheduler._deadlines) <= 1  # at most the model's own timeout's
    await scheduler.close()
