"""Triton's classification extension through tritonclient (REST JSON and binary, gRPC): an output
asked for with class_count=k comes back as its top k classes, "value:index[:label]", labels read
from the file model.toml names; and everything a request or a repository can get wrong about it.

The models are y = x identities (3 classes a row), so each test picks the scores it classifies.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.utils import InferenceServerException

from agent.serving.classification import (
    MAX_CLASS_COUNT,
    MAX_CLASS_ENTRIES,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    _top,
    classify,
    read_labels,
)
from agent.serving.config import ModelConfigError
from agent.serving.server import ServeOptions
from tests.conftest import ServerThread
from tests.test_grpc import identity_model

LABELS = "cat\ndog\nbird\n"


def _model(
    root, name: str, datatype: str, toml: str = "", files: dict | None = None, width: int = 3
):
    directory = root / name / "1"
    directory.mkdir(parents=True)
    model = identity_model(datatype)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[1].dim_value = width
    onnx.save(model, directory / "model.onnx")
    if toml:
        (directory / "model.toml").write_text(toml)
    for file, content in (files or {}).items():
        (directory / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


def _mean_colour_model() -> onnx.ModelProto:
    """y[n, c] = mean of x[n, c, :, :]: an image of [3, 4, 4] (NCHW) -> a score per colour."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "mean_colour",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    labelled = 'max_batch_size = 4\nlabels = { y = "labels.txt" }\n'
    _model(root, "scores", "FP32", labelled, {"labels.txt": LABELS})
    _model(root, "whole", "FP32")  # no batching: the whole output is one set of scores
    _model(root, "counts", "INT32", "max_batch_size = 4\n")
    _model(root, "bytes", "UINT8", "max_batch_size = 4\n")
    _model(root, "text", "BYTES", "max_batch_size = 4\n")
    _model(root, "wide", "FP32", "max_batch_size = 4\n", width=20_000)
    # what a repository can get wrong: each leaves its version UNAVAILABLE, saying why
    _model(root, "missing-file", "FP32", 'labels = { y = "labels.txt" }\n')
    _model(root, "wrong-output", "FP32", 'labels = { z = "labels.txt" }\n', {"labels.txt": LABELS})
    _model(root, "escape", "FP32", 'labels = { y = "../labels.txt" }\n')
    _model(root, "not-utf8", "FP32", 'labels = { y = "l.txt" }\n', {"l.txt": b"\xff\xfe\n"})
    linked = _model(root, "linked", "FP32", 'labels = { y = "l.txt" }\n')
    os.symlink("/etc/passwd", linked / "l.txt")
    fifo = _model(root, "fifo", "FP32", 'labels = { y = "l.txt" }\n')
    os.mkfifo(fifo / "l.txt")
    # an image model as Triton's image_client expects one: NCHW input, classes out, labels
    images = root / "colours" / "1"
    images.mkdir(parents=True)
    onnx.save(_mean_colour_model(), images / "model.onnx")
    (images / "model.toml").write_text(
        'max_batch_size = 2\ninput_formats = { x = "NCHW" }\nlabels = { y = "colours.txt" }\n'
    )
    (images / "colours.txt").write_text("red\ngreen\nblue\n")
    _model(root, "format-unknown-input", "FP32", 'input_formats = { z = "NCHW" }\n')
    _model(root, "format-not-an-image", "FP32", 'input_formats = { x = "NHWC" }\n')
    _model(root, "format-misspelt", "FP32", 'input_formats = { x = "CHW" }\n')
    with ServerThread(ServeOptions(root, "127.0.0.1:0", "127.0.0.1:0", None)) as running:
        yield running


def _as_bytes(array: np.ndarray) -> list:
    return [[v if isinstance(v, bytes) else v.encode() for v in row] for row in array.tolist()]


def _classify_over(kind: str, http, grpc_client, model: str, x: np.ndarray, datatype: str, k):
    """The classification of output y over one protocol: 'json', 'binary' or 'grpc'."""
    module, client = (grpcclient, grpc_client) if kind == "grpc" else (httpclient, http)
    tensor = module.InferInput("x", list(x.shape), datatype)
    if kind == "grpc":
        tensor.set_data_from_numpy(x)
        wanted = module.InferRequestedOutput("y", class_count=k)
    else:
        tensor.set_data_from_numpy(x, binary_data=kind == "binary")
        wanted = module.InferRequestedOutput("y", binary_data=kind == "binary", class_count=k)
    result = client.infer(model, [tensor], outputs=[wanted])
    output = result.get_output("y")
    datatype = output.datatype if kind == "grpc" else output["datatype"]
    return datatype, result.as_numpy("y")


