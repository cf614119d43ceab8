"""The gRPC front end at the HTTP/2 level: what real gRPC clients never send.

A frame-level client (the `h2` library) sends the server non-gRPC requests, broken framing,
compressed and bomb messages, oversized headers and bodies, resets and garbage; every case gets
its clear gRPC status (or HTTP status, where the spec says so), and the same connection or the
next one is still served. Real gRPC clients check deadlines, non-ASCII status messages and the
graceful stop.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest

from agent.serving import grpc_server, http2
from agent.serving.config import ModelConfig
from agent.serving.metrics import Metrics
from agent.serving.scheduler import Scheduler
from agent.serving.tensors import InferenceResponse, Tensor
from protocol import inference_pb2 as pb
from protocol import inference_pb2_grpc as pb_grpc
from tests.test_grpc import GrpcServerThread

ROW = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
INFER = b"/inference.GRPCInferenceService/ModelInfer"
LIMIT = 256 * 1024  # the message limit of the servers here


def infer_message(rows: int = 1) -> bytes:
    msg = pb.ModelInferRequest(model_name="mlp")
    msg.inputs.add(name="input", datatype="FP32", shape=(rows, 64))
    msg.raw_input_contents.append(np.repeat(ROW, rows, axis=0).tobytes())
    return msg.SerializeToString()


def large_message() -> bytes:
    """An ordinary call of 200 KB (its id), that gzip makes 1 KB of."""
    msg = pb.ModelInferRequest.FromString(infer_message())
    msg.id = "x" * 200_000
    return msg.SerializeToString()


def framed(message: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(message)) + message


class Reply:
    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.data = bytearray()
        self.trailers: dict[bytes, bytes] = {}
        self.reset: int | None = None
        self.ended = False

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers or a Trailers-Only response."""
        value = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        from urllib.parse import unquote

        value = self.trailers.get(b"grpc-message", self.headers.get(b"grpc-message", b""))
        return unquote(value.decode())

    def output(self) -> np.ndarray:
        assert self.status == 0, self.message
        length = struct.unpack_from(">I", self.data, 1)[0]
        response = pb.ModelInferResponse.FromString(bytes(self.data[5 : 5 + length]))
        return np.frombuffer(response.raw_output_contents[0], np.float32)


