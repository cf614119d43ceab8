"""Mutated inference requests against a real agent: thousands of seeded variations of valid
requests, each answered with a success or a client error that names the problem, never a server
error, and the server answers the next good request correctly. REST JSON, REST with binary
tensors, gRPC messages, raw HTTP/1.1 bytes, raw HTTP/2 frames (plain and gzip), and hostile model
names and versions on every endpoint that takes them.

The hand-written cases (test_rest_bad_input.py, test_grpc*.py) cover each known way a request
can be wrong; these find the combinations nobody wrote down. Mutations are structural (a JSON
node replaced by a hostile value, deleted or duplicated; protobuf fields set to odd values) and
byte-level (flips, cuts, insertions). Seeds are fixed, so a failure reproduces.
"""

from __future__ import annotations

import collections
import copy
import gzip
import http.client
import json
import random
import re
import socket
from urllib.parse import quote

import grpc
import numpy as np
import pytest

from agent.samples import reference_output, sample_input
from protocol import inference_pb2 as pb
from protocol import inference_pb2_grpc as pb_grpc
from tests import mutations
from tests.mutations import mutate_bytes

DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
             "FP16", "FP32", "FP64", "BYTES"]  # fmt: skip
# Besides the general hostile values, what means something to a tensor
HOSTILE = [
    *mutations.HOSTILE,
    "FP32", "input", [1, 64], [64, 1], [1, -64], [2**40, 2**40], [[0.5] * 64],
    {"binary_data_size": 256}, {"binary_data_size": -1}, {"binary_data_size": 2**62},
    {"binary_data": True}, {"timeout": 0}, {"timeout": -5}, {"timeout": "soon"},
]  # fmt: skip
KEYS = ["inputs", "outputs", "parameters", "id", "data", "shape"]
# success, the client's mistake, a model or version that is not there, a deadline it set itself
# (the `timeout` parameter, mutated to 1 µs)
REST_OK = {200, 400, 404, 504}
GRPC_OK = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a shape or message over the limits
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MLP_INPUT = sample_input("mlp")["input"]
MLP_EXPECTED = reference_output("mlp", sample_input("mlp"))["output"]


def mutate_json(doc, rng: random.Random):
    return mutations.mutate_json(doc, rng, HOSTILE, [*DATATYPES, "FP32", "FP32"], KEYS)


# --- REST ---------------------------------------------------------------------------------------


def json_request() -> dict:
    return {
        "id": "r1",
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": MLP_INPUT.tolist()[0]}
        ],
        "outputs": [{"name": "output"}],
        "parameters": {"timeout": 5_000_000},
    }


def binary_header() -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 256},
            }
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }


class Rest:
    """One keep-alive connection; reopened when the server answers `Connection: close`."""

    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes, dict]:
        self.connection.request("POST", path, body, headers)
        response = self.connection.getresponse()
        data = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return response.status, data, dict(response.getheaders())

    def check_good_request(self) -> None:
        body = json.dumps(json_request()).encode()
        status, data, _ = self.post(
            "/v2/models/mlp/infer", body, {"Content-Type": "application/json"}
        )
        assert status == 200, data
        output = json.loads(data)["outputs"][0]["data"]
        np.testing.assert_allclose(output, MLP_EXPECTED.ravel(), rtol=1e-5, atol=1e-6)


def assert_rest_answer(status: int, data: bytes, what: str) -> None:
    assert status in REST_OK, f"{what}: HTTP {status}: {data[:300]!r}"
    if status != 200:
        error = json.loads(data)["error"]
        assert isinstance(error, str) and error, f"{what}: an error with no message"


@pytest.mark.parametrize("seed", range(6))
def test_mutated_json_requests(agent, seed):
    rest = Rest(agent.server.http_port)
    rng = random.Random(seed)
    for n in range(300):
        doc = json_request()
        for _ in range(rng.randrange(1, 4)):
            doc = mutate_json(doc, rng)
        body = json.dumps(doc).encode()
        if rng.random() < 0.1:
            body = mutate_bytes(body, rng)  # not JSON any more, most of the time
        path = "/v2/models/mlp/infer" if rng.random() < 0.9 else "/v2/models/mlp/versions/1/infer"
        status, data, _ = rest.post(path, body, {"Content-Type": "application/json"})
        assert_rest_answer(status, data, f"seed {seed} request {n}: {body[:200]!r}")
    rest.check_good_request()


