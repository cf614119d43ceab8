"""Malformed, oversized and hostile REST requests: a clear 4xx naming the problem, never a 500."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import numpy as np
import pytest

GOOD = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}


def body(**override) -> bytes:
    return json.dumps({"inputs": [{**GOOD, **override}]}).encode()


def raw_body(header: dict, binary: bytes) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + binary, {"Inference-Header-Content-Length": str(len(h))}


BINARY_HEADER = {
    "inputs": [
        {
            "name": "input",
            "shape": [1, 64],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 256},
        }
    ]
}
F32 = np.zeros(64, dtype="<f4").tobytes()
HEADER = "Inference-Header-Content-Length"

# (case id, path, body, extra headers, expected status, text the error must contain)
CASES = [
    ("unknown-model", "/v2/models/nope/infer", body(), {}, 404, "nope"),
    ("unknown-version", "/v2/models/mlp/versions/7/infer", body(), {}, 404, "7"),
    ("non-numeric-version", "/v2/models/mlp/versions/abc/infer", body(), {}, 404, "abc"),
    ("wrong-input-name", "/v2/models/mlp/infer", body(name="x"), {}, 400, "'x'"),
    ("wrong-shape", "/v2/models/mlp/infer", body(shape=[1, 63], data=[0.5] * 63), {}, 400, "shape"),
    ("wrong-rank", "/v2/models/mlp/infer", body(shape=[64]), {}, 400, "shape"),
    (
        "wrong-datatype",
        "/v2/models/mlp/infer",
        body(datatype="INT32", data=[1] * 64),
        {},
        400,
        "datatype",
    ),
    ("unknown-datatype", "/v2/models/mlp/infer", body(datatype="FLOAT"), {}, 400, "datatype"),
    ("too-few-elements", "/v2/models/mlp/infer", body(data=[0.5] * 10), {}, 400, "elements"),
    ("too-many-elements", "/v2/models/mlp/infer", body(data=[0.5] * 65), {}, 400, "elements"),
    ("non-numeric-data", "/v2/models/mlp/infer", body(data=["a"] * 64), {}, 400, "FP32"),
    ("numeric-strings", "/v2/models/mlp/infer", body(data=["1.0"] * 64), {}, 400, "FP32"),
    ("null-data", "/v2/models/mlp/infer", body(data=[None] * 64), {}, 400, "FP32"),
    ("bool-data-for-fp32", "/v2/models/mlp/infer", body(data=[True] * 64), {}, 400, "FP32"),
    ("ragged-data", "/v2/models/mlp/infer", body(data=[[0.5] * 10, [0.5] * 54]), {}, 400, "input"),
    ("object-data", "/v2/models/mlp/infer", body(data={"a": 1}), {}, 400, "input"),
    (
        "no-data",
        "/v2/models/mlp/infer",
        json.dumps({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}).encode(),
        {},
        400,
        "no 'data'",
    ),
    ("malformed-json", "/v2/models/mlp/infer", b'{"inputs": [', {}, 400, "JSON"),
    ("not-utf8", "/v2/models/mlp/infer", b"\xff\xfe\x00", {}, 400, "JSON"),
    ("json-array", "/v2/models/mlp/infer", b"[1, 2]", {}, 400, "object"),
    ("empty-body", "/v2/models/mlp/infer", b"", {}, 400, "JSON"),
    ("no-inputs", "/v2/models/mlp/infer", b'{"inputs": []}', {}, 400, "inputs"),
    ("inputs-not-list", "/v2/models/mlp/infer", b'{"inputs": {"a": 1}}', {}, 400, "inputs"),
    ("input-not-object", "/v2/models/mlp/infer", b'{"inputs": [3]}', {}, 400, "object"),
    (
        "duplicate-input",
        "/v2/models/mlp/infer",
        json.dumps({"inputs": [GOOD, GOOD]}).encode(),
        {},
        400,
        "more than once",
    ),
    ("absurd-shape", "/v2/models/mlp/infer", body(shape=[1 << 40, 64]), {}, 400, "larger"),
    ("negative-dim", "/v2/models/mlp/infer", body(shape=[-1, 64]), {}, 400, "negative"),
    ("float-dim", "/v2/models/mlp/infer", body(shape=[1.5, 64]), {}, 400, "shape"),
    ("too-many-dims", "/v2/models/mlp/infer", body(shape=[1] * 40), {}, 400, "shape"),
    ("shape-not-list", "/v2/models/mlp/infer", body(shape="1x64"), {}, 400, "shape"),
    (
        "batch-over-max",
        "/v2/models/mlp/infer",
        body(shape=[33, 64], data=[0.5] * 33 * 64),
        {},
        400,
        "batch size",
    ),
    ("zero-batch", "/v2/models/mlp/infer", body(shape=[0, 64], data=[]), {}, 400, "batch size"),
    (
        "unknown-output",
        "/v2/models/mlp/infer",
        json.dumps({"inputs": [GOOD], "outputs": [{"name": "logits"}]}).encode(),
        {},
        400,
        "logits",
    ),
    (
        "id-not-string",
        "/v2/models/mlp/infer",
        json.dumps({"id": 5, "inputs": [GOOD]}).encode(),
        {},
        400,
        "id",
    ),
    (
        "bad-timeout",
        "/v2/models/mlp/infer",
        json.dumps({"inputs": [GOOD], "parameters": {"timeout": "soon"}}).encode(),
        {},
        400,
        "timeout",
    ),
    (
        "deep-nesting",
        "/v2/models/mlp/infer",
        b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        {},
        400,
        "JSON",
    ),
    (
        "header-length-not-int",
        "/v2/models/mlp/infer",
        body(),
        {"Inference-Header-Content-Length": "ten"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "header-length-too-long",
        "/v2/models/mlp/infer",
        body(),
        {"Inference-Header-Content-Length": "999999"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "header-length-negative",
        "/v2/models/mlp/infer",
        body(),
        {"Inference-Header-Content-Length": "-5"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary-truncated",
        "/v2/models/mlp/infer",
        *raw_body(BINARY_HEADER, F32[:100]),
        400,
        "past the end",
    ),
    (
        "binary-extra-bytes",
        "/v2/models/mlp/infer",
        *raw_body(BINARY_HEADER, F32 + b"xx"),
        400,
        "beyond",
    ),
    (
        "binary-size-mismatch",
        "/v2/models/mlp/infer",
        *raw_body(
            {"inputs": [{**BINARY_HEADER["inputs"][0], "parameters": {"binary_data_size": 200}}]},
            F32[:200],
        ),
        400,
        "expected 256",
    ),
    (
        "binary-size-negative",
        "/v2/models/mlp/infer",
        *raw_body(
            {"inputs": [{**BINARY_HEADER["inputs"][0], "parameters": {"binary_data_size": -4}}]},
            F32,
        ),
        400,
        "binary_data_size",
    ),
    (
        "binary-and-data",
        "/v2/models/mlp/infer",
        *raw_body({"inputs": [{**GOOD, "parameters": {"binary_data_size": 256}}]}, F32),
        400,
        "both",
    ),
    (
        # no bytes for 10**7 elements: refused before an array is made for them (and before
        # the model is looked up)
        "bytes-shape-without-data",
        "/v2/models/nope/infer",
        *raw_body(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [10**7],
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            },
            b"",
        ),
        400,
        "cannot hold 10000000 elements",
    ),
    (
        "empty-shape-huge-dim",
        "/v2/models/mlp/infer",
        body(shape=[0, 2**62], data=[]),
        {},
        400,
        "larger",
    ),
    (
        "empty-shape-huge-dim-binary",
        "/v2/models/mlp/infer",
        *raw_body(
            {
                "inputs": [
                    {
                        **BINARY_HEADER["inputs"][0],
                        "shape": [0, 2**62],
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            },
            b"",
        ),
        400,
        "larger",
    ),
    (
        "version-past-int-digits",
        f"/v2/models/mlp/versions/{'9' * 5000}/infer",
        body(),
        {},
        404,
        "not found",
    ),
    (
        "binary-data-output-string",
        "/v2/models/mlp/infer",
        json.dumps({"inputs": [GOOD], "parameters": {"binary_data_output": "false"}}).encode(),
        {},
        400,
        "'binary_data_output'",
    ),
    (
        "binary-data-word",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [GOOD], "outputs": [{"name": "output", "parameters": {"binary_data": "no"}}]}
        ).encode(),
        {},
        400,
        "'binary_data'",
    ),
    (
        "binary-data-list",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [GOOD], "outputs": [{"name": "output", "parameters": {"binary_data": [1]}}]}
        ).encode(),
        {},
        400,
        "'binary_data'",
    ),
    (
        "duplicate-output",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [GOOD], "outputs": [{"name": "output"}, {"name": "output"}]}
        ).encode(),
        {},
        400,
        "'output' asked for more than once",
    ),
    (
        "header-length-underscore",
        "/v2/models/mlp/infer",
        raw_body(BINARY_HEADER, F32)[0],
        {"Inference-Header-Content-Length": "1_" + raw_body(BINARY_HEADER, b"")[1][HEADER][1:]},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "gzip-then-garbage",
        "/v2/models/mlp/infer",
        gzip.compress(body()) + b"GARBAGE",
        {"Content-Encoding": "gzip"},
        400,
        "7 bytes after its end",
    ),
    ("repo-index-ready-string", "/v2/repository/index", b'{"ready": "false"}', {}, 400, "'ready'"),
    (
        "load-with-config",
        "/v2/repository/models/mlp/load",
        json.dumps({"parameters": {"config": '{"max_batch_size": 0}'}}).encode(),
        {},
        400,
        "config",
    ),
    (
        "load-with-model-files",  # Triton's in-request model files: ignored, it would say 200
        "/v2/repository/models/mlp/load",
        json.dumps({"parameters": {"file:1/model.onnx": "AAAA"}}).encode(),
        {},
        400,
        "load parameters (file:1/model.onnx) are not supported",
    ),
    (
        "unload-with-unknown-parameter",
        "/v2/repository/models/mlp/unload",
        json.dumps({"parameters": {"unload_dependents": True, "force": True}}).encode(),
        {},
        400,
        "unload parameters (force) are not supported",
    ),
    ("unknown-endpoint", "/v2/nothing/here", b"", {}, 404, "no such endpoint"),
    ("repo-index-bad-json", "/v2/repository/index", b"{oops", {}, 400, "JSON"),
    ("load-unknown-model", "/v2/repository/models/ghost/load", b"", {}, 404, "ghost"),
    ("load-traversal", "/v2/repository/models/..%2F..%2Fetc/load", b"", {}, 404, ""),
]


async def post(url: str, data: bytes, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
        text = await r.text()
        return r.status, json.loads(text) if text else {}


@pytest.mark.parametrize(
    ("path", "data", "headers", "status", "needle"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_request_is_refused_clearly(agent, path, data, headers, status, needle):
    code, doc = asyncio.run(post(f"http://{agent.http_url}{path}", data, headers))
    assert code == status, doc
    assert isinstance(doc.get("error"), str) and needle in doc["error"]


def test_oversized_body_is_refused(agent):
    big = b'{"inputs": [' + b" " * (5 * 1024 * 1024) + b"]}"  # the fixture allows 4 MiB
    code, doc = asyncio.run(post(f"http://{agent.http_url}/v2/models/mlp/infer", big, {}))
    assert code == 413
    assert "exceeds the limit" in doc["error"]


def test_an_empty_outputs_list_asks_for_every_output(agent):
    doc = json.dumps({"inputs": [GOOD], "outputs": []}).encode()
    code, reply = asyncio.run(post(f"http://{agent.http_url}/v2/models/mlp/infer", doc, {}))
    assert code == 200 and [o["name"] for o in reply["outputs"]] == ["output"]


def test_server_still_serves_after_hostile_input(agent):
    code, doc = asyncio.run(post(f"http://{agent.http_url}/v2/models/mlp/infer", body(), {}))
    assert code == 200
    assert doc["outputs"][0]["shape"] == [1, 10]
    failures = agent.dataplane.metrics.registry.get_sample_value(
        "edgefleet_inference_request_failure_total",
        {"model": "mlp", "version": "1", "reason": "InvalidInput"},
    )
    assert failures and failures > 10


async def request(method: str, url: str, data: bytes = b"") -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v2/models/mlp/infer", "POST"),
        ("PUT", "/v2/models/mlp/versions/1/infer", "POST"),
        ("POST", "/v2/models/mlp", "GET, HEAD"),
        ("DELETE", "/v2/health/ready", "GET, HEAD"),
        ("GET", "/v2/repository/index", "POST"),
        ("GET", "/v2/repository/models/mlp/unload", "POST"),
    ],
)
def test_a_known_path_with_the_wrong_method_is_405_with_allow(agent, method, path, allow):
    status, headers, raw = asyncio.run(request(method, f"http://{agent.http_url}{path}"))
    assert status == 405
    assert headers["Allow"] == allow
    assert method in json.loads(raw)["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/",
        "/v2/models//infer",
        "/v2/models/mlp/versions//ready",
        "/v2/models/mlp/explain",
        "/v2/models/mlp/versions/1/2/infer",
        "//v2/health/live",
        "/metrics/x",
    ],
)
def test_paths_that_are_almost_endpoints_are_404(agent, path):
    status, _, raw = asyncio.run(request("GET", f"http://{agent.http_url}{path}"))
    assert status == 404
    assert "no such endpoint" in json.loads(raw)["error"]


def test_head_and_percent_encoded_names(agent):
    status, _, raw = asyncio.run(request("HEAD", f"http://{agent.http_url}/v2/health/ready"))
    assert (status, raw) == (200, b"")
    # %70 is "p": path segments are decoded after splitting, as the router did
    status, _, _ = asyncio.run(request("GET", f"http://{agent.http_url}/v2/models/ml%70/ready"))
    assert status == 200
    status, _, raw = asyncio.run(request("GET", f"http://{agent.http_url}/v2/models/a%2Fb"))
    assert status == 404 and "'a/b'" in json.loads(raw)["error"]


def test_a_claimed_length_over_the_limit_is_refused_before_the_body_is_sent(agent):
    import socket

    host, port = agent.http_url.rsplit(":", 1)
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024)
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)  # no body follows: the answer must not wait for one
        reply = b""
        while b"}" not in reply:
            reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413")
        assert b"exceeds the limit" in reply and b"Connection: close" in reply
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""  # and the server does not keep the connection


def test_a_body_cut_short_by_the_client_leaves_the_server_serving(agent):
    import socket

    host, port = agent.http_url.rsplit(":", 1)
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body()[:100])
        s.shutdown(socket.SHUT_WR)  # the body ends 4,900 bytes early
        reply = b"".join(iter(lambda: s.recv(65536), b""))  # read to the server's close
    assert not reply or reply.startswith(b"HTTP/1.1 "), reply[:100]
    code, doc = asyncio.run(post(f"http://{agent.http_url}/v2/models/mlp/infer", body(), {}))
    assert code == 200 and doc["outputs"][0]["shape"] == [1, 10]


def test_a_chunked_body_over_the_limit_is_refused(agent):
    async def chunks():
        for _ in range(5):
            yield b" " * (1024 * 1024)  # 5 MiB in all, over the fixture's 4 MiB

    async def send():
        url = f"http://{agent.http_url}/v2/models/mlp/infer"
        async with aiohttp.ClientSession() as s, s.post(url, data=chunks()) as r:
            return r.status, await r.json()

    status, doc = asyncio.run(send())
    assert status == 413 and "exceeds the limit" in doc["error"]


def test_routing_memory_is_bounded_under_many_distinct_paths():
    """The router remembers paths it has routed; a client inventing paths cannot grow that."""
    from agent.serving.http1 import Request, Response
    from agent.serving.rest import MAX_KNOWN_ROUTES, RestFrontEnd

    front = RestFrontEnd(dataplane=None)
    for i in range(MAX_KNOWN_ROUTES + 500):
        handler, args = front.route(Request("POST", f"/v2/models/m{i}/versions/{i}/infer", "", {}))
        assert (handler, args) == (front.infer, (f"m{i}", str(i)))
        refused = front.route(Request("GET", f"/v2/nowhere/{i}", "", {}))
        assert isinstance(refused, Response) and refused.status == 404
    assert len(front._routes) == MAX_KNOWN_ROUTES
    # remembered or not, a path routes the same: the method is still checked every time
    for path in ("/v2/models/m0/versions/0/infer", f"/v2/models/m{MAX_KNOWN_ROUTES + 1}/ready"):
        assert front.route(Request("DELETE", path, "", {})).status == 405
