"""Model files and model.toml files that would take the agent down: one bad version, not all.

A model file that crashes its runtime is tried in a child process first; a model.toml that is a
FIFO or a device is refused; reading the repository never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.samples import sample_input
from agent.selection import sandbox as sandbox_module
from agent.serving.dataplane import DataPlane, TrialLoads
from agent.serving.repository import ModelRepository
from agent.serving.server import ServeOptions
from runtimes.base import LoadOptions
from tests.conftest import LoopThread, ServerThread
from tests.test_serve_command import rest_port, start_agent, stop, wait_for_log


def write_crashing_tflite(sample_repo, path) -> None:
    """The sample MLP as .tflite with two bytes of its flatbuffer zeroed: LiteRT, which has no
    flatbuffer verifier, dies of SIGSEGV loading it."""
    data = bytearray((sample_repo / "mlp-tflite" / "1" / "model.tflite").read_bytes())
    data[130] = data[132] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def write_tflite_that_crashes_when_run(sample_repo, path) -> None:
    """The sample MLP as .tflite whose subgraph input is its weights tensor: LiteRT loads it,
    then dies of SIGSEGV writing an input into the read-only weights on the first run."""
    import tflite

    data = bytearray((sample_repo / "mlp-tflite" / "1" / "model.tflite").read_bytes())
    graph = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)
    names = [graph.Tensors(i).Name() for i in range(graph.TensorsLength())]
    graph.InputsAsNumpy()[0] = names.index(b"weights")  # a view into `data`
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


@pytest.fixture
def repo_with_crashing_tflite(sample_repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(sample_repo / "mlp", root / "mlp")
    write_crashing_tflite(sample_repo, root / "bad" / "1" / "model.tflite")
    return root


def index(client) -> dict[str, dict]:
    return {e["name"]: e for e in client.get_model_repository_index()}


def infer_mlp(client):
    x = sample_input("mlp")["input"]
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("mlp", [inp]).as_numpy("output")


# The agent runs as its own process: a regression segfaults it, not the test run.
@pytest.mark.parametrize("select", [False, True], ids=["no-select", "pinned"])
def test_a_model_file_that_crashes_its_runtime_makes_only_its_version_unavailable(
    repo_with_crashing_tflite, tmp_path, select
):
    argv = ["--models", str(repo_with_crashing_tflite)]
    if select:  # selection on, but model.toml leaves it nothing to choose: loaded in the agent
        pin = 'runtime = "litert"\ndevice = "CPU"\n'
        (repo_with_crashing_tflite / "bad" / "1" / "model.toml").write_text(pin)
        argv += ["--select", "--profile", "generic-cpu"]
    env = {"EDGEFLEET_STATE_DIR": str(tmp_path / "state")}
    proc, log = start_agent(*argv, env=env)
    try:
        text = wait_for_log(proc, log, r"serving REST")
        # the trial process has ended: it holds no memory while the agent serves
        assert psutil.Process(proc.pid).children(recursive=True) == []
        with httpclient.InferenceServerClient(f"127.0.0.1:{rest_port(text)}") as client:
            bad = index(client)["bad"]
            assert bad["state"] == "UNAVAILABLE"
            assert "the runtime crashed loading model.tflite (signal 11)" in bad["reason"]
            assert infer_mlp(client).shape == (1, 10)
            # a reload through the repository API is tried the same way
            shutil.copytree(repo_with_crashing_tflite / "bad", repo_with_crashing_tflite / "bad2")
            with pytest.raises(InferenceServerException, match=r"crashed loading model\.tflite"):
                client.load_model("bad2")
            assert infer_mlp(client).shape == (1, 10)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_a_model_file_that_crashes_its_first_run_makes_only_its_version_unavailable(
    sample_repo, tmp_path
):
    root = tmp_path / "models"
    shutil.copytree(sample_repo / "mlp", root / "mlp")
    write_tflite_that_crashes_when_run(sample_repo, root / "bad" / "1" / "model.tflite")
    proc, log = start_agent("--models", str(root), "--no-select")
    try:
        text = wait_for_log(proc, log, r"serving REST")
        with httpclient.InferenceServerClient(f"127.0.0.1:{rest_port(text)}") as client:
            bad = index(client)["bad"]
            assert bad["state"] == "UNAVAILABLE"
            assert (
                "the runtime crashed running model.tflite once on random inputs (signal 11)"
                in bad["reason"]
            )
            # its input (the weights tensor, [10, 64]) is never written to in the agent
            assert client.is_model_ready("bad") is False
            assert infer_mlp(client).shape == (1, 10)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_a_clean_error_on_the_trial_run_is_not_held_against_the_file(tmp_path):
    """Random inputs can be outside a model's domain: token ids past a vocabulary make a
    Gather fail cleanly in the trial run, and the model still loads and serves good ids."""
    import onnx
    from onnx import TensorProto, helper

    vocabulary = np.arange(12, dtype=np.float32).reshape(2, 6)  # two rows: ids 0 and 1
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor("table", TensorProto.FLOAT, [2, 6], vocabulary.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "lookup" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, path)
    options = ServeOptions(models=tmp_path, http="127.0.0.1:0", grpc=None)
    with ServerThread(options) as server, httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready("lookup")  # its trial run (ids drawn from 0..7) failed cleanly
        ids = httpclient.InferInput("ids", [3], "INT64")
        ids.set_data_from_numpy(np.array([1, 0, 1], dtype=np.int64))
        rows = c.infer("lookup", [ids]).as_numpy("rows")
        np.testing.assert_array_equal(rows, vocabulary[[1, 0, 1]])


def test_a_file_that_passed_its_trial_is_not_tried_again(sample_repo, tmp_path, monkeypatch):
    model = sample_repo / "mlp" / "1" / "model.onnx"
    with_options = LoadOptions(threads=1)  # options no other test's trial used
    trials = TrialLoads()
    try:
        trials.check(model, None, with_options)
    finally:
        trials.close()

    class NoWorker:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a file that passed its trial must not start a trial process")

    monkeypatch.setattr(sandbox_module, "Sandbox", NoWorker)
    copy = tmp_path / "model.onnx"  # same content elsewhere, as a reload or a new version
    shutil.copy(model, copy)
    TrialLoads().check(copy, "onnxruntime", with_options)
    with pytest.raises(AssertionError, match="must not start"):
        TrialLoads().check(copy, "onnxruntime", LoadOptions(threads=2))


def test_trial_loads_import_only_the_sandbox_of_the_selection_package(sample_repo, tmp_path):
    """The trial child is the selection worker, but the serving agent needs only its sandbox:
    the rest of the selection package (SQLite decision cache, profiles, packages) cost it ~7 MiB
    of RSS when a trial load imported the package whole."""
    shutil.copytree(sample_repo / "mlp", tmp_path / "models" / "mlp")
    code = f"""
