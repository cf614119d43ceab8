"""The REST front end's HTTP/1.1 server: llhttp (through httptools) on an asyncio BufferedProtocol.

Why not aiohttp's server: with nothing else in the process, its request/response machinery costs
~33 µs of event-loop time per keep-alive request on the 2-core reference machine, this about 9 µs
(a bare handler: 30,000 vs 105,000 requests/s under wrk). On a small model that is a third of a
request's whole cost, and serving is bound by the one thread that holds the GIL.

What it does:
- keep-alive and pipelining (responses in request order; reading pauses while requests queue up),
  HTTP/1.0 clients, `Expect: 100-continue`, chunked request bodies, `HEAD`;
- limits: request line + headers (`MAX_HEAD_BYTES`, 431), header count, body (`max_body`, 413):
  a `Content-Length` over the limit is refused before any of the body is read, a chunked body as
  soon as it passes the limit; what a chunked body sends without data (chunk framing, the
  trailer section) counts like a head, in bytes and in time; trailer fields are ignored;
- a body with a `Content-Length` of `DIRECT_BODY_BYTES` or more is read from the socket straight
  into one buffer of its size (no per-read bytes objects, no parser copies, no join), whose
  memory is committed only as the body arrives, whatever length the client claims; a chunked
  body collects in one bytearray, so its memory is that of its data, however small its chunks;
- malformed HTTP (llhttp is strict: no `Content-Length` beside `Transfer-Encoding`, no bare LF,
  no obsolete line folding) gets 400 and the connection closes; a transfer coding other than
  chunked (`gzip, chunked`) gets 501;
- a connection idle past `keepalive_timeout` is closed; a request whose head is not in whole
  `request_timeout` after it began, or whose body stalls that long, gets 408 (not counting the
  time reading is paused by us, for pipelined requests); a connection whose client reads none of
  what we have to send for `send_timeout` is dropped;
- closing after an error shuts down our side and drains what the client still sends for a moment,
  so the client reads the error instead of a reset.

The application (`Application`) routes a request as soon as its head is in, which lets it refuse
one (unknown path, wrong method) before its body is read, and returns the handler to run on the
complete request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import httptools
import numpy as np

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line + headers
MAX_HEADERS = 100
DIRECT_BODY_BYTES = 64 * 1024
READ_BUFFER_BYTES = 256 * 1024
HEAD_READ_BYTES = 16 * 1024  # the first read of a request
LINGER_S = 2.0  # after an error: how long to drain what the client still sends before closing


class Request:
    """One request as the application sees it. Header names are lower case; repeated headers
    are joined with ", ". `body` is bytes, a writable memoryview for a body read directly, or a
    bytearray for a chunked one."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str]):
        self.method = method
        self.path = path  # raw, still percent-encoded
        self.query = query
        self.headers = headers
        self.body: bytes | memoryview = b""
        self.keep_alive = True


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


Reply = Callable[[Response], None]
# A handler answers at once with a Response, or returns None and calls reply(response) later.
Handler = Callable[..., Response | None]


class Application(Protocol):
    def route(self, request: Request) -> tuple[Handler, tuple] | Response:
        """With the head in (no body yet): the handler to run and its extra arguments, or a
        response that refuses the request at once."""

    def respond(
        self, request: Request, handler: Handler, args: tuple, reply: Reply
    ) -> Response | None:
        """Run the handler on the complete request: its response, or None if it will call
        `reply` later (once, from the event loop)."""

    def error(self, status: int, message: str) -> Response:
        """The response for a problem found by the server itself (malformed HTTP, limits)."""


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in _REASONS}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Header names as received -> their lower-case text: decoding and lowering each name of each
# request cost more than looking it up. Bounded: names beyond it are decoded every time.
_HEADER_NAMES: dict[bytes, str] = {}
MAX_KNOWN_HEADER_NAMES = 512

# Connection states
_IDLE, _HEAD, _BODY, _DIRECT, _DISCARD = range(5)