PROTOCOLS = ["json", "binary", "grpc"]


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_top_classes_with_labels_per_batch_row(http, grpc_client, kind):
    x = np.array([[0.1, 0.7, 0.2], [5.0, 5.0, -1.0]], np.float32)
    datatype, y = _classify_over(kind, http, grpc_client, "scores", x, "FP32", 2)
    assert datatype == "BYTES" and y.shape == (2, 2)
    assert _as_bytes(y) == [
        [b"0.700000:1:dog", b"0.200000:2:bird"],
        [b"5.000000:0:cat", b"5.000000:1:dog"],  # a tie: the lower index first
    ]


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_a_model_without_batching_is_classified_whole(http, grpc_client, kind):
    x = np.array([[3.0, 1.0, 2.0], [0.5, 9.0, -2.0]], np.float32)
    _, y = _classify_over(kind, http, grpc_client, "whole", x, "FP32", 10)  # more than it has
    assert y.shape == (6,)  # one set of scores, all 6 of them: k is cut to the classes there are
    assert _as_bytes(y[None])[0][:3] == [b"9.000000:4", b"3.000000:0", b"2.000000:2"]


@pytest.mark.parametrize(
    "model, datatype, x, top",
    [
        ("counts", "INT32", [[-7, 2**31 - 1, 0]], [b"2147483647:1", b"0:2", b"-7:0"]),
        ("bytes", "UINT8", [[255, 0, 128]], [b"255:0", b"128:2", b"0:1"]),  # no wrap-around
    ],
)
def test_integer_outputs_rank_and_print_as_integers(http, grpc_client, model, datatype, x, top):
    array = np.array(x, dtype=np.int32 if datatype == "INT32" else np.uint8)
    for kind in PROTOCOLS:
        _, y = _classify_over(kind, http, grpc_client, model, array, datatype, 3)
        assert _as_bytes(y) == [top]


def test_nan_ranks_lowest_and_other_outputs_stay_tensors(http):
    x = np.array([[np.nan, 1.0, 0.0]], np.float32)
    _, y = _classify_over("binary", http, None, "scores", x, "FP32", 1)
    assert _as_bytes(y) == [[b"1.000000:1:dog"]]
    plain = httpclient.InferInput("x", [1, 3], "FP32")
    plain.set_data_from_numpy(x)
    result = http.infer("scores", [plain])  # no classification asked: the raw tensor
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_config_and_metadata_show_the_extension_and_labels(http, grpc_client):
    assert "classification" in http.get_server_metadata()["extensions"]
    assert "classification" in grpc_client.get_server_metadata().extensions
    (output,) = http.get_model_config("scores")["output"]
    assert output["label_filename"] == "labels.txt"
    (grpc_output,) = grpc_client.get_model_config("scores").config.output
    assert grpc_output.label_filename == "labels.txt"


@pytest.mark.parametrize("count", [0, -1, 2.5, True, "3", MAX_CLASS_COUNT + 1, None])
def test_a_bad_class_count_is_refused_over_both_protocols(server, count):
    import json
    import urllib.error
    import urllib.request

    body = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
        "outputs": [{"name": "y", "parameters": {"classification": count}}],
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/scores/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert b"classification" in refused.value.read()


def test_a_bad_class_count_over_grpc_is_invalid_argument(grpc_client):
    tensor = grpcclient.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    for k in (0, -5):
        wanted = grpcclient.InferRequestedOutput("y", class_count=k)
        wanted._output.parameters["classification"].int64_param = k  # tritonclient skips k <= 0
        with pytest.raises(InferenceServerException) as refused:
            grpc_client.infer("scores", [tensor], outputs=[wanted])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "classification" in refused.value.message()


