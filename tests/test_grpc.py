"""KServe v2 gRPC front end: the .proto, the codec, and the server through tritonclient.grpc.

The server runs the real DataPlane on its own event loop in a background thread (tritonclient's
calls block), over a repository holding the sample MLP, a spare copy of it for load/unload, and
one `identity-<datatype>` ONNX model (y = x) per datatype.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from agent.samples import sample_input
from agent.serving import grpc_codec
from agent.serving.dataplane import DataPlane
from agent.serving.errors import InvalidInput
from agent.serving.grpc_server import start_grpc_server
from agent.serving.repository import ModelRepository
from agent.serving.rest_codec import decode_raw, encode_raw
from agent.serving.tensors import InferenceResponse, Tensor
from protocol import inference_pb2 as pb
from protocol import inference_pb2_grpc as pb_grpc
from runtimes.datatypes import to_numpy
from tests.conftest import LoopThread

ROOT = Path(__file__).resolve().parent.parent
GENERATED = (
    "inference_pb2.py",
    "inference_pb2.pyi",
    "inference_pb2_grpc.py",
    "fleet_pb2.py",
    "fleet_pb2.pyi",
    "fleet_pb2_grpc.py",
)

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
ALL_DATATYPES = list(ONNX_TYPES)


def sample_array(datatype: str, shape=(2, 3)) -> np.ndarray:
    """Values that exercise each type's range: extremes, zero, negatives where they exist."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        values = [b"", b"a", b"\x00\xff", "héllo".encode(), b"x" * 300, b"z"]
        return np.array((values * count)[:count], dtype=object).reshape(shape)
    dtype = to_numpy(datatype)
    if datatype == "BOOL":
        values = [True, False, True, True, False, False]
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
    else:
        values = [0.0, -1.5, 3.25, float(np.finfo(dtype).max), float(np.finfo(dtype).tiny), 1e-3]
    return np.array((values * count)[:count], dtype=dtype).reshape(shape)


def identity_model(datatype: str) -> onnx.ModelProto:
    """y = x for one datatype, shape [-1, 3]."""
    onnx_type = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype}",
        [helper.make_tensor_value_info("x", onnx_type, ["n", 3])],
        [helper.make_tensor_value_info("y", onnx_type, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class GrpcServerThread(LoopThread):
    """DataPlane + gRPC server on an event loop of their own, in a background thread."""

    def __init__(self, repo: Path, max_message_bytes: int = 64 * 1024 * 1024, dataplane=None):
        super().__init__()
        self.repo = repo
        self.max_message_bytes = max_message_bytes
        self.dataplane = dataplane

    def __enter__(self) -> GrpcServerThread:
        self.start_loop()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        if self.dataplane is None:
            self.dataplane = DataPlane(ModelRepository(self.repo))
            await self.dataplane.start()
        self.server, self.port = await start_grpc_server(
            self.dataplane, "127.0.0.1:0", self.max_message_bytes
        )

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop(grace=1))
        if isinstance(self.dataplane, DataPlane):
            self.call(self.dataplane.stop())
        self.stop_loop()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def grpc_repo(sample_repo, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpc-models")
    shutil.copytree(sample_repo / "mlp", root / "mlp")
    shutil.copytree(sample_repo / "mlp", root / "spare")
    for datatype in ONNX_TYPES:
        version_dir = root / f"identity-{datatype.lower()}" / "1"
        version_dir.mkdir(parents=True)
        onnx.save(identity_model(datatype), version_dir / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(grpc_repo):
    with GrpcServerThread(grpc_repo) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with tc.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def mlp_reference(grpc_repo):
    session = ort.InferenceSession(str(grpc_repo / "mlp" / "1" / "model.onnx"))
    return lambda x: session.run(["output"], {"input": x})[0]


def triton_input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# --- the .proto and its generated code --------------------------------------------------------


def _without_version_stamps(text: str) -> str:
    """Generator versions are stamped into the output; they say nothing about the .proto."""
    text = re.sub(r"# Protobuf Python Version: .*", "", text)
    text = re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "", text)
    return re.sub(r"GRPC_GENERATED_VERSION = .*", "", text)


def test_generated_code_is_up_to_date(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "protocol" / "generate.sh"), str(tmp_path)], check=True, env=env
    )
    for name in GENERATED:
        fresh = (tmp_path / "protocol" / name).read_text()
        committed = (ROOT / "protocol" / name).read_text()
        assert _without_version_stamps(committed) == _without_version_stamps(fresh), (
            f"protocol/{name} is stale: run protocol/generate.sh"
        )


