"""HTTP/2 server connections for the gRPC front end, on libnghttp2.

libnghttp2 (the HTTP/2 library of curl, nghttpx and Apache httpd; Debian package libnghttp2-14)
does the framing, HPACK, flow control and the protocol checks; it is reached through cffi in ABI
mode, so nothing is compiled at install time. This module turns its callbacks into whole
requests (headers + body) for a handler, and sends whole responses (headers, body, trailers).
It holds no gRPC knowledge: grpc_server.py does.

Why not grpc.aio: on the 2-core reference machine its own per-call work (tasks, completion-queue
round trips through a poller thread) capped a do-nothing unary handler at ~6,400 calls/s and
took ~1.1 ms to take in a 600 KB request, and importing grpc costs ~24 MiB of RSS. Here a call
is a handful of C callbacks on the event-loop thread.

Everything runs on the event loop thread. Limits, all enforced while data arrives:
- at most `max_streams` concurrent streams per connection (SETTINGS, enforced by nghttp2);
- request header lists of at most MAX_HEADER_BYTES (the stream is reset beyond it);
- a request body of at most `max_body` bytes per stream and `2 * max_body` buffered per
  connection; beyond either the handler's `too_large` answer is sent and the stream's further
  data dropped.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import cffi

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
STREAM_WINDOW = 1 << 20  # what a client may send on one stream before we acknowledge it
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_BYTES = 1 << 20
READ_BUFFER_BYTES = 256 << 10  # most the event loop reads at once (uvloop's own read size)

_CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct {
  size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved;
} nghttp2_frame_hd;
typedef struct { nghttp2_frame_hd hd; } nghttp2_frame;  /* a union whose members all start so */
typedef struct {
  const char *name; const char *value; size_t namelen; size_t valuelen; uint8_t flags;
} nghttp2_nv;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
  nghttp2_session *, int32_t, char *, size_t, uint32_t *, nghttp2_data_source *, void *);
typedef struct {
  nghttp2_data_source source; nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct {
  int age; int version_num; const char *version_str; const char *proto_str;
} nghttp2_info;

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);
int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
  int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
  int (*)(nghttp2_session *, const nghttp2_frame *, const char *, size_t, const char *, size_t,
          uint8_t, void *));
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
  int (*)(nghttp2_session *, uint8_t, int32_t, const char *, size_t, void *));
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
  int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
  int (*)(nghttp2_session *, int32_t, uint32_t, void *));
int nghttp2_session_server_new(nghttp2_session **session_ptr,
  const nghttp2_session_callbacks *callbacks, void *user_data);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
  int32_t stream_id, int32_t window_size);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
  const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
  const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id,
  const nghttp2_nv *nva, size_t nvlen);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
  uint32_t error_code);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
  uint32_t error_code, const char *opaque_data, size_t opaque_data_len);
int nghttp2_submit_shutdown_notice(nghttp2_session *session);
"""

# Constants of nghttp2.h and RFC 9113.
_DATA, _HEADERS = 0, 1
_FLAG_END_STREAM = 0x1
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 0x1, 0x2
_SETTINGS_MAX_CONCURRENT_STREAMS, _SETTINGS_INITIAL_WINDOW_SIZE = 3, 4
_SETTINGS_MAX_FRAME_SIZE, _SETTINGS_MAX_HEADER_LIST_SIZE = 5, 6
_ERR_TEMPORAL_CALLBACK_FAILURE, _ERR_CALLBACK_FAILURE = -521, -902
NO_ERROR, INTERNAL_ERROR, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x2, 0x8, 0xB

NV_CACHE_SIZE = 256
MIN_VERSION = 0x012B00  # 1.43: every call above, in Debian 11 and 12, Ubuntu 22.04 and later


class Http2Unavailable(RuntimeError):
    """libnghttp2 is not installed (or too old) on this machine."""


Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Request:
    """One request stream: its headers as they came, its body once complete.

    The body goes straight into one buffer of its final size once the handler can tell that
    size from its first bytes (a gRPC message announces its length): no per-frame objects, no
    join. Until then, or if more arrives than announced, it is kept as a list of chunks.
    """

    stream_id: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_bytes: int = 0
    size: int = 0  # body bytes received
    chunks: list[bytes] = field(default_factory=list)
    buffer: bytearray | None = None
    into: object = None  # a cffi pointer to buffer's first byte
    sized: bool = False  # the handler was asked for the body's size
    refused: bool = False  # answered early (too large): further data is dropped
    task: asyncio.Task | None = None

    @property
    def body(self) -> bytes | bytearray | memoryview:
        if self.buffer is not None:
            return (
                self.buffer
                if self.size == len(self.buffer)
                else memoryview(self.buffer)[: self.size]
            )
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def take(self, ffi, data, length: int, handler: Handler, limit: int) -> None:
        """Append `length` bytes at the C pointer `data`."""
        if self.buffer is not None:
            if self.size + length <= len(self.buffer):
                ffi.memmove(self.into + self.size, data, length)
                self.size += length
                return
            # more than announced: keep it all, the handler will say what is wrong
            self.chunks = [bytes(memoryview(self.buffer)[: self.size])]
            self.buffer = self.into = None
        self.chunks.append(ffi.unpack(data, length))
        self.size += length
        if not self.sized and self.size >= handler.head_bytes:
            self.sized = True
            head = b"".join(self.chunks)
            total = handler.body_size(head[: handler.head_bytes])
            if total is not None and self.size <= total <= limit:
                self.buffer = bytearray(total)
                self.into = ffi.from_buffer("char[]", self.buffer)
                self.buffer[: self.size] = head
                self.chunks = []


