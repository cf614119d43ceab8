"""Triton's model_configuration and statistics extensions, over REST and gRPC, through
tritonclient: what Triton clients read before they infer (max_batch_size, dims without the batch
dimension, batching settings) and the counters monitoring reads; plus hostile requests for both.

One agent serves a repository of its own: the sample MLP as versions 1 and 2 with batching
settings of their own, the sample CNN (a fixed batch of 1), the LiteRT and OpenVINO samples, and
a model named `stats` (Triton's /v2/models/stats path shadows its metadata).
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from agent.serving.metrics import ModelMetrics
from agent.serving.server import ServeOptions
from protocol import inference_pb2 as pb
from protocol import inference_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

MLP_TOML = """max_batch_size = 16
max_queue_delay_us = 2000
preferred_batch_sizes = [4, 8]
max_queue_size = 64
timeout_ms = 60000
instances = 2
threads = 1
"""


@pytest.fixture(scope="module")
def repo(sample_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("extensions")
    for version in ("1", "2"):
        shutil.copytree(sample_repo / "mlp" / "1", root / "mlp" / version)
        (root / "mlp" / version / "model.toml").write_text(MLP_TOML)
    (root / "mlp" / "1" / "model.toml").write_text("max_batch_size = 4\nthreads = 1\n")
    for name in ("cnn", "mlp-tflite", "cnn-openvino"):
        shutil.copytree(sample_repo / name, root / name)
    shutil.copytree(sample_repo / "mlp", root / "stats")
    return root


@pytest.fixture(scope="module")
def server(repo):
    with ServerThread(ServeOptions(repo, "127.0.0.1:0", "127.0.0.1:0", None)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _same_config(client, rest_config: dict, name: str, version: str = "") -> bool:
    """The gRPC answer equals the REST document read as Triton's ModelConfig (which also checks
    that every REST key and enum name is Triton's)."""
    expected = json_format.ParseDict(rest_config, triton_config_pb2.ModelConfig())
    return client.get_model_config(name, version).config == expected


# --- model configuration ----------------------------------------------------------------------


def test_server_metadata_lists_both_extensions(http, grpc_client):
    for extensions in (
        http.get_server_metadata()["extensions"],
        grpc_client.get_server_metadata().extensions,
    ):
        assert {"model_configuration", "statistics"} <= set(extensions)


def test_a_batching_model_config_leaves_the_batch_dimension_out(http, grpc_client):
    config = http.get_model_config("mlp")
    assert config["name"] == "mlp"
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [4, 8],
        "max_queue_delay_microseconds": 2000,
    }
    assert config["instance_group"] == [{"name": "mlp_0", "kind": "KIND_CPU", "count": 2}]
    assert config["version_policy"] == {"all": {}}
    assert config["default_model_filename"] == "model.onnx"
    assert config["parameters"] == {
        "device": {"string_value": "CPU"},
        "max_queue_size": {"string_value": "64"},
        "timeout_ms": {"string_value": "60000"},
    }
    assert _same_config(grpc_client, config, "mlp")


def test_a_model_without_batching_keeps_every_dimension(http, grpc_client):
    config = http.get_model_config("cnn")
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    assert config["input"][0]["dims"] == [1, 3, 224, 224]
    assert config["output"][0]["dims"] == [1, 1000]
    assert _same_config(grpc_client, config, "cnn")


@pytest.mark.parametrize(
    "name, platform, backend",
    [("mlp-tflite", "litert_tflite", "litert"), ("cnn-openvino", "openvino_xml", "openvino")],
)
def test_config_names_each_runtime(http, grpc_client, name, platform, backend):
    config = http.get_model_config(name)
    assert (config["platform"], config["backend"]) == (platform, backend)
    metadata = http.get_model_metadata(name)
    assert [i["name"] for i in config["input"]] == [i["name"] for i in metadata["inputs"]]
    assert _same_config(grpc_client, config, name)


def test_each_version_has_its_own_config(http, grpc_client):
    assert http.get_model_config("mlp", "1")["max_batch_size"] == 4
    assert http.get_model_config("mlp", "1")["dynamic_batching"]["preferred_batch_size"] == []
    assert http.get_model_config("mlp", "2")["max_batch_size"] == 16
    assert grpc_client.get_model_config("mlp", "1").config.max_batch_size == 4