def _fields(message) -> dict:
    return {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            f.message_type and f.message_type.full_name,
            f.enum_type and f.enum_type.full_name,
        )
        for f in message.fields
    }


def _assert_same_enums(ours, theirs) -> None:
    assert ours.full_name == theirs.full_name
    assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}


def _assert_same_messages(ours, theirs) -> None:
    """Every field we declare is Triton's (name, number, type); the model configuration and
    statistics messages declare only the fields the agent sets."""
    assert ours.full_name == theirs.full_name
    mine, triton = _fields(ours), _fields(theirs)
    assert mine == {name: triton.get(name) for name in mine}, ours.full_name
    if ours.name not in PARTIAL_MESSAGES:
        assert mine.keys() == triton.keys(), ours.full_name
    for nested in ours.nested_types:
        _assert_same_messages(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        _assert_same_enums(enum, theirs.enum_types_by_name[enum.name])


# Messages of Triton's model configuration and statistics with fields the agent never sets.
PARTIAL_MESSAGES = {
    "ModelConfig",
    "ModelInput",
    "ModelOutput",
    "ModelInstanceGroup",
    "ModelDynamicBatching",
    "ModelStatistics",
}


def test_proto_is_wire_compatible_with_tritonclient():
    """Every message, enum, field number and type we declare is Triton's (grpc_service.proto or
    model_config.proto); every method maps 1:1."""
    assert pb.DESCRIPTOR.package == triton_pb2.DESCRIPTOR.package == "inference"
    triton_files = (triton_pb2.DESCRIPTOR, triton_config_pb2.DESCRIPTOR)
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        twin = next(
            f.message_types_by_name[name] for f in triton_files if name in f.message_types_by_name
        )
        _assert_same_messages(message, twin)
    for name, enum in pb.DESCRIPTOR.enum_types_by_name.items():
        _assert_same_enums(enum, triton_config_pb2.DESCRIPTOR.enum_types_by_name[name])
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(ours.methods) == 11
    for method in ours.methods:
        twin = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            twin.input_type.full_name,
            twin.output_type.full_name,
        )
        assert not method.client_streaming and not method.server_streaming


@pytest.mark.parametrize(
    "imports",
    [
        "import tritonclient.grpc; from protocol import inference_pb2_grpc",
        "from protocol import inference_pb2_grpc; import tritonclient.grpc",
    ],
)
def test_generated_code_imports_next_to_tritonclient(imports):
    """Both define `inference.*` messages; ours live in a private descriptor pool."""
    subprocess.run([sys.executable, "-c", imports], check=True, cwd=ROOT)


# --- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_round_trip(datatype):
    array = sample_array(datatype)
    decoded = decode_raw("x", datatype, array.shape, encode_raw(datatype, array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", [d for d in ALL_DATATYPES if d != "FP16"])
def test_typed_contents_round_trip(datatype):
    array = sample_array(datatype)
    wire = grpc_codec.encode_contents(datatype, array).SerializeToString()
    contents = pb.InferTensorContents.FromString(wire)
    decoded = grpc_codec.decode_contents("x", datatype, array.shape, contents)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_request_and_response_round_trip(datatype):
    """Raw request in, raw response out, as tritonclient does it."""
    array = sample_array(datatype)
    msg = pb.ModelInferRequest(model_name="m", model_version="2", id="req-7")
    msg.inputs.add(name="x", datatype=datatype, shape=array.shape)
    msg.raw_input_contents.append(encode_raw(datatype, array))
    msg.outputs.add(name="y").parameters["classification"].int64_param = 3
    msg.parameters["timeout"].int64_param = 5000
    request = grpc_codec.decode_request(pb.ModelInferRequest.FromString(msg.SerializeToString()))
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "req-7")
    assert request.parameters == {"timeout": 5000}
    assert [(o.name, o.parameters) for o in request.outputs] == [("y", {"classification": 3})]
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, array.shape)
    np.testing.assert_array_equal(tensor.data, array)

    response = InferenceResponse("m", "2", [Tensor("y", datatype, array.shape, array)], id="req-7")
    out = pb.ModelInferResponse.FromString(grpc_codec.encode_response(response))
    assert (out.model_name, out.model_version, out.id) == ("m", "2", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in out.outputs] == [
        ("y", datatype, list(array.shape))
    ]
    back = decode_raw("y", datatype, array.shape, out.raw_output_contents[0])
    np.testing.assert_array_equal(back, array)