class HttpServer:
    """Serves one application on any number of listening sockets."""

    def __init__(
        self,
        app: Application,
        *,
        max_body: int,
        body_limit_hint: str = "",
        keepalive_timeout: float = 75.0,
        request_timeout: float = 60.0,
        send_timeout: float = 60.0,
    ):
        self.app = app
        self.max_body = max_body
        self.body_limit_hint = body_limit_hint
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.connections: set[_Connection] = set()
        self.date = b""
        self._heads: dict[tuple[int, str | None], bytes] = {}  # made this second (response_head)
        self._read_buffer = bytearray(READ_BUFFER_BYTES)
        self.read_view = memoryview(self._read_buffer)
        self.head_view = self.read_view[:HEAD_READ_BYTES]
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task | None = None

    async def listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await self._listening(await loop.create_server(self._connection, sock=sock))

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        await self._listening(await loop.create_unix_server(self._connection, path))

    async def _listening(self, server: asyncio.AbstractServer) -> None:
        self._servers.append(server)
        if self._sweeper is None:
            self._tick()
            self._sweeper = asyncio.create_task(self._sweep())

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish for up to
        `grace` s, then close everything."""
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        cut = sum(connection.stop_now() for connection in list(self.connections))
        if cut:
            log.warning("stopping: %d request(s) unanswered after %g s got 503", cut, grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            await server.wait_closed()

    def _tick(self) -> None:
        self.date = email.utils.formatdate(usegmt=True).encode("ascii")
        self._heads = {}

    def response_head(self, status: int, content_type: str | None) -> bytes:
        """Status line, Date and Content-Type: the same for every response of a kind within a
        second, so made once a second per kind."""
        key = (status, content_type)
        head = self._heads.get(key)
        if head is None:
            head = _STATUS_LINES.get(status) or _status_line(status)
            head += b"Date: %s\r\n" % self.date
            if content_type is not None:
                head += b"Content-Type: %s\r\n" % content_type.encode("latin-1")
            if len(self._heads) < 64:
                self._heads[key] = head
        return head

    async def _sweep(self) -> None:
        """Once a second: the Date header, and connections past their time."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self._tick()
            now = loop.time()
            for connection in list(self.connections):
                connection.check_time(now)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.app = server.app
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.state = _IDLE
        self.since = self.loop.time()  # start of the idle time or of the request being read
        # The head being read: the bytes of the reads it came in, and of those how many may
        # have come before it (the end of the request before it, in its first read). llhttp
        # does not say where in a read a head begins or ends.
        self.head_bytes = 0
        self.head_slack = 0
        self.read_bytes = 0  # the last read the parser was fed
        self.read_slack = 0  # what a head beginning in it may have after the read's start
        self.header_count = 0
        # the request being read
        self.url: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.request: Request | None = None
        self.dispatch: tuple[Handler, tuple] | Response | None = None
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.direct: memoryview | None = None  # the body's buffer, when read directly
        # a chunked body: its size after the last read that brought data, and the bytes and
        # start of the reads since then, which brought none
        self.data_seen = 0
        self.dataless_bytes = 0
        self.dataless_since = 0.0
        # requests read and not yet answered, in order; the one in the front is being handled
        self.queue: deque[tuple[Request, tuple[Handler, tuple] | Response]] = deque()
        self.busy = False  # answering the queue
        self.reading_paused = False  # by us, while pipelined requests wait
        self.waiting = False  # for the reply to the request in the front of the queue
        self.closing = False  # no more requests: close once the queue is answered
        self.write_paused = False
        # what we have written and the client has not read yet: its size when last seen going
        # down, and since when (a client that stops reading is dropped after send_timeout)
        self.unsent = 0
        self.unsent_since = 0.0
        self.linger: asyncio.TimerHandle | None = None
        self.eof = False  # the client has shut its side

    # asyncio

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.queue.clear()
        if self.linger is not None:
            self.linger.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unsent = 0  # the client read: its send_timeout starts over
        if self.busy and not self.waiting:
            self._answer()

    def get_buffer(self, sizehint: int) -> memoryview:
        state = self.state
        if state == _DIRECT:
            return self.direct[self.size :]
        if state == _BODY:
            if self.length is not None:
                # not past the body's end, so the head after it is counted from its start
                return self.server.read_view[: self.length - self.size]
            return self.server.read_view
        # A new request: read little, so that most of a large body goes straight into its
        # buffer once the head has told its length, instead of through the parser's copies.
        return self.server.head_view

    def buffer_updated(self, nbytes: int) -> None:
        state = self.state
        if state == _DIRECT:
            self.since = self.loop.time()
            self.size += nbytes
            if self.size == self.length:
                self.parser = httptools.HttpRequestParser(self)  # the old one still waits for body
                self.state = _IDLE
                self.since = self.loop.time()
                self._complete(self.direct)
            return
        if state == _DISCARD:
            return
        if state == _BODY:
            self.since = self.loop.time()  # a body may take long, but not stall
        else:
            self.head_bytes += nbytes
        self.read_bytes = nbytes
        self.read_slack = 0 if state == _IDLE else nbytes
        try:
            self.parser.feed_data(self.server.read_view[:nbytes])
        except httptools.HttpParserUpgrade:
            # llhttp stops at a request asking to switch protocols (e.g. `Upgrade: h2c`): it
            # was answered as HTTP/1.1; nothing after it is read.
            self._close_after_queue()
            return
        except httptools.HttpParserError as exc:
            if self.state != _DISCARD:
                if isinstance(exc.__context__, _TooManyHeaders):
                    self._refuse(431, str(exc.__context__))
                else:
                    self._refuse(400, f"malformed HTTP request: {_reason(exc)}")
            return
        if self.state in (_HEAD, _IDLE) and self.head_bytes - self.head_slack > MAX_HEAD_BYTES:
            self._refuse(431, _HEAD_TOO_LARGE)
        elif self.state == _BODY:
            if self.direct is not None:
                if self.size < self.length:
                    self.state = _DIRECT
            elif self.length is None:
                self._chunked_read(nbytes)

    def _chunked_read(self, nbytes: int) -> None:
        """After a read of a chunked body: reads that bring no data (chunk framing, the
        trailer section) are bounded like a head, to MAX_HEAD_BYTES and request_timeout in all
        (a read that brought data is not counted, so a trailer section may have up to one read
        more). Counted here, by the read: httptools joins the pieces of a trailer field's
        value itself (bytes +=) and hands over only whole fields."""
        if self.size != self.data_seen:
            self.data_seen = self.size
            self.dataless_bytes = 0
            return
        if self.dataless_bytes:
            self.since = self.dataless_since  # a trickle does not restart the clock
        else:
            self.dataless_since = self.since
        self.dataless_bytes += nbytes
        if self.dataless_bytes > MAX_HEAD_BYTES:
            self._refuse(
                431, f"a chunked body's framing or trailer section exceeds {MAX_HEAD_BYTES} bytes"
            )

    def eof_received(self) -> bool:
        self.eof = True
        if self.state in (_HEAD, _BODY, _DIRECT):
            if self.length is not None and self.state != _HEAD:
                message = f"the body ended after {self.size} of its {self.length} bytes"
            else:
                message = "the connection ended in the middle of a request"
            self._refuse(400, message)
        elif not self.busy:
            return False  # nothing owed: close
        self.closing = True
        self.state = _DISCARD
        return True  # keep our side open until what is queued is answered

    # llhttp callbacks

    def on_message_begin(self) -> None:
        if self.state == _DISCARD:
            return
        self.state = _HEAD
        self.since = self.loop.time()
        self.head_bytes = self.read_bytes
        self.head_slack = self.read_slack
        self.read_slack = self.read_bytes  # a head after this one in the same read

    def on_url(self, piece: bytes) -> None:
        self.url.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > MAX_HEADERS:  # lines, not names: repeats are joined below
            raise _TooManyHeaders()
        headers = self.headers
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_HEADER_NAMES) < MAX_KNOWN_HEADER_NAMES:
                _HEADER_NAMES[name] = key
        text = value.decode("latin-1")
        if key in headers:
            if key == "content-length" or key == "host":
                raise httptools.HttpParserError(f"repeated {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text

    def on_headers_complete(self) -> None:
        if self.state != _HEAD:
            return
        parser = self.parser
        url = b"".join(self.url) if len(self.url) != 1 else self.url[0]
        self.url = []
        headers, self.headers = self.headers, {}
        if self.head_bytes > MAX_HEAD_BYTES and _head_size(parser, url, headers) > MAX_HEAD_BYTES:
            self._refuse(431, _HEAD_TOO_LARGE)
            return
        self.head_bytes = self.head_slack = self.header_count = 0
        path, _, query = url.decode("latin-1").partition("?")
        if not path.startswith("/"):  # absolute-form ("http://host/path") or "*"
            with contextlib.suppress(httptools.HttpParserInvalidURLError):
                parsed = httptools.parse_url(url)
                path = (parsed.path or b"").decode("latin-1")
                query = (parsed.query or b"").decode("latin-1")
        request = Request(parser.get_method().decode("ascii"), path, query, headers)
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":  # llhttp also takes 0.9 (no version) and 2.0
            self._refuse(505, f"HTTP/{version} is not supported: use HTTP/1.1 (or 1.0)")
            return
        request.keep_alive = parser.should_keep_alive()
        self.request = request
        self.state = _BODY
        self.size = 0
        self.chunks = []
        self.direct = None
        length = headers.get("content-length")
        self.length = int(length) if length is not None else None  # llhttp checked the digits
        coding = headers.get("transfer-encoding")
        has_body = bool(self.length) or coding is not None
        if coding is not None and coding.lower() != "chunked" and _ends_chunked(coding):
            # llhttp refuses (400) a coding that does not end with chunked, and de-chunks the
            # rest, passing on a body still in the codings before it
            self._refuse(501, f"Transfer-Encoding {coding!r} is not supported: only chunked")
            return
        limit = self.server.max_body
        if self.length is not None and self.length > limit:
            self._refuse(413, self._too_large())
            return
        if parser.should_upgrade() and has_body:
            self._refuse(400, "a request with a body cannot ask to switch protocols")
            return
        dispatch = self.app.route(request)
        if isinstance(dispatch, Response) and has_body:
            self._refuse_with(dispatch)  # before reading a body that would be thrown away
            return
        self.dispatch = dispatch
        expect = headers.get("expect")
        if expect is not None and has_body:
            if expect.lower() != "100-continue":
                self._refuse(417, f"cannot meet the expectation {expect!r}")
                return
            if not self.queue and not self.closing and version == "1.1":  # 1.0 has no 100
                self.transport.write(_CONTINUE)
        if self.length is None:
            if has_body:  # chunked
                self.chunks = _ChunkedBody()
                self.data_seen = self.dataless_bytes = 0
        elif self.length >= DIRECT_BODY_BYTES:
            # Not a bytearray: that is zero-filled, so a client claiming a large length and
            # sending nothing would make us commit it all. np.empty's pages are only
            # committed as the body arrives.
            self.direct = memoryview(np.empty(self.length, np.uint8))

    def on_body(self, piece: bytes) -> None:
        if self.state != _BODY:
            return
        start = self.size
        self.size += len(piece)
        if self.direct is not None:
            self.direct[start : self.size] = piece
        elif self.size > self.server.max_body:  # chunked: no length to check up front
            self._refuse(413, self._too_large())
        else:
            self.chunks.append(piece)

    def on_chunk_complete(self) -> None:
        if self.header_count:
            # trailer fields of the last chunk, collected by on_header: ignored, and not the
            # next request's
            self.headers = {}
            self.header_count = 0

    def on_message_complete(self) -> None:
        if self.state != _BODY:
            return  # refused already
        self.state = _IDLE
        self.since = self.loop.time()
        if self.direct is not None:
            self._complete(self.direct)
            return
        chunks = self.chunks
        self._complete(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # requests

    def _complete(self, body: bytes | memoryview) -> None:
        request, dispatch = self.request, self.dispatch
        self.request = self.dispatch = self.direct = None
        self.chunks = []
        request.body = body
        self.queue.append((request, dispatch))
        if not request.keep_alive:
            self.state = _DISCARD
            self.closing = True
        if self.busy:
            self.transport.pause_reading()  # pipelined: answer what is queued first
            self.reading_paused = True
        else:
            self.busy = True
            self._answer()

    def _answer(self) -> None:
        """Answer queued requests in order, until one waits for its reply, the client stops
        reading (resume_writing goes on) or the queue is empty."""
        queue, app = self.queue, self.app
        if self.waiting:
            return
        while queue:
            if self.write_paused:
                return  # resume_writing goes on
            request, dispatch = queue[0]
            if isinstance(dispatch, Response):
                response = dispatch
            else:
                self.waiting = True
                try:
                    response = app.respond(request, dispatch[0], dispatch[1], self._reply)
                except Exception:
                    log.exception("unhandled error answering %s %s", request.method, request.path)
                    response = app.error(500, "internal error")
                if response is None:
                    return  # _reply goes on
                self.waiting = False
            self._send(response)
        if self.write_paused:
            return  # read nothing more until the client reads what we wrote
        self.busy = False
        if self.closing:
            self._shut()
        else:
            if self.reading_paused and not self.transport.is_closing():
                self.reading_paused = False
                self.transport.resume_reading()
            self.since = self.loop.time()

    def _reply(self, response: Response) -> None:
        if not self.waiting or not self.queue:
            return  # the connection was lost meanwhile
        self.waiting = False
        self._send(response)
        self._answer()

    def _send(self, response: Response) -> None:
        request, _ = self.queue.popleft()
        self._write(response, request.method == "HEAD", self.closing and not self.queue)

    def _write(self, response: Response, head_only: bool, close: bool) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        body = response.body
        head = self.server.response_head(response.status, response.content_type)
        if response.headers or close:
            extra = [head]
            if response.headers:
                for name, value in response.headers.items():
                    extra.append(f"{name}: {value}\r\n".encode("latin-1"))
            if close:
                extra.append(b"Connection: close\r\n")
            head = b"".join(extra)
        if head_only or not body:
            transport.write(b"%sContent-Length: %d\r\n\r\n" % (head, len(body)))
        elif len(body) < 16384:
            transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        else:
            transport.writelines([b"%sContent-Length: %d\r\n\r\n" % (head, len(body)), body])

    # refusing and closing

    def _too_large(self) -> str:
        message = f"request body exceeds the limit of {self.server.max_body} bytes"
        hint = self.server.body_limit_hint
        return f"{message} ({hint})" if hint else message

    def _refuse(self, status: int, message: str) -> None:
        self._refuse_with(self.app.error(status, message))

    def _refuse_with(self, response: Response) -> None:
        """Answer the request being read with `response` (after those before it) and close:
        nothing more is read from this connection."""
        self.state = _DISCARD
        self.request = self.dispatch = self.direct = None
        self.chunks = []
        self.closing = True
        self.queue.append((Request("", "", "", {}), response))
        if not self.busy:
            self.busy = True
            self.loop.call_soon(self._answer)  # not from inside the parser's callbacks

    def _close_after_queue(self) -> None:
        self.closing = True
        self.state = _DISCARD
        if not self.busy:
            self._shut()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy and self.state == _IDLE:
            self._shut()

    def _shut(self) -> None:
        """Close once what was written has gone: shut our side first and drain the client's
        for a moment, so that it reads our last response rather than a reset."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.linger is not None:
            return
        self.state = _DISCARD
        transport.resume_reading()
        if not self.eof and transport.can_write_eof():
            transport.write_eof()
            self.linger = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def stop_now(self) -> bool:
        """The server's grace is over: a request still waiting for its answer gets 503 (a
        client must not take a reset for an answer); then the connection closes. True if a
        request was cut off so."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if not (self.waiting and self.queue):
            transport.abort()
            return False
        request, _ = self.queue.popleft()
        self.queue.clear()
        self.waiting, self.closing = False, True
        response = self.app.error(503, "the server is stopping; retry the request")
        self._write(response, request.method == "HEAD", close=True)
        transport.close()  # after what was written
        return True

    def check_time(self, now: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._send_stalled(transport, now):
            transport.abort()  # nothing more can reach this client: free what waits for it
            return
        if self.linger is not None:
            return
        if self.state == _IDLE and not self.busy:
            if now - self.since > self.server.keepalive_timeout:
                self._shut()
        elif self.state in (_HEAD, _BODY, _DIRECT) and not self.reading_paused:
            # (while we pause reading, the request's bytes wait in the socket, not the client)
            limit = self.server.request_timeout
            if now - self.since > limit:
                if self.state == _HEAD:
                    self._refuse(408, f"the request's head was not in whole after {limit:g} s")
                else:
                    self._refuse(408, f"no more of the body came for {limit:g} s")

    def _send_stalled(self, transport: asyncio.Transport, now: float) -> bool:
        """True once what we wrote has not gone down for send_timeout: the client reads none
        of it (also after a refusal, or while closing, which waits for it to go)."""
        unsent = transport.get_write_buffer_size()
        if not unsent:
            self.unsent = 0
            return False
        if not self.unsent or unsent < self.unsent:
            self.unsent, self.unsent_since = unsent, now
            return False
        return now - self.unsent_since > self.server.send_timeout


_HEAD_TOO_LARGE = f"request line and headers exceed {MAX_HEAD_BYTES} bytes"


def _head_size(parser: httptools.HttpRequestParser, url: bytes, headers: dict[str, str]) -> int:
    """A head's size less optional whitespace, for a head whose reads held more than the limit
    (they may also hold what came before and after it)."""
    size = len(parser.get_method()) + len(url) + 14  # 2 spaces, "HTTP/1.1", 2 CRLFs
    for name, value in headers.items():
        size += len(name) + len(value) + 3  # ":", CRLF
    return size


def _ends_chunked(coding: str) -> bool:
    return coding.rpartition(",")[2].strip().lower() == "chunked"


class _ChunkedBody(list):
    """A chunked body's pieces, joined as they come into one bytearray (the only item): a bytes
    object per chunk costs ~40 bytes beside its data, which `max_body` does not count (a body of
    2-byte chunks would take 25 times its size). A list, for on_body and on_message_complete."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__((bytearray(),))

    def append(self, piece: bytes) -> None:
        self[0] += piece


class _TooManyHeaders(httptools.HttpParserError):
    def __str__(self) -> str:
        return f"more than {MAX_HEADERS} headers"


def _reason(exc: httptools.HttpParserError) -> str:
    """llhttp's reason for a parse error, or ours when a callback raised it."""
    cause = exc.__context__ or exc.__cause__
    if isinstance(cause, httptools.HttpParserError):
        return str(cause)
    return str(exc) or type(exc).__name__
