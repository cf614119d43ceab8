"""REST behaviours real KServe/Triton clients rely on beyond the basics: non-finite floats over
JSON (Triton reads and writes NaN, Infinity, -Infinity), compressed request bodies (tritonclient's
request_compression_algorithm), version strings as Triton reads them, and a clear refusal of
the shared memory extension, which this server does not have."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
import zlib

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.serving.server import ServeOptions
from tests.conftest import ServerThread
from tests.test_grpc import identity_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("identity")
    for datatype in ("FP32", "FP64"):
        directory = repo / f"id_{datatype.lower()}" / "1"
        directory.mkdir(parents=True)
        onnx.save(identity_model(datatype), directory / "model.onnx")
    with ServerThread(ServeOptions(repo, "127.0.0.1:0", None, None)) as running:
        yield running


def post(server, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    url = f"http://{server.http_url}{path}"
    request = urllib.request.Request(url, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


NON_FINITE = [[np.nan, np.inf, -np.inf], [0.0, -0.0, 1.5]]


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_nan_and_infinities_round_trip_over_json(server, datatype):
    x = np.array(NON_FINITE, dtype=np.float32 if datatype == "FP32" else np.float64)
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput("x", list(x.shape), datatype)
        tensor.set_data_from_numpy(x, binary_data=False)  # JSON: Python writes NaN, Infinity
        wanted = httpclient.InferRequestedOutput("y", binary_data=False)
        y = client.infer(f"id_{datatype.lower()}", [tensor], outputs=[wanted]).as_numpy("y")
    np.testing.assert_array_equal(y, x)  # +-inf stay infinities (orjson alone writes null)
    assert np.signbit(y[1, 1])


def test_json_with_non_finite_tokens_is_answered_with_them(server):
    data = [float("nan"), float("inf"), 1.0]
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                   "data": data}]}).encode()  # fmt: skip
    status, reply = post(
        server, "/v2/models/id_fp32/infer", body, {"Content-Type": "application/json"}
    )
    assert status == 200, reply
    assert b'"data":[NaN,Infinity,1.0]' in reply


def test_json_that_is_still_not_json_is_refused(server):
    for body in (b'{"inputs": [NaN', b'{"id": "\\ud800", "inputs": []}'):
        status, reply = post(server, "/v2/models/id_fp32/infer", body, {})
        assert status == 400 and b"not valid JSON" in reply, reply


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient_are_inflated(server, algorithm):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with httpclient.InferenceServerClient(server.http_url) as client:
        for binary in (True, False):
            tensor = httpclient.InferInput("x", [2, 3], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("id_fp32", [tensor], request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_bad_compressed_bodies_are_refused_clearly(server):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                   "data": [1, 2, 3]}]}).encode()  # fmt: skip
    path = "/v2/models/id_fp32/infer"
    status, reply = post(server, path, body, {"Content-Encoding": "br"})
    assert status == 415 and b"use gzip or deflate" in reply
    status, reply = post(server, path, b"not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and b"corrupt" in reply
    status, reply = post(server, path, gzip.compress(body)[:-12], {"Content-Encoding": "gzip"})
    assert status == 400 and b"truncated" in reply
    status, reply = post(server, path, zlib.compress(body), {"Content-Encoding": "identity"})
    assert status == 400  # identity: the bytes as they are, not JSON here
    assert post(server, path, zlib.compress(body), {"Content-Encoding": "Deflate"})[0] == 200


def test_a_body_that_inflates_past_the_limit_is_refused(tmp_path, sample_repo):
    options = ServeOptions(sample_repo, "127.0.0.1:0", None, None, max_body_bytes=1 << 20)
    bomb = gzip.compress(b" " * (8 << 20))  # 8 MiB of spaces in ~8 KiB
    with ServerThread(options) as running:
        status, reply = post(running, "/v2/models/mlp/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and b"inflates beyond 1048576 bytes" in reply


@pytest.mark.parametrize("version", ["01", "+1", "001"])
def test_a_version_written_with_leading_zeros_or_plus_is_that_version(server, version):
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_model_ready("id_fp32", version)
        assert not client.is_model_ready("id_fp32", "2")


def test_the_shared_memory_extension_this_server_lacks_is_refused(server):
    x = np.ones((1, 3), np.float32)
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="asks for shared memory, an extension"):
            client.infer("id_fp32", [tensor], outputs=[_shared_memory_output()])


def _shared_memory_output():
    output = httpclient.InferRequestedOutput("y")
    output.set_shared_memory("region0", 12)
    return output
