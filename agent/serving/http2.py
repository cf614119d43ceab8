"""HTTP/2 server connections for the gRPC front end (RFC 9113), in Python.

A connection reads frames, keeps the protocol's state (streams, flow-control windows, HPACK,
settings) and hands whole requests (headers + body) to a handler; it sends whole responses
(headers, body, trailers) back as frames. It holds no gRPC knowledge: grpc_server.py does.

Why its own: gRPC's unary calls use a small part of HTTP/2, and that part is cheap in Python
when it is written for it. Per call the server parses two frames (a whole frame in one read is
handled in place, with no state kept), finds the header block in a per-connection cache
(http2_headers.py) and writes headers, body and trailers in one system call. On the 2-core
reference machine, A/B against the same front end on libnghttp2 through cffi (a dozen
C-to-Python callbacks per call), at 32 clients: ~101 -> ~69 µs of the event loop per MLP call,
~1.45x the calls per second (bench/README.md). A request body's frames are copied once each,
straight into the request's buffer; when 64 KiB or more of a frame is still to come, the
kernel reads it into that buffer directly. The agent needs no system library for it.

Everything runs on the event loop thread. What a client may do is bounded while it arrives:
- frames of at most MAX_FRAME_BYTES (our SETTINGS_MAX_FRAME_SIZE);
- at most `max_streams` concurrent streams (SETTINGS; more are refused with REFUSED_STREAM);
- header blocks of at most MAX_HEADER_BLOCK bytes that inflate to at most MAX_DECODED_HEADERS
  (beyond either the connection ends: HPACK state cannot be kept in step otherwise); a request
  whose header list is over MAX_HEADER_BYTES is answered by the handler's `headers_too_large`;
- a request body of at most `max_body` bytes per stream and `2 * max_body` held per
  connection, with what the handler makes of them (`hold`: an inflated message); beyond either
  the handler's `too_large` answer is sent, then the upload reset;
- RESET_BURST stream resets at once, refilled at RESET_RATE per second, whether the client sends
  them ("rapid reset") or makes the server send them with frames that break a stream
  ("MadeYouReset"); SETTINGS frames of at most MAX_SETTINGS entries;
- nothing more is read from a client that does not read what it is sent (write backpressure
  pauses reading), so floods of PINGs or SETTINGS cannot queue answers without bound;
- HANDSHAKE_TIMEOUT_S for the client's preface and SETTINGS, BODY_STALL_S for a request body
  that gets no further, SEND_STALL_S for an answer the client gives no window for (its stream
  is reset) or a connection it does not read (closed) (`check_time`, called once a second); an
  answer waiting for window holds no request body. Idle connections stay open, as gRPC clients
  expect.
A protocol violation ends the connection with GOAWAY and the RFC's error code; a stream-level
one resets the stream. Both say what was wrong (GOAWAY debug data, logged at debug level).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.serving.http2_headers import HeaderBlockError, HeaderDecoder, Headers, encode_headers

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # a request's header list, counted as RFC 9113 does
MAX_HEADER_BLOCK = 64 * 1024  # a compressed header block, CONTINUATIONs included
MAX_SETTINGS = 32  # entries in one SETTINGS frame
STREAM_WINDOW = 1 << 20  # what a client may send on one stream before we acknowledge it
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_BYTES = 1 << 20
READ_BUFFER_BYTES = 256 << 10  # most the event loop reads at once (uvloop's own read size)
DIRECT_READ_BYTES = 64 << 10  # a DATA payload with this much to come is read into its request
RESET_BURST, RESET_RATE = 1000, 33.0  # resets a client sends or provokes: at once, per second
HANDSHAKE_TIMEOUT_S = 10.0  # for the client's preface and SETTINGS
BODY_STALL_S = 60.0  # a request body that gets no further for this long is answered and dropped
SEND_STALL_S = 60.0  # an answer given no window (a connection not read) this long is reset (closed)
SMALL_BODY = 64 << 10  # smaller bodies go to a bytearray (zero-filled, cheaper to make)
EAGER_BODY = 4 << 10  # a small body's bytearray is made at once up to this size
JOIN_BYTES = 64 << 10  # output up to this size is joined into one write

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP1_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_HTTP1_TEXT = b"This port serves gRPC (HTTP/2); the KServe v2 REST API is on the HTTP port.\n"
_HTTP1_ANSWER = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_HTTP1_TEXT), _HTTP1_TEXT)
)

# Frame types, flags and settings (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
_HEADER_TABLE_SIZE, _ENABLE_PUSH, _MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
_INITIAL_WINDOW_SIZE, _MAX_FRAME_SIZE, _MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65535
_DEFAULT_FRAME = 16384
_DEFAULT_TABLE = 4096


class ErrorCode(enum.IntEnum):
    """RFC 9113 section 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