class Wire:
    """An HTTP/2 client connection that sends exactly what a test asks for."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.pings: list[bytes] = []
        self._send()
        self._pump_until(lambda: self.conn.remote_settings.initial_window_size > 65535)

    def close(self) -> None:
        self.sock.close()

    def headers(self, path: bytes = INFER, **extra: bytes) -> list[tuple[bytes, bytes]]:
        base = {
            b":method": b"POST",
            b":scheme": b"http",
            b":path": path,
            b":authority": b"localhost",
            b"content-type": b"application/grpc",
            b"te": b"trailers",
        }
        base.update({k.replace("_", "-").encode(): v for k, v in extra.items()})
        return list(base.items())

    def start(self, headers, body: bytes = b"", end: bool = True) -> int:
        stream = self.conn.get_next_available_stream_id()
        self.replies[stream] = Reply()
        self.conn.send_headers(stream, headers, end_stream=end and not body)
        self._send()
        if body:
            self.send(stream, body, end)
        return stream

    def send(self, stream: int, body: bytes, end: bool = True) -> None:
        step = self.conn.max_outbound_frame_size
        for offset in range(0, len(body), step):
            chunk = body[offset : offset + step]
            self._pump_until(functools.partial(self._may_send, stream, len(chunk)))
            if self._gone(stream):
                return  # the server answered early and reset the upload
            last = end and offset + step >= len(body)
            self.conn.send_data(stream, chunk, end_stream=last)
            self._send()

    def call(self, headers, body: bytes = b"") -> Reply:
        return self.wait(self.start(headers, body))

    def wait(self, stream: int) -> Reply:
        self._pump_until(lambda: self.replies[stream].done)
        return self.replies[stream]

    def reset(self, stream: int) -> None:
        self.conn.reset_stream(stream, error_code=8)
        self._send()

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (after a GOAWAY, if it sent one)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def _may_send(self, stream: int, size: int) -> bool:
        return self.conn.local_flow_control_window(stream) >= size or self._gone(stream)

    def _gone(self, stream: int) -> bool:
        return self.replies[stream].done

    def _send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump_until(self, condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "no answer from the server within 10 s"
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                self._event(event)
            self._send()

    def _event(self, event) -> None:
        reply = self.replies.get(getattr(event, "stream_id", None) or 0)
        if isinstance(event, h2.events.ResponseReceived):
            reply.headers = dict(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            reply.trailers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            reply.data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            reply.ended = True
        elif isinstance(event, h2.events.StreamReset) and reply is not None:
            reply.reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings.append(event.ping_data)


@pytest.fixture(scope="module")
def server(sample_repo):
    with GrpcServerThread(sample_repo, max_message_bytes=LIMIT) as s:
        yield s


@pytest.fixture
def wire(server):
    w = Wire(server.port)
    yield w
    w.close()


@pytest.fixture(scope="module")
def expected(server) -> np.ndarray:
    w = Wire(server.port)
    try:
        return w.call(w.headers(), framed(infer_message())).output()
    finally:
        w.close()


def served(w: Wire, expected: np.ndarray) -> None:
    """An ordinary call on `w` gets the right answer."""
    np.testing.assert_array_equal(w.call(w.headers(), framed(infer_message())).output(), expected)


def still_serves(server, expected) -> None:
    w = Wire(server.port)
    try:
        served(w, expected)
    finally:
        w.close()


# --- well-formed calls ----------------------------------------------------------------------


def test_a_call_is_answered_with_headers_one_message_and_ok_trailers(wire, expected):
    reply = wire.call(wire.headers(), framed(infer_message()))
    assert reply.headers[b":status"] == b"200"
    assert reply.headers[b"content-type"] == b"application/grpc"
    assert reply.trailers == {b"grpc-status": b"0"}
    assert reply.output().shape == (10,)
    np.testing.assert_array_equal(reply.output(), expected)


def test_many_calls_multiplexed_on_one_connection(wire, expected):
    streams = [wire.start(wire.headers(), framed(infer_message())) for _ in range(60)]
    for stream in streams:
        np.testing.assert_array_equal(wire.wait(stream).output(), expected)


@pytest.mark.parametrize(
    "encoding, compress",
    [(b"gzip", gzip.compress), (b"deflate", zlib.compress)],
)
def test_compressed_requests_are_served(wire, expected, encoding, compress):
    body = framed(compress(infer_message()), compressed=1)
    reply = wire.call(wire.headers(grpc_encoding=encoding), body)
    np.testing.assert_array_equal(reply.output(), expected)


def test_large_requests_are_taken_in_whole(wire, expected):
    # 200 KB in many DATA frames, past the client's initial 64 KiB windows; the id is echoed
    msg = pb.ModelInferRequest.FromString(infer_message())
    msg.id = "x" * 200_000
    reply = wire.call(wire.headers(), framed(msg.SerializeToString()))
    np.testing.assert_array_equal(reply.output(), expected)
    length = struct.unpack_from(">I", reply.data, 1)[0]
    assert pb.ModelInferResponse.FromString(bytes(reply.data[5 : 5 + length])).id == msg.id


def test_keepalive_pings_are_answered_between_calls(wire, expected):
    for data in (b"keepaliv", b"\x00" * 8):
        wire.conn.ping(data)
        wire._send()
        wire._pump_until(lambda d=data: d in wire.pings)
        served(wire, expected)


# --- what the gRPC layer refuses ------------------------------------------------------------


def test_not_post_is_405_and_not_grpc_is_415(wire, server, expected):
    get = [(k, b"GET" if k == b":method" else v) for k, v in wire.headers()]
    assert wire.call(get).headers[b":status"] == b"405"
    json = wire.headers(content_type=b"application/json")
    assert wire.call(json, framed(infer_message())).headers[b":status"] == b"415"
    still_serves(server, expected)


def test_unknown_method_is_unimplemented(wire):
    reply = wire.call(wire.headers(b"/inference.GRPCInferenceService/Explode"), framed(b""))
    assert reply.status == 12
    assert "unknown method /inference.GRPCInferenceService/Explode" in reply.message
    assert reply.headers[b":status"] == b"200" and not reply.data  # Trailers-Only


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"", "the request body has 0 bytes: a gRPC message needs a 5-byte prefix"),
        (b"\0\0\0", "the request body has 3 bytes"),
        (struct.pack(">BI", 0, 100) + b"x" * 10, "announces 100 bytes but 10 came"),
        (framed(infer_message()) * 2, "exactly one whole message"),
        (framed(b"\xff\xff\xff\xff"), "not a valid inference.ModelInferRequest message"),
        (framed(infer_message(), compressed=7), "invalid compressed flag 7"),
    ],
    ids=["empty", "short-prefix", "truncated", "two-messages", "not-protobuf", "bad-flag"],
)
def test_broken_framing_is_invalid_argument(wire, server, expected, body, needle):
    reply = wire.call(wire.headers(), body)
    assert reply.status == 3, reply.message
    assert needle in reply.message
    still_serves(server, expected)


@pytest.mark.parametrize(
    "encoding, body, status, needle",
    [
        (None, framed(infer_message(), 1), 3, "flagged compressed but grpc-encoding is identity"),
        (b"snappy", framed(infer_message(), 1), 12, "grpc-encoding 'snappy' is not supported"),
        (b"gzip", framed(b"not gzip at all", 1), 3, "the gzip message is corrupt"),
        (b"gzip", framed(gzip.compress(infer_message())[:-12], 1), 3, "message is truncated"),
        (b"gzip", framed(gzip.compress(large_message())[:-12], 1), 3, "message is truncated"),
        # 64 MiB of zeros in ~64 KB: refused once it inflates past the 256 KiB limit
        (b"gzip", framed(gzip.compress(bytes(64 << 20)), 1), 8, "inflates beyond the limit"),
    ],
    ids=["flag-without-encoding", "unknown-encoding", "corrupt", "truncated", "truncated-large",
         "bomb"],
)  # fmt: skip
@pytest.mark.parametrize("steps", [False, True], ids=["on-the-loop", "in-steps"])
def test_compression_errors(
    wire, server, expected, encoding, body, status, needle, steps, monkeypatch
):
    if steps:  # what inflates past 16 KiB goes on in a thread, 32 KiB at a time
        monkeypatch.setattr(grpc_server, "INLINE_INFLATE", 16 << 10)
        monkeypatch.setattr(grpc_server, "INFLATE_STEP", 32 << 10)
    extra = {} if encoding is None else {"grpc_encoding": encoding}
    reply = wire.call(wire.headers(**extra), body)
    assert reply.status == status, reply.message
    assert needle in reply.message
    still_serves(server, expected)


def test_a_large_inflation_goes_on_off_the_event_loop(wire, server, expected, monkeypatch):
    monkeypatch.setattr(grpc_server, "INLINE_INFLATE", 16 << 10)
    monkeypatch.setattr(grpc_server, "INFLATE_STEP", 32 << 10)
    threads = []
    step = grpc_server._Inflation.step

    def recorded(self, data, size):
        threads.append(threading.current_thread())
        return step(self, data, size)

    monkeypatch.setattr(grpc_server._Inflation, "step", recorded)
    body = framed(gzip.compress(large_message()), 1)
    reply = wire.call(wire.headers(grpc_encoding=b"gzip"), body)
    np.testing.assert_array_equal(reply.output(), expected)
    loop_thread, *others = threads
    assert len(others) >= 6 and loop_thread not in others  # 16 KiB there, the rest in steps


def test_inflated_messages_count_against_their_connection(wire, server, expected):
    # 2 uploads of 200 KiB under way, then ~1 KiB of gzip that inflates to 200 KiB: past the
    # 512 KiB the connection may hold, as 200 KiB more of upload would be
    part = framed(infer_message(800))[: 200 * 1024]
    uploads = [wire.start(wire.headers(), part, end=False) for _ in range(2)]
    body = framed(gzip.compress(large_message()), 1)
    reply = wire.call(wire.headers(grpc_encoding=b"gzip"), body)
    assert reply.status == 8 and "beyond what the connection may hold" in reply.message
    for stream in uploads:
        wire.reset(stream)
    np.testing.assert_array_equal(
        wire.call(wire.headers(grpc_encoding=b"gzip"), body).output(), expected
    )


def test_inflation_in_threads_is_bounded_across_connections(wire, server, monkeypatch):
    monkeypatch.setattr(grpc_server, "INLINE_INFLATE", 16 << 10)
    protocol = server.server._protocol
    monkeypatch.setattr(protocol, "inflating", protocol.inflate_budget)  # as if others were
    body = framed(gzip.compress(large_message()), 1)
    reply = wire.call(wire.headers(grpc_encoding=b"gzip"), body)
    assert reply.status == 8 and "inflating too many large messages at once" in reply.message
    assert protocol.inflating == protocol.inflate_budget  # its own reservation given back


def test_oversized_message_is_refused_before_it_is_all_sent(wire, server, expected):
    body = framed(infer_message(2048))  # 512 KiB > 256 KiB
    stream = wire.start(wire.headers(), body)
    reply = wire.wait(stream)
    assert reply.status == 8
    assert f"exceeds the limit of {LIMIT} bytes per message" in reply.message
    # the rest of the upload is stopped "without error" (RFC 9113 8.1)
    wire._pump_until(lambda: reply.reset is not None or reply.ended)
    served(wire, expected)


def test_a_connection_cannot_hold_more_than_twice_the_limit(wire, server, expected):
    part = framed(infer_message(800))[: 200 * 1024]  # 200 KiB each, none of them complete
    streams = [wire.start(wire.headers(), part, end=False) for _ in range(3)]
    third = wire.wait(streams[2])
    assert third.status == 8 and "too many large requests at once" in third.message
    for stream in streams[:2]:
        wire.reset(stream)
    served(wire, expected)


def test_oversized_header_list_is_resource_exhausted_for_that_call_only(wire, expected):
    reply = wire.call(wire.headers(x_junk=b"j" * 20000), framed(infer_message()))
    assert reply.status == 8, reply.message
    assert "metadata takes 20" in reply.message and "over the limit of 16384" in reply.message
    served(wire, expected)


@pytest.mark.parametrize("value", [b"", b"5", b"10x", b"123456789S", b"-1S", b"1.5S"])
def test_malformed_grpc_timeout_is_invalid_argument(wire, value):
    reply = wire.call(wire.headers(grpc_timeout=value), framed(infer_message()))
    assert reply.status == 3
    assert "is not 1-8 digits and a unit" in reply.message


def test_expired_grpc_timeout_is_deadline_exceeded_and_frees_the_queue(wire, server, expected):
    reply = wire.call(wire.headers(grpc_timeout=b"1n"), framed(infer_message()))
    assert reply.status == 4 and "no result within 1e-09 s" in reply.message
    _wait_idle(server)
    still_serves(server, expected)


def test_a_grpc_timeout_of_zero_is_expired_before_the_call_runs(wire):
    live = b"/inference.GRPCInferenceService/ServerLive"
    reply = wire.call(wire.headers(live, grpc_timeout=b"0n"), framed(b""))
    assert reply.status == 4 and "deadline" in reply.message


def test_a_stalled_upload_is_deadline_exceeded(server, expected, monkeypatch):
    monkeypatch.setattr(http2, "BODY_STALL_S", 1.5)
    w = Wire(server.port)
    try:
        started = time.monotonic()
        stream = w.start(w.headers(), framed(infer_message())[:100], end=False)
        reply = w.wait(stream)
        assert reply.status == 4 and "no more of the request came for 1.5 s" in reply.message
        assert time.monotonic() - started < 5
        _wait_idle(server)
        served(w, expected)
    finally:
        w.close()


def test_client_resets_mid_upload_and_mid_call(wire, server, expected):
    half = wire.start(wire.headers(), framed(infer_message())[:100], end=False)
    wire.reset(half)
    started = [wire.start(wire.headers(), framed(infer_message())) for _ in range(20)]
    for stream in started:
        wire.reset(stream)  # some are queued, some running, some answered already
    _wait_idle(server)
    served(wire, expected)


def test_a_reset_call_waiting_in_the_queue_never_runs(wire, server, expected):
    scheduler = server.dataplane.model("mlp").scheduler
    real_infer, gate, rows = scheduler._infer, threading.Event(), []

    def gated(inputs):
        gate.wait(10)
        rows.append(len(inputs["input"]))
        return real_infer(inputs)

    scheduler._infer = gated
    try:
        running = wire.start(wire.headers(), framed(infer_message()))
        deadline = time.monotonic() + 10
        while server.dataplane.idle():  # the worker holds it at the gate
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)
        queued = wire.start(wire.headers(), framed(infer_message()))
        time.sleep(0.05)
        wire.reset(queued)
        time.sleep(0.05)
        gate.set()
        np.testing.assert_array_equal(wire.wait(running).output(), expected)
        _wait_idle(server)
    finally:
        gate.set()
        scheduler._infer = real_infer
    assert sum(rows) == 1, f"the reset call ran too: rows {rows}"
    served(wire, expected)


# --- what HTTP/2 itself refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,  # the preface, then no SETTINGS
        b"\x00" * 9 + b"\x16\x03\x01\x02\x00\x01",  # TLS to a plaintext port, after junk
    ],
    ids=["http1", "garbage-frames", "junk"],
)
def test_non_http2_clients_are_disconnected(server, expected, data):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    still_serves(server, expected)


def test_a_protocol_violation_ends_only_that_connection(server, expected):
    other = Wire(server.port)
    bad = Wire(server.port)
    try:
        stream = bad.start(bad.headers(), framed(infer_message()))
        bad.wait(stream)
        bad.raw(struct.pack(">I", 4)[1:] + b"\x00\x00" + struct.pack(">I", stream) + b"oops")
        assert bad.closed_by_server()  # DATA on a closed stream: STREAM_CLOSED, GOAWAY
        served(other, expected)
    finally:
        other.close()
        bad.close()


# --- real clients ---------------------------------------------------------------------------


def _response_output(frame_bytes: bytes) -> np.ndarray:
    length = struct.unpack_from(">I", frame_bytes, 1)[0]
    assert len(frame_bytes) == 5 + length
    response = pb.ModelInferResponse.FromString(frame_bytes[5:])
    return np.frombuffer(response.raw_output_contents[0], np.float32)


@pytest.fixture
def request_file(tmp_path) -> str:
    path = tmp_path / "request.grpc"
    path.write_bytes(framed(infer_message()))
    return str(path)


def test_nghttp2s_client_is_served(server, expected, request_file):
    # nghttp: libnghttp2's own client, which opens with PRIORITY frames on idle streams
    url = f"http://127.0.0.1:{server.port}{INFER.decode()}"
    grpc_headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    verbose = subprocess.run(
        ["nghttp", "-v", "-d", request_file, *grpc_headers, url],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    assert b"send PRIORITY frame" in verbose.stdout
    assert b"recv (stream_id=13) grpc-status: 0" in verbose.stdout
    body = subprocess.run(["nghttp", "-d", request_file, *grpc_headers, url],
                          capture_output=True, timeout=30)  # fmt: skip
    np.testing.assert_array_equal(_response_output(body.stdout), expected)


def test_curl_is_served(server, expected, request_file, tmp_path):
    out, headers = tmp_path / "body", tmp_path / "headers"
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", f"@{request_file}",
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-D", str(headers), "-o", str(out), f"http://127.0.0.1:{server.port}{INFER.decode()}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert headers.read_text().splitlines()[0].startswith("HTTP/2 200")
    assert "grpc-status: 0" in headers.read_text()  # curl writes the trailers there too
    np.testing.assert_array_equal(_response_output(out.read_bytes()), expected)


def test_non_ascii_status_message_reaches_grpc_clients_intact(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="modèle-ü 100%"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "modèle-ü 100%" in err.value.details()


class SlowDataPlane:
    """Its one model takes `delay` s per run (on a real scheduler), to have a call in flight."""

    def __init__(self, delay: float):
        self.delay = delay
        self.started = threading.Event()
        self._scheduler: Scheduler | None = None

    def live(self) -> bool:
        return True

    def _run(self, inputs):
        self.started.set()
        time.sleep(self.delay)
        return {"output": np.ones((1, 10), np.float32)}

    def submit(self, request, done, timeout=None):
        if self._scheduler is None:
            metrics = Metrics().for_model("mlp", "1")
            loop = asyncio.get_running_loop()
            self._scheduler = Scheduler("mlp", self._run, ModelConfig(), metrics, loop)

        def answered(outcome, error):
            if error is not None:
                done(None, error)
                return
            out = outcome.outputs["output"]
            done(InferenceResponse("mlp", "1", [Tensor("output", "FP32", out.shape, out)]), None)

        inputs = {t.name: t.data for t in request.inputs}
        return self._scheduler.submit(inputs, 1, answered, timeout)


def test_grpc_client_deadline_is_deadline_exceeded(sample_repo):
    with (
        GrpcServerThread(sample_repo, dataplane=SlowDataPlane(2.0)) as slow,
        grpc.insecure_channel(slow.url) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest.FromString(infer_message()), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_stop_lets_calls_in_flight_finish_then_refuses_connections(sample_repo):
    dataplane = SlowDataPlane(0.5)
    slow = GrpcServerThread(sample_repo, dataplane=dataplane).__enter__()
    results = []
    with grpc.insecure_channel(slow.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = threading.Thread(
            target=lambda: results.append(
                stub.ModelInfer(pb.ModelInferRequest.FromString(infer_message()))
            )
        )
        call.start()
        assert dataplane.started.wait(10)
        slow.call(slow.server.stop(grace=5))
        call.join(10)
    slow.stop_loop()
    assert results and results[0].outputs[0].name == "output"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", slow.port), timeout=5)


def test_a_call_unanswered_when_the_grace_ends_gets_unavailable_not_a_closed_socket(sample_repo):
    dataplane = SlowDataPlane(3.0)
    slow = GrpcServerThread(sample_repo, dataplane=dataplane).__enter__()
    errors = []

    def call() -> None:
        try:
            stub.ModelInfer(pb.ModelInferRequest.FromString(infer_message()), timeout=30)
        except grpc.RpcError as exc:
            errors.append(exc)

    with grpc.insecure_channel(slow.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        caller = threading.Thread(target=call)
        caller.start()
        assert dataplane.started.wait(10)
        slow.call(slow.server.stop(grace=0.2))
        caller.join(10)
    slow.stop_loop()
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert errors[0].details() == "the server is stopping; retry the call"


def test_percent_encoding_of_status_messages():
    encode = grpc_server._percent_encode
    assert encode("plain text: ok") == b"plain text: ok"
    assert encode("100% é\n") == b"100%25 %C3%A9%0A"


def _wait_idle(server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not server.dataplane.idle():
        assert time.monotonic() < deadline, "requests still pending"
        time.sleep(0.02)


def test_serving_does_not_import_grpcio():
    # grpcio costs ~24 MiB of RSS; the agent's serving path must not pull it in
    code = (
        "import sys, agent.commands.serve, agent.serving.server, agent.serving.grpc_server;"
        "from agent.serving import server;"
        "assert 'grpc' not in sys.modules, sorted(m for m in sys.modules if 'grpc' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
