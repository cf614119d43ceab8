"""The REST front end's HTTP/1.1 server (agent/serving/http1.py) on raw sockets: keep-alive,
pipelining, Expect, bodies read directly and chunked, limits, malformed and hostile input,
timeouts and a graceful close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys

import psutil
import pytest

from agent.serving import http1
from agent.serving.http1 import HttpServer, Request, Response
from agent.serving.server import bind


class EchoApp:
    """/echo answers the body back, with the method and query in headers; /slow?S waits S s."""

    def route(self, request: Request):
        if request.path == "/echo":
            return self.echo, ()
        if request.path == "/slow":
            return self.slow, ()
        if request.path == "/boom":
            return self.boom, ()
        return Response(404, b"no such path", "text/plain")

    def respond(self, request: Request, handler, args, reply) -> Response | None:
        return handler(request, reply, *args)

    def error(self, status: int, message: str) -> Response:
        return Response(status, json.dumps({"error": message}).encode(), "application/json")

    def echo(self, request: Request, reply) -> Response:
        headers = {"X-Method": request.method, "X-Query": request.query}
        headers["X-Body-Type"] = type(request.body).__name__
        headers["X-Header-Names"] = ",".join(sorted(request.headers))
        return Response(200, bytes(request.body), "application/octet-stream", headers)

    def slow(self, request: Request, reply) -> None:
        """Answers later, through `reply`."""
        delay = float(request.query or 0.3)
        asyncio.get_running_loop().call_later(
            delay, reply, Response(200, b"slow done", "text/plain")
        )

    def boom(self, request: Request, reply) -> Response:
        raise RuntimeError("a bug in a handler")


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next final response (an interim 100 is returned as such, with no body)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status == 100:
            return status, headers, b""
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, body

    async def closed(self) -> bool:
        """True once the server has closed its side (and sent nothing more)."""
        rest = await asyncio.wait_for(self.reader.read(), 10)
        return rest == b""

    def close(self) -> None:
        self.writer.close()


def serve(test, **options):
    """Run `test(server, connect)` against an HttpServer on a free port."""

    async def main():
        server = HttpServer(EchoApp(), max_body=options.pop("max_body", 1 << 20), **options)
        sock = bind("127.0.0.1:0")
        port = sock.getsockname()[1]
        await server.listen(sock)

        async def connect(receive_buffer: int = 0) -> Client:
            if not receive_buffer:
                return Client(*await asyncio.open_connection("127.0.0.1", port))
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            return Client(*await asyncio.open_connection(sock=sock))

        try:
            return await test(server, connect)
        finally:
            await server.close(grace=1.0)

    return asyncio.run(main())


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def test_keep_alive_serves_many_requests_on_one_connection():
    async def test(server, connect):
        client = await connect()
        for i in range(20):
            await client.send(post(f"/echo?{i}", b"x" * i))
            status, headers, body = await client.response()
            assert (status, body, headers["x-query"]) == (200, b"x" * i, str(i))
            assert "date" in headers and "connection" not in headers
        assert len(server.connections) == 1
        client.close()

    serve(test)


def test_pipelined_requests_are_answered_in_order():
    async def test(server, connect):
        client = await connect()
        await client.send(
            b"GET /slow?0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/echo?a", b"first")
            + b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/echo?b", b"second")
        )
        answers = [await client.response() for _ in range(4)]
        assert [a[0] for a in answers] == [200, 200, 404, 200]
        assert [a[2] for a in answers] == [b"slow done", b"first", b"no such path", b"second"]
        client.close()

    serve(test)


def test_a_client_that_does_not_read_is_paused_not_buffered():
    async def test(server, connect):
        client = await connect()
        body = os.urandom(10_000)
        count = 1000  # ~10 MB of answers
        sender = asyncio.create_task(client.send(post("/echo", body) * count))
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        (connection,) = server.connections
        assert not connection.transport.is_reading()  # reading paused, not queuing everything
        assert len(connection.queue) < count
        for _ in range(count):
            status, _, echoed = await client.response()
            assert status == 200 and echoed == body
        await sender
        client.close()

    serve(test)


def test_a_client_that_reads_none_of_its_answers_is_dropped():
    async def test(server, connect):
        body = b"x" * (8 << 20)  # more than the socket buffers take: the rest waits in ours
        answered = await connect(receive_buffer=4096)
        await answered.send(post("/echo", body))
        refused = await connect(receive_buffer=4096)  # and one whose last answer is a refusal
        await refused.send(post("/echo", body) + b"GET /echo HTTP/1.1\r\nX: " + b"a" * 70_000)
        for _ in range(100):  # send_timeout is 1 s
            if not server.connections:
                break
            await asyncio.sleep(0.1)
        assert not server.connections
        answered.close()
        refused.close()

    serve(test, max_body=16 << 20, send_timeout=1.0)


def test_a_request_waiting_while_reading_is_paused_is_not_timed_out():
    async def test(server, connect):
        client = await connect()
        body = b"y" * 200_000  # the head and some of it come in the read that pauses reading
        await client.send(
            b"GET /slow?2.5 HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/echo", b"second")
            + post("/echo", body)
        )
        answers = [await client.response() for _ in range(3)]  # /slow outlasts request_timeout
        assert [(a[0], a[2]) for a in answers] == [
            (200, b"slow done"),
            (200, b"second"),
            (200, body),
        ]
        client.close()

    serve(test, request_timeout=1.0)


def test_a_reply_after_the_client_left_is_dropped(caplog):
    async def test(server, connect):
        gone = await connect()
        await gone.send(b"GET /slow?0.2 HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.05)
        sock = gone.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.writer.transport.abort()  # a reset: the server loses the connection at once
        await asyncio.sleep(0.4)  # its reply comes after the connection was lost
        client = await connect()
        await client.send(post("/echo", b"still here"))
        assert (await client.response())[2] == b"still here"
        client.close()

    serve(test)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()


def test_header_names_are_lower_case_and_remembering_them_is_bounded():
    async def test(server, connect):
        client = await connect()
        for i in range(http1.MAX_KNOWN_HEADER_NAMES + 100):
            extra = b"X-Made-Up-%d: v\r\nCONTENT-type: text/plain\r\n" % i
            await client.send(post("/echo", b"x", extra))
            status, headers, _ = await client.response()
            names = headers["x-header-names"].split(",")
            assert status == 200 and f"x-made-up-{i}" in names and "content-type" in names
        assert len(http1._HEADER_NAMES) <= http1.MAX_KNOWN_HEADER_NAMES
        client.close()

    serve(test)


def test_http10_closes_after_the_response_unless_asked_to_keep_alive():
    async def test(server, connect):
        client = await connect()
        await client.send(b"GET /slow?0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (await client.response())[0] == 200
        await client.send(b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        status, headers, body = await client.response()
        assert (status, body, headers["connection"]) == (200, b"hi", "close")
        assert await client.closed()

    serve(test)


def test_data_after_connection_close_is_not_read():
    async def test(server, connect):
        client = await connect()
        await client.send(
            b"GET /slow?0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" + post("/echo", b"x")
        )
        status, headers, _ = await client.response()
        assert (status, headers["connection"]) == (200, "close")
        assert await client.closed()

    serve(test)


def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async def test(server, connect):
        client = await connect()
        body = os.urandom(200_000)
        head = post("/echo", b"", b"Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)
        )
        await client.send(head)
        assert (await client.response())[0] == 100
        await client.send(body)
        status, _, echoed = await client.response()
        assert (status, echoed) == (200, body)
        # refused up front: no 100, the final answer at once
        await client.send(head.replace(b"/echo", b"/nowhere"))
        assert (await client.response())[0] == 404
        assert await client.closed()

    serve(test)


def test_an_http10_client_gets_no_100_continue():
    async def test(server, connect):
        client = await connect()
        await client.send(
            b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        await client.send(b"hi")
        status, _, body = await client.response()  # the final answer, no interim one before it
        assert (status, body) == (200, b"hi")
        assert await client.closed()

    serve(test)


def test_an_expectation_other_than_100_continue_is_417():
    async def test(server, connect):
        client = await connect()
        await client.send(post("/echo", b"abc", b"Expect: the-unexpected\r\n"))
        status, _, body = await client.response()
        assert status == 417 and "the-unexpected" in json.loads(body)["error"]
        assert await client.closed()

    serve(test)


def test_a_large_body_sent_in_pieces_is_read_into_one_buffer():
    async def test(server, connect):
        client = await connect()
        body = os.urandom(1_000_003)
        message = post("/echo", body) + b"GET /slow?0 HTTP/1.1\r\nHost: t\r\n\r\n"
        pieces = [message[i : i + 150_001] for i in range(0, len(message), 150_001)]
        for piece in pieces:
            await client.send(piece)
            await asyncio.sleep(0.01)
        status, headers, echoed = await client.response()
        assert (status, echoed, headers["x-body-type"]) == (200, body, "memoryview")
        assert (await client.response())[2] == b"slow done"  # the request after it, intact
        # just under the threshold: bytes, joined from what the parser handed over
        small = os.urandom(http1.DIRECT_BODY_BYTES - 1)
        await client.send(post("/echo", small))
        status, headers, echoed = await client.response()
        assert (status, echoed, headers["x-body-type"]) == (200, small, "bytes")
        client.close()

    serve(test)


def test_a_claimed_length_commits_memory_only_as_the_body_arrives():
    """Eight connections each claim a 256 MiB body (within the limit) and send 100 KB of it: the
    server holds their buffers, but only what arrived may become resident."""
    process = psutil.Process()

    async def test(server, connect):
        before = process.memory_info().rss
        clients = []
        for _ in range(8):
            client = await connect()
            await client.send(
                post("/echo", b"").replace(
                    b"Content-Length: 0", b"Content-Length: %d" % (256 << 20)
                )
                + b"x" * 100_000
            )
            clients.append(client)
        await asyncio.sleep(0.5)
        assert len(server.connections) == 8
        assert all(c.direct is not None and c.size == 100_000 for c in server.connections)
        grown = process.memory_info().rss - before
        assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB for 800 KB received"
        for client in clients:
            client.close()

    serve(test, max_body=256 << 20)


def test_chunked_bodies_are_joined():
    async def test(server, connect):
        client = await connect()
        chunks = [os.urandom(n) for n in (1, 5000, 70_000, 3)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
        )
        status, _, echoed = await client.response()
        assert (status, echoed) == (200, b"".join(chunks))
        client.close()

    serve(test)


CHUNKED = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_chunked_body_of_tiny_chunks_is_kept_as_one_piece():
    """A bytes object per 2-byte chunk would cost ~25 times the body's size."""

    async def test(server, connect):
        client = await connect()
        await client.send(CHUNKED + b"2\r\nab\r\n" * 5000)
        for _ in range(200):
            await asyncio.sleep(0.01)
            (connection,) = server.connections
            if connection.size == 10_000:
                break
        assert connection.size == 10_000 and len(connection.chunks) == 1
        await client.send(b"0\r\n\r\n" + post("/echo", b"after"))
        status, headers, echoed = await client.response()
        assert (status, echoed, headers["x-body-type"]) == (200, b"ab" * 5000, "bytearray")
        status, headers, echoed = await client.response()  # single pieces: as they came
        assert (status, echoed, headers["x-body-type"]) == (200, b"after", "bytes")
        client.close()

    serve(test)


