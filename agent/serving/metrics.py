"""Prometheus metrics of the serving data plane, after Triton's `nv_inference_*` family.

Durations are cumulative microsecond counters like Triton's (rate() them), plus a latency
histogram for percentiles.

The hot path only adds to plain numbers on one object per model version; a collector turns
them into Prometheus families when `/metrics` is scraped. prometheus_client's own metric
children take a lock and go through several calls per update: ~3 µs of the event loop per
request, where a small model's whole request costs ~80 µs. Every update happens on the event
loop thread (the scheduler reports executions from there too), so plain additions are safe, and a
scrape, also on the loop, sees a consistent snapshot.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from operator import attrgetter

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from agent.serving.errors import ModelLoadFailed, ServingError

_LABELS = ["model", "version"]
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The `reason` label of failures: the name of the data plane's error (agent/serving/errors.py)
# that ended the request; a failed load answers the repository API, not a request. Stable, since
# the update's health watch tells client errors from the model's by them.
REASONS = tuple(e.__name__ for e in ServingError.__subclasses__() if e is not ModelLoadFailed)


class ModelMetrics:
    """The counters of one model version."""

    __slots__ = (
        "batch_counts",
        "batch_sum",
        "batches",
        "compute_us",
        "created",
        "exec_count",
        "failure_us",
        "failures",
        "inference_count",
        "labels",
        "last_inference_ms",
        "latency_counts",
        "latency_sum",
        "pending",
        "queue_us",
        "request_compute_us",
        "request_us",
        "success",
    )

    def __init__(self, name: str, version: str):
        self.labels = [name, version]
        self.created = time.time()
        self.success = 0
        self.failures: dict[str, int] = {}
        self.inference_count = 0
        self.exec_count = 0
        self.request_us = 0.0
        self.queue_us = 0.0
        self.compute_us = 0.0
        self.pending = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.latency_sum = 0.0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        # For the statistics extension (Triton's per-request view): the compute time of each
        # successful request's batch, summed per request; the time failed requests took; and
        # executions by exact batch size -> [count, compute ns] (at most max_batch_size keys).
        self.request_compute_us = 0.0
        self.failure_us = 0.0
        self.batches: dict[int, list[int]] = {}
        self.last_inference_ms = 0

    def succeeded(self, elapsed_ns: int, queue_ns: int, compute_ns: int) -> None:
        self.success += 1
        self.request_us += elapsed_ns / 1000
        self.queue_us += queue_ns / 1000
        self.request_compute_us += compute_ns / 1000
        seconds = elapsed_ns / 1e9
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def failure(self, reason: str, elapsed_ns: int = 0) -> None:
        """A failed request; `elapsed_ns` is how long it took if it reached the model's queue
        (one refused outright took no measurable time)."""
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.failure_us += elapsed_ns / 1000

    def executed(self, rows: int, compute_ns: int) -> None:
        """One model execution (a batch of `rows`) finished."""
        self.exec_count += 1
        self.inference_count += rows
        self.compute_us += compute_ns / 1000
        self.batch_counts[bisect_left(BATCH_BUCKETS, rows)] += 1
        self.batch_sum += rows
        size = self.batches.get(rows)
        if size is None:
            size = self.batches[rows] = [0, 0]
        size[0] += 1
        size[1] += compute_ns
        self.last_inference_ms = time.time_ns() // 1_000_000


class Metrics:
    """Every model version's counters, exposed through `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self.registry.register(_Collector(self._models))

    def for_model(self, name: str, version: str) -> ModelMetrics:
        """The counters of (name, version); a reload keeps counting where the last load left."""
        key = (name, version)
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = ModelMetrics(name, version)
        return found


class _Collector(Collector):
    def __init__(self, models: dict[tuple[str, str], ModelMetrics]):
        self._models = models

    def describe(self) -> list:
        return []  # names are dynamic; nothing for the registry to check at register()

    def collect(self) -> Iterator:
        models = list(self._models.values())

        def counter(name: str, doc: str, value, labels=_LABELS):
            family = CounterMetricFamily(name, doc, labels=labels)
            for m in models:
                family.add_metric(m.labels, value(m), created=m.created)
            return family

        yield counter(
            "edgefleet_inference_request_success",
            "Successful inference requests",
            attrgetter("success"),
        )
        failure = CounterMetricFamily(
            "edgefleet_inference_request_failure",
            "Failed inference requests, by reason: the error's kind (" + ", ".join(REASONS) + ")",
            labels=[*_LABELS, "reason"],
        )
        for m in models:
            for reason, count in sorted(m.failures.items()):
                failure.add_metric([*m.labels, reason], count, created=m.created)
        yield failure
        yield counter(
            "edgefleet_inference_count",
            "Inferences performed (batch rows)",
            attrgetter("inference_count"),
        )
        yield counter(
            "edgefleet_inference_exec_count",
            "Model executions (batches run)",
            attrgetter("exec_count"),
        )
        yield counter(
            "edgefleet_inference_request_duration_us",
            "Cumulative end-to-end request time in the data plane, microseconds",
            attrgetter("request_us"),
        )
        yield counter(
            "edgefleet_inference_queue_duration_us",
            "Cumulative time requests waited in the model's queue, microseconds",
            attrgetter("queue_us"),
        )
        yield counter(
            "edgefleet_inference_compute_infer_duration_us",
            "Cumulative time spent in the runtime, microseconds (once per batch)",
            attrgetter("compute_us"),
        )
        latency = HistogramMetricFamily(
            "edgefleet_inference_request_latency_seconds",
            "Request latency in the data plane",
            labels=_LABELS,
        )
        batch = HistogramMetricFamily(
            "edgefleet_inference_batch_size", "Rows per model execution", labels=_LABELS
        )
        for m in models:
            latency.add_metric(
                m.labels, _cumulative(LATENCY_BUCKETS, m.latency_counts), m.latency_sum
            )
            batch.add_metric(m.labels, _cumulative(BATCH_BUCKETS, m.batch_counts), m.batch_sum)
        yield latency
        yield batch
        pending = GaugeMetricFamily(
            "edgefleet_inference_pending_requests", "Requests queued or running", labels=_LABELS
        )
        for m in models:
            pending.add_metric(m.labels, m.pending)
        yield pending


def _cumulative(bounds: tuple, counts: list[int]) -> list[tuple[str, int]]:
    out, total = [], 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        total += count
        out.append((_bound(bound), total))
    return out


def _bound(value: float) -> str:
    """Bucket bounds as prometheus_client writes them ("0.005", "1.0", "+Inf")."""
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))