@dataclass(slots=True)
class _Outgoing:
    body: bytes
    trailers: Headers
    offset: int = 0


class Handler(Protocol):
    """What a connection calls; grpc_server.py's GrpcProtocol is the one implementation."""

    max_body: int  # the largest request body a stream may send
    head_bytes: int  # how many first body bytes body_size needs to tell the body's size

    def body_size(self, head: bytes) -> int | None:
        """The whole body's size, told from its first `head_bytes` bytes; None if unknown."""

    async def handle(self, connection: Connection, request: Request) -> None:
        """Answer a complete request (with connection.respond)."""

    def too_large(self, connection: Connection, request: Request, limit: int) -> None:
        """Answer a request whose body passed `limit`; its further data is dropped."""


class _Library:
    """libnghttp2 loaded once, with one set of callbacks shared by every connection."""

    def __init__(self):
        self.ffi = ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        name = ctypes.util.find_library("nghttp2") or "libnghttp2.so.14"
        try:
            self.lib = lib = ffi.dlopen(name)
        except OSError as exc:
            raise Http2Unavailable(
                f"the gRPC front end needs libnghttp2 (Debian/Ubuntu: apt-get install "
                f"libnghttp2-14), and it could not be loaded: {exc}"
            ) from None
        if lib.nghttp2_version(MIN_VERSION) == ffi.NULL:
            found = ffi.string(lib.nghttp2_version(0).version_str).decode()
            raise Http2Unavailable(f"libnghttp2 {found} is too old: 1.43 or newer is needed")
        self.version = ffi.string(lib.nghttp2_version(0).version_str).decode()
        fail = {"onerror": _on_callback_error, "error": _ERR_CALLBACK_FAILURE}
        # ffi.callback objects must stay referenced as long as the library may call them.
        self._callbacks = [
            (
                lib.nghttp2_session_callbacks_set_on_begin_headers_callback,
                ffi.callback("int(nghttp2_session *, const nghttp2_frame *, void *)", **fail)(
                    _on_begin_headers
                ),
            ),
            (
                lib.nghttp2_session_callbacks_set_on_header_callback,
                ffi.callback(
                    "int(nghttp2_session *, const nghttp2_frame *, const char *, size_t, "
                    "const char *, size_t, uint8_t, void *)",
                    **fail,
                )(_on_header),
            ),
            (
                lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback,
                ffi.callback(
                    "int(nghttp2_session *, uint8_t, int32_t, const char *, size_t, void *)", **fail
                )(_on_data_chunk),
            ),
            (
                lib.nghttp2_session_callbacks_set_on_frame_recv_callback,
                ffi.callback("int(nghttp2_session *, const nghttp2_frame *, void *)", **fail)(
                    _on_frame
                ),
            ),
            (
                lib.nghttp2_session_callbacks_set_on_stream_close_callback,
                ffi.callback("int(nghttp2_session *, int32_t, uint32_t, void *)", **fail)(
                    _on_stream_close
                ),
            ),
        ]
        holder = ffi.new("nghttp2_session_callbacks **")
        if lib.nghttp2_session_callbacks_new(holder) != 0:
            raise MemoryError("nghttp2_session_callbacks_new failed")
        self.callbacks = holder[0]
        for setter, callback in self._callbacks:
            setter(self.callbacks, callback)
        self.read_body = ffi.callback("nghttp2_data_source_read_callback", **fail)(_read_body)
        self.provider = ffi.new("nghttp2_data_provider *")
        self.provider.read_callback = self.read_body
        self._nv_cache: dict[tuple, object] = {}  # header list -> nghttp2_nv[] (see headers())

    def headers(self, pairs: Headers):
        """An nghttp2_nv array for `pairs` (nghttp2 copies it: it need not outlive the call).

        Arrays are kept for reuse (most responses send the same few header lists, and
        building one costs a few µs per response): the first `NV_CACHE_SIZE` distinct lists,
        each kept with the bytes it points into."""
        key = tuple(pairs)
        nva = self._nv_cache.get(key)
        if nva is not None:
            return nva
        nva = self.ffi.new("nghttp2_nv[]", len(pairs))
        for nv, (name, value) in zip(nva, pairs, strict=True):
            nv.name, nv.namelen = self.ffi.from_buffer(name), len(name)
            nv.value, nv.valuelen = self.ffi.from_buffer(value), len(value)
        if len(self._nv_cache) < NV_CACHE_SIZE:
            self._nv_cache[key] = nva
        return nva