import asyncio, sys
from pathlib import Path
from agent.serving.server import ServeOptions, start

async def main():
    server = await start(ServeOptions(models=Path({str(tmp_path / "models")!r}), http=None,
                                      grpc=None, socket=Path({str(tmp_path / "s")!r})))
    states = server.dataplane.repository_index()
    await server.stop()
    return states

assert [(e.name, e.state) for e in asyncio.run(main())] == [("mlp", "READY")]
assert "agent.selection.sandbox" in sys.modules  # the model was tried in a child
# the child, its messages and the checks of its replies
wire = {"agent.selection.sandbox", "agent.selection.worker", "agent.selection.replies"}
unwanted = sorted(m for m in sys.modules if m.startswith(("agent.selection.", "sqlite_utils"))
                  and m not in wire)
assert not unwanted, unwanted
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)  # a regression blocks the start for good: fail, do not hang
def test_a_model_toml_that_is_a_fifo_makes_only_its_version_unavailable(sample_repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(sample_repo / "mlp", root / "mlp")
    shutil.copytree(sample_repo / "mlp", root / "aaa")  # loads first
    fifo = root / "aaa" / "1" / "model.toml"
    fifo.unlink()
    os.mkfifo(fifo)
    options = ServeOptions(root, "127.0.0.1:0", None, None)
    with ServerThread(options) as server, httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_server_live()
        aaa = index(c)["aaa"]
        assert aaa["state"] == "UNAVAILABLE"
        assert "model.toml: not a regular file" in aaa["reason"]
        assert c.is_model_ready("mlp")
        assert infer_mlp(c).shape == (1, 10)


class SlowDisk(ModelRepository):
    """A repository whose version directories take until `release` is set to read."""

    def __init__(self, root):
        super().__init__(root)
        self.reading = threading.Event()
        self.release = threading.Event()

    def source(self, name, version):
        self.reading.set()
        self.release.wait(30)
        return super().source(name, version)


@pytest.mark.timeout(60)
def test_the_event_loop_keeps_answering_while_the_repository_is_read(sample_repo):
    repository = SlowDisk(sample_repo)
    dataplane = DataPlane(repository)
    loop = LoopThread()
    loop.start_loop()
    try:
        starting = asyncio.run_coroutine_threadsafe(dataplane.start(), loop.loop)
        assert repository.reading.wait(30)

        async def live() -> bool:
            return dataplane.live()

        assert loop.call(live(), timeout=5)  # a blocked loop would not run this
        assert not dataplane.ready()
        repository.release.set()
        starting.result(60)
        assert dataplane.model_ready("mlp")
        loop.call(dataplane.stop())
    finally:
        repository.release.set()
        loop.stop_loop()
