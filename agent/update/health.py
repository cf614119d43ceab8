"""The health watch after an activation: error rate and p95 latency of the new version.

It reads the agent's Prometheus metrics for (model, version) when the version goes live and
then every `poll_s` until `window_s` has passed, and judges the difference: the share of failed
requests (client mistakes such as malformed input are not the model's fault and do not count)
and the 95th percentile of the latency histogram, interpolated within its bucket the way
Prometheus' histogram_quantile does. With fewer than `min_requests` requests it gives no
verdict. The clock and sleep are parameters so tests need no real waiting.

When no poll in the whole window could read the metrics (the agent gone, /metrics missing or not
Prometheus text) the verdict is None, "no verdict": nothing was observed, so nothing says the
version is healthy, and nothing says it is not (it passed its self-test; a node whose metrics
are switched off must not roll back every update). The lifecycle keeps it and reports why.

Counters are followed series by series from one poll to the next, as Prometheus' increase()
does: a counter that went down was reset (the agent restarted), so its increase is its new
value. A poll whose metrics cannot be read or parsed gives no verdict; the next one may.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from agent.update.config import HealthPolicy
from agent.update.errors import UpdateError

# Failure reasons that are the client's fault, not the model's.
CLIENT_ERRORS = frozenset({"InvalidInput", "ModelNotFound"})
_SUCCESS = "edgefleet_inference_request_success"
_FAILURE = "edgefleet_inference_request_failure"
_LATENCY = "edgefleet_inference_request_latency_seconds"

log = logging.getLogger(__name__)


# One counter series of a (model, version): ("success", ""), ("failure", reason) or
# ("bucket", upper bound).
SeriesKey = tuple[str, str | float]


class MetricsUnreadable(ValueError):
    """The agent's /metrics text is not Prometheus text."""


@dataclass(frozen=True, slots=True)
class Sample:
    success: float = 0.0
    failure: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count)

    @classmethod
    def of(cls, series: dict[SeriesKey, float]) -> Sample:
        success = failure = 0.0
        buckets: dict[float, float] = {}
        for (kind, label), value in series.items():
            if kind == "success":
                success += value
            elif kind == "failure" and label not in CLIENT_ERRORS:
                failure += value
            elif kind == "bucket":
                buckets[float(label)] = value
        return cls(success, failure, tuple(sorted(buckets.items())))

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
    healthy: bool | None  # None: no verdict, the metrics could not be read at all
    reason: str
    requests: int = 0
    error_rate: float | None = None
    p95_ms: float | None = None
    details: dict = field(default_factory=dict)


def parse_series(text: str, model: str, version: str) -> dict[SeriesKey, float]:
    """The counters of (model, version) in `text`; MetricsUnreadable if it is not Prometheus
    text. Values that no counter can hold (negative, NaN, infinite) and bucket bounds that are
    not numbers are left out."""
    series: dict[SeriesKey, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("model") != model or s.labels.get("version") != version:
                    continue
                if not (isinstance(s.value, float | int) and 0 <= s.value < math.inf):
                    continue
                if s.name == f"{_SUCCESS}_total":
                    key: SeriesKey = ("success", "")
                elif s.name == f"{_FAILURE}_total":
                    key = ("failure", s.labels.get("reason", ""))
                elif s.name == f"{_LATENCY}_bucket":
                    le = _bound(s.labels.get("le"))
                    if le is None:
                        continue
                    key = ("bucket", le)
                else:
                    continue
                series[key] = series.get(key, 0.0) + s.value
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise MetricsUnreadable(f"the agent's metrics are not Prometheus text: {exc}") from None
    return series


def parse_sample(text: str, model: str, version: str) -> Sample:
    return Sample.of(parse_series(text, model, version))


def increase(
    earlier: dict[SeriesKey, float], now: dict[SeriesKey, float]
) -> dict[SeriesKey, float]:
    """How much each counter grew; one that went down was reset and grew by its new value."""
    return {
        key: value - earlier.get(key, 0.0) if value >= earlier.get(key, 0.0) else value
        for key, value in now.items()
    }


def _bound(le: str | None) -> float | None:
    try:
        bound = float(le)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(bound) else bound


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
        self._last_error = ""

    def watch(self, model: str, version: int) -> Verdict:
        policy = self.policy
        last = self._read(model, str(version))
        grown: dict[SeriesKey, float] = {}
        started = self.clock()
        verdict, polls = None, 0
        while self.clock() - started < policy.window_s:
            self.sleep(min(policy.poll_s, max(0.0, policy.window_s - (self.clock() - started))))
            polls += 1
            now = self._read(model, str(version))
            if now is None:
                continue  # no reading, no verdict for this poll
            if last is not None:
                for key, value in increase(last, now).items():
                    grown[key] = grown.get(key, 0.0) + value
            last = now
            verdict = self.judge(Sample.of(grown), self.clock() - started)
            if not verdict.healthy:
                return verdict
        if verdict is None and not polls:  # a window too short for one poll
            return Verdict(True, "no requests yet")
        if verdict is None:
            return Verdict(
                None,
                f"no verdict: the agent's metrics could not be read at any poll of the "
                f"{policy.window_s:g} s window ({self._last_error})",
            )
        return verdict

    def _read(self, model: str, version: str) -> dict[SeriesKey, float] | None:
        try:
            return parse_series(self.read_metrics(), model, version)
        except (UpdateError, MetricsUnreadable) as exc:  # agent gone or not speaking Prometheus
            log.warning("health watch of %s@%s: no reading (%s)", model, version, exc)
            self._last_error = str(exc)
            return None

    def judge(self, window: Sample, elapsed: float) -> Verdict:
        policy = self.policy
        requests = int(window.requests)
        if requests < policy.min_requests or window.requests <= 0:
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