@pytest.mark.parametrize("seed", range(6))
def test_mutated_binary_requests(agent, seed):
    rest = Rest(agent.server.http_port)
    rng = random.Random(100 + seed)
    tensor = MLP_INPUT.astype("<f4").tobytes()
    for n in range(300):
        header = binary_header()
        for _ in range(rng.randrange(0, 3)):
            header = mutate_json(header, rng)
        head = json.dumps(header).encode()
        binary = tensor if rng.random() < 0.5 else mutate_bytes(tensor, rng)
        declared = len(head)
        if rng.random() < 0.3:
            declared = rng.choice([0, -1, len(head) - 1, len(head) + 1, 2**40, "x", ""])
        headers = {"Inference-Header-Content-Length": str(declared)}
        status, data, answer_headers = rest.post("/v2/models/mlp/infer", head + binary, headers)
        if status == 200 and "Inference-Header-Content-Length" in answer_headers:
            length = int(answer_headers["Inference-Header-Content-Length"])
            assert json.loads(data[:length])["outputs"], f"seed {seed} request {n}"
            continue
        assert_rest_answer(status, data, f"seed {seed} request {n}: {head[:200]!r}")
    rest.check_good_request()


# --- gRPC ---------------------------------------------------------------------------------------


def grpc_request() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp", id="g1")
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    msg.raw_input_contents.append(MLP_INPUT.astype("<f4").tobytes())
    msg.outputs.add(name="output")
    return msg


