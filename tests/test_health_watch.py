"""The health watch and the agent client against metrics and replies no honest agent sends:
a restarted agent's reset counters, text that is not Prometheus, no traffic at all, and a
process on the agent's address that does not speak HTTP. None of them may end in a traceback.
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from agent.update.agent_client import AgentClient, AgentUnreachable
from agent.update.config import HealthPolicy
from agent.update.health import HealthWatch, increase, parse_series

LABELS = 'model="m",version="2"'


def _metrics(success: int, failed: int) -> str:
    return (
        f"edgefleet_inference_request_success_total{{{LABELS}}} {success}\n"
        f'edgefleet_inference_request_failure_total{{{LABELS},reason="InferenceFailed"}} {failed}\n'
        f'edgefleet_inference_request_latency_seconds_bucket{{{LABELS},le="+Inf"}} '
        f"{success + failed}\n"
    )


def _watch(readings: list[str], policy: HealthPolicy) -> HealthWatch:
    """A watch that reads `readings` in turn (the last one again and again)."""
    texts = iter(readings)
    last = [readings[-1]]

    def read() -> str:
        last[0] = next(texts, last[0])
        return last[0]

    return HealthWatch(policy, read, sleep=lambda s: None)


POLICY = HealthPolicy(window_s=0.05, poll_s=0.01, max_error_rate=0.05, min_requests=20)


def test_counters_reset_by_an_agent_restart_count_from_zero():
    """1000 good requests before the restart, then 50 good and 50 failed: a 50 % error rate."""
    verdict = _watch([_metrics(1000, 0), _metrics(50, 50)], POLICY).watch("m", 2)
    assert not verdict.healthy
    assert verdict.requests == 100 and verdict.error_rate == pytest.approx(0.5)
    before = parse_series(_metrics(1000, 3), "m", "2")
    after = parse_series(_metrics(1010, 1), "m", "2")  # only the failure counter was reset
    grown = increase(before, after)
    assert grown[("success", "")] == 10 and grown[("failure", "InferenceFailed")] == 1
    assert min(grown.values()) >= 0


def test_growth_before_a_restart_is_not_lost():
    readings = [_metrics(0, 0), _metrics(100, 0), _metrics(0, 30)]  # restart after the 2nd poll
    verdict = _watch(readings, POLICY).watch("m", 2)
    assert not verdict.healthy and verdict.requests == 130


@pytest.mark.parametrize(
    ("text", "readable"),
    [
        ("this is { not prometheus\n", False),
        ("\x00\xff" * 100, False),
        # Read, with the series that no counter can hold left out: no requests.
        (f'edgefleet_inference_request_latency_seconds_bucket{{{LABELS},le="abc"}} 1\n', True),
        (f"edgefleet_inference_request_success_total{{{LABELS}}} NaN\n", True),
    ],
)
def test_metrics_that_cannot_be_read_give_no_verdict(text, readable):
    """Never 'healthy': with nothing read at any poll, the verdict says so and is None."""
    verdict = _watch([text], POLICY).watch("m", 2)
    assert verdict.requests == 0
    if readable:
        assert verdict.healthy and "not enough to judge" in verdict.reason
    else:
        assert verdict.healthy is None
        assert verdict.reason.startswith("no verdict: the agent's metrics could not be read")


def test_metrics_missing_for_the_whole_window_is_no_verdict():
    """An agent whose /metrics answers 404 at every poll, with min_requests = 0 (which would
    otherwise call zero requests enough)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = AgentClient(f"http://127.0.0.1:{server.server_address[1]}", timeout=10)
        policy = HealthPolicy(window_s=0.05, poll_s=0.01, min_requests=0)
        verdict = HealthWatch(policy, client.metrics, sleep=lambda s: None).watch("m", 2)
    finally:
        server.shutdown()
        server.server_close()
    assert verdict.healthy is None
    assert "could not be read" in verdict.reason and "HTTP 404" in verdict.reason


def test_unreadable_polls_are_skipped_and_later_ones_judged():
    readings = [_metrics(0, 0), "garbage {", _metrics(50, 50)]
    verdict = _watch(readings, POLICY).watch("m", 2)
    assert not verdict.healthy and verdict.requests == 100


def test_a_bucket_with_a_bad_bound_is_skipped():
    text = _metrics(5, 0) + (
        f'edgefleet_inference_request_latency_seconds_bucket{{{LABELS},le="abc"}} 1\n'
    )
    series = parse_series(text, "m", "2")
    assert series[("success", "")] == 5 and ("bucket", float("inf")) in series


def test_no_traffic_with_min_requests_zero_is_no_verdict():
    policy = HealthPolicy(window_s=0.05, poll_s=0.01, min_requests=0)
    verdict = _watch([_metrics(0, 0)], policy).watch("m", 2)
    assert verdict.healthy and "not enough to judge" in verdict.reason


def _garbage_server(reply: bytes) -> tuple[str, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", thread


@pytest.mark.parametrize(
    "reply",
    [
        b"NOT HTTP AT ALL\r\n\r\n",  # BadStatusLine
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",  # IncompleteRead
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
    ],
)
@pytest.mark.parametrize("call", ["reload", "metrics"])
def test_a_reply_that_is_not_http_is_an_unreachable_agent(reply, call):
    url, thread = _garbage_server(reply)
    client = AgentClient(url, timeout=10)
    with pytest.raises(AgentUnreachable, match="cannot reach the agent"):
        client.reload("mlp") if call == "reload" else client.metrics()
    thread.join(10)


def test_a_reply_over_the_size_limit_is_refused(monkeypatch):
    monkeypatch.setattr("agent.update.agent_client.MAX_REPLY_BYTES", 1000)
    url, thread = _garbage_server(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"#" * 5000)
    with pytest.raises(AgentUnreachable, match="more than 1000 bytes"):
        AgentClient(url, timeout=10).metrics()
    thread.join(10)


def test_a_reply_dripped_byte_by_byte_is_cut_off_at_the_deadline():
    """Each byte comes well within the timeout; the whole reply would not."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
                for _ in range(20):
                    if done.wait(0.2):
                        return
                    connection.sendall(b"#")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = AgentClient(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1)
    try:
        with pytest.raises(AgentUnreachable):
            client.metrics()
    finally:
        done.set()
        thread.join(10)