def test_tritonclient_reads_the_config_as_triton_examples_do(http):
    """Triton's image_client example: batching from max_batch_size, the input's shape from dims
    (one fewer than the metadata's shape when the server batches)."""
    for name in ("mlp", "cnn"):
        config, metadata = http.get_model_config(name), http.get_model_metadata(name)
        batching = config["max_batch_size"] > 0
        shape = metadata["inputs"][0]["shape"]
        assert config["input"][0]["dims"] == (shape[1:] if batching else shape)


@pytest.mark.parametrize("ask", ["get_model_config", "get_inference_statistics"])
@pytest.mark.parametrize(
    "model, version", [("nope", ""), ("mlp", "3"), ("mlp", "x"), ("mlp", "-1"), ("mlp", "9" * 5000)]
)
def test_a_model_or_version_not_served_is_not_found(http, grpc_client, ask, model, version):
    with pytest.raises(InferenceServerException) as over_rest:
        getattr(http, ask)(model, version)
    assert over_rest.value.status() == "404"
    with pytest.raises(InferenceServerException) as over_grpc:
        getattr(grpc_client, ask)(model, version)
    assert over_grpc.value.status() == "StatusCode.NOT_FOUND"


# --- statistics -------------------------------------------------------------------------------


def _stats(client, name, version=""):
    (entry,) = client.get_inference_statistics(name, version)["model_stats"]
    return entry


def _infer(client, module, model, rows, version=""):
    x = np.random.default_rng(rows).standard_normal((rows, 64), dtype=np.float32)
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], model_version=version)


def test_statistics_count_requests_rows_executions_and_time(http, grpc_client):
    before = _stats(http, "mlp", "2")
    for rows in (1, 3, 3):
        _infer(http, httpclient, "mlp", rows, "2")
        _infer(grpc_client, grpcclient, "mlp", rows, "2")
    after = _stats(http, "mlp", "2")
    assert after["name"] == "mlp" and after["version"] == "2"
    assert after["inference_count"] - before["inference_count"] == 14
    assert after["execution_count"] - before["execution_count"] == 6  # one client at a time
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == 6
    for kind in ("success", "queue", "compute_infer"):
        assert stats[kind]["ns"] > old[kind]["ns"]
    # a request's time in the server holds its queueing and its model execution
    assert stats["success"]["ns"] >= stats["queue"]["ns"] + stats["compute_infer"]["ns"]
    assert after["last_inference"] >= before["last_inference"] > 0 or before["execution_count"] == 0
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    old_sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert sizes[1] - old_sizes.get(1, 0) == 2 and sizes[3] - old_sizes.get(3, 0) == 4
    assert sum(sizes.values()) == after["execution_count"]
    over_grpc = grpc_client.get_inference_statistics("mlp", "2")
    assert over_grpc == json_format.ParseDict(
        http.get_inference_statistics("mlp", "2"), triton_pb2.ModelStatisticsResponse()
    )


def test_batches_formed_under_concurrent_load_show_in_batch_stats(http, server):
    before = _stats(http, "mlp", "2")

    def one(i):
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            for _ in range(10):
                _infer(client, grpcclient, "mlp", 1, "2")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    after = _stats(http, "mlp", "2")
    rows = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert rows == 80 and executions < rows  # requests shared executions
    assert any(b["batch_size"] > 1 for b in after["batch_stats"])
    assert (
        sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"])
        == (after["inference_count"])
    )


def test_failures_are_counted(http, grpc_client):
    before = _stats(http, "mlp", "1")["inference_stats"]["fail"]["count"]
    bad = httpclient.InferInput("input", [1, 65], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 65), np.float32))
    with pytest.raises(InferenceServerException):
        http.infer("mlp", [bad], model_version="1")
    with pytest.raises(InferenceServerException):
        _infer(http, httpclient, "mlp", 5, "1")  # over version 1's max_batch_size of 4
    (entry,) = grpc_client.get_inference_statistics("mlp", "1").model_stats
    assert entry.inference_stats.fail.count == before + 2


