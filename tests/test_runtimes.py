"""Runtime adapters and discovery, on the generated sample models."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import runtimes
from agent import samples
from runtimes import ModelLoadError, TensorSpec, UnsupportedModel, load
from runtimes.base import LoadOptions
from runtimes.discovery import RuntimeDevice, discover

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    samples.write_sample_repository(root)
    return {
        "mlp": root / "mlp" / "1" / "model.onnx",
        "cnn": root / "cnn" / "1" / "model.onnx",
        "cnn-openvino": root / "cnn-openvino" / "1" / "model.xml",
        "mlp-tflite": root / "mlp-tflite" / "1" / "model.tflite",
    }


def _batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.RandomState(seed).standard_normal((rows, 64)).astype(np.float32)}


# --- ONNX Runtime ----------------------------------------------------------------------------


def test_onnx_mlp_metadata_has_a_dynamic_batch(models):
    session = load(models["mlp"])
    assert session.runtime == "onnxruntime"
    assert session.device == "CPU"
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 64))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 10))]


@pytest.mark.parametrize("rows", [1, 7, 32])
def test_onnx_mlp_runs_any_batch_size(models, rows):
    session = load(models["mlp"])
    inputs = _batch(rows, seed=rows)
    output = session.infer(inputs)["output"]
    assert output.shape == (rows, 10)
    expected = samples.reference_output("mlp", inputs)["output"]
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_onnx_cnn_metadata(models):
    session = load(models["cnn"], options=LoadOptions(threads=2))
    assert session.inputs == [TensorSpec("input", "FP32", (1, 3, 224, 224))]
    assert session.outputs == [TensorSpec("output", "FP32", (1, 1000))]
    assert session.providers == ["CPUExecutionProvider"]


# --- OpenVINO --------------------------------------------------------------------------------


# CPU the process uses while idle right after a run, least of three tries (in its own process,
# so that no other thread of the test run is counted).
_IDLE_CPU_AFTER_A_RUN = """
import json, sys, time
from agent.samples import sample_input
from runtimes import load
from runtimes.base import LoadOptions
idle_spin = json.loads(sys.argv[2])
session = load(sys.argv[1], options=LoadOptions(threads=2, idle_spin=idle_spin))
inputs = sample_input("cnn")
idle = []
for _ in range(3):
    session.infer(inputs)
    start = time.process_time()
    time.sleep(0.3)
    idle.append(time.process_time() - start)
print(min(idle))
"""


def _idle_cpu_after_a_run(model: Path, idle_spin: bool) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _IDLE_CPU_AFTER_A_RUN, str(model), json.dumps(idle_spin)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )
    return float(done.stdout)


def test_onnx_threads_stop_spinning_when_a_run_ends(models):
    """ONNX Runtime's intra-op threads keep spinning after a run by default (~40 ms of a core
    after each run of the sample CNN here); the adapter has them sleep as each run ends, unless
    idle_spin asks for ONNX Runtime's way."""
    assert _idle_cpu_after_a_run(models["cnn"], idle_spin=False) < 0.003
    spinning = _idle_cpu_after_a_run(models["cnn"], idle_spin=True)
    assert spinning > 0.01, "idle_spin no longer keeps ONNX Runtime's threads spinning"


def test_openvino_ir_metadata_and_where_it_runs(models):
    session = load(models["cnn-openvino"])
    assert session.runtime == "openvino"
    assert session.device == "CPU"
    assert session.execution_devices == ["CPU"]
    assert session.inputs == [TensorSpec("input", "FP32", (1, 3, 224, 224))]
    assert session.outputs == [TensorSpec("output", "FP32", (1, 1000))]


def test_openvino_defaults_to_f32_precision(models):
    session = load(models["cnn-openvino"])
    assert session.properties["INFERENCE_PRECISION_HINT"] == "f32"
    assert session._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"


def test_openvino_passes_threads_and_extra_properties(models):
    options = LoadOptions(
        threads=1,
        extra={"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16"},
    )
    session = load(models["mlp"], runtime="openvino", options=options)
    assert session.properties == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "INFERENCE_NUM_THREADS": 1,
        "PERFORMANCE_HINT": "THROUGHPUT",
    }
    assert session._compiled.get_property("INFERENCE_NUM_THREADS") == 1