def mutate_message(msg: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    msg = copy.deepcopy(msg)
    tensor = msg.inputs[0] if msg.inputs else msg.inputs.add(name="input")
    action = rng.randrange(9)
    if action == 0:
        tensor.datatype = rng.choice([*DATATYPES, "", "FLOAT", "fp32"])
    elif action == 1:
        del tensor.shape[:]
        tensor.shape.extend(rng.choice([[], [64], [1, 64, 1], [-1, 64], [2, 64], [0, 64],
                                        [2**40, 2**40], [1] * 20, [1, 2**62]]))  # fmt: skip
    elif action == 2:
        tensor.name = rng.choice(["", "x", "input" * 100, "\u00fc"])
    elif action == 3:  # typed contents, of this or another kind, with or without raw ones
        contents = tensor.contents
        field = rng.choice(["fp32_contents", "int_contents", "bytes_contents", "bool_contents",
                            "uint64_contents", "fp64_contents"])  # fmt: skip
        count = rng.choice([0, 1, 63, 64, 65])
        values = {"bytes_contents": [b"a"] * count, "bool_contents": [True] * count}
        getattr(contents, field).extend(values.get(field, [1] * count))
        if rng.random() < 0.5:
            del msg.raw_input_contents[:]
    elif action == 4:
        raw = msg.raw_input_contents
        choice = rng.randrange(3)
        if choice == 0 and raw:
            raw[0] = raw[0][: rng.randrange(len(raw[0]) + 1)]
        elif choice == 1:
            raw.append(rng.randbytes(rng.randrange(300)))
        else:
            del raw[:]
    elif action == 5:
        msg.inputs.add(name=rng.choice(["input", "other"]), datatype="FP32", shape=[1, 64])
    elif action == 6:
        msg.outputs.add(name=rng.choice(["output", "nope", ""]))
    elif action == 7:
        key = rng.choice(["timeout", "binary_data_output", "x", "priority"])
        param = msg.parameters[key]
        kind = rng.randrange(3)
        if kind == 0:
            param.int64_param = rng.choice([-1, 0, 1, 2**62])
        elif kind == 1:
            param.string_param = "soon"
        else:
            param.bool_param = True
    else:
        msg.model_version = rng.choice(["", "1", "2", "0", "-1", "abc", "9" * 30])
    return msg


@pytest.mark.parametrize("seed", range(6))
def test_mutated_grpc_requests(agent, seed):
    rng = random.Random(200 + seed)
    with grpc.insecure_channel(agent.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for n in range(300):
            msg = grpc_request()
            for _ in range(rng.randrange(1, 4)):
                msg = mutate_message(msg, rng)
            data = msg.SerializeToString(deterministic=True)
            if rng.random() < 0.3:
                data = mutate_bytes(data, rng)
            try:
                answer = infer(data, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in GRPC_OK, (
                    f"seed {seed} request {n}: {exc.code()} {exc.details()}"
                )
                assert exc.details(), f"seed {seed} request {n}: an error with no message"
            else:
                assert pb.ModelInferResponse.FromString(answer).model_name == "mlp"
        answer = pb.ModelInferResponse.FromString(infer(grpc_request().SerializeToString()))
        output = np.frombuffer(answer.raw_output_contents[0], "<f4")
        np.testing.assert_allclose(output, MLP_EXPECTED.ravel(), rtol=1e-5, atol=1e-6)


# --- hostile model names and versions on every endpoint that takes them -----------------------

NAMES = ["", ".", "..", "../../etc", "..%2f..", "a/b", "mlp/../mlp", "mlp\x00", "\x00",
         " mlp", "mlp ", "MLP", "-mlp", "mlp" * 50, "m" * 129, "\u00fc", "\ud7ff", "cnn\n",
         "*", "%"]  # fmt: skip
NAME_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,  # a readiness or metadata call for a model that is not ready
}
VERSIONS = ["", "0", "-1", "01", "1.0", "9" * 30, "../1", "1/..", "\x00", "latest", " 1"]


def rest_paths():
    for name in NAMES:
        m = quote(name, safe="")
        yield "GET", f"/v2/models/{m}"
        yield "GET", f"/v2/models/{m}/ready"
        yield "POST", f"/v2/models/{m}/infer"
        yield "POST", f"/v2/repository/models/{m}/load"
        yield "POST", f"/v2/repository/models/{m}/unload"
    for version in VERSIONS:
        v = quote(version, safe="")
        yield "GET", f"/v2/models/mlp/versions/{v}"
        yield "GET", f"/v2/models/mlp/versions/{v}/ready"
        yield "POST", f"/v2/models/mlp/versions/{v}/infer"


def index(agent) -> list[tuple[str, str, str]]:
    return sorted((e.name, e.version, e.state) for e in agent.dataplane.repository_index())


def test_hostile_names_over_rest(agent):
    before = index(agent)
    body = json.dumps(json_request()).encode()
    for method, path in rest_paths():
        connection = http.client.HTTPConnection("127.0.0.1", agent.server.http_port, timeout=30)
        connection.request(method, path, body if method == "POST" else None)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        # 503: a ready probe of a model that is not ready; 400 also for a path llhttp refuses
        assert response.status in {200, 400, 404, 503}, f"{method} {path}: {response.status}"
        if response.status != 200:
            assert json.loads(data)["error"], f"{method} {path}"
    assert index(agent) == before  # nothing loaded or unloaded through a hostile name
    Rest(agent.server.http_port).check_good_request()


def test_hostile_names_over_grpc(agent):
    before = index(agent)
    with grpc.insecure_channel(agent.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = []
        for name in NAMES:
            calls += [
                ("ModelReady", pb.ModelReadyRequest(name=name)),
                ("ModelMetadata", pb.ModelMetadataRequest(name=name)),
                ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name)),
                ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name)),
            ]
            request = grpc_request()
            request.model_name = name
            calls.append(("ModelInfer", request))
        for version in VERSIONS:
            calls += [
                ("ModelReady", pb.ModelReadyRequest(name="mlp", version=version)),
                ("ModelMetadata", pb.ModelMetadataRequest(name="mlp", version=version)),
            ]
            request = grpc_request()
            request.model_version = version
            calls.append(("ModelInfer", request))
        for method, request in calls:
            try:
                getattr(stub, method)(request, timeout=30)
            except grpc.RpcError as exc:
                what = f"{method}({str(request)[:200]!r})"
                assert exc.code() in NAME_ERRORS, f"{what}: {exc.code()}"
                assert exc.details(), what
    assert index(agent) == before