def _protobuf_response(response: InferenceResponse) -> bytes:
    """What protobuf itself writes for `response` (the reference for the hand-written one)."""
    msg = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    grpc_codec.dict_to_parameters(response.parameters, msg.parameters)
    for t in response.outputs:
        msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        msg.raw_output_contents.append(encode_raw(t.datatype, t.data))
    return msg.SerializeToString(deterministic=True)  # a map's entries ordered by key


@pytest.mark.parametrize(
    "response",
    [
        InferenceResponse("mlp", "1", [Tensor("output", "FP32", (1, 10), np.ones((1, 10), "f4"))]),
        # every datatype at once, in one answer; an id and parameters
        InferenceResponse(
            "m",
            "12",
            [Tensor(f"y{d}", d, sample_array(d).shape, sample_array(d)) for d in ALL_DATATYPES],
            id="req-ü-7",
            parameters={"sequence_end": True, "n": -3, "big": (1 << 64) - 1, "label": "é"},
        ),
        # empty strings are left out; a scalar has no shape field; a zero-size tensor no data
        InferenceResponse("m", "", [Tensor("s", "INT64", (), np.array(7, np.int64))], id=""),
        InferenceResponse("m", "1", [Tensor("e", "FP32", (0, 3), np.zeros((0, 3), "f4"))]),
        # lengths past one varint byte: a long name, large dims, 200 KB of data
        InferenceResponse(
            "n" * 300, "1", [Tensor("big", "UINT8", (1, 200_000), np.ones((1, 200_000), "u1"))]
        ),
        # a negative dimension (never from a model, but the field is int64): ten varint bytes
        InferenceResponse("m", "1", [Tensor("odd", "FP32", (-1,), np.zeros(0, "f4"))]),
        # views in any layout and byte order go out as little-endian C order
        InferenceResponse(
            "m",
            "1",
            [
                Tensor("t", "FP64", (3, 2), np.arange(6.0).reshape(2, 3).T.astype(">f8")),
                Tensor("u", "INT32", (3, 2), np.arange(6, dtype="<i4").reshape(2, 3).T),
                Tensor("v", "INT16", (2, 2), np.arange(8, dtype="<i2").reshape(2, 4)[:, ::2]),
            ],
        ),
    ],
    ids=["mlp", "all-datatypes", "scalar", "empty", "long", "negative-dim", "strided"],
)
def test_response_bytes_equal_protobufs(response):
    """The response is written by hand; protobuf writes exactly the same bytes."""
    wire = grpc_codec.encode_response(response)
    assert wire == _protobuf_response(response)
    back = pb.ModelInferResponse.FromString(wire)
    for t, out, raw in zip(response.outputs, back.outputs, back.raw_output_contents, strict=True):
        assert (out.name, out.datatype, tuple(out.shape)) == (t.name, t.datatype, t.shape)
        if t.datatype != "BYTES":
            np.testing.assert_array_equal(np.frombuffer(raw, to_numpy(t.datatype)), t.data.ravel())


def test_parameters_round_trip():
    values = {"flag": True, "n": -3, "big": (1 << 64) - 1, "ratio": 0.25, "label": "héllo"}
    msg = pb.ModelInferRequest()
    grpc_codec.dict_to_parameters(values, msg.parameters)
    assert msg.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert msg.parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert grpc_codec.parameters_to_dict(msg.parameters) == values


def test_narrow_integers_are_range_checked():
    contents = pb.InferTensorContents(uint_contents=[255, 256])
    with pytest.raises(InvalidInput, match="outside the UINT8 range"):
        grpc_codec.decode_contents("x", "UINT8", (2,), contents)
    contents = pb.InferTensorContents(int_contents=[-32768, 32767])
    decoded = grpc_codec.decode_contents("x", "INT16", (2,), contents)
    assert decoded.dtype == np.int16 and decoded.tolist() == [-32768, 32767]