_library: _Library | None = None


def library() -> _Library:
    """libnghttp2, loaded on first use; Http2Unavailable says how to install it if missing."""
    global _library
    if _library is None:
        _library = _Library()
    return _library


def _on_callback_error(exc_type, exc, tb) -> None:
    # A bug in this module: end the connection (the callback returns CALLBACK_FAILURE), say why.
    log.error("HTTP/2 callback failed", exc_info=(exc_type, exc, tb))


def _connection(user_data) -> Connection:
    return _library.ffi.from_handle(user_data)


def _on_begin_headers(session, frame, user_data) -> int:
    if frame.hd.type == _HEADERS:
        conn = _connection(user_data)
        if frame.hd.stream_id not in conn.requests:
            conn.requests[frame.hd.stream_id] = Request(frame.hd.stream_id)
    return 0


def _on_header(session, frame, name, namelen, value, valuelen, flags, user_data) -> int:
    request = _connection(user_data).requests.get(frame.hd.stream_id)
    if request is None or request.task is not None:
        return 0  # trailers from the client: gRPC requests carry none worth reading
    request.header_bytes += namelen + valuelen + 32  # RFC 9113's accounting
    if request.header_bytes > MAX_HEADER_BYTES:
        return _ERR_TEMPORAL_CALLBACK_FAILURE  # nghttp2 resets just this stream
    ffi = _library.ffi
    request.headers[ffi.unpack(name, namelen)] = ffi.unpack(value, valuelen)
    return 0


def _on_data_chunk(session, flags, stream_id, data, length, user_data) -> int:
    conn = _connection(user_data)
    request = conn.requests.get(stream_id)
    if request is None or request.refused:
        return 0
    limit = conn.handler.max_body
    if request.size + length > limit or conn.buffered + length > 2 * limit:
        request.refused = True
        conn.buffered -= request.size
        request.chunks, request.buffer, request.into, request.size = [], None, None, 0
        conn.handler.too_large(conn, request, limit)
        return 0
    request.take(_library.ffi, data, length, conn.handler, limit)
    conn.buffered += length
    return 0


def _on_frame(session, frame, user_data) -> int:
    if frame.hd.flags & _FLAG_END_STREAM and frame.hd.type in (_DATA, _HEADERS):
        conn = _connection(user_data)
        request = conn.requests.get(frame.hd.stream_id)
        if request is not None and request.task is None and not request.refused:
            conn.complete.append(request)
    return 0


def _on_stream_close(session, stream_id, error_code, user_data) -> int:
    conn = _connection(user_data)
    request = conn.requests.pop(stream_id, None)
    conn.outgoing.pop(stream_id, None)
    if request is not None:
        conn.buffered -= request.size
        if request.task is not None and not request.task.done():
            request.task.cancel()  # the client reset the stream or went away
    return 0


def _read_body(session, stream_id, buf, length, data_flags, source, user_data) -> int:
    conn = _connection(user_data)
    out = conn.outgoing[stream_id]
    n = min(length, len(out.body) - out.offset)
    _library.ffi.memmove(buf, memoryview(out.body)[out.offset : out.offset + n], n)
    out.offset += n
    if out.offset == len(out.body):
        del conn.outgoing[stream_id]
        if out.trailers:
            data_flags[0] |= _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
            lib = _library
            lib.lib.nghttp2_submit_trailer(
                session, stream_id, lib.headers(out.trailers), len(out.trailers)
            )
        else:
            data_flags[0] |= _DATA_FLAG_EOF
    return n


class ReadBuffer:
    """Where the event loop reads connections' bytes (asyncio.BufferedProtocol), one per server.

    Its connections share it: each read goes to nghttp2 at once, which copies whatever it keeps
    (headers, body bytes into the request's buffer) before the loop reads anything else. Reading
    in place saves the bytes object a plain Protocol gets per read: one copy of every request
    body (600 KB per image) and its allocation.
    """

    def __init__(self, size: int = READ_BUFFER_BYTES):
        self.view = memoryview(bytearray(size))
        self.pointer = library().ffi.from_buffer("char[]", self.view)