@pytest.mark.parametrize("variant", ["cnn-openvino", "cnn"])
def test_openvino_matches_onnxruntime_on_the_cnn(models, variant):
    """The IR and the ONNX file read by OpenVINO agree with ONNX Runtime in f32."""
    inputs = samples.sample_input("cnn")
    reference = load(models["cnn"]).infer(inputs)["output"]
    output = load(models[variant], runtime="openvino").infer(inputs)["output"]
    assert output.shape == (1, 1000)
    np.testing.assert_allclose(output, reference, rtol=0, atol=1e-4)


def test_openvino_reads_onnx_with_a_dynamic_batch(models):
    session = load(models["mlp"], runtime="openvino")
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 64))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 10))]
    for rows in (1, 5, 32):
        inputs = _batch(rows, seed=rows)
        expected = samples.reference_output("mlp", inputs)["output"]
        np.testing.assert_allclose(session.infer(inputs)["output"], expected, atol=1e-5)


def test_openvino_reads_tflite(models):
    session = load(models["mlp-tflite"], runtime="openvino")
    inputs = samples.sample_input("mlp-tflite")
    expected = samples.reference_output("mlp-tflite", inputs)["output"]
    np.testing.assert_allclose(session.infer(inputs)["output"], expected, atol=1e-5)


def test_openvino_outputs_are_not_overwritten_by_the_next_call(models):
    session = load(models["mlp"], runtime="openvino")
    first = session.infer(_batch(4, seed=1))["output"]
    kept = first.copy()
    session.infer(_batch(4, seed=2))
    np.testing.assert_array_equal(first, kept)


def test_openvino_refuses_missing_or_unknown_inputs(models):
    session = load(models["mlp"], runtime="openvino")
    with pytest.raises(ValueError, match="expected inputs"):
        session.infer({})
    with pytest.raises(ValueError, match="expected inputs"):
        session.infer({"input": _batch(1)["input"], "extra": _batch(1)["input"]})


def test_openvino_auto_device_reports_the_real_one(models):
    session = load(models["mlp"], runtime="openvino", options=LoadOptions(device="AUTO"))
    assert session.device == "AUTO"
    assert session.execution_devices == ["CPU"]


# --- LiteRT ----------------------------------------------------------------------------------


def test_litert_metadata(models):
    session = load(models["mlp-tflite"], options=LoadOptions(threads=1))
    assert session.runtime == "litert"
    assert session.device == "CPU"
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 64))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 10))]


def test_litert_matches_numpy(models):
    session = load(models["mlp-tflite"])
    inputs = samples.sample_input("mlp-tflite")
    expected = samples.reference_output("mlp-tflite", inputs)["output"]
    np.testing.assert_allclose(session.infer(inputs)["output"], expected, rtol=1e-6, atol=1e-6)


def test_litert_resizes_for_another_batch_and_back(models):
    session = load(models["mlp-tflite"])
    for rows in (3, 3, 16, 1):
        inputs = _batch(rows, seed=rows)
        output = session.infer(inputs)["output"]
        assert output.shape == (rows, 10)
        expected = samples.reference_output("mlp-tflite", inputs)["output"]
        np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)


def test_litert_refuses_a_shape_the_model_cannot_take(models):
    session = load(models["mlp-tflite"])
    with pytest.raises(ValueError, match=r"accepts \[-1, 64\]"):
        session.infer({"input": np.zeros((2, 63), np.float32)})
    # the session still works afterwards
    assert session.infer(_batch(2))["output"].shape == (2, 10)


def test_litert_outputs_are_not_overwritten_by_the_next_call(models):
    session = load(models["mlp-tflite"])
    first = session.infer(_batch(2, seed=1))["output"]
    kept = first.copy()
    session.infer(_batch(2, seed=2))
    np.testing.assert_array_equal(first, kept)


# --- every runtime --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "runtime"),
    [("mlp", "onnxruntime"), ("mlp", "openvino"), ("mlp-tflite", "litert")],
)
def test_read_only_inputs_are_accepted(models, model, runtime):
    """Binary request bodies decode to read-only arrays (np.frombuffer)."""
    data = _batch(3)["input"]
    read_only = np.frombuffer(data.tobytes(), dtype=np.float32).reshape(data.shape)
    assert not read_only.flags.writeable
    session = load(models[model], runtime=runtime)
    expected = samples.reference_output(model, {"input": data})["output"]
    np.testing.assert_allclose(session.infer({"input": read_only})["output"], expected, atol=1e-5)


