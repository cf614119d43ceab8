"""Runs one model's requests off the event loop, forming dynamic batches when the model allows.

The event loop hands each validated request to `submit()` with a callback, which is called once,
back on the loop, with the outcome, an error or a timeout (unless the caller cancels first). No
future or task per request: on a small model the loop's own work per request bounds throughput,
and a task with its coroutines cost ~6 µs of it, a timer per request ~1 µs.

Requests submitted in one turn of the loop go to the workers together (one queue put, one
wake-up, instead of one per request: waking a thread per request cost 14% of the loop thread's
time under load). With batching on, a worker drains the requests that are already waiting (and,
if configured, waits up to `max_queue_delay_us` for more) into one batch of compatible shapes,
concatenates along the batch dimension, runs the model once and splits the outputs. Results
come back to the loop with one `call_soon_threadsafe` per batch.

Under load this batches naturally: requests pile up while the previous batch runs, so a busy
model runs fewer, larger batches without adding latency at low load.

Deadlines: requests with the same timeout expire in the order they came, so each timeout value
keeps a FIFO of its requests, finished ones dropped from the front as results come back, and one
timer per model is armed for the earliest deadline at the front of any of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.serving.config import ModelConfig
from agent.serving.errors import (
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    QueueFull,
    RequestTimeout,
    ServingError,
)
from agent.serving.metrics import ModelMetrics
from runtimes.base import InputRejected

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(slots=True)
class Outcome:
    """One request's result: its rows `span` of the batch's `arrays` (None: all of them)."""

    arrays: Arrays
    span: slice | None
    queue_ns: int
    compute_ns: int

    @property
    def outputs(self) -> Arrays:
        span = self.span
        if span is None:
            return self.arrays
        return {name: array[span] for name, array in self.arrays.items()}


Done = Callable[[Outcome | None, ServingError | None], None]


class Job:
    """One submitted request. `cancel()` it (on the loop) when nobody waits for its answer."""

    __slots__ = (
        "counted", "deadline", "done", "enqueued_ns", "finished", "inputs", "key", "rows",
        "scheduler",
    )  # fmt: skip

    def __init__(
        self,
        scheduler: Scheduler,
        inputs: Arrays,
        rows: int,
        key: tuple,
        done: Done,
        deadline: float,
    ):
        self.scheduler = scheduler
        self.inputs: Arrays | None = inputs
        self.rows = rows
        self.key = key  # non-batch dims of every input: only equal keys batch together
        self.done: Done | None = done
        self.deadline = deadline  # on the loop's clock
        self.enqueued_ns = time.perf_counter_ns()
        # answered, timed out or cancelled. Set on the loop; workers read it to skip the job.
        self.finished = False
        # It holds one of max_queue_size's places (loop thread only): until it is answered,
        # times out or is cancelled, not until a worker gets round to dropping it.
        self.counted = True

    def cancel(self) -> None:
        self.finished = True
        self.done = None
        if self.counted:
            self.scheduler._settle((self,))


_STOP = object()


def hand_over_queue() -> queue.Queue:
    """The queue from the event loop to a model's workers.

    Not SimpleQueue: before Python 3.13 its get(timeout) can sleep past the timeout until the
    next put, when it was woken for an item another consumer took (several workers) and its
    time ran out before it ran again. A worker holding a batch open for max_queue_delay_us then
    waited for the next request, which closed-loop clients never sent before their deadlines.
    queue.Queue waits on a condition and keeps its timeouts, for ~3 µs more a hand-over.
    """
    return queue.Queue()


class Scheduler:
    def __init__(
        self,
        name: str,
        infer: Callable[[Arrays], Arrays],
        config: ModelConfig,
        metrics: ModelMetrics,
        loop: asyncio.AbstractEventLoop,
    ):
        self.name = name
        self._infer = infer
        self._config = config
        self._metrics = metrics
        self._loop = loop
        self._batching = config.max_batch_size > 0
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._delay_s = config.max_queue_delay_us / 1e6
        self._default_timeout = config.timeout_ms / 1000
        self._queue = hand_over_queue()
        self._pending = 0  # touched on the event loop thread only
        self._outbox: list[Job] = []  # submitted in this turn of the loop, not yet handed over
        # One hand-over per loop turn feeds one worker; separate jobs keep several busy.
        self._hand_over_together = self._batching or config.instances == 1
        # timeout (s) -> its jobs in submission order, so in deadline order (loop thread only)
        self._deadlines: dict[float, deque[Job]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        # A worker took a STOP: everything handed over before it has been taken by some worker.
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, name=f"model-{name}-{i}", daemon=True)
            for i in range(config.instances)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, inputs: Arrays, rows: int, done: Done, timeout: float | None = None) -> Job:
        """Queue one request. `done(outcome, None)` or `done(None, error)` is called once, on the
        loop, unless the job is cancelled first. `timeout` (s) may shorten the model's own."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is unloading")
        if self._pending >= self._config.max_queue_size:
            raise QueueFull(
                f"model {self.name} has {self._pending} requests waiting "
                f"(max_queue_size {self._config.max_queue_size}); retry later"
            )
        if timeout is None or timeout > self._default_timeout:
            timeout = self._default_timeout
        key = ()
        if self._batching:
            # `inputs` come in the model's input order (ServedModel.validate), so equal shapes
            # give equal keys whatever order a request listed its inputs in.
            for array in inputs.values():  # a loop, not a generator: this runs per request
                key += (array.shape[1:],)
        deadline = self._loop.time() + timeout
        job = Job(self, inputs, rows, key, done, deadline)
        waiting = self._deadlines.get(timeout)
        if waiting is None:
            waiting = self._deadlines[timeout] = deque()
        waiting.append(job)
        if deadline < self._timer_at:
            self._arm(deadline)
        self._pending += 1
        self._metrics.pending += 1
        self._outbox.append(job)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._hand_over)
        return job

    def _hand_over(self) -> None:
        jobs, self._outbox = self._outbox, []
        if not jobs:
            return
        if self._hand_over_together:
            self._queue.put(jobs)
        else:
            for job in jobs:
                self._queue.put([job])

    async def close(self) -> None:
        """Stop taking requests, let queued ones finish, then stop the workers."""
        if self._closed:
            return
        self._closed = True
        self._hand_over()
        for _ in self._workers:
            self._queue.put(_STOP)
        await asyncio.to_thread(self._join)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _join(self) -> None:
        for worker in self._workers:
            worker.join()

    # --- worker threads -------------------------------------------------------------------

    def _work(self) -> None:
        ready: deque[Job] = deque()  # handed over, not yet run, in arrival order
        while True:
            if not ready and not self._take(ready, block=True):
                return
            job = ready.popleft()
            batch = self._collect(job, ready) if self._batching else [job]
            live = [j for j in batch if not j.finished]  # drop timed-out and cancelled ones
            if len(live) < len(batch):
                dropped = [j for j in batch if j.finished]
                self._loop.call_soon_threadsafe(self._settle, dropped)
            if live:
                self._run(live)
            if self._stopping and not ready:
                return

    def _take(self, ready: deque, block: bool, timeout: float | None = None) -> bool:
        """Move one hand-over from the queue into `ready`; False if none came (or STOP)."""
        try:
            item = self._queue.get(block, timeout)
        except queue.Empty:
            return False
        if item is _STOP:
            self._stopping = True  # finish what this worker already took, then end
            return False
        ready.extend(item)
        return True

    def _collect(self, first: Job, ready: deque) -> list[Job]:
        batch, rows = [first], first.rows
        limit = self._config.max_batch_size
        deadline = None
        while rows < limit:
            if not ready and not self._stopping and not self._take(ready, block=False):
                # Not after a STOP this take found: another wait could take a second STOP, one
                # meant for a worker blocked in get(), and close() would join it forever.
                if self._stopping or not self._delay_s or rows in self._preferred:
                    break
                now = time.monotonic()
                deadline = deadline or now + self._delay_s
                if now >= deadline or not self._take(ready, True, deadline - now):
                    break
            if not ready:
                break
            job = ready[0]
            if job.key != first.key or rows + job.rows > limit:
                break  # it starts the next batch
            if rows in self._preferred and not self._grows_to_preferred(rows, first.key, ready):
                break  # a preferred size, and the requests waiting make no larger one
            batch.append(ready.popleft())
            rows += job.rows
        return batch

    def _grows_to_preferred(self, rows: int, key: tuple, ready: deque) -> bool:
        """Whether the waiting requests that could join make a larger preferred size (Triton
        closes a batch at the largest preferred size the queue can form)."""
        limit = self._config.max_batch_size
        for job in ready:
            if job.key != key or rows + job.rows > limit:
                return False
            rows += job.rows
            if rows in self._preferred:
                return True
        return False

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter_ns()
        rows = sum(j.rows for j in batch)
        error: Exception | None = None
        outputs: Arrays = {}
        try:
            if len(batch) == 1:
                outputs = self._infer(batch[0].inputs)
            else:
                names = batch[0].inputs.keys()
                merged = {n: np.concatenate([j.inputs[n] for j in batch]) for n in names}
                outputs = self._infer(merged)
                for name, array in outputs.items():
                    if array.ndim == 0 or array.shape[0] != rows:
                        raise ValueError(
                            f"output {name} has shape {array.shape}, not {rows} batch rows"
                        )
        except Exception as exc:  # the runtime's own error types vary; report, never crash
            if len(batch) > 1:
                # One request's bad values (an id past a vocabulary) must not fail the others
                # batched with it, nor may a model that does not really batch: run each alone.
                log.info(
                    "model %s failed on a batch of %d (%s): running its %d requests one by one",
                    self.name, rows, exc, len(batch),
                )  # fmt: skip
                for job in batch:
                    if job.finished:  # timed out or cancelled meanwhile
                        self._loop.call_soon_threadsafe(self._settle, (job,))
                    else:
                        self._run([job])
                return
            if isinstance(exc, InputRejected):
                error = InvalidInput(f"model {self.name}: {exc}")
            else:
                log.warning("model %s failed on a batch of %d: %s", self.name, rows, exc)
                error = InferenceFailed(f"model {self.name} failed: {exc}")
        compute_ns = time.perf_counter_ns() - start
        self._loop.call_soon_threadsafe(
            self._resolve, batch, rows, outputs, error, start, compute_ns
        )

    # --- back on the event loop -----------------------------------------------------------

    def _settle(self, jobs) -> None:
        """Give back the queue places of these jobs that still hold one."""
        count = 0
        for job in jobs:
            if job.counted:
                job.counted = False
                count += 1
        self._pending -= count
        self._metrics.pending -= count

    def _resolve(self, batch, rows, outputs, error, start_ns, compute_ns) -> None:
        """Answer a batch's jobs, each with its rows of the outputs (a slice each, no copy)."""
        self._settle(batch)
        self._metrics.executed(rows, compute_ns)
        whole = len(batch) == 1
        offset = 0
        for job in batch:
            done = job.done
            job.inputs = job.done = None
            start, offset = offset, offset + job.rows
            if job.finished:
                continue
            job.finished = True
            if error is not None:
                self._answer(done, None, error)
                continue
            span = None if whole else slice(start, offset)
            outcome = Outcome(outputs, span, start_ns - job.enqueued_ns, compute_ns)
            self._answer(done, outcome, None)
        emptied = []
        for timeout, waiting in self._deadlines.items():  # usually one: the model's own timeout
            while waiting and waiting[0].finished:
                waiting.popleft()
            if not waiting and timeout != self._default_timeout:
                emptied.append(timeout)
        for timeout in emptied:  # clients' own timeouts: at most one list per pending request
            del self._deadlines[timeout]

    def _answer(self, done: Done, outcome: Outcome | None, error: ServingError | None) -> None:
        try:
            done(outcome, error)
        except Exception:  # the caller's bug must not cost the rest of the batch its answers
            log.exception("model %s: answering a request failed", self.name)

    # --- deadlines (on the loop) ----------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        """Time out every job past its deadline; arm the timer for the next one."""
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        expired: list[tuple[Job, float]] = []
        for timeout, waiting in list(self._deadlines.items()):
            while waiting and (waiting[0].finished or waiting[0].deadline <= now):
                job = waiting.popleft()
                if not job.finished:
                    expired.append((job, timeout))
            if not waiting:
                del self._deadlines[timeout]
        self._settle([job for job, _ in expired])  # their places are free at once
        for job, timeout in expired:  # the worker skips them, or drops their results
            done, job.done = job.done, None
            job.finished = True
            error = RequestTimeout(f"model {self.name}: no result within {timeout:g} s")
            self._answer(done, None, error)
        fronts = [w[0].deadline for w in self._deadlines.values() if w]
        if fronts and min(fronts) < self._timer_at:
            self._arm(min(fronts))
