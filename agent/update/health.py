"""The health watch after an activation: error rate and p95 latency of the new version.

It reads the agent's Prometheus metrics for (model, version) when the version goes live and
then every `poll_s` until `window_s` has passed, and judges the difference: the share of failed
requests (client mistakes such as malformed input are not the model's fault and do not count)
and the 95th percentile of the latency histogram, interpolated within its bucket the way
Prometheus' histogram_quantile does. With fewer than `min_requests` requests it gives no
verdict. The clock and sleep are parameters so tests need no real waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from agent.update.config import HealthPolicy

# Failure reasons that are the client's fault, not the model's.
CLIENT_ERRORS = frozenset({"InvalidInput", "ModelNotFound"})
_SUCCESS = "edgefleet_inference_request_success"
_FAILURE = "edgefleet_inference_request_failure"
_LATENCY = "edgefleet_inference_request_latency_seconds"


@dataclass(frozen=True, slots=True)
class Sample:
    success: float = 0.0
    failure: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count)

    def minus(self, earlier: Sample) -> Sample:
        before = dict(earlier.buckets)
        return Sample(
            self.success - earlier.success,
            self.failure - earlier.failure,
            tuple((le, count - before.get(le, 0.0)) for le, count in self.buckets),
        )

    @property
    def requests(self) -> float:
        return self.success + self.failure

    def quantile(self, q: float) -> float | None:
        """Seconds below which a fraction `q` of the requests completed (None if none)."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower
                inside = cumulative - below
                return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = upper, cumulative
        return lower


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    reason: str
    requests: int = 0
    error_rate: float | None = None
    p95_ms: float | None = None
    details: dict = field(default_factory=dict)


def parse_sample(text: str, model: str, version: str) -> Sample:
    success = failure = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model or s.labels.get("version") != version:
                continue
            if s.name == f"{_SUCCESS}_total":
                success += s.value
            elif s.name == f"{_FAILURE}_total" and s.labels.get("reason") not in CLIENT_ERRORS:
                failure += s.value
            elif s.name == f"{_LATENCY}_bucket":
                buckets[float(s.labels["le"])] = s.value
    return Sample(success, failure, tuple(sorted(buckets.items())))


class HealthWatch:
    def __init__(
        self,
        policy: HealthPolicy,
        read_metrics: Callable[[], str],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self.read_metrics = read_metrics
        self.clock = clock
        self.sleep = sleep

    def watch(self, model: str, version: int) -> Verdict:
        policy = self.policy
        base = parse_sample(self.read_metrics(), model, str(version))
        started = self.clock()
        verdict = Verdict(True, "no requests yet")
        while self.clock() - started < policy.window_s:
            self.sleep(min(policy.poll_s, max(0.0, policy.window_s - (self.clock() - started))))
            window = parse_sample(self.read_metrics(), model, str(version)).minus(base)
            verdict = self.judge(window, self.clock() - started)
            if not verdict.healthy:
                return verdict
        return verdict

    def judge(self, window: Sample, elapsed: float) -> Verdict:
        policy = self.policy
        requests = int(window.requests)
        if requests < policy.min_requests:
            return Verdict(
                True, f"only {requests} requests in {elapsed:.0f} s: not enough to judge", requests
            )
        error_rate = window.failure / window.requests
        p95 = window.quantile(0.95)
        p95_ms = None if p95 is None else p95 * 1000
        figures = f"{requests} requests in {elapsed:.1f} s"
        if error_rate > policy.max_error_rate:
            return Verdict(
                False,
                f"error rate {error_rate:.1%} above the limit of {policy.max_error_rate:.1%} "
                f"({figures})",
                requests,
                error_rate,
                p95_ms,
            )
        if policy.max_p95_ms is not None and p95_ms is not None and p95_ms > policy.max_p95_ms:
            return Verdict(
                False,
                f"p95 latency {p95_ms:.3g} ms above the limit of {policy.max_p95_ms:g} ms "
                f"({figures})",
                requests,
                error_rate,
                p95_ms,
            )
        return Verdict(
            True,
            f"healthy: error rate {error_rate:.1%}, p95 "
            f"{'-' if p95_ms is None else f'{p95_ms:.3g} ms'} ({figures})",
            requests,
            error_rate,
            p95_ms,
        )