def test_trailer_fields_are_ignored_and_not_the_next_requests():
    async def test(server, connect):
        client = await connect()
        trailers = b"X-Trailer: 1\r\nHost: evil\r\n" + b"X-Many: v\r\n" * 60
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(50))
        await client.send(
            CHUNKED + b"2\r\nab\r\n0\r\n" + trailers + b"\r\n" + post("/echo?2", b"next", extra)
        )
        status, headers, body = await client.response()
        assert (status, body, headers["x-header-names"]) == (
            200,
            b"ab",
            "host,transfer-encoding",
        )
        # its own 52 headers, none of the trailer's (nor counted with its 62 fields)
        status, headers, body = await client.response()
        names = headers["x-header-names"].split(",")
        assert (status, body, len(names)) == (200, b"next", 52)
        assert "x-trailer" not in names and "x-many" not in names
        client.close()

    serve(test)


async def send_ignoring_close(client: Client, pieces, pause: float = 0.0) -> None:
    with contextlib.suppress(ConnectionError):
        for piece in pieces:
            await client.send(piece)
            await asyncio.sleep(pause)


def test_a_trailer_section_is_bounded_like_a_head():
    many = [b"X-%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 1)]
    cases = {
        "1 MiB of one value": (b"X-T: ", [b"a" * 16384] * 64, 0.0),
        "a trickle, a read at a time": (b"X-T: ", [b"a" * 1024] * 200, 0.002),
        "too many fields": (b"", [*many, b"\r\n"], 0.0),
    }

    async def test(server, connect):
        for case, (start, pieces, pause) in cases.items():
            client = await connect()
            await client.send(CHUNKED + b"2\r\nab\r\n0\r\n" + start)
            sender = asyncio.create_task(send_ignoring_close(client, pieces, pause))
            status, _, body = await client.response()
            assert status == 431, (case, body)
            sender.cancel()
            client.close()

    serve(test)


def test_a_trailer_section_that_trickles_in_gets_408():
    async def test(server, connect):
        client = await connect()
        await client.send(CHUNKED + b"2\r\nab\r\n0\r\nX-T: ")
        sender = asyncio.create_task(send_ignoring_close(client, [b"a"] * 100, 0.05))
        status, _, body = await client.response()  # bytes keep coming, the trailer never ends
        assert status == 408 and "no more of the body" in json.loads(body)["error"]
        assert not sender.done()  # refused in time, not when the client stopped
        sender.cancel()
        client.close()

    serve(test, request_timeout=1.0)


def test_bodies_over_the_limit_are_refused():
    async def test(server, connect):
        client = await connect()
        await client.send(post("/echo", b"x" * 1001))
        status, headers, body = await client.response()
        assert status == 413 and "exceeds the limit of 1000 bytes" in json.loads(body)["error"]
        assert headers["connection"] == "close" and await client.closed()
        client = await connect()
        chunk = b"x" * 600
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"258\r\n%s\r\n" % chunk) * 2
        )
        status, _, body = await client.response()
        assert status == 413 and "exceeds the limit" in json.loads(body)["error"]
        assert await client.closed()

    serve(test, max_body=1000)


MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    "bad-version": b"GET /echo HTTP/7.1\r\nHost: t\r\n\r\n",
    "space-in-target": b"GET /ec ho HTTP/1.1\r\nHost: t\r\n\r\n",
    "header-without-colon": b"GET /echo HTTP/1.1\r\nHost t\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost : t\r\n\r\n",
    "nul-in-header": b"GET /echo HTTP/1.1\r\nHost: t\x00x\r\n\r\n",
    "obsolete-folding": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  2\r\n\r\n",
    "bare-lf": b"GET /echo HTTP/1.1\nHost: t\n\n",
    "length-and-chunked": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "non-numeric-length": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1e3\r\n\r\n",
    "negative-length": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    "two-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "two-hosts": b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "gzip-transfer-coding": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nxx"
    ),
    "bad-chunk-size": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
    ),
    "chunk-longer-than-said": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_http_gets_400_and_the_connection_closes(raw):
    async def test(server, connect):
        client = await connect()
        await client.send(raw)
        status, headers, body = await client.response()
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["error"]
        assert await client.closed()
        # and the server goes on serving
        client = await connect()
        await client.send(post("/echo", b"fine"))
        assert (await client.response())[2] == b"fine"
        client.close()

    serve(test)


@pytest.mark.parametrize(
    "raw", [b"GET /echo\r\n\r\n", b"GET /echo HTTP/2.0\r\nHost: t\r\n\r\n"], ids=["0.9", "2.0"]
)
def test_http_versions_other_than_1x_get_505(raw):
    async def test(server, connect):
        client = await connect()
        await client.send(raw)
        status, headers, body = await client.response()
        assert status == 505 and "not supported" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        assert await client.closed()

    serve(test)