def test_a_bytes_output_cannot_be_classified(http):
    tensor = httpclient.InferInput("x", [1, 3], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a", b"b", b"c"]], dtype=object))
    with pytest.raises(InferenceServerException) as refused:
        http.infer("text", [tensor], outputs=[httpclient.InferRequestedOutput("y", class_count=1)])
    assert refused.value.status() == "400" and "BYTES" in refused.value.message()


@pytest.mark.parametrize(
    "model, reason",
    [
        ("missing-file", "cannot open labels.txt"),
        ("wrong-output", "labels for 'z', which the model does not output"),
        ("escape", "labels.y must be the name of a file in the version directory"),
        ("not-utf8", "l.txt is not UTF-8"),
        ("linked", "cannot open l.txt"),  # a link could point anywhere: not followed
        ("fifo", "l.txt: not a regular file; a label file must be a file"),
    ],
)
def test_bad_label_files_leave_the_version_unavailable(http, model, reason):
    index = {e["name"]: e for e in http.get_model_repository_index()}
    assert index[model]["state"] == "UNAVAILABLE"
    assert reason in index[model]["reason"]
    assert index["scores"]["state"] == "READY"  # the others serve


def test_triton_image_client_steps_work_unchanged(http, grpc_client):
    """What Triton's image_client example does: read metadata and config, require one 3-dim
    NCHW/NHWC input and the batching from max_batch_size, then ask for the top class by
    class_count and print "value (index) = label"."""
    for client, module in ((http, httpclient), (grpc_client, grpcclient)):
        if client is http:
            metadata, config = http.get_model_metadata("colours"), http.get_model_config("colours")
            (input_config,) = config["input"]
            layout, batching = input_config["format"], config["max_batch_size"] > 0
            shape = metadata["inputs"][0]["shape"]
        else:
            metadata = grpc_client.get_model_metadata("colours")
            config = grpc_client.get_model_config("colours").config
            layout = triton_config_pb2.ModelInput.Format.Name(config.input[0].format)
            batching, shape = config.max_batch_size > 0, list(metadata.inputs[0].shape)
        assert layout == "FORMAT_NCHW" and batching and len(shape) == 4
        c, h, w = shape[1:]
        images = np.zeros((2, c, h, w), np.float32)
        images[0, 2] = 1.0  # blue
        images[1, 1] = 0.5  # green
        tensor = module.InferInput("x", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        wanted = module.InferRequestedOutput("y", class_count=1)
        results = client.infer("colours", [tensor], outputs=[wanted]).as_numpy("y")
        printed = []
        for row in results:
            for result in row:
                value, index, label = result.decode().split(":")
                printed.append(f"{value} ({index}) = {label}")
        assert printed == ["1.000000 (2) = blue", "0.500000 (1) = green"]


@pytest.mark.parametrize(
    "model, reason",
    [
        ("format-unknown-input", "gives a format for 'z', which is not an input of the model"),
        ("format-not-an-image", "an image layout needs 3 dimensions besides the batch"),
        ("format-misspelt", "input_formats must be a table of input name -> NCHW or NHWC"),
    ],
)
def test_bad_input_formats_leave_the_version_unavailable(http, model, reason):
    index = {e["name"]: e for e in http.get_model_repository_index()}
    assert index[model]["state"] == "UNAVAILABLE" and reason in index[model]["reason"]


def test_classify_keeps_shapes_and_labels_beyond_the_file():
    scores = np.array([[1, 3, 2, 4]], np.int64)
    assert classify(scores, 2, ("a", "b"), batched=True).tolist() == [[b"4:3", b"3:1:b"]]
    # an empty line names no class: no ":" and empty label after the index, as Triton
    assert classify(scores, 2, ("a", "", "c", ""), batched=False).tolist() == [b"4:3", b"3:1"]
    assert classify(scores, 9, None, batched=False).shape == (4,)


def test_an_answer_of_too_many_classes_is_refused_and_the_server_keeps_serving(http):
    x = np.random.default_rng(1).standard_normal((4, 20_000), dtype=np.float32)
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    wanted = httpclient.InferRequestedOutput("y", class_count=20_000)  # 4 x 20000 strings
    with pytest.raises(InferenceServerException) as refused:
        http.infer("wide", [tensor], outputs=[wanted])
    assert refused.value.status() == "400" and "ask for fewer" in refused.value.message()
    top = httpclient.InferRequestedOutput("y", class_count=3)
    y = http.infer("wide", [tensor], outputs=[top]).as_numpy("y")
    best = np.argsort(-x, axis=1, kind="stable")[:, :3]
    assert [[int(v.split(b":")[1]) for v in row] for row in y] == best.tolist()


def test_top_classes_match_a_full_sort_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(500):
        n = int(rng.integers(1, 50))
        k = int(rng.integers(1, n + 1))
        for dtype in (np.float32, np.int32, np.uint8):
            keys = rng.integers(0, 4, n).astype(dtype)  # many ties
            expected = sorted(range(n), key=lambda i: (-float(keys[i]), i))[:k]
            assert _top(keys, k).tolist() == expected
    with pytest.raises(ValueError, match="ask for fewer"):
        classify(np.zeros((2, MAX_CLASS_ENTRIES), np.float32), MAX_CLASS_ENTRIES, None, True)


def test_huge_floats_print_exactly_as_percent_f():
    """Values from 2**53 up are printed from their exact integer (%f of a double near 1e308
    costs ~25 us: 65536 of them held the event loop ~1.8 s, against ~0.2 s now): the same text."""
    extremes = [1e308, -1e308, 2.0**53, -(2.0**53) - 2, 1.5e16, 3.4e38, np.inf, -np.inf, -0.0]
    assert [v.split(b":")[0].decode() for v in classify(np.array(extremes), 9, None, False)] == [
        f"{v:f}" for v in sorted(extremes, key=lambda v: -v)
    ]


def test_nan_ranks_below_minus_infinity():
    scores = np.array([[np.nan, -np.inf, 1.0, np.nan]], np.float32)
    assert classify(scores, 4, None, batched=True).tolist() == [
        [b"1.000000:2", b"-inf:1", b"nan:0", b"nan:3"]
    ]
    assert classify(scores, 2, None, batched=True).tolist() == [[b"1.000000:2", b"-inf:1"]]
    assert classify(np.full((1, 2), np.nan), 1, None, batched=True).tolist() == [[b"nan:0"]]


def test_a_label_longer_than_the_limit_is_refused_at_load(tmp_path):
    (tmp_path / "labels.txt").write_text("short\n" + "x" * (MAX_LABEL_CHARS + 1) + "\n")
    with pytest.raises(ModelConfigError, match=f"line 2 is longer than {MAX_LABEL_CHARS}"):
        read_labels(tmp_path, {"y": "labels.txt"})


def test_a_models_label_files_are_bounded_together(tmp_path):
    """Each label is a Python string: bounds on the model's files together, not each file,
    keep 64 outputs' worth of label files from costing gigabytes."""
    line = b"x" * 1023 + b"\n"
    (tmp_path / "a.txt").write_bytes(line * (10 << 10))  # 10 MiB
    (tmp_path / "b.txt").write_bytes(line * (7 << 10))
    assert len(read_labels(tmp_path, {"a": "a.txt"})["a"]) == 10 << 10
    with pytest.raises(ModelConfigError, match="label files hold 16 MiB together"):
        read_labels(tmp_path, {"a": "a.txt", "b": "b.txt"})
    (tmp_path / "one-letter.txt").write_bytes(b"z\n" * (MAX_LABELS // 2 + 1))
    assert len(read_labels(tmp_path, {"a": "one-letter.txt"})["a"]) == MAX_LABELS // 2 + 1
    with pytest.raises(ModelConfigError, match=f"more than {MAX_LABELS} in all"):
        read_labels(tmp_path, {"a": "one-letter.txt", "b": "one-letter.txt"})


def test_an_unexpected_error_preparing_the_answer_is_answered(http, monkeypatch):
    """Whatever fails while the answer is prepared, the client gets an error, not silence."""
    from agent.serving import dataplane

    def broken(*args):
        raise RuntimeError("broken classifier")

    monkeypatch.setattr(dataplane, "classify", broken)
    tensor = httpclient.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    wanted = httpclient.InferRequestedOutput("y", class_count=1)
    with pytest.raises(InferenceServerException) as failed:
        http.infer("scores", [tensor], outputs=[wanted])
    assert failed.value.status() == "500" and "RuntimeError: broken classifier" in str(failed.value)