NO_ERROR, CANCEL = ErrorCode.NO_ERROR, ErrorCode.CANCEL

_FRAME_HEADER = struct.Struct(">BHBBL")  # 24-bit length as 8 + 16 bits, type, flags, stream
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


class ProtocolError(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


class StreamError(Exception):
    """A stream error (RFC 9113 5.4.2): RST_STREAM with `code`; the connection goes on."""

    def __init__(self, stream_id: int, code: ErrorCode, message: str):
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


def _frame_header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, type_, flags, stream_id)


def _frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _frame_header(type_, flags, stream_id, len(payload)) + payload


@dataclass(slots=True, eq=False)
class Request:
    """One request stream: its headers as they came, its body once complete.

    The body goes straight into one buffer of its final size once the handler can tell that
    size from its first bytes (a gRPC message announces its length): no per-frame objects, no
    join. A large buffer is np.empty's, so its pages are committed only as bytes arrive: a
    client that announces a large message and sends nothing holds no memory. A small one is a
    bytearray (cheaper to make, but zero-filled, so all committed at once): it is made only once
    an eighth of the body is in, so that a few bytes announcing 60 KB hold no 60 KB. Until then,
    or if more arrives than announced, the bytes collect in one growing bytearray.
    """

    stream_id: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    size: int = 0  # body bytes received
    pending: bytearray | None = None  # the body so far, while it has no buffer
    buffer: memoryview | None = None
    sized: bool = False  # the handler was asked for the body's size
    expected: int = 0  # the size it told, while its buffer is still to be made
    refused: bool = False  # answered early (too large): further data is dropped
    held: int = 0  # bytes the handler made of the body (an inflated message), counted as body
    call: Call | None = None  # what answers it, to cancel when nobody will take the answer
    # stream state
    ended: bool = False  # the client's END_STREAM came
    answered: bool = False  # our END_STREAM is queued
    content_length: int | None = None
    recv_window: int = STREAM_WINDOW
    recv_unacked: int = 0  # body bytes taken since the last stream WINDOW_UPDATE
    send_window: int = _DEFAULT_WINDOW
    outgoing: _Outgoing | None = None  # response data waiting for flow-control credit
    swept_size: int = -1  # body size at the last check_time, and since when it is so
    swept_since: float = 0.0

    @property
    def body(self) -> bytes | bytearray | memoryview:
        if self.buffer is not None:
            return self.buffer if self.size == len(self.buffer) else self.buffer[: self.size]
        return self.pending if self.pending is not None else b""

    def take(self, data: memoryview, handler: Handler, limit: int) -> None:
        """Append `data` (a view of the read buffer, valid only during this call)."""
        n = len(data)
        if self.buffer is not None:
            if self.size + n <= len(self.buffer):
                self.buffer[self.size : self.size + n] = data
                self.size += n
                return
            # more than announced: keep it all, the handler will say what is wrong
            self.pending = bytearray(self.buffer[: self.size])
            self.buffer = None
        if self.pending is None:
            self.pending = bytearray(data)
        else:
            self.pending += data
        self.size += n
        if not self.sized and self.size >= handler.head_bytes:
            self.sized = True
            total = handler.body_size(bytes(self.pending[: handler.head_bytes]))
            if total is not None and self.size <= total <= limit:
                self.expected = total
        total = self.expected
        if total and (total >= SMALL_BODY or total <= EAGER_BODY or self.size * 8 >= total):
            self.expected = 0
            self.buffer = memoryview(
                bytearray(total) if total < SMALL_BODY else np.empty(total, np.uint8)
            ).cast("B")
            self.buffer[: self.size] = self.pending
            self.pending = None

    def room(self) -> memoryview | None:
        """Where the next body bytes go when they can be read straight into the buffer."""
        if self.buffer is None or self.refused:
            return None
        return self.buffer[self.size :]


@dataclass(slots=True)
class _Outgoing:
    body: memoryview
    trailers: Headers
    offset: int = 0
    swept_offset: int = -1  # offset at the last check_time, and since when it is so
    swept_since: float = 0.0


class Call(Protocol):
    """A request's answer in the making: an asyncio task, or a job queued on a model."""

    def cancel(self) -> object: ...


class Handler(Protocol):
    """What a connection calls; grpc_server.py's GrpcProtocol is the one implementation."""

    max_body: int  # the largest request body a stream may send
    head_bytes: int  # how many first body bytes body_size needs to tell the body's size

    def body_size(self, head: bytes) -> int | None:
        """The whole body's size, told from its first `head_bytes` bytes; None if unknown."""

    def handle(self, connection: Connection, request: Request) -> Call | None:
        """Answer a complete request with connection.respond, now or later; what answers it
        later (a task, a queued inference) is returned, to be cancelled if the stream goes."""

    def too_large(self, connection: Connection, request: Request, limit: int) -> None:
        """Answer a request whose body passed `limit`; its further data is dropped."""

    def headers_too_large(self, connection: Connection, request: Request, size: int) -> None:
        """Answer a request whose header list (`size` bytes) is over MAX_HEADER_BYTES."""

    def body_stalled(self, connection: Connection, request: Request, seconds: float) -> None:
        """Answer a request whose body got no further for `seconds`; it is then dropped."""


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise ValueError(f"content-length {value!r} is not a number")
    return int(value)


