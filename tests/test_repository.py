"""Model repository layout, versions, and the repository extension (index, load, unload)."""

from __future__ import annotations

import shutil

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.samples import sample_input
from agent.serving.config import ModelConfig, ModelConfigError
from agent.serving.repository import ModelRepository, RepositoryError
from agent.serving.server import ServeOptions
from tests.conftest import ServerThread


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