# --- bad files and options -------------------------------------------------------------------


READERS = [
    ("model.onnx", "onnxruntime"),
    ("model.onnx", "openvino"),
    ("model.xml", "openvino"),
    ("model.tflite", "litert"),
    ("model.tflite", "openvino"),
]


@pytest.mark.parametrize(("filename", "runtime"), READERS)
def test_garbage_bytes_raise_model_load_error(tmp_path, filename, runtime):
    path = tmp_path / filename
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    if filename.endswith(".xml"):
        path.with_suffix(".bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match=filename):
        load(path, runtime=runtime)


@pytest.mark.parametrize(("filename", "runtime"), READERS)
def test_empty_files_raise_model_load_error(tmp_path, filename, runtime):
    path = tmp_path / filename
    path.write_bytes(b"")
    if filename.endswith(".xml"):
        path.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=filename):
        load(path, runtime=runtime)


@pytest.mark.parametrize(
    ("filename", "runtime"), [("model.onnx", "openvino"), ("model.tflite", "litert")]
)
def test_missing_files_raise_model_load_error(tmp_path, filename, runtime):
    with pytest.raises(ModelLoadError, match="no such model file"):
        load(tmp_path / filename, runtime=runtime)


def test_ir_without_its_weights_names_the_bin_file(tmp_path, models):
    xml = tmp_path / "model.xml"
    xml.write_bytes(models["cnn-openvino"].read_bytes())
    with pytest.raises(ModelLoadError, match=r"model\.bin"):
        load(xml)