# --- connections ----------------------------------------------------------------------------


class ReadBuffer:
    """Where the event loop reads connections' bytes (asyncio.BufferedProtocol), one per server.

    Its connections share it: each read is parsed at once, and whatever a connection keeps
    (headers, body bytes into the request's buffer, a partial frame) is copied out before the
    loop reads anything else. Reading in place saves the bytes object a plain Protocol gets per
    read: one copy of every request body (600 KB per image) and its allocation.
    """

    def __init__(self, size: int = READ_BUFFER_BYTES):
        self.view = memoryview(bytearray(size))


class Connection(asyncio.BufferedProtocol):
    """One client connection: frames in, whole requests out to the handler, responses back."""

    def __init__(
        self,
        handler: Handler,
        max_streams: int,
        on_close: Callable[[Connection], None],
        read_buffer: ReadBuffer,
    ):
        self.handler = handler
        self.max_streams = max_streams
        self.requests: dict[int, Request] = {}  # open streams
        self.buffered = 0  # request body bytes held for this connection
        self._on_close = on_close
        self._read_buffer = read_buffer
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closing = False
        self._complete: list[Request] = []
        self._decoder = HeaderDecoder()
        # receiving
        self._preface = b""  # the part of the client preface seen so far
        self._settings_seen = False
        self._head = b""  # a frame header split across reads
        self._frame: tuple[int, int, int, int] | None = None  # (length, type, flags, stream)
        self._left = 0  # payload bytes of the current frame still to come
        self._payload: bytearray | None = None  # a whole-frame payload being collected
        self._target: Request | None = None  # the stream an unpadded DATA payload goes to
        self._direct: Request | None = None  # get_buffer gave out this request's buffer
        self._block: tuple[int, int, bytearray] | None = None  # (stream, flags, fragments)
        self._last_stream = 0  # highest client stream id seen
        self._reset_by_us: OrderedDict[int, None] = OrderedDict()  # recent, to ignore late frames
        self._recv_window = CONNECTION_WINDOW
        self._recv_unacked = 0
        self._reset_tokens = float(RESET_BURST)
        self._reset_time = time.monotonic()
        self._peer_going = False  # the client sent GOAWAY
        self._opened = 0.0  # loop time of connection_made
        # sending
        self._send_window = _DEFAULT_WINDOW
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = _DEFAULT_FRAME
        self._peer_table_size = _DEFAULT_TABLE  # what our HPACK encoder may assume
        self._table_update_due = False
        self._blocked: dict[int, Request] = {}  # streams waiting for send window
        self._paused_since: float | None = None  # loop time the transport's buffer filled up

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._opened = self._loop.time()
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (_MAX_CONCURRENT_STREAMS, self.max_streams),
                (_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (_MAX_FRAME_SIZE, MAX_FRAME_BYTES),
                (_MAX_HEADER_LIST_SIZE, MAX_HEADER_BYTES),
            )
        )
        self._out.append(_frame(SETTINGS, 0, 0, settings))
        increment = CONNECTION_WINDOW - _DEFAULT_WINDOW
        self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment)))
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        if target is not None and self._left >= DIRECT_READ_BYTES:
            room = target.room()
            if room is not None and len(room) >= self._left:
                self._direct = target
                return room[: self._left]
        return self._read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            self._direct = None
            return
        try:
            if self._direct is not None:
                request, self._direct = self._direct, None
                self._taken_in_place(request, nbytes)
            else:
                self._receive(self._read_buffer.view[:nbytes])
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        if self._complete:
            ready, self._complete = self._complete, []
            for request in ready:
                if self.requests.get(request.stream_id) is request and not request.refused:
                    request.call = self.handler.handle(self, request)
        if self._out:
            self._flush()

    def eof_received(self) -> bool:
        return False  # close: HTTP/2 clients do not half-close; one that does is done with us

    def pause_writing(self) -> None:
        # The client does not read: stop reading from it, so nothing it asks for piles up here.
        self._paused_since = self._loop.time()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_since = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self._closing = True
        for request in self.requests.values():
            if request.call is not None:
                request.call.cancel()
        self.requests.clear()
        self._blocked.clear()
        self._out.clear()
        self._on_close(self)

    # --- reading frames -------------------------------------------------------------------

    def _receive(self, view: memoryview) -> None:
        i, n = 0, len(view)
        if len(self._preface) < len(PREFACE):
            i = self._take_preface(view)
        while i < n and not self._closing:
            if self._left:  # the rest of a frame begun in an earlier read
                take = min(self._left, n - i)
                chunk = view[i : i + take]
                i += take
                self._left -= take
                if self._target is not None:
                    self._data_bytes(self._target, chunk)
                elif self._payload is not None:
                    self._payload += chunk
                if not self._left:
                    self._frame_end()
                continue
            if self._head or n - i < 9:
                take = min(9 - len(self._head), n - i)
                self._head += bytes(view[i : i + take])
                i += take
                if len(self._head) < 9:
                    return
                header, self._head = self._head, b""
                high, low, type_, flags, stream = _FRAME_HEADER.unpack(header)
            else:
                high, low, type_, flags, stream = _FRAME_HEADER.unpack_from(view, i)
                i += 9
            length = high << 16 | low
            stream &= 0x7FFFFFFF
            self._check_frame(length, type_, stream)
            if n - i >= length:  # the whole payload is here: no state to keep
                self._whole_frame(type_, flags, stream, view[i : i + length])
                i += length
            else:
                self._frame_start(length, type_, flags, stream)

    def _whole_frame(self, type_: int, flags: int, stream: int, payload: memoryview) -> None:
        try:
            if type_ == DATA and not flags & PADDED:
                request = self._data_start(len(payload), flags, stream)
                if request is None:
                    return
                n, buffer = len(payload), request.buffer
                if (  # the usual case, inline: more of a body whose buffer is ready
                    buffer is not None
                    and request.size + n <= len(buffer)
                    and self.buffered + n <= 2 * self.handler.max_body
                    and not request.refused
                ):
                    buffer[request.size : request.size + n] = payload
                    request.size += n
                    self.buffered += n
                else:
                    self._data_bytes(request, payload)
                if flags & END_STREAM:
                    self._request_ended(request)
            else:
                self._dispatch(type_, flags, stream, payload)
        except StreamError as exc:
            self._stream_error(exc)

    def _take_preface(self, view: memoryview) -> int:
        need = len(PREFACE) - len(self._preface)
        got = bytes(view[:need])
        self._preface += got
        if not PREFACE.startswith(self._preface):
            if self._preface.startswith(_HTTP1_METHODS) or b"HTTP/1." in self._preface:
                self._out.append(_HTTP1_ANSWER)
                self._close_after_flush()
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HTTP/1.x on the gRPC port")
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not the HTTP/2 connection preface")
        return len(got)

    def _check_frame(self, length: int, type_: int, stream: int) -> None:
        """What a frame's header alone can break."""
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"a frame of {length} bytes is over SETTINGS_MAX_FRAME_SIZE ({MAX_FRAME_BYTES})",
            )
        if not self._settings_seen and type_ != SETTINGS:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if self._block is not None:
            if type_ != CONTINUATION or stream != self._block[0]:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "a header block was interrupted before END_HEADERS"
                )
            if len(self._block[2]) + length > MAX_HEADER_BLOCK:
                raise ProtocolError(
                    ErrorCode.ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_BLOCK} bytes"
                )
        elif type_ == HEADERS and length > MAX_HEADER_BLOCK:
            raise ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_BLOCK} bytes"
            )
        elif type_ == SETTINGS and length > 6 * MAX_SETTINGS:
            raise ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM, f"a SETTINGS frame of over {MAX_SETTINGS} entries"
            )

    def _frame_start(self, length: int, type_: int, flags: int, stream: int) -> None:
        """A frame whose payload comes over more than one read."""
        self._frame = (length, type_, flags, stream)
        self._left = length
        self._target = self._payload = None
        if type_ == DATA and not flags & PADDED:
            # Unpadded DATA streams into its request as it arrives.
            try:
                self._target = self._data_start(length, flags, stream)
            except StreamError as exc:
                self._stream_error(exc)
        elif type_ <= CONTINUATION:
            self._payload = bytearray()
        # else an unknown frame type, ignored (RFC 9113 5.5): its payload is skipped

    def _frame_end(self) -> None:
        _, type_, flags, stream = self._frame
        target, payload = self._target, self._payload
        self._frame = self._target = self._payload = None
        try:
            if target is not None:
                self._data_end(target, flags)
            elif payload is not None:
                self._dispatch(type_, flags, stream, memoryview(payload))
        except StreamError as exc:
            self._stream_error(exc)

    def _stream_error(self, exc: StreamError) -> None:
        log.debug("gRPC stream %d reset (%s): %s", exc.stream_id, exc.code.name, exc)
        self._count_reset()  # the client's frames asked for it
        self._reset_stream(exc.stream_id, exc.code)

    def _dispatch(self, type_: int, flags: int, stream: int, payload: memoryview) -> None:
        if type_ == DATA:  # padded: strip the padding, then as any DATA frame
            body = _unpad(payload, stream)
            target = self._data_start(len(payload), flags, stream)
            if target is not None:
                self._data_bytes(target, body)
                self._data_end(target, flags)
        elif type_ == HEADERS:
            self._on_headers(flags, stream, payload)
        elif type_ == CONTINUATION:
            self._on_continuation(flags, stream, payload)
        elif type_ == SETTINGS:
            self._on_settings(flags, stream, payload)
        elif type_ == WINDOW_UPDATE:
            self._on_window_update(stream, payload)
        elif type_ == PING:
            self._on_ping(flags, stream, payload)
        elif type_ == RST_STREAM:
            self._on_rst_stream(stream, payload)
        elif type_ == PRIORITY:
            self._on_priority(stream, payload)
        elif type_ == GOAWAY:
            self._on_goaway(stream, payload)
        elif type_ == PUSH_PROMISE:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a client may not send PUSH_PROMISE")

    # --- DATA -----------------------------------------------------------------------------

    def _data_start(self, length: int, flags: int, stream: int) -> Request | None:
        """Check a DATA frame's header and count it against the windows; its request, or None
        when the frame's bytes are to be dropped."""
        if stream == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection's flow-control window"
            )
        self._credit_connection(length)
        request = self.requests.get(stream)
        if request is None:
            self._closed_stream_frame(stream, "DATA")
            return None
        if request.ended:
            raise StreamError(stream, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
        request.recv_window -= length
        if request.recv_window < 0:
            raise StreamError(stream, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the window")
        request.recv_unacked += length
        if (
            request.recv_unacked >= STREAM_WINDOW // 2
            and not flags & END_STREAM
            # no credit when the rest of a body of known size fits the window left: a write
            # the client would have to read, for nothing (a 600 KB image crossed half of it)
            and (
                request.buffer is None
                or len(request.buffer) - request.size - length > request.recv_window
            )
        ):
            self._out.append(_frame(WINDOW_UPDATE, 0, stream, _U32.pack(request.recv_unacked)))
            request.recv_window += request.recv_unacked
            request.recv_unacked = 0
        return request

    def _data_bytes(self, request: Request, data: memoryview) -> None:
        if request.refused or not data:
            return
        limit = self.handler.max_body
        n = len(data)
        if request.size + n > limit or self.buffered + n > 2 * limit:
            self._refuse_body(request, limit)
            return
        request.take(data, self.handler, limit)
        self.buffered += n

    def _taken_in_place(self, request: Request, nbytes: int) -> None:
        """`nbytes` of the current DATA frame were read straight into `request`'s buffer."""
        self._left -= nbytes
        if self.requests.get(request.stream_id) is request and not request.refused:
            request.size += nbytes
            self.buffered += nbytes
            if self.buffered > 2 * self.handler.max_body:
                self._refuse_body(request, self.handler.max_body)
        if not self._left:
            self._frame_end()

    def _refuse_body(self, request: Request, limit: int) -> None:
        self._drop_body(request)
        self.handler.too_large(self, request, limit)
        # Then stop the rest of the upload, "without error" (RFC 9113 8.1).
        self.reset(request, NO_ERROR)

    def _drop_body(self, request: Request) -> None:
        request.refused = True
        request.expected = 0
        self._free_body(request)

    def _free_body(self, request: Request) -> None:
        self.buffered -= request.size + request.held
        request.pending, request.buffer, request.size, request.held = None, None, 0, 0

    def hold(self, request: Request, n: int) -> bool:
        """Count `n` more bytes made of `request`'s body (say, its message inflated) as its
        body, until it is answered; False, and nothing counted, if the connection would then
        hold more than it may (2 * max_body)."""
        if self.buffered + n > 2 * self.handler.max_body:
            return False
        request.held += n
        self.buffered += n
        return True

    def check_time(self, now: float) -> None:
        """Called about once a second (GrpcServer's sweep): end what is past its time.

        A client that has not sent its preface and SETTINGS within HANDSHAKE_TIMEOUT_S is
        disconnected; a request whose body gets no further for BODY_STALL_S is answered by the
        handler's `body_stalled`, its upload reset and its buffer freed. Idle connections stay:
        gRPC clients keep their channels open between calls. An answer the client gives no
        window for SEND_STALL_S is reset; a client that reads nothing for as long is
        disconnected, with what it left unread."""
        if self._closing:
            return
        if self._paused_since is not None and now - self._paused_since >= SEND_STALL_S:
            log.debug("gRPC connection closed: the client read nothing for %g s", SEND_STALL_S)
            self._closing = True
            self._transport.abort()
            return
        if not self._settings_seen:
            if now - self._opened > HANDSHAKE_TIMEOUT_S:
                message = f"no HTTP/2 preface and SETTINGS within {HANDSHAKE_TIMEOUT_S:g} s"
                self._fail(ErrorCode.SETTINGS_TIMEOUT, message)
            return
        for request in list(self.requests.values()):
            if request.ended or request.refused or request.answered:
                continue
            if request.size != request.swept_size:  # progress since the last look
                request.swept_size, request.swept_since = request.size, now
            elif now - request.swept_since >= BODY_STALL_S:
                self._drop_body(request)
                self.handler.body_stalled(self, request, BODY_STALL_S)
                self.reset(request, NO_ERROR)
        for request in list(self._blocked.values()):
            out = request.outgoing
            if out.offset != out.swept_offset:
                out.swept_offset, out.swept_since = out.offset, now
            elif now - out.swept_since >= SEND_STALL_S:
                stalled = (request.stream_id, SEND_STALL_S)
                log.debug("gRPC stream %d reset: no window for its answer for %g s", *stalled)
                self._reset_stream(request.stream_id, CANCEL)
        if self._out:
            self._flush()

    def _data_end(self, request: Request, flags: int) -> None:
        if flags & END_STREAM:
            self._request_ended(request)

    def _credit_connection(self, length: int) -> None:
        # Bytes are taken as they come (bodies are bounded by max_body), so credit goes back
        # at once, in one WINDOW_UPDATE per half window.
        self._recv_unacked += length
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked)))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    # --- HEADERS --------------------------------------------------------------------------

    def _on_headers(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = _unpad(payload, stream) if flags & PADDED else payload
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if len(fragment) < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for PRIORITY")
            self_dependent = _U32.unpack_from(fragment)[0] & 0x7FFFFFFF == stream
            fragment = fragment[5:]
        if flags & END_HEADERS:
            self._header_block(stream, flags, bytes(fragment), self_dependent)
        else:
            self._block = (stream, flags, bytearray(fragment), self_dependent)

    def _on_continuation(self, flags: int, stream: int, payload: memoryview) -> None:
        if self._block is None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block[2].extend(payload)
        if flags & END_HEADERS:
            stream, first_flags, block, self_dependent = self._block
            self._block = None
            self._header_block(stream, first_flags, bytes(block), self_dependent)

    def _header_block(
        self, stream: int, flags: int, block: bytes, self_dependent: bool = False
    ) -> None:
        try:
            decoded = self._decoder.decode(block)
        except HeaderBlockError as exc:  # HPACK state is lost with it: the connection ends
            code = ErrorCode.ENHANCE_YOUR_CALM if exc.too_large else ErrorCode.COMPRESSION_ERROR
            raise ProtocolError(code, str(exc)) from None
        if self_dependent:  # a stream error, once the whole block has kept HPACK in step
            raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, "a stream depends on itself")
        request = self.requests.get(stream)
        if request is not None:  # trailers
            if request.ended:
                raise StreamError(stream, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
            if not flags & END_STREAM:
                raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")
            if any(name[:1] == b":" for name, _ in decoded.fields):
                raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, "pseudo-header in trailers")
            self._request_ended(request)
            return
        if stream <= self._last_stream:
            # Trailers may still come on a stream we reset; a request may not reuse its id.
            trailers = flags & END_STREAM and not any(n[:1] == b":" for n, _ in decoded.fields)
            self._closed_stream_frame(stream, "HEADERS", in_flight=bool(trailers))
            return
        if stream % 2 == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"a client stream id is even: {stream}")
        self._last_stream = stream
        if len(self.requests) >= self.max_streams:
            raise StreamError(
                stream,
                ErrorCode.REFUSED_STREAM,
                f"over SETTINGS_MAX_CONCURRENT_STREAMS ({self.max_streams})",
            )
        if decoded.size > MAX_HEADER_BYTES:  # refused before its headers are made
            request = Request(stream, refused=True, send_window=self._peer_initial_window)
            self.requests[stream] = request
            self.handler.headers_too_large(self, request, decoded.size)
            if flags & END_STREAM:
                self._request_ended(request)
            else:
                self.reset(request, NO_ERROR)  # and the body it would send
            return
        headers = decoded.request_headers()
        if isinstance(headers, str):
            raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, headers)
        try:
            length = _content_length(headers.get(b"content-length"))
        except ValueError as exc:
            raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, str(exc)) from None
        request = Request(
            stream,
            headers,
            content_length=length,
            send_window=self._peer_initial_window,
        )
        self.requests[stream] = request
        if flags & END_STREAM:
            self._request_ended(request)

    def _request_ended(self, request: Request) -> None:
        request.ended = True
        if request.refused:
            self._close_if_done(request)
            return
        if request.content_length is not None and request.content_length != request.size:
            raise StreamError(
                request.stream_id,
                ErrorCode.PROTOCOL_ERROR,
                f"content-length {request.content_length} but {request.size} body bytes",
            )
        self._complete.append(request)

    def _closed_stream_frame(self, stream: int, kind: str, in_flight: bool = True) -> None:
        """A DATA or HEADERS frame for a stream that is not open; `in_flight`: one the client
        may have sent before it saw our reset."""
        if in_flight and stream in self._reset_by_us:
            return  # frames in flight when we reset it
        if stream > self._last_stream:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind} on idle stream {stream}")
        raise ProtocolError(ErrorCode.STREAM_CLOSED, f"{kind} on closed stream {stream}")

    # --- control frames -------------------------------------------------------------------

    def _on_settings(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6")
        self._settings_seen = True
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == _HEADER_TABLE_SIZE:
                if value < self._peer_table_size:
                    # Our blocks use no dynamic table; say so once it must shrink (RFC 7541 4.2).
                    self._peer_table_size = 0
                    self._table_update_due = True
            elif key == _ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0/1")
            elif key == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise ProtocolError(
                        ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1"
                    )
                self._initial_window(value)
            elif key == _MAX_FRAME_SIZE:
                if not _DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} out of range"
                    )
                self._peer_max_frame = value
        self._out.append(_frame(SETTINGS, ACK, 0))

    def _initial_window(self, value: int) -> None:
        delta = value - self._peer_initial_window
        self._peer_initial_window = value
        for request in self.requests.values():
            request.send_window += delta
            if request.send_window > _MAX_WINDOW:
                raise ProtocolError(
                    ErrorCode.FLOW_CONTROL_ERROR, "a stream's window grows over 2^31-1"
                )
        if delta > 0:
            self._unblock()

    def _on_window_update(self, stream: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream == 0:
            if increment == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise ProtocolError(
                    ErrorCode.FLOW_CONTROL_ERROR, "the connection's window over 2^31-1"
                )
            self._unblock()
            return
        request = self.requests.get(stream)
        if request is None:
            if stream > self._last_stream:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a stream just closed
        if increment == 0:
            raise StreamError(stream, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        request.send_window += increment
        if request.send_window > _MAX_WINDOW:
            raise StreamError(stream, ErrorCode.FLOW_CONTROL_ERROR, "window over 2^31-1")
        if request.outgoing is not None:
            self._send_data(request)

    def _on_ping(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if not flags & ACK:
            self._out.append(_frame(PING, ACK, 0, bytes(payload)))

    def _on_rst_stream(self, stream: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if stream == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if stream > self._last_stream:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        request = self.requests.get(stream)
        if request is None:
            return
        self._count_reset()
        self._forget(request)
        if request.call is not None:
            request.call.cancel()  # the client gave up on it

    def _count_reset(self) -> None:
        """A stream reset by the client, or by us in answer to its frames: either frees a
        stream whose call may still run, so a client that resets streams as fast as it opens
        them would have the server work on calls without limit ("rapid reset", "MadeYouReset").
        """
        now = time.monotonic()
        tokens = self._reset_tokens + (now - self._reset_time) * RESET_RATE
        self._reset_tokens, self._reset_time = min(tokens, RESET_BURST) - 1, now
        if self._reset_tokens < 0:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many stream resets")

    def _on_priority(self, stream: int, payload: memoryview) -> None:
        if stream == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise StreamError(stream, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")
        # Prioritisation is deprecated (RFC 9113 5.3) and unary calls gain nothing from it.

    def _on_goaway(self, stream: int, payload: memoryview) -> None:
        if stream != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY under 8 bytes")
        self._peer_going = True
        if not self.requests:
            self._close_after_flush()

    # --- responses ------------------------------------------------------------------------

    def respond(self, request: Request, headers: Headers, body: bytes, trailers: Headers) -> None:
        """Send headers, then `body` (if any) and `trailers` (if any), ending the stream."""
        if self._closing or request.answered or self.requests.get(request.stream_id) is not request:
            return  # the stream is gone: reset by the client, or the connection closed
        stream, n = request.stream_id, len(body)
        self._send_headers(stream, headers, not n and not trailers)
        if n and n <= min(self._peer_max_frame, self._send_window, request.send_window):
            # the usual answer: one DATA frame, within the windows
            self._out.append(_frame_header(DATA, 0 if trailers else END_STREAM, stream, n))
            self._out.append(body)
            self._send_window -= n
            request.send_window -= n
            if trailers:
                self._send_headers(stream, trailers, end=True)
            self._answered(request)
        elif n or trailers:
            request.outgoing = _Outgoing(memoryview(body), trailers)
            self._send_data(request)
        else:
            self._answered(request)
        # Written at once, not at the end of the loop's turn: a turn later is measurably later
        # for a single call (the CNN's p50), and calls finishing together on one connection
        # are rare enough that one write each costs less.
        self._flush()

    def _send_headers(self, stream: int, headers: Headers, end: bool) -> None:
        block = encode_headers(headers)
        if self._table_update_due:
            self._table_update_due = False
            block = b"\x20" + block  # dynamic table size update to 0
        flags = END_STREAM if end else 0
        step = self._peer_max_frame
        if len(block) <= step:
            self._out.append(_frame_header(HEADERS, flags | END_HEADERS, stream, len(block)))
            self._out.append(block)
            return
        self._out.append(_frame(HEADERS, flags, stream, block[:step]))
        for offset in range(step, len(block), step):
            last = offset + step >= len(block)
            piece = block[offset : offset + step]
            self._out.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream, piece))

    def _send_data(self, request: Request) -> None:
        out = request.outgoing
        body, stream = out.body, request.stream_id
        while out.offset < len(body):
            n = min(
                len(body) - out.offset, self._peer_max_frame, self._send_window, request.send_window
            )
            if n <= 0:
                self._blocked[stream] = request  # until the client gives credit
                if request.ended:  # only the answer waits: the body and its call can go
                    self._free_body(request)
                    request.call = None
                return
            last = out.offset + n == len(body) and not out.trailers
            self._out.append(_frame_header(DATA, END_STREAM if last else 0, stream, n))
            self._out.append(body[out.offset : out.offset + n])
            out.offset += n
            self._send_window -= n
            request.send_window -= n
        self._blocked.pop(stream, None)
        request.outgoing = None
        if out.trailers:
            self._send_headers(stream, out.trailers, end=True)
        elif not body:
            self._out.append(_frame(DATA, END_STREAM, stream))
        self._answered(request)

    def _unblock(self) -> None:
        for request in list(self._blocked.values()):
            if self._send_window <= 0:
                break
            self._send_data(request)
        self._schedule_flush()

    def _answered(self, request: Request) -> None:
        request.answered = True
        self._close_if_done(request)

    def _close_if_done(self, request: Request) -> None:
        if request.answered and request.ended:
            self._forget(request)
            if self._peer_going and not self.requests:
                self._close_after_flush()

    def _forget(self, request: Request) -> None:
        if self.requests.pop(request.stream_id, None) is not None:
            self.buffered -= request.size + request.held
        self._blocked.pop(request.stream_id, None)
        request.outgoing = None

    def reset(self, request: Request, error_code: int = CANCEL) -> None:
        """Reset the stream (after whatever was sent on it so far)."""
        if self.requests.get(request.stream_id) is request:
            self._reset_stream(request.stream_id, error_code)

    def _reset_stream(self, stream: int, error_code: int) -> None:
        if self._closing:
            return
        request = self.requests.get(stream)
        if request is not None:
            self._forget(request)
            call = request.call
            if call is not None and call is not asyncio.current_task():
                call.cancel()  # nobody will take its answer
        self._out.append(_frame(RST_STREAM, 0, stream, _U32.pack(error_code)))
        self._reset_by_us[stream] = None
        if len(self._reset_by_us) > 256:
            self._reset_by_us.popitem(last=False)
        self._schedule_flush()

    def shutdown_notice(self) -> None:
        """Tell the client no new streams will be taken once in-flight ones finish."""
        if not self._closing:
            self._out.append(_goaway(_MAX_WINDOW, NO_ERROR))
            self._flush()

    def goaway(self) -> None:
        if not self._closing:
            self._out.append(_goaway(self._last_stream, NO_ERROR))
            self._close_after_flush()

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    def unanswered(self) -> list[Request]:
        """Open streams that nothing has been sent on yet (no response headers), oldest first."""
        return [
            r
            for r in self.requests.values()
            if not (r.answered or r.refused or r.outgoing is not None)
        ]

    def _fail(self, code: ErrorCode, message: str) -> None:
        log.debug("gRPC connection closed (%s): %s", code.name, message)
        if not self._closing and self._transport is not None:
            if self._preface == PREFACE:  # an HTTP/2 client: tell it why
                self._out.append(_goaway(self._last_stream, code, message.encode()[:256]))
            self._close_after_flush()

    # --- output ---------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Write once per turn of the loop, whatever number of responses were queued."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            out, self._out = self._out, []
            if len(out) == 1:
                self._transport.write(out[0])
            elif sum(map(len, out)) < JOIN_BYTES:
                self._transport.write(b"".join(out))
            else:  # large bodies go out as they are, not copied into one buffer first
                self._transport.writelines(out)

    def _close_after_flush(self) -> None:
        self._flush()
        self._closing = True
        if self._transport is not None:
            self._transport.close()  # after what is buffered has been written


def _goaway(last_stream: int, code: int, debug: bytes = b"") -> bytes:
    return _frame(GOAWAY, 0, 0, _U32.pack(last_stream) + _U32.pack(code) + debug)


def _unpad(payload: memoryview, stream: int) -> memoryview:
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "a PADDED frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1 : len(payload) - pad]
