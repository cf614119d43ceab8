"""The data plane's Prometheus exposition: names, labels and values as prometheus_client's own
metric types would write them, read back by the standard parser and by the update health watch."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.serving import errors
from agent.serving.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, REASONS, Metrics
from agent.update.health import CLIENT_ERRORS, parse_sample


def _samples(metrics: Metrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_histograms_and_gauge_per_model_version():
    metrics = Metrics()
    mlp, cnn = metrics.for_model("mlp", "1"), metrics.for_model("cnn", "2")
    for elapsed_us in (50, 300, 500, 4000, 20_000_000):  # the last one beyond every bucket
        mlp.succeeded(elapsed_us * 1000, queue_ns=10_000, compute_ns=5_000)
    mlp.failure("InvalidInput")
    mlp.failure("InvalidInput")
    mlp.failure("QueueFull")
    mlp.executed(rows=3, compute_ns=40_000)
    mlp.executed(rows=32, compute_ns=60_000)
    mlp.pending = 4
    cnn.succeeded(1_000_000, 0, 0)

    got = _samples(metrics)
    labels = (("model", "mlp"), ("version", "1"))

    def value(name, **extra):
        return got[(name, tuple(sorted(dict(labels, **extra).items())))]

    assert value("edgefleet_inference_request_success_total") == 5
    assert value("edgefleet_inference_request_failure_total", reason="InvalidInput") == 2
    assert value("edgefleet_inference_request_failure_total", reason="QueueFull") == 1
    assert value("edgefleet_inference_count_total") == 35
    assert value("edgefleet_inference_exec_count_total") == 2
    assert value("edgefleet_inference_request_duration_us_total") == 20_004_850
    assert value("edgefleet_inference_queue_duration_us_total") == 50
    assert value("edgefleet_inference_compute_infer_duration_us_total") == 100
    assert value("edgefleet_inference_pending_requests") == 4
    assert value("edgefleet_inference_request_success_created") > 0
    # cumulative buckets; 500 µs, equal to a bound, counts in that bucket
    latency = {
        le: value("edgefleet_inference_request_latency_seconds_bucket", le=le)
        for le in ("0.0001", "0.00025", "0.0005", "0.005", "10.0", "+Inf")
    }
    assert latency == {
        "0.0001": 1, "0.00025": 1, "0.0005": 3, "0.005": 4, "10.0": 4, "+Inf": 5
    }  # fmt: skip
    assert value("edgefleet_inference_request_latency_seconds_count") == 5
    assert abs(value("edgefleet_inference_request_latency_seconds_sum") - 20.00485) < 1e-9
    assert value("edgefleet_inference_batch_size_bucket", le="2.0") == 0
    assert value("edgefleet_inference_batch_size_bucket", le="4.0") == 1
    assert value("edgefleet_inference_batch_size_bucket", le="32.0") == 2
    assert value("edgefleet_inference_batch_size_sum") == 35
    assert len([k for k in got if k[0] == "edgefleet_inference_batch_size_bucket"]) == 2 * (
        len(BATCH_BUCKETS) + 1
    )
    assert len([k for k in got if k[0].endswith("latency_seconds_bucket")]) == 2 * (
        len(LATENCY_BUCKETS) + 1
    )
    # the other model's series are its own
    assert (
        got[("edgefleet_inference_request_success_total", (("model", "cnn"), ("version", "2")))]
        == 1
    )


def test_a_reload_keeps_counting_and_the_health_watch_reads_it():
    metrics = Metrics()
    metrics.for_model("mlp", "1").succeeded(200_000_000, 0, 0)  # 0.2 s
    metrics.for_model("mlp", "1").succeeded(2_000_000_000, 0, 0)  # a reload gets the same counters
    metrics.for_model("mlp", "1").failure("InferenceFailed")
    text = generate_latest(metrics.registry).decode()
    sample = parse_sample(text, "mlp", "1")
    assert (sample.success, sample.failure) == (2, 1)
    assert dict(sample.buckets)[0.25] == 1 and dict(sample.buckets)[float("inf")] == 2


def test_no_model_no_series():
    text = generate_latest(Metrics().registry).decode()
    assert "edgefleet_inference_request_success" in text  # the family is declared
    assert not [line for line in text.splitlines() if line and not line.startswith("#")]


def test_failure_reasons_are_the_data_plane_errors_and_the_help_names_them():
    # Every error a request can end with is a reason, under its class name; a load that fails
    # (ModelLoadFailed) answers the repository API, not an inference.
    request_errors = {c.__name__ for c in errors.ServingError.__subclasses__()}
    assert set(REASONS) == request_errors - {"ModelLoadFailed"}
    assert set(REASONS) >= CLIENT_ERRORS  # the health watch's client errors are among them
    text = generate_latest(Metrics().registry).decode()
    help_line = next(
        line
        for line in text.splitlines()
        if line.startswith("# HELP edgefleet_inference_request_failure_total ")
    )
    assert all(reason in help_line for reason in REASONS), help_line
