"""Model repository layout, versions, and the repository extension (index, load, unload)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.samples import sample_input
from agent.serving.config import ModelConfig, ModelConfigError
from agent.serving.dataplane import DataPlane
from agent.serving.errors import ModelLoadFailed, ModelNotFound
from agent.serving.repository import ModelRepository, RepositoryError
from agent.serving.server import ServeOptions
from tests.conftest import LoopThread, ServerThread


def _infer(client, model, version=""):
    x = sample_input("mlp")["input"]
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], model_version=version)


@pytest.fixture
def client(private_agent):
    with httpclient.InferenceServerClient(private_agent.http_url) as c:
        yield c


def test_readiness_follows_unload_and_load(client):
    assert client.is_model_ready("mlp")
    client.unload_model("mlp")
    assert not client.is_model_ready("mlp")
    assert client.is_server_ready()  # unloaded on purpose: the node is still ready
    with pytest.raises(InferenceServerException, match="not ready"):
        _infer(client, "mlp")
    index = {(e["name"], e.get("version")): e for e in client.get_model_repository_index()}
    assert index[("mlp", "1")]["state"] == "UNAVAILABLE"
    assert index[("mlp", "1")]["reason"] == "unloaded"
    client.load_model("mlp")
    assert client.is_model_ready("mlp")
    assert client.is_server_ready()
    assert _infer(client, "mlp").as_numpy("output").shape == (1, 10)


def test_a_model_that_fails_to_load_makes_the_server_unready(client, private_repo):
    (private_repo / "cnn" / "1" / "model.toml").write_text("threads = 0\n")
    client.unload_model("cnn")
    with pytest.raises(InferenceServerException, match="threads"):
        client.load_model("cnn")
    assert not client.is_server_ready()
    (private_repo / "cnn" / "1" / "model.toml").unlink()
    client.load_model("cnn")
    assert client.is_server_ready()


def test_index_lists_every_model_and_ready_filter(client, private_agent):
    names = {e["name"] for e in client.get_model_repository_index()}
    assert names == {"mlp", "cnn", "cnn-openvino", "mlp-tflite"}
    client.unload_model("cnn")
    ready = {e.name for e in private_agent.dataplane.repository_index(ready_only=True)}
    assert "cnn" not in ready and "mlp" in ready


def test_every_version_addressable_latest_by_default(client, private_repo):
    shutil.copytree(private_repo / "mlp" / "1", private_repo / "mlp" / "2")
    shutil.copytree(private_repo / "mlp" / "1", private_repo / "mlp" / "10")
    client.load_model("mlp")
    md = client.get_model_metadata("mlp")
    assert md["versions"] == ["1", "2", "10"]
    assert _infer(client, "mlp").get_response()["model_version"] == "10"
    assert _infer(client, "mlp", "2").get_response()["model_version"] == "2"
    assert client.is_model_ready("mlp", "1")
    # a version removed from disk goes away on the next load
    shutil.rmtree(private_repo / "mlp" / "10")
    client.load_model("mlp")
    assert _infer(client, "mlp").get_response()["model_version"] == "2"
    with pytest.raises(InferenceServerException, match="not found"):
        _infer(client, "mlp", "10")


def test_only_ascii_digit_directories_are_versions(tmp_path):
    for name in ("1", "10", "2", "²", "٣", "v3"):  # "²" and "٣" pass str.isdigit()
        (tmp_path / "mlp" / name).mkdir(parents=True)
    assert ModelRepository(tmp_path).versions("mlp") == ["1", "2", "10"]


def test_a_directory_name_ending_in_a_newline_is_no_model(tmp_path):
    for name in ("mlp", "cnn\n"):  # `$` alone would match before the newline
        (tmp_path / name / "1").mkdir(parents=True)
    repository = ModelRepository(tmp_path)
    assert repository.model_names() == ["mlp"]
    with pytest.raises(RepositoryError):
        repository.versions("cnn\n")


def test_a_stray_unicode_digit_directory_does_not_stop_serving(private_repo):
    (private_repo / "mlp" / "²").mkdir()
    options = ServeOptions(private_repo, "127.0.0.1:0", None, None)
    with ServerThread(options) as server, httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready("mlp")
        assert c.get_model_metadata("mlp")["versions"] == ["1"]


def test_model_added_at_runtime_loads(client, private_repo):
    shutil.copytree(private_repo / "mlp", private_repo / "mlp-copy")
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("mlp-copy")
    client.load_model("mlp-copy")
    assert client.is_model_ready("mlp-copy")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("max_batch_size = 'many'\n", "max_batch_size must be an integer"),
        ("batch = 4\n", "unknown key 'batch'"),
        ("max_batch_size = [\n", "model.toml"),
        ("max_queue_size = 0\n", "max_queue_size"),
        ("runtime = 'tensorflow'\n", "unknown runtime"),
        ("runtime = 'litert'\n", "cannot read .onnx"),
        ("device = 'NPU'\n", "NPU"),
        ("idle_spin = 'yes'\n", "idle_spin must be true or false"),
        ("max_batch_size = " + "[" * 100_000 + "]" * 100_000 + "\n", "recursion"),  # was a crash
    ],
)
def test_bad_model_config_marks_version_unavailable_with_reason(
    client, private_repo, private_agent, content, reason
):
    (private_repo / "mlp" / "1" / "model.toml").write_text(content)
    client.unload_model("mlp")
    with pytest.raises(InferenceServerException, match="failed to load"):
        client.load_model("mlp")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "mlp")
    assert entry.state == "UNAVAILABLE"
    assert reason in entry.reason
    assert not client.is_model_ready("mlp")
    assert client.is_model_ready("cnn")  # the others keep serving


def test_failed_reload_keeps_the_working_copy_serving(client, private_repo, private_agent):
    (private_repo / "mlp" / "1" / "model.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InferenceServerException, match="could not load"):
        client.load_model("mlp")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "mlp")
    assert entry.state == "READY" and "reload failed" in entry.reason
    assert _infer(client, "mlp").as_numpy("output").shape == (1, 10)


def test_broken_model_file_is_reported(client, private_repo, private_agent):
    (private_repo / "cnn" / "1" / "model.onnx").write_bytes(b"\x00garbage" * 100)
    client.unload_model("cnn")
    with pytest.raises(InferenceServerException, match="could not load"):
        client.load_model("cnn")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "cnn")
    assert entry.state == "UNAVAILABLE" and "could not load" in entry.reason


def test_version_dir_layout_errors(client, private_repo, private_agent):
    two = private_repo / "mlp" / "1"
    shutil.copy(private_repo / "mlp-tflite" / "1" / "model.tflite", two / "model.tflite")
    client.unload_model("mlp")
    with pytest.raises(InferenceServerException, match="more than one model file"):
        client.load_model("mlp")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "mlp")
    assert "more than one model file" in entry.reason
    (private_repo / "cnn-openvino" / "1" / "model.bin").unlink()
    client.unload_model("cnn-openvino")
    with pytest.raises(InferenceServerException, match=r"without its \.bin"):
        client.load_model("cnn-openvino")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "cnn-openvino")
    assert "without its .bin" in entry.reason


def test_batching_needs_a_dynamic_batch_dimension(client, private_repo, private_agent):
    (private_repo / "cnn" / "1" / "model.toml").write_text("max_batch_size = 8\n")
    client.unload_model("cnn")
    with pytest.raises(InferenceServerException, match="dynamic first"):
        client.load_model("cnn")
    entry = next(e for e in private_agent.dataplane.repository_index() if e.name == "cnn")
    assert "dynamic first (batch) dimension" in entry.reason


def test_model_config_limits():
    with pytest.raises(ModelConfigError, match="need max_batch_size > 0"):
        ModelConfig.from_dict({"max_queue_delay_us": 10})
    with pytest.raises(ModelConfigError, match="exceeds max_batch_size"):
        ModelConfig.from_dict({"max_batch_size": 4, "preferred_batch_sizes": [8]})
    with pytest.raises(ModelConfigError, match="integer"):
        ModelConfig.from_dict({"threads": True})
    cfg = ModelConfig.from_dict({"max_batch_size": 8, "preferred_batch_sizes": [4, 2, 4]})
    assert cfg.preferred_batch_sizes == (2, 4)


@pytest.mark.timeout(60)  # a regression reads /dev/zero until memory runs out, or waits forever
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
        (lambda p: p.symlink_to(p.parent / "gone.toml"), "No such file"),
        (lambda p: p.write_text("# padding\n" * 110_000), "larger than 1 MiB"),
    ],
    ids=["dev-zero", "dangling-link", "oversized"],
)
def test_a_model_toml_that_is_no_small_file_is_refused(private_repo, make, reason):
    config = private_repo / "mlp" / "1" / "model.toml"
    config.unlink()
    make(config)
    with pytest.raises(RepositoryError, match=reason):
        ModelRepository(private_repo).source("mlp", "1")


def _states(agent) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e.name, e.version): (e.state, e.reason) for e in agent.dataplane.repository_index()}


def test_a_model_directory_without_versions_does_not_stop_the_start(private_repo):
    (private_repo / "empty").mkdir()
    options = ServeOptions(private_repo, "127.0.0.1:0", None, None)
    with ServerThread(options) as server, httpclient.InferenceServerClient(server.http_url) as c:
        assert _states(server)[("empty", "")] == (
            "UNAVAILABLE",
            "model 'empty' has no numeric version directory",
        )
        assert _infer(c, "mlp").as_numpy("output").shape == (1, 10)


class _VanishingVersion(ModelRepository):
    """A repository whose version 9 of `mlp` is deleted between listing and loading it."""

    def versions(self, name: str) -> list[str]:
        found = super().versions(name)
        return [*found, "9"] if name == "mlp" else found


def test_a_version_deleted_while_loading_is_unavailable_with_the_reason(private_repo):
    dataplane = DataPlane(_VanishingVersion(private_repo))
    loop = LoopThread()
    loop.start_loop()
    try:
        loop.call(dataplane.start())
        state = {(e.name, e.version): e for e in dataplane.repository_index()}
        assert state[("mlp", "1")].state == "READY"
        assert state[("mlp", "9")].state == "UNAVAILABLE"  # was LOADING for good
        assert "cannot read" in state[("mlp", "9")].reason
        with pytest.raises(ModelLoadFailed, match=r"version 9: cannot read .*No such file"):
            loop.call(dataplane.load_model("mlp"))  # was a FileNotFoundError: HTTP 500
        assert dataplane.model_ready("mlp", "1")
    finally:
        loop.call(dataplane.stop())
        loop.stop_loop()


@pytest.mark.parametrize("operation", ["load_model", "unload_model"])
def test_a_load_or_unload_whose_caller_leaves_still_finishes(private_agent, operation):
    """A gRPC client's deadline or reset cancels the call; the repository change must still
    end in a real state, not LOADING or UNLOADING for good."""
    dataplane = private_agent.dataplane

    busy, want = {
        "load_model": ("LOADING", ("READY", "")),
        "unload_model": ("UNLOADING", ("UNAVAILABLE", "unloaded")),
    }[operation]

    async def leave_early() -> None:
        task = asyncio.ensure_future(getattr(dataplane, operation)("mlp"))
        # Every turn of the loop, until the change is under way: a state changes only in a
        # turn, so none is missed (a load whose trial already passed is LOADING for a few ms).
        deadline = time.monotonic() + 30
        while dataplane._states["mlp"]["1"].state != busy:
            assert time.monotonic() < deadline and not task.done(), f"mlp never became {busy}"
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    private_agent.call(leave_early())
    deadline = time.monotonic() + 30
    while _states(private_agent)[("mlp", "1")] != want:
        assert time.monotonic() < deadline, _states(private_agent)[("mlp", "1")]
        time.sleep(0.05)
    assert dataplane.ready()


def test_a_model_deleted_from_disk_goes_on_load(client, private_agent, private_repo):
    shutil.rmtree(private_repo / "mlp-tflite")
    with pytest.raises(InferenceServerException, match="no model 'mlp-tflite'"):
        client.load_model("mlp-tflite")
    assert not any(name == "mlp-tflite" for name, _ in _states(private_agent))
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("mlp-tflite")
    # and a model whose last version directory went: unloaded, with the reason
    shutil.rmtree(private_repo / "cnn-openvino" / "1")
    with pytest.raises(InferenceServerException, match="no numeric version directory"):
        client.load_model("cnn-openvino")
    assert _states(private_agent)[("cnn-openvino", "")][1].endswith("no numeric version directory")
    assert not client.is_model_ready("cnn-openvino")
    assert client.is_server_ready()


def test_loads_and_unloads_of_unknown_names_leave_no_lock_behind(private_agent):
    async def many() -> None:
        for i in range(200):
            for operation in (
                private_agent.dataplane.load_model,
                private_agent.dataplane.unload_model,
            ):
                with contextlib.suppress(ModelNotFound):
                    await operation(f"nobody-{i}")

    private_agent.call(many())
    assert len(private_agent.dataplane._locks) == 0


def test_the_repository_index_reads_the_disk_off_the_event_loop(private_agent, client):
    threads = []
    repository = private_agent.dataplane.repository
    listing = repository.model_names

    def model_names():
        threads.append(threading.current_thread())
        return listing()

    repository.model_names = model_names
    assert any(e["name"] == "mlp" for e in client.get_model_repository_index())
    assert threads and private_agent._thread not in threads


def test_requests_to_a_model_that_is_not_ready_are_counted(client, private_agent):
    client.unload_model("mlp")
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="not ready"):
            _infer(client, "mlp")
    with pytest.raises(InferenceServerException, match="not found"):
        _infer(client, "nobody")  # not counted: any client could make up names
    registry = private_agent.dataplane.metrics.registry
    labels = {"model": "mlp", "version": "1", "reason": "ModelNotReady"}
    assert registry.get_sample_value("edgefleet_inference_request_failure_total", labels) == 3
    assert (
        registry.get_sample_value(
            "edgefleet_inference_request_failure_total",
            {"model": "nobody", "version": "", "reason": "ModelNotFound"},
        )
        is None
    )
