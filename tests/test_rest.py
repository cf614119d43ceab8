"""KServe v2 REST conformance through tritonclient.http, JSON and binary, on every format."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient

from agent.samples import sample_input
from runtimes import load

# model name in the sample repository -> its file under version 1
FORMATS = {
    "mlp": "model.onnx",
    "cnn": "model.onnx",
    "cnn-openvino": "model.xml",
    "mlp-tflite": "model.tflite",
}


@pytest.fixture(scope="module")
def client(agent):
    with httpclient.InferenceServerClient(agent.http_url) as c:
        yield c


def reference(sample_repo, model: str, inputs: dict) -> dict:
    session = load(sample_repo / model / "1" / FORMATS[model])
    try:
        return session.infer(inputs)
    finally:
        session.close()


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md["name"] == "edgefleet"
    assert {"binary_tensor_data", "model_repository"} <= set(md["extensions"])


@pytest.mark.parametrize("model", sorted(FORMATS))
def test_model_metadata_and_ready(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    md = client.get_model_metadata(model)
    assert md["name"] == model
    assert md["versions"] == ["1"]
    (inp,) = md["inputs"]
    (out,) = md["outputs"]
    assert inp["name"] == "input" and inp["datatype"] == "FP32"
    assert out["name"] == "output" and out["datatype"] == "FP32"
    assert client.get_model_metadata(model, "1") == md


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", sorted(FORMATS))
def test_infer_matches_runtime(client, sample_repo, model, binary):
    x = sample_input(model)["input"]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    result = client.infer(model, [inp], outputs=[out], request_id=f"req-{model}")
    got = result.as_numpy("output")
    want = reference(sample_repo, model, {"input": x})["output"]
    assert got.shape == want.shape
    # JSON carries float32 in its shortest repr, which round-trips exactly
    np.testing.assert_array_equal(got, want)
    assert result.get_response()["id"] == f"req-{model}"
    assert result.get_response()["model_version"] == "1"


def test_infer_versioned_path_and_all_outputs_default(client):
    x = sample_input("mlp")["input"]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("mlp", [inp], model_version="1")  # no outputs named: all of them
    assert result.as_numpy("output").shape == (1, 10)


def test_batch_of_rows_in_one_request(client, sample_repo):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    inp = httpclient.InferInput("input", [5, 64], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("mlp", [inp]).as_numpy("output")
    np.testing.assert_allclose(got, reference(sample_repo, "mlp", {"input": x})["output"], 1e-6)


def test_metrics_endpoint_counts_requests(client, agent):
    x = sample_input("mlp")["input"]
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    client.infer("mlp", [inp])
    body = asyncio.run(_get(f"http://{agent.http_url}/metrics"))
    assert 'edgefleet_inference_request_success_total{model="mlp",version="1"}' in body
    assert "edgefleet_inference_compute_infer_duration_us_total" in body
    assert "edgefleet_inference_queue_duration_us_total" in body
    assert "edgefleet_inference_batch_size_bucket" in body


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.text()


def test_unix_socket_serves_inference(agent):
    x = sample_input("mlp")["input"]
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }

    async def call():
        connector = aiohttp.UnixConnector(path=str(agent.server.socket))
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get("http://agent/v2/health/ready") as r:
                assert r.status == 200
            async with s.post("http://agent/v2/models/mlp/infer", json=body) as r:
                assert r.status == 200
                return await r.json()

    doc = asyncio.run(call())
    assert doc["outputs"][0]["shape"] == [1, 10]
    assert len(doc["outputs"][0]["data"]) == 10


def test_socket_is_not_world_accessible(agent):
    assert agent.server.socket.stat().st_mode & 0o007 == 0


def test_binary_output_on_request_level_parameter(agent):
    """`binary_data_output: true` sends every output as raw bytes after the JSON header."""
    x = sample_input("mlp")["input"]
    body = json.dumps(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
            ],
        }
    ).encode()

    async def call():
        async with aiohttp.ClientSession() as s:
            url = f"http://{agent.http_url}/v2/models/mlp/infer"
            async with s.post(url, data=body) as r:
                return r.headers, await r.read()

    headers, payload = asyncio.run(call())
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(payload[:n])
    size = header["outputs"][0]["parameters"]["binary_data_size"]
    assert size == 40 and len(payload) == n + 40
    out = np.frombuffer(payload[n:], dtype="<f4")
    assert out.shape == (10,)