# --- server through tritonclient --------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md.name == "edgefleet"
    assert "model_repository" in md.extensions


def test_model_metadata_and_readiness(client):
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("mlp", "9")
    md = client.get_model_metadata("mlp")
    assert (md.name, list(md.versions), md.platform) == ("mlp", ["1"], "onnxruntime_onnx")
    (inp,), (out,) = md.inputs, md.outputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("input", "FP32", [-1, 64])
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [-1, 10])
    assert client.get_model_metadata("mlp", "1") == md


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_infer_matches_onnxruntime(client, mlp_reference, rows):
    x = np.random.RandomState(rows).standard_normal((rows, 64)).astype(np.float32)
    result = client.infer("mlp", [triton_input("input", x, "FP32")], request_id=f"r{rows}")
    assert result.get_response().id == f"r{rows}"
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(x), rtol=1e-5, atol=1e-6)


def test_infer_sample_input_with_requested_output(client, mlp_reference):
    x = sample_input("mlp")["input"]
    result = client.infer(
        "mlp",
        [triton_input("input", x, "FP32")],
        model_version="1",
        outputs=[tc.InferRequestedOutput("output")],
    )
    np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(x), rtol=1e-5, atol=1e-6)


def test_concurrent_clients_get_their_own_results(server, mlp_reference):
    def worker(seed: int) -> None:
        with tc.InferenceServerClient(server.url) as c:
            for i in range(20):
                x = np.random.RandomState(seed * 100 + i).standard_normal((1, 64))
                x = x.astype(np.float32)
                out = c.infer("mlp", [triton_input("input", x, "FP32")]).as_numpy("output")
                np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-6)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))


def test_large_tensors_from_many_connections_arrive_intact(server):
    """Connections share one read buffer (http2.ReadBuffer): 1.2 MB tensors from six at once,
    each read in several pieces interleaved with the others', must come back bit for bit."""

    def worker(seed: int) -> None:
        with tc.InferenceServerClient(server.url) as c:
            for i in range(4):
                x = np.random.RandomState(seed * 10 + i).standard_normal((100_000, 3))
                x = x.astype(np.float32)
                tensor = triton_input("x", x, "FP32")
                out = c.infer("identity-fp32", [tensor]).as_numpy("y")
                np.testing.assert_array_equal(out, x)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(worker, range(6)))


def utf8_sample(datatype: str) -> np.ndarray:
    """sample_array, with BYTES as UTF-8 text: ONNX Runtime string tensors hold nothing else."""
    if datatype == "BYTES":
        return np.array([b"", "héllo".encode(), b"x" * 300] * 2, dtype=object).reshape(2, 3)
    return sample_array(datatype)


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_through_the_server(client, datatype):
    array = utf8_sample(datatype)
    model = f"identity-{datatype.lower()}"
    assert client.get_model_metadata(model).inputs[0].datatype == datatype
    out = client.infer(model, [triton_input("x", array, datatype)]).as_numpy("y")
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_non_utf8_bytes_for_an_onnx_string_input_is_invalid(client):
    array = np.array([b"ok", b"\xff\xfe", b"z"], dtype=object).reshape(1, 3)
    with pytest.raises(InferenceServerException, match="element 1 is not UTF-8 text"):
        client.infer("identity-bytes", [triton_input("x", array, "BYTES")])


# --- server through a plain generated stub (typed contents) -----------------------------------


def test_typed_contents_infer(stub, mlp_reference):
    x = np.random.RandomState(5).standard_normal((2, 64)).astype(np.float32)
    msg = pb.ModelInferRequest(model_name="mlp", id="typed")
    tensor = msg.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(msg)
    assert response.id == "typed"
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [2, 10])
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("datatype", [d for d in ONNX_TYPES if d != "FP16"])
def test_every_typed_datatype_through_the_server(stub, datatype):
    array = utf8_sample(datatype)
    msg = pb.ModelInferRequest(model_name=f"identity-{datatype.lower()}")
    msg.inputs.add(
        name="x",
        datatype=datatype,
        shape=array.shape,
        contents=grpc_codec.encode_contents(datatype, array),
    )
    response = stub.ModelInfer(msg)
    out = decode_raw("y", datatype, array.shape, response.raw_output_contents[0])
    np.testing.assert_array_equal(out, array)