class Connection(asyncio.BufferedProtocol):
    """One client connection: bytes in to nghttp2, whole requests out to the handler."""

    def __init__(
        self,
        handler: Handler,
        max_streams: int,
        on_close: Callable[[Connection], None],
        read_buffer: ReadBuffer,
    ):
        self.handler = handler
        self._read_buffer = read_buffer
        self.max_streams = max_streams
        self.requests: dict[int, Request] = {}
        self.outgoing: dict[int, _Outgoing] = {}
        self.complete: list[Request] = []
        self.buffered = 0  # request body bytes held for this connection
        self._on_close = on_close
        self._lib = library()
        self._session = None
        self._handle = None
        self._pointer = None
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        ffi, lib = self._lib.ffi, self._lib.lib
        self._handle = ffi.new_handle(self)
        self._pointer = ffi.new("const char **")  # where mem_send says its output is
        holder = ffi.new("nghttp2_session **")
        if lib.nghttp2_session_server_new(holder, self._lib.callbacks, self._handle) != 0:
            transport.abort()
            return
        self._session = holder[0]
        entries = [
            (_SETTINGS_MAX_CONCURRENT_STREAMS, self.max_streams),
            (_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_BYTES),
            # Clients that honour it (gRPC's own) send large tensors in fewer, larger frames.
            (_SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_BYTES),
        ]
        settings = ffi.new("nghttp2_settings_entry[]", entries)
        lib.nghttp2_submit_settings(self._session, 0, settings, len(entries))
        lib.nghttp2_session_set_local_window_size(self._session, 0, 0, CONNECTION_WINDOW)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._session is None:
            return
        used = self._lib.lib.nghttp2_session_mem_recv(
            self._session, self._read_buffer.pointer, nbytes
        )
        if used < 0:  # not HTTP/2, or a connection error nghttp2 has already queued GOAWAY for
            log.debug("gRPC connection closed: %s", self._error(used))
            self.flush()
            self._close()
            return
        if self.complete:
            ready, self.complete = self.complete, []
            for request in ready:
                request.task = self._loop.create_task(self.handler.handle(self, request))
        self.flush()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.flush()

    def connection_lost(self, exc) -> None:
        for request in self.requests.values():
            if request.task is not None and not request.task.done():
                request.task.cancel()
        self.requests.clear()
        self.outgoing.clear()
        if self._session is not None:
            self._lib.lib.nghttp2_session_del(self._session)
            self._session = None
        self._on_close(self)

    # --- responses ------------------------------------------------------------------------

    def respond(self, request: Request, headers: Headers, body: bytes, trailers: Headers) -> None:
        """Send headers, then `body` (if any) and `trailers` (if any), ending the stream."""
        if self._session is None or request.stream_id not in self.requests:
            return  # the stream is gone: reset by the client, or the connection closed
        lib = self._lib
        provider = lib.ffi.NULL
        if body or trailers:
            self.outgoing[request.stream_id] = _Outgoing(body, trailers)
            provider = lib.provider
        lib.lib.nghttp2_submit_response(
            self._session, request.stream_id, lib.headers(headers), len(headers), provider
        )
        self.schedule_flush()

    def reset(self, request: Request, error_code: int = CANCEL) -> None:
        if self._session is not None:
            self._lib.lib.nghttp2_submit_rst_stream(self._session, 0, request.stream_id, error_code)
            self.schedule_flush()

    def reset_later(self, request: Request, error_code: int) -> None:
        """Reset after what is queued now has been written (a reset may overtake it otherwise)."""
        self.schedule_flush()
        self._loop.call_soon(self.reset, request, error_code)

    def shutdown_notice(self) -> None:
        """Tell the client no new streams will be taken once in-flight ones finish."""
        if self._session is not None:
            self._lib.lib.nghttp2_submit_shutdown_notice(self._session)
            self.flush()

    def goaway(self) -> None:
        if self._session is not None:
            lib = self._lib.lib
            last = lib.nghttp2_session_get_last_proc_stream_id(self._session)
            lib.nghttp2_submit_goaway(self._session, 0, last, NO_ERROR, self._lib.ffi.NULL, 0)
            self.flush()
        self._close()

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    # --- output ---------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Write once per turn of the loop, whatever number of responses were submitted."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._session is None or self._paused or self._transport is None:
            return
        ffi, lib = self._lib.ffi, self._lib.lib
        pointer = self._pointer
        chunks = []
        while True:
            n = lib.nghttp2_session_mem_send(self._session, pointer)
            if n < 0:
                log.debug("gRPC connection closed: %s", self._error(n))
                self._close()
                return
            if n == 0:
                break
            chunks.append(ffi.buffer(pointer[0], n)[:])
        if chunks:
            self._transport.write(b"".join(chunks))
        if not lib.nghttp2_session_want_read(self._session) and not (
            lib.nghttp2_session_want_write(self._session)
        ):
            self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _error(self, code: int) -> str:
        return self._lib.ffi.string(self._lib.lib.nghttp2_strerror(code)).decode()