def test_statistics_without_a_version_cover_every_loaded_version(http, grpc_client):
    entries = http.get_inference_statistics("mlp")["model_stats"]
    assert [(e["name"], e["version"]) for e in entries] == [("mlp", "1"), ("mlp", "2")]
    every = http.get_inference_statistics()["model_stats"]
    assert [(e["name"], e["version"]) for e in every] == [
        ("cnn", "1"),
        ("cnn-openvino", "1"),
        ("mlp", "1"),
        ("mlp", "2"),
        ("mlp-tflite", "1"),
        ("stats", "1"),
    ]
    over_grpc = grpc_client.get_inference_statistics(as_json=True)["model_stats"]
    assert [(e["name"], e["version"]) for e in over_grpc] == [
        (e["name"], e["version"]) for e in every
    ]


def test_a_model_never_run_reports_zeros(http):
    entry = _stats(http, "cnn-openvino")
    assert entry["inference_count"] == entry["execution_count"] == entry["last_inference"] == 0
    assert entry["batch_stats"] == []
    assert all(v == {"count": 0, "ns": 0} for v in entry["inference_stats"].values())


def test_a_model_named_stats_keeps_its_metadata_under_its_versions(http, server):
    assert http.get_model_metadata("stats", "1")["name"] == "stats"
    assert http.get_model_config("stats")["name"] == "stats"
    assert _stats(http, "stats")["name"] == "stats"
    status, body = _get(server, "/v2/models/stats")
    assert status == 200 and b"model_stats" in body


def test_metrics_keep_batches_by_exact_size_and_failure_time():
    m = ModelMetrics("m", "1")
    m.executed(3, 1_000)
    m.executed(3, 2_000)
    m.executed(5, 4_000)
    m.failure("InvalidInput")
    m.failure("RequestTimeout", 7_000_000)
    assert m.batches == {3: [2, 3_000], 5: [1, 4_000]}
    assert m.failure_us == 7_000
    assert m.last_inference_ms > 0


# --- hostile requests -------------------------------------------------------------------------


def _get(server, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{server.http_url}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("POST", "/v2/models/mlp/config", 405),
        ("DELETE", "/v2/models/stats", 405),
        ("POST", "/v2/models/mlp/versions/1/stats", 405),
        ("GET", "/v2/models/mlp/versions//config", 404),
        ("GET", "/v2/models/mlp/config/extra", 404),
        ("GET", "/v2/models/%00/config", 404),
        ("GET", "/v2/models/mlp/versions/%2e%2e/stats", 404),
        ("GET", "/v2/models/" + "a" * 8000 + "/stats", 404),
        ("GET", "/v2/models/mlp/versions/1e3/config", 404),
        ("HEAD", "/v2/models/mlp/config", 200),
    ],
)
def test_hostile_rest_paths_get_clear_errors(server, method, path, status):
    got, body = _get(server, path, method)
    assert got == status
    if status != 200:
        assert b'"error"' in body


def test_hostile_grpc_requests_get_clear_errors(stub, server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        for method in ("ModelConfig", "ModelStatistics"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as garbage:
                call(b"\xff\xff\xff\xff", timeout=30)  # not a protobuf message
            assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request in (
        pb.ModelConfigRequest(name="x" * 100_000),
        pb.ModelConfigRequest(name="mlp", version="\u0000"),
        pb.ModelConfigRequest(name="../mlp"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelConfig(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # an error quoting a 100 KB name is cut short: gRPC clients drop a response whose
    # metadata passes 8-16 KiB, and would see RESOURCE_EXHAUSTED instead of the error
    with pytest.raises(grpc.RpcError) as error:
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
        request = pb.ModelInferRequest(
            model_name="y" * 100_000, inputs=[tensor], raw_input_contents=[bytes(256)]
        )
        stub.ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details().endswith("more characters)")
    assert len(error.value.details()) < 1024
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="", version="1"), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ModelConfig(pb.ModelConfigRequest(name="mlp"), timeout=30).config.name == "mlp"