# --- bad input --------------------------------------------------------------------------------

MLP_ROW = np.zeros((1, 64), dtype=np.float32)


def raw_request(
    model: str = "mlp", name: str = "input", datatype: str = "FP32", shape=(1, 64), data=None
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(MLP_ROW.tobytes() if data is None else data)
    return msg


def typed_fp32(values: list[float], shape=(1, 64)) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp")
    msg.inputs.add(name="input", datatype="FP32", shape=shape).contents.fp32_contents.extend(values)
    return msg


def _mixed() -> pb.ModelInferRequest:
    msg = raw_request()
    msg.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return msg


def _with(msg: pb.ModelInferRequest, edit) -> pb.ModelInferRequest:
    edit(msg)
    return msg


def _no_data() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp")
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    return msg


def _typed_fp16() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="identity-fp16")
    msg.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    return msg


def _int8_out_of_range() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="identity-int8")
    msg.inputs.add(name="x", datatype="INT8", shape=[1, 3]).contents.int_contents.extend(
        [1, 2, 300]
    )
    return msg


def _wrong_typed_field() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp")
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.int_contents.extend(
        [0] * 64
    )
    return msg


BAD_REQUESTS = {
    "empty model name": (lambda: raw_request(model=""), "model_name is empty"),
    "no inputs": (lambda: pb.ModelInferRequest(model_name="mlp"), "request has no inputs"),
    "wrong input name": (lambda: raw_request(name="pixels"), "unexpected input 'pixels'"),
    "wrong shape": (
        lambda: raw_request(shape=(1, 63), data=MLP_ROW.tobytes()[:252]),
        "has shape [1, 63], model expects [-1, 64]",
    ),
    "wrong datatype": (
        lambda: raw_request(datatype="FP64", data=np.zeros((1, 64)).tobytes()),
        "has datatype FP64, model expects FP32",
    ),
    "unknown datatype": (lambda: raw_request(datatype="FLOAT32"), "unknown datatype 'FLOAT32'"),
    "element count": (lambda: typed_fp32([0.0] * 63), "63 values in fp32_contents"),
    "truncated raw bytes": (
        lambda: raw_request(data=MLP_ROW.tobytes()[:255]),
        "255 bytes of data for shape [1, 64]",
    ),
    "too many raw bytes": (
        lambda: raw_request(data=MLP_ROW.tobytes() + b"\0"),
        "257 bytes of data",
    ),
    "raw and typed mixed": (_mixed, "also has raw_input_contents"),
    "raw entries per input": (
        lambda: _with(raw_request(), lambda m: m.raw_input_contents.append(b"")),
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    "no data": (_no_data, "input 'input' has no data"),
    "absurd shape": (lambda: raw_request(shape=(1 << 40, 64)), "larger than 1073741824 elements"),
    "negative dim": (lambda: raw_request(shape=(-1, 64)), "negative dim"),
    "too many dims": (lambda: raw_request(shape=(1,) * 17), "at most 16"),
    "batch above max_batch_size": (
        lambda: raw_request(shape=(33, 64), data=np.zeros((33, 64), np.float32).tobytes()),
        "batch size 33 outside 1..32",
    ),
    "unknown output": (
        lambda: _with(raw_request(), lambda m: m.outputs.add(name="logits")),
        "unknown output 'logits'",
    ),
    "bad timeout parameter": (
        lambda: _with(
            raw_request(), lambda m: setattr(m.parameters["timeout"], "string_param", "1s")
        ),
        "parameter 'timeout' must be a positive integer",
    ),
    "parameter without value": (
        lambda: _with(raw_request(), lambda m: m.parameters["priority"].SetInParent()),
        "parameter 'priority' has no value",
    ),
    "FP16 in typed contents": (_typed_fp16, "FP16 has no typed contents field"),
    "typed field of another datatype": (_wrong_typed_field, "takes its data in fp32_contents"),
    "INT8 out of range": (_int8_out_of_range, "outside the INT8 range [-128, 127]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(stub, case):
    build, needle = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()


def test_a_repeated_request_with_bad_tensor_bytes_is_refused_and_counted(server, stub):
    """The second request repeats the first's layout (remembered) with too few tensor bytes."""

    def failures() -> float:
        return (
            server.dataplane.metrics.registry.get_sample_value(
                "edgefleet_inference_request_failure_total",
                {"model": "mlp", "version": "1", "reason": "InvalidInput"},
            )
            or 0.0
        )

    def request(data: bytes) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="mlp")
        msg.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        msg.raw_input_contents.append(data)
        return msg

    x = sample_input("mlp")["input"]
    assert stub.ModelInfer(request(x.tobytes())).outputs[0].name == "output"
    before = failures()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request(x.tobytes()[:-4]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "252 bytes of data for shape [1, 64] FP32; expected 256" in err.value.details()
    assert failures() == before + 1
    assert stub.ModelInfer(request(x.tobytes())).outputs[0].name == "output"


@pytest.mark.parametrize(
    ("model", "version", "needle"),
    [("no-such-model", "", "model 'no-such-model' not found"), ("mlp", "7", "version '7'")],
)
def test_unknown_model_or_version_is_not_found(client, model, version, needle):
    x = MLP_ROW
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [triton_input("input", x, "FP32")], model_version=version)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert needle in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(model, version)
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_server_still_serves_after_bad_input(client, stub, mlp_reference):
    for build, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(build())
    assert client.is_server_live() and client.is_server_ready()
    x = sample_input("mlp")["input"]
    out = client.infer("mlp", [triton_input("input", x, "FP32")]).as_numpy("output")
    np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-6)


def test_oversized_message_is_resource_exhausted(grpc_repo):
    with (
        GrpcServerThread(grpc_repo, max_message_bytes=256 * 1024) as small,
        grpc.insecure_channel(small.url) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        rows = np.zeros((2048, 64), dtype=np.float32)  # 512 KiB of raw contents
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request(shape=rows.shape, data=rows.tobytes()))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ModelInfer(raw_request()).outputs[0].name == "output"


def test_port_in_use_is_a_clear_error(server):
    with pytest.raises(OSError, match=f"cannot serve gRPC on {server.url}: the address is in use"):
        server.call(start_grpc_server(server.dataplane, server.url))


class BrokenDataPlane:
    """Raises what no front end expects, to show the server survives its own bugs."""

    def live(self) -> bool:
        raise RuntimeError("disk on fire")

    def ready(self) -> bool:
        return True


def test_unexpected_error_is_internal_and_server_keeps_serving(grpc_repo):
    with (
        GrpcServerThread(grpc_repo, dataplane=BrokenDataPlane()) as broken,
        grpc.insecure_channel(broken.url) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerLive(pb.ServerLiveRequest())
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: disk on fire" in err.value.details()
        assert stub.ServerReady(pb.ServerReadyRequest()).ready


# --- repository extension ---------------------------------------------------------------------


def _index(client) -> dict[str, tuple[str, str]]:
    models = client.get_model_repository_index(as_json=True).get("models", [])
    return {m["name"]: (m.get("version", ""), m.get("state", "")) for m in models}


def _ready_names(stub) -> set[str]:
    return {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models}


def test_repository_index(client, stub):
    index = _index(client)
    assert index["mlp"] == ("1", "READY")
    assert set(index) == {"mlp", "spare", *(f"identity-{d.lower()}" for d in ONNX_TYPES)}
    assert _ready_names(stub) == {m for m, (_, state) in index.items() if state == "READY"}


def test_unload_and_load_follow_readiness(client, stub):
    x = MLP_ROW
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    assert _index(client)["spare"] == ("1", "UNAVAILABLE")
    assert "spare" not in _ready_names(stub)
    with pytest.raises(InferenceServerException) as err:
        client.infer("spare", [triton_input("input", x, "FP32")])
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert client.is_server_ready()  # unloaded on purpose: the node still serves what it should

    client.load_model("spare")
    assert client.is_model_ready("spare")
    assert _index(client)["spare"] == ("1", "READY")
    assert client.infer("spare", [triton_input("input", x, "FP32")]).as_numpy("output").shape == (
        1,
        10,
    )


def test_repository_errors(client):
    with pytest.raises(InferenceServerException) as err:
        client.load_model("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("spare", config='{"max_batch_size": 4}')
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "load parameters (config) are not supported" in err.value.message()
    assert client.is_model_ready("spare")