def test_oversized_and_too_many_headers_are_431():
    async def test(server, connect):
        client = await connect()
        await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n")
        status, _, body = await client.response()
        assert status == 431 and "exceed" in json.loads(body)["error"]
        assert await client.closed()
        client = await connect()
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 1))
        await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        status, _, body = await client.response()
        assert status == 431 and "headers" in json.loads(body)["error"]
        assert await client.closed()
        client = await connect()  # the same name repeated counts every time
        many = b"X-Same: v\r\n" * (http1.MAX_HEADERS + 1)
        await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        assert (await client.response())[0] == 431
        assert await client.closed()
        client = await connect()  # a long path is a long head too
        await client.send(b"GET /" + b"p" * 70_000 + b" HTTP/1.1\r\n")
        assert (await client.response())[0] == 431
        client.close()

    serve(test)


def head_of(size: int) -> bytes:
    """A GET whose head is `size` bytes."""
    start = b"GET /echo HTTP/1.1\r\nHost: t\r\nX: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_the_head_limit_counts_every_byte_of_the_head():
    limit = http1.MAX_HEAD_BYTES

    async def test(server, connect):
        client = await connect()
        await client.send(head_of(72_000))  # in one go, the last read completing it
        assert (await client.response())[0] == 431
        assert await client.closed()
        client = await connect()
        await client.send(post("/echo", b"ab")[:-2])
        await asyncio.sleep(0.2)  # the server waits for the body...
        await client.send(b"ab" + head_of(200_000))  # ...which comes with the next head
        assert (await client.response())[2] == b"ab"
        assert (await client.response())[0] == 431
        assert await client.closed()
        client = await connect()
        await client.send(head_of(limit + 4))
        assert (await client.response())[0] == 431
        client = await connect()  # the limit itself, in reads that hold other requests too
        await client.send(post("/echo", b"ab") + head_of(limit) + post("/echo", b"cd")[:-2])
        await asyncio.sleep(0.2)
        await client.send(b"cd" + head_of(limit))
        assert [(await client.response())[0] for _ in range(4)] == [200] * 4
        client.close()

    serve(test)


