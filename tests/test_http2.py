"""agent/serving/http2.py at the frame level: a connection fed the exact bytes a test writes.

Each test plays a client: it writes frames (HPACK from the `hpack` package, the encoder real
Python clients use) into a Connection whose transport records what the server writes back, and
reads the server's frames. Well-formed traffic (split at any byte, padded, prioritised, in
CONTINUATIONs, under tight flow control) must give the same requests and responses; every
violation of RFC 9113 must end the stream or the connection with its error code, and the hostile
patterns (floods, bombs, oversized blocks, rapid resets) must be refused without holding memory.
The gRPC tests (test_grpc.py, test_grpc_wire.py) run the same code under real clients.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import struct

import hpack
import pytest

from agent.serving import http2, http2_headers
from agent.serving.http2 import ErrorCode

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/test"),
    (b"te", b"trailers"),
]


def frame(type_: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, type_, flags, stream) + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "initial_window_size": 4,
           "max_frame_size": 5, "max_header_list_size": 6}  # fmt: skip
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", ids[k], v) for k, v in values.items()))


class Transport:
    """What the connection writes, and what it asks of its transport."""

    def __init__(self):
        self.data = bytearray()
        self.closed = False
        self.aborted = False  # closed without writing what is buffered
        self.reading = True

    def write(self, data) -> None:
        self.data += data

    def writelines(self, pieces) -> None:
        for piece in pieces:
            self.data += piece

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Echo:
    """A handler: answers each request with its body, as a body and an `x-size` trailer."""

    max_body = 1 << 20
    head_bytes = 4

    def __init__(self):
        self.requests: list[http2.Request] = []
        self.release = asyncio.Event()
        self.release.set()
        self.cancelled = 0
        self.too_large_calls = 0

    def body_size(self, head: bytes) -> int | None:
        size = int.from_bytes(head[:4], "big")  # bodies here start with their own length
        return size if size >= 4 else None

    def handle(self, connection, request) -> asyncio.Task:
        self.requests.append(request)
        return asyncio.get_running_loop().create_task(self._answer(connection, request))

    async def _answer(self, connection, request) -> None:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        body = bytes(request.body)
        headers = [(b":status", b"200"), (b"content-type", b"application/test")]
        connection.respond(request, headers, body, [(b"x-size", str(len(body)).encode())])

    def too_large(self, connection, request, limit: int) -> None:
        self.too_large_calls += 1
        connection.respond(request, [(b":status", b"413")], b"", [])

    def headers_too_large(self, connection, request, size: int) -> None:
        connection.respond(request, [(b":status", b"431")], b"", [])

    def body_stalled(self, connection, request, seconds: float) -> None:
        connection.respond(request, [(b":status", b"408")], b"", [])


def body_of(size: int) -> bytes:
    return size.to_bytes(4, "big") + bytes(i % 251 for i in range(size - 4))


class Client:
    """The client side of one connection, in frames."""

    def __init__(self, connection: http2.Connection, transport: Transport):
        self.connection = connection
        self.transport = transport
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.read = 0  # bytes of transport.data already parsed
        self.stream = 1

    def send(self, data: bytes, split: list[int] | None = None) -> None:
        """Feed `data` through the read buffer, in pieces ending at `split` offsets if given."""
        cuts = [0, *(split or []), len(data)]
        for start, end in itertools.pairwise(cuts):
            piece = data[start:end]
            while piece:
                buffer = self.connection.get_buffer(-1)
                n = min(len(buffer), len(piece))
                buffer[:n] = piece[:n]
                self.connection.buffer_updated(n)
                piece = piece[n:]

    def preface(self, **values: int) -> None:
        self.send(http2.PREFACE + settings(**values))

    def request_frames(self, body: bytes, headers=REQUEST, step: int = 16384) -> bytes:
        stream = self.stream
        self.stream += 2
        block = self.encoder.encode(headers)
        out = [frame(HEADERS, END_HEADERS | (0 if body else END_STREAM), stream, block)]
        for offset in range(0, len(body), step):
            last = offset + step >= len(body)
            out.append(frame(DATA, END_STREAM if last else 0, stream, body[offset : offset + step]))
        return b"".join(out)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """Frames the server wrote since the last call: (type, flags, stream, payload)."""
        out = []
        data = self.transport.data
        while len(data) - self.read >= 9:
            high, low, type_, flags, stream = struct.unpack_from(">BHBBL", data, self.read)
            length = high << 16 | low
            if len(data) - self.read - 9 < length:
                break
            start = self.read + 9
            out.append((type_, flags, stream & 0x7FFFFFFF, bytes(data[start : start + length])))
            self.read = start + length
        return out

    def responses(self) -> dict[int, dict]:
        """Per stream: headers, body, trailers and whether it ended or was reset."""
        replies: dict[int, dict] = {}
        for type_, flags, stream, payload in self.frames():
            reply = replies.setdefault(stream, {"headers": None, "body": b"", "trailers": None})
            if type_ == HEADERS:
                block = dict(self.decoder.decode(payload, raw=True))
                if reply["headers"] is None:
                    reply["headers"] = block
                else:
                    reply["trailers"] = block
            elif type_ == DATA:
                reply["body"] += payload
            elif type_ == RST_STREAM:
                reply["reset"] = struct.unpack(">L", payload)[0]
            elif type_ == GOAWAY:
                last, code = struct.unpack_from(">LL", payload)
                reply["goaway"] = (last, code, payload[8:])
            if flags & END_STREAM and type_ in (DATA, HEADERS):
                reply["ended"] = True
        return replies


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def client():
    handler = Echo()
    transport = Transport()
    connection = http2.Connection(handler, 8, lambda c: None, http2.ReadBuffer(64 * 1024))
    connection.connection_made(transport)
    c = Client(connection, transport)
    c.handler = handler
    # as gRPC clients do: windows large enough that answers are not held back
    c.preface(initial_window_size=1 << 24)
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 30)))
    c.frames()  # the server's SETTINGS, WINDOW_UPDATE and ACK
    yield c
    if not transport.closed:
        connection.connection_lost(None)


def goaway(c: Client) -> tuple[int, int, bytes]:
    found = [r["goaway"] for r in c.responses().values() if "goaway" in r]
    assert found, "no GOAWAY"
    assert c.transport.closed
    return found[-1]


async def exchange(c: Client, body: bytes, **kw) -> dict:
    stream = c.stream
    c.send(c.request_frames(body, **kw))
    await settle()
    return c.responses()[stream]


# --- the connection's start ---------------------------------------------------------------


async def test_the_server_opens_with_its_settings_and_a_connection_window():
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    c = Client(connection, transport)
    (t1, f1, s1, p1), (t2, _, s2, p2) = c.frames()
    assert (t1, f1, s1) == (SETTINGS, 0, 0)
    values = dict(struct.iter_unpack(">HL", p1))
    assert values == {3: 8, 4: http2.STREAM_WINDOW, 5: http2.MAX_FRAME_BYTES, 6: 16384}
    assert (t2, s2) == (WINDOW_UPDATE, 0)
    assert struct.unpack(">L", p2)[0] == http2.CONNECTION_WINDOW - 65535
    c.preface()
    assert c.frames() == [(SETTINGS, ACK, 0, b"")]


async def test_http1_on_the_grpc_port_gets_a_plain_answer():
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    Client(connection, transport).send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP/1.1 505" in transport.data and b"serves gRPC" in transport.data
    assert transport.closed


@pytest.mark.parametrize(
    "data",
    [b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    ids=["bad-preface", "tls"],
)
async def test_anything_but_the_preface_is_disconnected(data):
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    sent = len(transport.data)
    Client(connection, transport).send(data)
    assert transport.closed and len(transport.data) == sent  # no GOAWAY to a non-HTTP/2 peer


async def test_the_first_frame_must_be_settings():
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    c = Client(connection, transport)
    c.send(http2.PREFACE + frame(PING, 0, 0, b"12345678"))
    assert goaway(c)[1] == ErrorCode.PROTOCOL_ERROR


# --- well-formed traffic ------------------------------------------------------------------


async def test_a_request_is_answered_with_headers_body_and_trailers(client):
    body = body_of(1000)
    reply = await exchange(client, body)
    assert reply["headers"][b":status"] == b"200"
    assert reply["body"] == body
    assert reply["trailers"] == {b"x-size": b"1000"}
    assert reply["ended"]
    request = client.handler.requests[0]
    assert request.headers[b":path"] == b"/echo" and request.headers[b"te"] == b"trailers"
    assert not client.connection.requests  # the stream is closed and forgotten


async def test_frames_split_at_any_byte_give_the_same_requests(client):
    body = body_of(40_000)
    data = b"".join(client.request_frames(body, step=7000) for _ in range(3))
    rng = random.Random(7)
    client.send(data, split=sorted(rng.sample(range(1, len(data)), 400)))
    await settle()
    replies = client.responses()
    assert [replies[s]["body"] == body for s in (1, 3, 5)] == [True] * 3


async def test_one_byte_at_a_time(client):
    body = body_of(100)
    data = client.request_frames(body)
    client.send(data, split=list(range(1, len(data))))
    await settle()
    assert client.responses()[1]["body"] == body


async def test_padding_priority_and_continuation_are_understood(client):
    block = client.encoder.encode(REQUEST)
    body = body_of(300)
    headers = b"\x03" + struct.pack(">LB", 0, 15) + block[:5] + b"pad"  # padded, prioritised
    client.send(
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, headers)
        + frame(CONTINUATION, 0, 1, block[5:9])
        + frame(CONTINUATION, END_HEADERS, 1, block[9:])
        + frame(PRIORITY, 0, 1, struct.pack(">LB", 0, 200))
        + frame(DATA, PADDED, 1, b"\x02" + body[:100] + b"\0\0")
        + frame(DATA, PADDED | END_STREAM, 1, b"\x00" + body[100:])
    )
    await settle()
    assert client.responses()[1]["body"] == body


async def test_client_trailers_end_the_request(client):
    block = client.encoder.encode(REQUEST)
    body = body_of(50)
    client.send(
        frame(HEADERS, END_HEADERS, 1, block)
        + frame(DATA, 0, 1, body)
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, client.encoder.encode([(b"x-t", b"1")]))
    )
    await settle()
    assert client.responses()[1]["body"] == body


async def test_unknown_frame_types_are_skipped_whatever_their_size(client):
    client.send(frame(0xFA, 0xFF, 0, b"x" * 100_000))
    reply = await exchange(client, body_of(10))
    assert reply["body"] == body_of(10)


async def test_pings_are_answered(client):
    client.send(frame(PING, 0, 0, b"abcdefgh") + frame(PING, ACK, 0, b"ignored!"))
    assert client.frames() == [(PING, ACK, 0, b"abcdefgh")]


async def test_a_large_frame_is_read_straight_into_its_request(client):
    body = body_of(600_000)
    data = client.request_frames(body, step=len(body))  # one DATA frame, as gRPC clients send
    targets = []
    get_buffer = client.connection.get_buffer

    def spy(hint):
        view = get_buffer(hint)
        direct = view.obj is not client.connection._read_buffer.view.obj
        targets.append(len(view) if direct else 0)
        return view

    client.connection.get_buffer = spy
    client.send(data)
    await settle()
    assert client.responses()[1]["body"] == body
    assert sum(targets) >= 500_000  # most of the 600 KB went in place, not through a copy


async def test_announced_sizes_commit_memory_only_as_bodies_arrive(client):
    # four calls announce 200 MiB each and send 64 KiB: their buffers are allocated at the
    # announced size (so the rest can be read in place), but pages are used only as bytes come
    import psutil

    client.handler.max_body = 256 << 20
    process = psutil.Process()
    before = process.memory_info().rss
    for _ in range(4):
        stream = client.stream
        client.stream += 2
        block = client.encoder.encode(REQUEST)
        head = (200 << 20).to_bytes(4, "big") + bytes(65532)
        client.send(frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, 0, stream, head))
    grown = process.memory_info().rss - before
    held = [r for r in client.connection.requests.values() if r.buffer is not None]
    assert len(held) == 4 and all(len(r.buffer) == 200 << 20 for r in held)
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for 800 MiB announced"


async def test_header_blocks_are_decoded_once_while_the_table_is_unchanged(client, monkeypatch):
    calls = []
    decoder = client.connection._decoder._decoder
    original = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda b, raw: calls.append(b) or original(b, raw=raw))
    for _ in range(5):
        await exchange(client, body_of(8))
    assert len(calls) == 2  # the first block fills the table; the second repeats, then cached


async def test_the_header_cache_follows_the_table_through_insertions_and_evictions(client):
    rng = random.Random(3)
    for i in range(150):
        extra = [(f"x-{rng.randrange(40)}".encode(), b"v" * rng.randrange(1, 600))]
        headers = REQUEST + extra[: rng.randrange(2)]
        await exchange(client, body_of(8), headers=headers)
        got = client.handler.requests[-1].headers
        assert got == dict(headers), i


async def test_large_header_blocks_are_not_cached(client):
    # distinct blocks of 9 KB each (literals, the table unchanged): 64 of them once stayed
    # cached per connection, ~1 MB each of hundreds of idle connections
    for i in range(20):
        headers = [*REQUEST, (b"x-pad", b"%02d" % i + b"p" * 9000)]
        block = http2.encode_headers(headers)
        client.send(frame(HEADERS, END_HEADERS | END_STREAM, client.stream, block))
        client.stream += 2
        await settle()
    decoder = client.connection._decoder
    assert not decoder._cache  # none of them fits
    await exchange(client, body_of(8))
    await exchange(client, body_of(8))
    assert len(decoder._cache) == 1  # a call's usual block still does
    cached = sum(len(block) + decoded.size for block, decoded in decoder._cache.items())
    assert cached == decoder.cached_bytes <= http2_headers.HEADER_CACHE_BYTES


async def test_an_oversized_header_list_is_refused_before_its_headers_are_made(client, monkeypatch):
    made = []
    monkeypatch.setattr(http2_headers, "request_headers", lambda fields: made.append(fields) or {})
    repeated = [*REQUEST, *[(b"x-r", b"v")] * 1000]  # 36 KB, one header joined 1000 times
    block = http2.encode_headers(repeated)
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert client.responses()[1]["headers"][b":status"] == b"431"
    assert not made


async def test_response_headers_round_trip_through_a_decoder():
    headers = [
        (b":status", b"200"),  # fully indexed
        (b"content-type", b"application/grpc"),  # indexed name
        (b"grpc-message", b"x" * 300),  # literal name, long value (multi-byte length)
        (b"allow", b"POST"),
    ]
    assert hpack.Decoder().decode(http2.encode_headers(headers), raw=True) == headers


async def test_a_smaller_header_table_is_announced_in_the_next_block(client):
    client.send(settings(header_table_size=0))
    reply_frames = client.frames()
    assert reply_frames == [(SETTINGS, ACK, 0, b"")]
    stream = client.stream
    client.send(client.request_frames(body_of(8)))
    await settle()
    first = next(p for t, _, s, p in client.frames() if t == HEADERS and s == stream)
    assert first[0] == 0x20  # a dynamic table size update to 0


# --- flow control -------------------------------------------------------------------------


async def test_responses_wait_for_the_clients_window():
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    c = Client(connection, transport)
    c.preface(initial_window_size=100)
    c.frames()
    body = body_of(1000)
    c.send(c.request_frames(body))
    await settle()
    sent = [p for t, _, s, p in c.frames() if t == DATA]
    assert sum(map(len, sent)) == 100  # the stream's window
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 400)))
    assert sum(len(p) for t, _, _, p in c.frames() if t == DATA) == 400
    c.send(settings(initial_window_size=1000))  # +900 to every open stream
    rest = c.frames()
    assert sum(len(p) for t, _, _, p in rest if t == DATA) == 500
    trailers = [p for t, f, _, p in rest if t == HEADERS and f & END_STREAM]
    assert hpack.Decoder().decode(trailers[0], raw=True) == [(b"x-size", b"1000")]


async def test_an_answer_waiting_for_window_holds_no_body_and_stalls_out(client):
    client.send(settings(initial_window_size=0))  # and never any window
    stream = client.stream
    client.send(client.request_frames(body_of(200_000)))
    await settle()
    connection = client.connection
    request = connection._blocked[stream]
    assert connection.buffered == 0 and request.buffer is None and request.pending is None
    start = asyncio.get_running_loop().time()
    connection.check_time(start)
    client.send(frame(WINDOW_UPDATE, 0, stream, struct.pack(">L", 1000)))
    connection.check_time(start + http2.SEND_STALL_S)  # 1000 bytes went: not stalled
    assert stream in connection.requests
    connection.check_time(start + 2 * http2.SEND_STALL_S + 1)
    assert client.responses()[stream]["reset"] == ErrorCode.CANCEL
    assert not connection.requests and not connection._blocked
    assert not client.transport.closed


async def test_a_client_that_reads_nothing_is_disconnected(client):
    now = asyncio.get_running_loop().time()
    client.connection.pause_writing()
    client.connection.check_time(now + http2.SEND_STALL_S - 1)
    assert not client.transport.closed
    client.connection.resume_writing()  # it read: the clock starts again
    client.connection.pause_writing()
    client.connection.check_time(now + http2.SEND_STALL_S + 1)
    assert client.transport.aborted  # what it left unread is dropped, not waited for


async def test_responses_are_cut_to_the_clients_frame_size(client):
    client.send(client.request_frames(body_of(50_000)))
    await settle()
    sizes = [len(p) for t, _, _, p in client.frames() if t == DATA]
    assert max(sizes) == 16384 and sum(sizes) == 50_000


async def test_stream_credit_only_where_the_rest_of_the_body_needs_it(client):
    known = body_of(900_000)  # past half the stream window, the rest fits what is left
    unknown = b"\0" * 4 + bytes(900_000)  # a size the handler cannot tell (Echo: < 4)
    streams = {}
    for name, body in (("known", known), ("unknown", unknown)):
        streams[name] = client.stream
        client.send(client.request_frames(body))
        await settle()
    frames = client.frames()
    credited = {s for t, _, s, _ in frames if t == WINDOW_UPDATE and s != 0}
    assert streams["known"] not in credited  # a write the client would read for nothing
    assert streams["unknown"] in credited
    bodies = {}
    for t, _, s, payload in frames:
        if t == DATA:
            bodies[s] = bodies.get(s, b"") + payload
    assert bodies[streams["known"]] == known and bodies[streams["unknown"]] == unknown


async def test_connection_window_credit_comes_back(client):
    body = body_of(200_000)
    for _ in range(50):  # 10 MB, past half of the connection window
        client.send(client.request_frames(body))
    await settle()
    updates = [p for t, _, s, p in client.frames() if t == WINDOW_UPDATE and s == 0]
    assert sum(struct.unpack(">L", p)[0] for p in updates) >= http2.CONNECTION_WINDOW // 2


@pytest.mark.parametrize(
    "data, code",
    [
        (settings(initial_window_size=1 << 31), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 31) - 1)),
         ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 9, struct.pack(">L", 1)), ErrorCode.PROTOCOL_ERROR),
        (settings(max_frame_size=100), ErrorCode.PROTOCOL_ERROR),
        (settings(enable_push=2), ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["initial-window-over-2^31", "zero-increment", "window-overflow", "short",
         "idle-stream", "max-frame-too-small", "enable-push-2"],
)  # fmt: skip
async def test_flow_control_and_settings_violations_end_the_connection(client, data, code):
    client.send(data)
    assert goaway(client)[1] == code


# --- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, why",
    [
        ([*REQUEST, (b"X-Upper", b"1")], "upper case"),
        ([*REQUEST, (b"connection", b"close")], "connection-specific"),
        ([*REQUEST[:-1], (b"te", b"gzip")], "te may only be"),
        ([h for h in REQUEST if h[0] != b":path"], ":path is missing"),
        ([(b"x-first", b"1"), *REQUEST], "after a regular header"),
        ([*REQUEST[:3], (b":status", b"200"), *REQUEST[3:]], "not a request pseudo-header"),
        ([REQUEST[0], *REQUEST], "repeated"),
        ([*REQUEST, (b"x-bad", b"a\r\nb")], "NUL, CR or LF"),
        ([*REQUEST, (b"x-bad", b" a")], "whitespace"),
        ([*REQUEST, (b"x-bad", b"a\t")], "whitespace"),
        ([*REQUEST[:3], (b":authority", b"localhost "), *REQUEST[4:]], "whitespace"),
    ],
    ids=["upper-case", "connection", "te", "no-path", "pseudo-late", "response-pseudo",
         "repeated", "crlf", "leading-space", "trailing-tab", "pseudo-trailing-space"],
)  # fmt: skip
async def test_malformed_requests_are_reset_and_the_connection_goes_on(client, headers, why):
    reply = await exchange(client, body_of(8), headers=headers)
    assert reply["reset"] == ErrorCode.PROTOCOL_ERROR
    assert not client.handler.requests
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


def test_whitespace_is_refused_only_at_either_end_of_a_value():
    def check(value: bytes):
        return http2_headers.request_headers([*REQUEST, (b"x-v", value)])

    for value in (b" a", b"a ", b"\ta", b"a\t", b" ", b"\t"):
        assert "whitespace" in check(value), value
    for value in (b"", b"a", b"a b", b"a\tb"):
        assert check(value)[b"x-v"] == value


async def test_content_length_must_match_the_body(client):
    headers = [*REQUEST, (b"content-length", b"99")]
    reply = await exchange(client, body_of(8), headers=headers)
    assert reply["reset"] == ErrorCode.PROTOCOL_ERROR
    headers = [*REQUEST, (b"content-length", b"-1")]
    assert (await exchange(client, body_of(8), headers=headers))["reset"] == 1


async def test_more_streams_than_allowed_are_refused(client):
    client.handler.release.clear()  # every call waits
    for _ in range(9):
        client.send(client.request_frames(body_of(8)))
    await settle()
    replies = client.responses()
    assert replies[17]["reset"] == ErrorCode.REFUSED_STREAM
    assert len(client.handler.requests) == 8
    client.handler.release.set()
    await settle()
    replies = client.responses()
    assert all(replies[s]["ended"] for s in range(1, 17, 2))


async def test_an_oversized_header_list_is_answered_by_the_handler(client):
    headers = [*REQUEST, (b"x-junk", b"j" * 20_000)]
    reply = await exchange(client, body_of(8), headers=headers)
    assert reply["headers"][b":status"] == b"431"
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


async def test_an_oversized_body_is_answered_then_its_upload_reset(client):
    stream = client.stream
    client.send(client.request_frames(body_of(2 << 20)))
    await settle()
    reply = client.responses()[stream]
    assert reply["headers"][b":status"] == b"413" and reply["reset"] == ErrorCode.NO_ERROR
    assert client.connection.buffered == 0
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


@pytest.mark.parametrize(
    "data, code",
    [
        (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
        (frame(DATA, 0, 5, b"x"), ErrorCode.PROTOCOL_ERROR),  # an idle stream
        (frame(HEADERS, END_HEADERS, 2, b"\x82"), ErrorCode.PROTOCOL_ERROR),  # even id
        (frame(HEADERS, END_HEADERS, 0, b"\x82"), ErrorCode.PROTOCOL_ERROR),
        (frame(CONTINUATION, END_HEADERS, 1, b"\x82"), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, bytes(8)), ErrorCode.PROTOCOL_ERROR),
        (frame(PUSH_PROMISE, END_HEADERS, 1, bytes(4)), ErrorCode.PROTOCOL_ERROR),
        (frame(PING, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, bytes(8)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\0\4\0"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, ACK, 0, bytes(6)), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, bytes(6 * 40)), ErrorCode.ENHANCE_YOUR_CALM),
        (frame(RST_STREAM, 0, 0, bytes(4)), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 7, bytes(4)), ErrorCode.PROTOCOL_ERROR),  # an idle stream
        (frame(GOAWAY, 0, 1, bytes(8)), ErrorCode.PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 0, bytes(5)), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x7f"), ErrorCode.COMPRESSION_ERROR),
        (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x09abc"), ErrorCode.PROTOCOL_ERROR),
        (struct.pack(">BHBBL", 0x20, 0, DATA, 0, 1), ErrorCode.FRAME_SIZE_ERROR),
    ],
    ids=["data-stream-0", "data-idle", "even-stream", "headers-stream-0",
         "continuation-alone", "interrupted-block", "push-promise", "ping-short",
         "ping-on-stream", "settings-partial", "settings-ack-payload", "settings-on-stream",
         "settings-too-many", "rst-stream-0", "rst-idle", "goaway-on-stream",
         "priority-stream-0", "hpack-garbage", "padding-too-long", "frame-too-large"],
)  # fmt: skip
async def test_protocol_violations_end_the_connection_with_their_code(client, data, code):
    client.send(data)
    _last, error, debug = goaway(client)
    assert error == code, debug
    assert debug  # a reason for whoever reads the client's log


async def test_data_on_a_closed_stream_ends_the_connection(client):
    await exchange(client, body_of(8))
    client.send(frame(DATA, 0, 1, b"late"))
    last, error, _ = goaway(client)
    assert (last, error) == (1, ErrorCode.STREAM_CLOSED)


async def test_data_after_the_end_of_a_request_resets_it_and_cancels_its_call(client):
    client.handler.release.clear()
    client.send(client.request_frames(body_of(8)))
    await settle()
    client.send(frame(DATA, 0, 1, b"more"))
    assert client.responses()[1]["reset"] == ErrorCode.STREAM_CLOSED
    await settle()
    assert client.handler.cancelled == 1 and not client.connection.requests
    client.handler.release.set()
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


async def test_frames_on_a_stream_we_reset_are_ignored(client):
    client.send(client.request_frames(body_of(8), headers=[*REQUEST, (b"Bad", b"1")]))
    assert client.responses()[1]["reset"] == ErrorCode.PROTOCOL_ERROR
    client.send(frame(DATA, END_STREAM, 1, b"in flight"))
    assert not client.transport.closed
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


async def test_a_request_may_not_reuse_the_id_of_a_stream_we_reset(client):
    client.send(client.request_frames(body_of(8), headers=[*REQUEST, (b"Bad", b"1")]))
    assert client.responses()[1]["reset"] == ErrorCode.PROTOCOL_ERROR
    trailers = client.encoder.encode([(b"x-late", b"1")])
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers))  # in flight: ignored
    assert not client.transport.closed
    client.send(frame(HEADERS, END_HEADERS, 1, client.encoder.encode(REQUEST)))
    assert goaway(client)[1] == ErrorCode.STREAM_CLOSED


async def test_a_stream_that_depends_on_itself_in_continuations_is_reset(client):
    block = client.encoder.encode(REQUEST)
    dependency = struct.pack(">LB", 1, 0)
    client.send(frame(HEADERS, PRIORITY_FLAG, 1, dependency + block[:3]))
    client.send(frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    assert client.responses()[1]["reset"] == ErrorCode.PROTOCOL_ERROR
    assert not client.transport.closed
    client.stream = 3
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)  # HPACK kept in step


async def test_a_stream_that_depends_on_itself_is_reset(client):
    block = client.encoder.encode(REQUEST)
    client.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, struct.pack(">LB", 1, 0) + block))
    assert client.responses()[1]["reset"] == ErrorCode.PROTOCOL_ERROR
    client.stream = 3
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)  # HPACK kept in step


async def test_a_continuation_flood_is_cut_off(client):
    client.send(frame(HEADERS, 0, 1, client.encoder.encode(REQUEST)))
    for _ in range(3):
        client.send(frame(CONTINUATION, 0, 1, b"\x00" * 30_000))
    assert goaway(client)[1] == ErrorCode.ENHANCE_YOUR_CALM


async def test_an_hpack_bomb_is_cut_off(client):
    # one 4 KB entry in the table, then a block that names it 100 times: 400 KB from 100 bytes
    plain = http2.encode_headers(REQUEST)  # static indexes and literals: the table stays as is
    big = client.encoder.encode([(b"x-big", b"b" * 4000)])  # the table's only entry: index 62
    client.send(frame(HEADERS, END_HEADERS, 1, plain + big))
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)))
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, plain + b"\xbe" * 100))
    assert goaway(client)[1] == ErrorCode.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    "provoke",
    [
        lambda stream: frame(RST_STREAM, 0, stream, struct.pack(">L", 8)),
        lambda stream: frame(WINDOW_UPDATE, 0, stream, struct.pack(">L", 0)),
        lambda stream: frame(DATA, 0, stream, b"after END_STREAM"),
    ],
    ids=["rst-stream", "window-update-0", "data-after-end"],
)
async def test_rapid_resets_end_the_connection(client, monkeypatch, provoke):
    # "Rapid reset" (the client's RST_STREAM), and "MadeYouReset" (CVE-2025-8671): frames that
    # make the server reset a stream whose call runs free the stream as RST_STREAM would. Either
    # way the calls the client gave up on are cancelled, and the connection ends past the budget.
    monkeypatch.setattr(http2, "RESET_BURST", 20)
    client.connection._reset_tokens = 20
    client.handler.release.clear()
    for _ in range(40):
        stream = client.stream
        client.send(client.request_frames(body_of(8)))
        await settle()  # the call has started
        client.send(provoke(stream))
        if client.transport.closed:
            break
    assert goaway(client)[1] == ErrorCode.ENHANCE_YOUR_CALM
    await settle()
    assert client.handler.cancelled >= 20


async def test_a_client_reset_cancels_its_call_and_frees_its_stream(client):
    client.handler.release.clear()
    client.send(client.request_frames(body_of(8)))
    await settle()
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)))
    await settle()
    assert client.handler.cancelled == 1 and not client.connection.requests
    client.handler.release.set()
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


async def test_a_client_that_does_not_read_is_not_read_from(client):
    client.connection.pause_writing()
    assert not client.transport.reading
    client.connection.resume_writing()
    assert client.transport.reading


async def test_goaway_from_the_client_closes_once_calls_finish(client):
    client.handler.release.clear()
    client.send(client.request_frames(body_of(8)))
    await settle()
    client.send(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))
    assert not client.transport.closed
    client.handler.release.set()
    await settle()
    assert client.responses()[1]["ended"] and client.transport.closed


async def test_a_client_that_never_completes_the_handshake_is_disconnected():
    transport = Transport()
    connection = http2.Connection(Echo(), 8, lambda c: None, http2.ReadBuffer())
    connection.connection_made(transport)
    start = asyncio.get_running_loop().time()
    Client(connection, transport).send(http2.PREFACE)  # and then no SETTINGS
    connection.check_time(start + http2.HANDSHAKE_TIMEOUT_S - 1)
    assert not transport.closed
    connection.check_time(start + http2.HANDSHAKE_TIMEOUT_S + 1)
    assert transport.closed


async def test_a_stalled_body_is_answered_and_dropped_and_progress_keeps_it(client):
    block = client.encoder.encode(REQUEST)
    body = body_of(50_000)
    client.send(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, body[:20_000]))
    stall = http2.BODY_STALL_S
    client.connection.check_time(0.0)
    client.connection.check_time(stall - 1)
    client.send(frame(DATA, 0, 1, body[20_000:30_000]))  # progress: the clock starts again
    client.connection.check_time(stall + 1)
    assert 1 in client.connection.requests
    client.connection.check_time(2 * stall + 2)
    reply = client.responses()[1]
    assert reply["headers"][b":status"] == b"408" and reply["reset"] == ErrorCode.NO_ERROR
    assert client.connection.buffered == 0 and not client.connection.requests
    client.send(frame(DATA, END_STREAM, 1, body[30_000:]))  # the rest, late: ignored
    client.stream = 3
    assert (await exchange(client, body_of(8)))["body"] == body_of(8)


async def test_idle_connections_stay_open(client):
    await exchange(client, body_of(8))
    client.connection.check_time(asyncio.get_running_loop().time() + 10_000)
    assert not client.transport.closed


async def test_shutdown_notice_then_goaway_names_the_last_stream(client):
    await exchange(client, body_of(8))
    client.connection.shutdown_notice()
    client.connection.goaway()
    notices = [p for t, _, _, p in client.frames() if t == GOAWAY]
    assert [struct.unpack_from(">LL", p) for p in notices] == [((1 << 31) - 1, 0), (1, 0)]
    assert client.transport.closed