# --- raw bytes on the wire ----------------------------------------------------------------------


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection, end our side, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_http_bytes(agent, seed):
    """Mutated request lines, headers and bodies, pipelined: every answer a 2xx or 4xx (505 for
    a version the server does not speak), and the connection then closed; never a 5xx."""
    rng = random.Random(300 + seed)
    body = json.dumps(json_request()).encode()
    request = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    for n in range(150):
        head_end = request.index(b"\r\n\r\n")
        if rng.random() < 0.7:  # most mutations in the head, where the parser is
            data = mutate_bytes(request[:head_end], rng) + request[head_end:]
        else:
            data = mutate_bytes(request, rng)
        if rng.random() < 0.3:
            data = request + data  # pipelined behind a good one
        answer = exchange(agent.server.http_port, data)
        codes = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]
        bad = [c for c in codes if c >= 500 and c != 505]
        assert not bad, f"seed {seed} request {n}: {data[:300]!r} -> {answer[:300]!r}"
    Rest(agent.server.http_port).check_good_request()


def grpc_statuses(data: bytes) -> list[str]:
    """The grpc-status values in the header blocks a server wrote (frames parsed, HPACK decoded;
    the server's own frames are well formed, and whatever follows a cut is ignored)."""
    import hpack

    decoder, statuses, block, i = hpack.Decoder(), [], b"", 0
    while len(data) - i >= 9:
        length = int.from_bytes(data[i : i + 3], "big")
        type_, flags = data[i + 3], data[i + 4]
        payload = data[i + 9 : i + 9 + length]
        i += 9 + length
        if type_ in (0x1, 0x9):  # HEADERS, CONTINUATION
            block += payload
            if flags & 0x4:  # END_HEADERS
                headers = decoder.decode(block)
                block = b""
                statuses += [value for name, value in headers if name == "grpc-status"]
    return statuses


@pytest.mark.parametrize("seed", range(4))
def test_mutated_http2_bytes(agent, seed):
    """Mutated HTTP/2 frames of a ModelInfer call (headers by the `hpack` encoder; the message
    gzip-compressed for odd seeds): the server
    answers, resets the stream or ends the connection with GOAWAY; no call ends INTERNAL, and
    the server keeps serving."""
    import hpack

    rng = random.Random(400 + seed)
    message = grpc_request().SerializeToString()
    headers = [
        (":method", "POST"), (":scheme", "http"), (":authority", "x"),
        (":path", "/inference.GRPCInferenceService/ModelInfer"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    if seed % 2:  # a gzip-compressed message, whose deflate stream the mutations then reach
        message = gzip.compress(message)
        headers.append(("grpc-encoding", "gzip"))
    body = bytes([seed % 2]) + len(message).to_bytes(4, "big") + message
    block = hpack.Encoder().encode(headers)

    def frame(type_: int, flags: int, stream: int, payload: bytes) -> bytes:
        head = len(payload).to_bytes(3, "big") + bytes([type_, flags]) + stream.to_bytes(4, "big")
        return head + payload

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
    call = frame(1, 4, 1, block) + frame(0, 1, 1, body)
    statuses = collections.Counter()
    for n in range(150):
        if rng.random() < 0.8:
            data = preface + mutate_bytes(call, rng)
        else:
            data = mutate_bytes(preface + call, rng)
        for status in grpc_statuses(exchange(agent.server.grpc_port, data)):
            statuses[status] += 1
            assert status not in ("2", "13"), f"seed {seed} request {n}: {status} for {data!r}"
    assert statuses, "no call was answered at all: the mutations say nothing"
    with grpc.insecure_channel(agent.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer = pb.ModelInferResponse.FromString(infer(grpc_request().SerializeToString()))
        output = np.frombuffer(answer.raw_output_contents[0], "<f4")
        np.testing.assert_allclose(output, MLP_EXPECTED.ravel(), rtol=1e-5, atol=1e-6)