def test_a_transfer_coding_other_than_chunked_is_501():
    async def test(server, connect):
        client = await connect()
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"2\r\nab\r\n0\r\n\r\n"
        )
        status, headers, body = await client.response()
        assert status == 501 and "'gzip, chunked' is not supported" in json.loads(body)["error"]
        assert headers["connection"] == "close" and await client.closed()

    serve(test)


def test_a_handler_that_fails_is_a_500_and_the_connection_goes_on():
    async def test(server, connect):
        client = await connect()
        await client.send(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n" + post("/echo", b"after"))
        status, _, body = await client.response()
        assert status == 500 and json.loads(body) == {"error": "internal error"}
        assert (await client.response())[2] == b"after"
        client.close()

    serve(test)


def test_absolute_form_targets_and_head():
    async def test(server, connect):
        client = await connect()
        await client.send(post("http://t:1/echo?q", b"abs"))
        status, headers, body = await client.response()
        assert (status, body, headers["x-query"]) == (200, b"abs", "q")
        await client.send(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n" + post("/echo", b"next"))
        status, headers, body = await client.response()  # Content-Length of a body not sent
        assert (status, headers["x-method"], headers["content-length"], body) == (
            200,
            "HEAD",
            "0",
            b"",
        )
        assert (await client.response())[2] == b"next"
        client.close()

    serve(test)


def test_an_upgrade_request_is_answered_as_http11_then_closed():
    async def test(server, connect):
        client = await connect()
        await client.send(
            b"GET /slow?0 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        )
        status, headers, body = await client.response()
        assert (status, body, headers["connection"]) == (200, b"slow done", "close")
        assert await client.closed()
        client = await connect()  # with a body: refused, since the body would be lost
        await client.send(post("/echo", b"abc", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"))
        assert (await client.response())[0] == 400
        client.close()

    serve(test)


def test_a_body_cut_short_is_answered_400():
    async def test(server, connect):
        client = await connect()
        await client.send(post("/echo", b"x" * 100).replace(b"100", b"5000"))
        client.writer.write_eof()
        status, _, body = await client.response()
        assert status == 400 and "ended after 100 of its 5000 bytes" in json.loads(body)["error"]
        assert await client.closed()
        client = await connect()  # also one read directly into its buffer
        await client.send(post("/echo", b"x" * 100_000).replace(b"100000", b"200000"))
        client.writer.write_eof()
        status, _, body = await client.response()
        assert status == 400 and "ended after 100000 of its 200000" in json.loads(body)["error"]

    serve(test)


async def trickle_head(client: Client) -> None:
    await client.send(b"GET /echo HTTP/1.1\r\n")
    for i in range(100):
        await asyncio.sleep(0.1)
        await client.send(b"X-%d: v\r\n" % i)


def test_an_idle_connection_is_closed_and_a_slow_request_gets_408():
    async def test(server, connect):
        idle = await connect()
        await idle.send(post("/echo", b"once"))
        assert (await idle.response())[2] == b"once"
        stalled = await connect()
        await stalled.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        slow_head = await connect()
        trickle = asyncio.create_task(trickle_head(slow_head))
        assert await idle.closed()  # no request for longer than keepalive_timeout
        status, _, body = await stalled.response()
        assert status == 408 and "no more of the body" in json.loads(body)["error"]
        assert await stalled.closed()
        status, _, body = await slow_head.response()  # bytes keep coming, the head never ends
        assert status == 408 and "head was not in whole" in json.loads(body)["error"]
        trickle.cancel()

    serve(test, keepalive_timeout=1.0, request_timeout=1.0)


def test_closing_lets_requests_in_flight_finish():
    async def test(server, connect):
        busy = await connect()
        idle = await connect()
        await idle.send(post("/echo", b"x"))
        await idle.response()
        await busy.send(b"GET /slow?0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(server.close(grace=5.0))
        assert await idle.closed()  # idle connections go at once
        status, headers, body = await busy.response()
        assert (status, body, headers["connection"]) == (200, b"slow done", "close")
        await closing
        assert not server.connections

    serve(test)


def test_the_agent_answers_pipelined_kserve_requests_in_order(agent):
    """The same server under the real REST front end: infer, ready and a refused infer."""
    host, port = agent.http_url.rsplit(":", 1)
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()

    async def main():
        client = Client(*await asyncio.open_connection(host, int(port)))
        await client.send(
            post("/v2/models/mlp/infer", body, b"Content-Type: application/json\r\n")
            + b"GET /v2/models/mlp/ready HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/v2/models/mlp/infer", body[:-3])
            + b"GET /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        answers = [await client.response() for _ in range(4)]
        client.close()
        return answers

    answers = asyncio.run(main())
    assert [a[0] for a in answers] == [200, 200, 400, 405]
    assert json.loads(answers[0][2])["outputs"][0]["shape"] == [1, 10]
    assert "JSON" in json.loads(answers[2][2])["error"]
    assert answers[3][1]["allow"] == "POST"


def test_serving_rest_does_not_import_aiohttp(tmp_path):
    """aiohttp's server side costs ~11 MiB of RSS: a started agent answering REST has none of it."""
    code = f"""
import asyncio, sys, urllib.request
from pathlib import Path
from agent.serving.server import ServeOptions, start

async def main():
    options = ServeOptions(models=Path({str(tmp_path)!r}), http="127.0.0.1:0", grpc=None)
    server = await start(options)
    url = f"http://127.0.0.1:{{server.http_port}}/v2/health/live"
    status = await asyncio.to_thread(lambda: urllib.request.urlopen(url).status)
    await server.stop()
    return status

assert asyncio.run(main()) == 200
assert "aiohttp" not in sys.modules, sorted(m for m in sys.modules if "aiohttp" in m)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_request_unanswered_when_the_grace_ends_gets_503_not_a_reset():
    async def test(server, connect):
        client = await connect()
        await client.send(b"GET /slow?30 HTTP/1.1\r\nHost: t\r\n\r\n")  # answers in 30 s
        idle = await connect()
        await asyncio.sleep(0.1)
        await server.close(grace=0.2)
        status, headers, body = await client.response()
        assert status == 503 and headers["connection"] == "close"
        assert b"the server is stopping; retry" in body
        assert await client.closed()
        assert await idle.closed()  # nothing was owed on it

    serve(test)