def test_unknown_suffix_is_unsupported(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(UnsupportedModel, match=r"unknown model format.*\.onnx"):
        load(path)


def test_runtime_that_cannot_read_the_format_is_unsupported(models):
    with pytest.raises(UnsupportedModel, match=r"litert cannot read \.xml"):
        load(models["cnn-openvino"], runtime="litert")


@pytest.mark.parametrize(
    ("model", "runtime", "device"),
    [
        ("mlp", "onnxruntime", "GPU"),
        ("mlp", "openvino", "GPU"),
        ("mlp", "openvino", "NPU"),
        ("mlp", "openvino", "AUTO:GPU,CPU"),
        ("mlp-tflite", "litert", "GPU"),
    ],
)
def test_unavailable_device_raises_model_load_error(models, model, runtime, device):
    with pytest.raises(ModelLoadError, match=device.split(":")[-1].split(",")[0]):
        load(models[model], runtime=runtime, options=LoadOptions(device=device))


def test_openvino_device_error_lists_the_available_devices(models):
    with pytest.raises(ModelLoadError, match="available: CPU"):
        load(models["mlp"], runtime="openvino", options=LoadOptions(device="GPU"))


def test_openvino_bad_property_is_a_load_error_without_source_locations(models):
    options = LoadOptions(extra={"PERFORMANCE_HINT": "FASTEST"})
    with pytest.raises(ModelLoadError, match="PERFORMANCE_HINT") as caught:
        load(models["mlp"], runtime="openvino", options=options)
    assert "Exception from src/" not in str(caught.value)


# --- discovery and lazy imports --------------------------------------------------------------


def test_discover_lists_every_runtime_on_this_node():
    found = discover()
    pairs = {(d.runtime, d.device) for d in found}
    assert {("onnxruntime", "CPU"), ("openvino", "CPU"), ("litert", "CPU")} <= pairs
    assert not any("Azure" in d.device for d in found)
    by_pair = {(d.runtime, d.device): d for d in found}
    assert by_pair["openvino", "CPU"].details["FULL_DEVICE_NAME"]
    assert by_pair["onnxruntime", "CPU"].details["provider"] == "CPUExecutionProvider"
    json.dumps([d.details for d in found])  # reportable as is


def test_runtime_device_identity_ignores_details():
    a = RuntimeDevice("openvino", "CPU", {"FULL_DEVICE_NAME": "x"})
    b = RuntimeDevice("openvino", "CPU", {"FULL_DEVICE_NAME": "y"})
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.device = "GPU"


def test_discover_leaves_out_a_runtime_that_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    runtimes_found = {d.runtime for d in discover()}
    assert "openvino" not in runtimes_found
    assert {"onnxruntime", "litert"} <= runtimes_found


def test_loading_onnx_does_not_import_other_runtimes(models):
    script = (
        "import sys, numpy as np, runtimes\n"
        f"session = runtimes.load({str(models['mlp'])!r})\n"
        "session.infer({'input': np.zeros((2, 64), np.float32)})\n"
        "print(sorted(m for m in ('openvino', 'ai_edge_litert', 'tflite_runtime') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_package_exports_the_loader():
    assert runtimes.load is load
    assert set(runtimes.RUNTIMES) == {"onnxruntime", "openvino", "litert"}


# --- LiteRT delegates (Coral Edge TPU, GPU, NPU libraries) ---------------------------------------


def test_litert_delegate_libraries_are_discovered(tmp_path, monkeypatch):
    from runtimes import litert
    from runtimes.discovery import discover

    monkeypatch.setenv(litert.DELEGATE_PATH_ENV, str(tmp_path))
    assert "EDGETPU" not in litert.delegates() or litert.delegates()["EDGETPU"].parent != tmp_path
    (tmp_path / "libedgetpu.so.1").write_bytes(b"\x7fELF not really")
    assert litert.delegates()["EDGETPU"] == tmp_path / "libedgetpu.so.1"
    assert "EDGETPU" in litert.devices()
    found = {(d.runtime, d.device): d for d in discover()}
    assert found[("litert", "EDGETPU")].details["delegate"] == str(tmp_path / "libedgetpu.so.1")
    assert ("litert", "CPU") in found


# ai_edge_litert's Delegate.__del__ trips over its own failed construction (an upstream wart):
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_litert_refuses_a_delegate_device_it_cannot_load(tmp_path, monkeypatch, sample_repo):
    from runtimes import litert

    model = sample_repo / "mlp-tflite" / "1" / "model.tflite"
    monkeypatch.setenv(litert.DELEGATE_PATH_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="no delegate library found"):
        load(model, options=LoadOptions(device="NPU"))
    (tmp_path / "libvx_delegate.so").write_bytes(b"garbage, not a shared library")
    with pytest.raises(ModelLoadError, match="could not load the NPU delegate"):
        load(model, options=LoadOptions(device="NPU"))
    assert load(model).infer({"input": np.zeros((1, 64), np.float32)})["output"].shape == (1, 10)


# --- several callers at once (model.toml `instances`), and what the runtimes disagree on ----------


@pytest.mark.parametrize(
    ("model", "runtime"),
    [("mlp", "onnxruntime"), ("mlp", "openvino"), ("mlp-tflite", "litert")],
)
def test_concurrent_callers_each_get_their_own_answer(models, model, runtime):
    """The scheduler runs `instances` workers on one session: no caller may get another's rows
    (OpenVINO shared one infer request, LiteRT one interpreter, between threads)."""
    session = load(models[model], runtime=runtime)
    cases = [_batch(rows, seed=rows) for rows in (1, 1, 2, 3)]  # LiteRT also resizes
    expected = [samples.reference_output(model, case)["output"] for case in cases]
    start = threading.Barrier(len(cases))
    wrong: list[str] = []

    def call(number: int) -> None:
        start.wait()
        for _ in range(150):
            try:
                output = session.infer(cases[number])["output"]
            except Exception as exc:  # "Infer Request is busy": a wrong answer too
                wrong.append(f"{type(exc).__name__}: {exc}")
                continue
            if output.shape != expected[number].shape or not np.allclose(
                output, expected[number], atol=1e-5
            ):
                wrong.append(f"caller {number} got rows of shape {output.shape}")

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(cases))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: between one caller's set and its run
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


def _onnx_file(path: Path, nodes, inputs, outputs) -> Path:
    """A small ONNX model; nodes: (op, inputs, outputs); inputs, outputs: (name, type, shape)."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ins, outs) for op, ins, outs in nodes],
        "test",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _tflite_file(path: Path, tensors, operators, inputs, outputs) -> Path:
    """A small .tflite model, as agent/samples.py builds one. tensors: (name, shape, signature or
    None, tflite.TensorType); operators: (tflite.BuiltinOperator, inputs, outputs) by index."""
    import flatbuffers
    import tflite

    b = flatbuffers.Builder(1024)

    def vector(start, offsets):
        start(b, len(offsets))
        for offset in reversed(offsets):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()

    def ints(values):
        return b.CreateNumpyVector(np.array(values, dtype=np.int32))

    buffers = []
    for _ in range(len(tensors) + 1):  # buffer 0 is the empty one by convention
        tflite.BufferStart(b)
        buffers.append(tflite.BufferEnd(b))
    tensor_offsets = []
    for number, (name, shape, signature, tensor_type) in enumerate(tensors):
        name_offset, shape_offset = b.CreateString(name), ints(shape)
        signature_offset = ints(signature) if signature is not None else None
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_offset)
        if signature_offset is not None:
            tflite.TensorAddShapeSignature(b, signature_offset)
        tflite.TensorAddType(b, tensor_type)
        tflite.TensorAddBuffer(b, number + 1)
        tflite.TensorAddName(b, name_offset)
        tensor_offsets.append(tflite.TensorEnd(b))
    codes = sorted({op for op, _, _ in operators})
    operator_offsets = []
    for op, op_inputs, op_outputs in operators:
        inputs_offset, outputs_offset = ints(op_inputs), ints(op_outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op))
        tflite.OperatorAddInputs(b, inputs_offset)
        tflite.OperatorAddOutputs(b, outputs_offset)
        operator_offsets.append(tflite.OperatorEnd(b))
    code_offsets = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))
    subgraph_tensors = vector(tflite.SubGraphStartTensorsVector, tensor_offsets)
    subgraph_inputs, subgraph_outputs = ints(inputs), ints(outputs)
    subgraph_operators = vector(tflite.SubGraphStartOperatorsVector, operator_offsets)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, subgraph_tensors)
    tflite.SubGraphAddInputs(b, subgraph_inputs)
    tflite.SubGraphAddOutputs(b, subgraph_outputs)
    tflite.SubGraphAddOperators(b, subgraph_operators)
    subgraph = tflite.SubGraphEnd(b)
    operator_codes = vector(tflite.ModelStartOperatorCodesVector, code_offsets)
    subgraphs = vector(tflite.ModelStartSubgraphsVector, [subgraph])
    model_buffers = vector(tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, operator_codes)
    tflite.ModelAddSubgraphs(b, subgraphs)
    tflite.ModelAddBuffers(b, model_buffers)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


@pytest.mark.parametrize("datatype", ["INT64", "UINT64"])
def test_openvino_refuses_64_bit_integers_it_would_compute_in_32_bits(tmp_path, datatype):
    from onnx import TensorProto

    element = {"INT64": TensorProto.INT64, "UINT64": TensorProto.UINT64}[datatype]
    dtype = np.int64 if datatype == "INT64" else np.uint64
    path = _onnx_file(
        tmp_path / "add.onnx",
        [("Add", ["x", "x"], ["y"])],
        [("x", element, ["batch", 3])],
        [("y", element, ["batch", 3])],
    )
    session = load(path, runtime="openvino")
    assert session.inputs == [TensorSpec("x", datatype, (-1, 3))]
    small = np.array([[0, 7, 2**30 - 1]], dtype)
    np.testing.assert_array_equal(session.infer({"x": small})["y"], small + small)
    assert session.infer({"x": np.zeros((0, 3), dtype)})["y"].shape == (0, 3)
    large = np.array([[1, 2**40 + 1, 2]], dtype)  # OpenVINO answered 2 for 2**40+1 + itself
    with pytest.raises(ValueError, match=rf"input 'x' holds {2**40 + 1}: .*{datatype} in 32 bits"):
        session.infer({"x": large})
    if datatype == "INT64":
        with pytest.raises(ValueError, match=rf"holds {-(2**31) - 1}"):
            session.infer({"x": np.array([[-(2**31) - 1, 0, 0]], dtype)})
    np.testing.assert_array_equal(load(path).infer({"x": large})["y"], large + large)


def test_a_64_bit_value_openvino_refuses_is_bad_input_not_a_server_error(tmp_path):
    """Served, the refusal is the client's 400 (InputRejected), not a 500."""
    import tritonclient.http as httpclient
    from onnx import TensorProto
    from tritonclient.utils import InferenceServerException

    from agent.serving.server import ServeOptions
    from tests.conftest import ServerThread

    version_dir = tmp_path / "add64" / "1"
    version_dir.mkdir(parents=True)
    _onnx_file(
        version_dir / "model.onnx",
        [("Add", ["x", "x"], ["y"])],
        [("x", TensorProto.INT64, ["batch", 3])],
        [("y", TensorProto.INT64, ["batch", 3])],
    )
    (version_dir / "model.toml").write_text('runtime = "openvino"\nmax_batch_size = 8\n')
    options = ServeOptions(tmp_path, "127.0.0.1:0", None, None)
    with ServerThread(options) as server, httpclient.InferenceServerClient(server.http_url) as c:
        x = httpclient.InferInput("x", [1, 3], "INT64")
        x.set_data_from_numpy(np.array([[1, 2**40 + 1, 2]], np.int64))
        with pytest.raises(InferenceServerException, match="OpenVINO computes INT64") as err:
            c.infer("add64", [x])
        assert err.value.status() == "400"
        x.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        np.testing.assert_array_equal(c.infer("add64", [x]).as_numpy("y"), [[2, 4, 6]])


def test_a_scalar_input_runs_on_every_runtime(tmp_path):
    import tflite
    from onnx import TensorProto

    onnx_path = _onnx_file(
        tmp_path / "double.onnx",
        [("Add", ["x", "x"], ["y"])],
        [("x", TensorProto.FLOAT, [])],
        [("y", TensorProto.FLOAT, [])],
    )
    float32 = tflite.TensorType.FLOAT32
    tflite_path = _tflite_file(
        tmp_path / "double.tflite",
        [("x", [], None, float32), ("y", [], None, float32)],
        [(tflite.BuiltinOperator.ADD, [0, 0], [1])],
        [0],
        [1],
    )
    x = np.array(1.5, np.float32)
    for path, runtime in (
        (onnx_path, "onnxruntime"),
        (onnx_path, "openvino"),
        (tflite_path, "litert"),
    ):
        session = load(path, runtime=runtime)
        assert session.inputs == [TensorSpec("x", "FP32", ())], runtime
        y = session.infer({"x": x})["y"]
        assert isinstance(y, np.ndarray) and y.shape == () and y == 3.0, runtime


def test_openvino_names_outputs_as_the_onnx_graph_does(tmp_path):
    """OpenVINO folds the Identity: its output tensor is called both 'hidden' and 'y'."""
    from onnx import TensorProto

    path = _onnx_file(
        tmp_path / "model.onnx",
        [("Relu", ["x"], ["hidden"]), ("Identity", ["hidden"], ["y"])],
        [("x", TensorProto.FLOAT, ["batch", 3])],
        [("y", TensorProto.FLOAT, ["batch", 3])],
    )
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    for runtime in ("onnxruntime", "openvino"):
        session = load(path, runtime=runtime)
        assert [o.name for o in session.outputs] == ["y"], runtime
        np.testing.assert_array_equal(session.infer({"x": x})["y"], [[0.0, 0.0, 2.0]])


@pytest.fixture
def litert_strings(tmp_path) -> Path:
    """A .tflite model whose output is its input: BYTES [-1, 3]."""
    import tflite

    return _tflite_file(
        tmp_path / "strings.tflite",
        [("x", [1, 3], [-1, 3], tflite.TensorType.STRING)],
        [],
        [0],
        [0],
    )


def test_litert_keeps_trailing_nul_bytes_of_bytes_inputs(litert_strings):
    session = load(litert_strings)
    x = np.array([[b"a\x00", b"\x00\x00", b""]], dtype=object)
    assert session.infer({"x": x})["x"].tolist() == x.tolist()


def test_litert_resizes_a_string_input_for_every_batch_size(litert_strings):
    session = load(litert_strings)
    assert session.inputs == [TensorSpec("x", "BYTES", (-1, 3))]
    for rows in (1, 2, 3, 1):
        x = np.array([[b"%d" % r, b"b", b"c"] for r in range(rows)], dtype=object)
        assert session.infer({"x": x})["x"].tolist() == x.tolist()
