"""Prometheus metrics of the serving data plane, after Triton's `nv_inference_*` family.

Durations are cumulative microsecond counters like Triton's (rate() them), plus a latency
histogram for percentiles. Children are bound once per model version, so the hot path only
increments.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LABELS = ("model", "version")
_LATENCY_BUCKETS = (
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
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(slots=True)
class ModelMetrics:
    """The metric children of one model version."""

    success: Counter
    inference_count: Counter
    exec_count: Counter
    request_us: Counter
    queue_us: Counter
    compute_us: Counter
    latency: Histogram
    batch_size: Histogram
    pending: Gauge
    _failure: Counter
    _labels: tuple[str, str]

    def failure(self, reason: str) -> None:
        self._failure.labels(*self._labels, reason).inc()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._success = Counter(
            "edgefleet_inference_request_success",
            "Successful inference requests",
            _LABELS,
            registry=r,
        )
        self._failure = Counter(
            "edgefleet_inference_request_failure",
            "Failed inference requests, by reason (invalid, queue_full, timeout, runtime, ...)",
            (*_LABELS, "reason"),
            registry=r,
        )
        self._inference_count = Counter(
            "edgefleet_inference_count", "Inferences performed (batch rows)", _LABELS, registry=r
        )
        self._exec_count = Counter(
            "edgefleet_inference_exec_count", "Model executions (batches run)", _LABELS, registry=r
        )
        self._request_us = Counter(
            "edgefleet_inference_request_duration_us",
            "Cumulative end-to-end request time in the data plane, microseconds",
            _LABELS,
            registry=r,
        )
        self._queue_us = Counter(
            "edgefleet_inference_queue_duration_us",
            "Cumulative time requests waited in the model's queue, microseconds",
            _LABELS,
            registry=r,
        )
        self._compute_us = Counter(
            "edgefleet_inference_compute_infer_duration_us",
            "Cumulative time spent in the runtime, microseconds (once per batch)",
            _LABELS,
            registry=r,
        )
        self._latency = Histogram(
            "edgefleet_inference_request_latency_seconds",
            "Request latency in the data plane",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._batch_size = Histogram(
            "edgefleet_inference_batch_size",
            "Rows per model execution",
            _LABELS,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._pending = Gauge(
            "edgefleet_inference_pending_requests",
            "Requests queued or running",
            _LABELS,
            registry=r,
        )

    def for_model(self, name: str, version: str) -> ModelMetrics:
        labels = (name, version)
        return ModelMetrics(
            success=self._success.labels(*labels),
            inference_count=self._inference_count.labels(*labels),
            exec_count=self._exec_count.labels(*labels),
            request_us=self._request_us.labels(*labels),
            queue_us=self._queue_us.labels(*labels),
            compute_us=self._compute_us.labels(*labels),
            latency=self._latency.labels(*labels),
            batch_size=self._batch_size.labels(*labels),
            pending=self._pending.labels(*labels),
            _failure=self._failure,
            _labels=labels,
        )
