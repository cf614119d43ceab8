"""Serving on the measured choice: variants in one version directory, pins, stored decisions."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.samples import sample_input
from agent.serving.server import ServeOptions
from runtimes import load
from tests.conftest import ServerThread


@pytest.fixture(scope="module")
def variants_repo(sample_repo, tmp_path_factory):
    """mlp/1 holding the same MLP twice: ONNX and its OpenVINO IR."""
    import openvino as ov

    root = tmp_path_factory.mktemp("variants")
    version = root / "mlp" / "1"
    shutil.copytree(sample_repo / "mlp" / "1", version)
    ir = ov.convert_model(str(version / "model.onnx"))
    ov.save_model(ir, str(version / "model.xml"), compress_to_fp16=False)
    return root


def serve(repo, state_dir, select=True) -> ServerThread:
    options = ServeOptions(
        repo,
        "127.0.0.1:0",
        None,
        None,
        select=select,
        state_dir=state_dir,
        profile="generic-cpu",
    )
    return ServerThread(options)


def infer(url: str, model: str = "mlp"):
    x = sample_input("mlp")["input"]
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    with httpclient.InferenceServerClient(url) as client:
        return client.infer(model, [inp]).as_numpy("output"), client.get_model_metadata(model)


def test_serves_the_measured_choice_and_reuses_it_on_restart(variants_repo, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    want = load(variants_repo / "mlp" / "1" / "model.onnx").infer(sample_input("mlp"))["output"]
    with serve(variants_repo, tmp_path) as agent:
        got, md = infer(agent.http_url)
        chosen = agent.dataplane.model("mlp").model_file.name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert chosen in {"model.onnx", "model.xml"}
    assert md["platform"] in {"onnxruntime_onnx", "openvino_onnx", "openvino_xml"}
    assert "measured now" in caplog.text
    assert (tmp_path / "agent.db").exists()

    caplog.clear()
    with serve(variants_repo, tmp_path) as agent:
        assert agent.dataplane.model("mlp").model_file.name == chosen
        infer(agent.http_url)
    assert "stored decision" in caplog.text and "measured now" not in caplog.text


def test_model_toml_pins_the_runtime(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo, repo)
    (repo / "mlp" / "1" / "model.toml").write_text(
        'max_batch_size = 32\nruntime = "openvino"\nvariant = "model.xml"\n'
    )
    with serve(repo, tmp_path / "state") as agent:
        _, md = infer(agent.http_url)
    assert md["platform"] == "openvino_xml"


def test_selection_failure_is_reported_per_model(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo, repo)
    (repo / "mlp" / "1" / "model.toml").write_text('runtime = "litert"\n')
    with serve(repo, tmp_path / "state") as agent:
        (entry,) = agent.dataplane.repository_index()
        assert entry.state == "UNAVAILABLE"
        assert "no candidate" in entry.reason
        with pytest.raises(InferenceServerException, match="not ready"):
            infer(agent.http_url)


def test_bad_tolerance_table_is_a_clear_load_failure(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo, repo)
    (repo / "mlp" / "1" / "model.toml").write_text('[tolerance]\nFP32 = "loose"\n')
    with serve(repo, tmp_path / "state") as agent:
        (entry,) = agent.dataplane.repository_index()
    assert entry.state == "UNAVAILABLE" and "tolerance" in entry.reason


def test_without_selection_several_variants_need_a_pin(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo, repo)
    with serve(repo, None, select=False) as agent:
        (entry,) = agent.dataplane.repository_index()
        assert entry.state == "UNAVAILABLE"
        assert "name one with `variant`" in entry.reason
    (repo / "mlp" / "1" / "model.toml").write_text('variant = "model.xml"\n')
    with serve(repo, None, select=False) as agent:
        _, md = infer(agent.http_url)
    assert md["platform"] == "openvino_xml"


def test_a_full_pin_loads_directly_without_measuring(sample_repo, tmp_path, caplog):
    """What an update writes after its own selection and self-test: nothing left to choose."""
    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    shutil.copytree(sample_repo / "cnn", repo / "cnn")
    (repo / "cnn" / "1" / "model.toml").write_text(
        'runtime = "openvino"\ndevice = "CPU"\nhint = "THROUGHPUT"\nprecision = "f32"\n'
    )
    with serve(repo, tmp_path / "state") as agent:
        session = agent.dataplane.model("cnn").session
        assert session.runtime == "openvino"
        assert session.properties["PERFORMANCE_HINT"] == "THROUGHPUT"
        assert session.properties["INFERENCE_PRECISION_HINT"] == "f32"
    assert "measured now" not in caplog.text and "stored decision" not in caplog.text


def test_a_pin_to_an_unknown_precision_is_a_clear_load_failure(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo, repo)
    (repo / "mlp" / "1" / "model.toml").write_text('runtime = "openvino"\nprecision = "fp64"\n')
    with serve(repo, tmp_path / "state") as agent:
        (entry,) = agent.dataplane.repository_index()
    assert entry.state == "UNAVAILABLE"
    assert "precision must be one of f32, bf16, f16; got 'fp64'" in entry.reason


def _spins_after_a_run(agent) -> bool:
    options = agent.dataplane.model("mlp").session._session.get_session_options()
    return options.get_session_config_entry("session.force_spinning_stop") == "0"


@pytest.mark.parametrize("select", [True, False], ids=["selection", "no-selection"])
def test_idle_spin_reaches_the_session_with_and_without_selection(sample_repo, tmp_path, select):
    """model.toml's idle_spin is no choice selection makes: it applies to what selection picks."""
    repo = tmp_path / "repo"
    shutil.copytree(sample_repo / "mlp", repo / "mlp")
    toml = repo / "mlp" / "1" / "model.toml"
    toml.write_text('runtime = "onnxruntime"\n')
    with serve(repo, tmp_path / "state", select=select) as agent:
        assert not _spins_after_a_run(agent)
    toml.write_text('runtime = "onnxruntime"\nidle_spin = true\n')
    with serve(repo, tmp_path / "state", select=select) as agent:
        assert _spins_after_a_run(agent)
        infer(agent.http_url)
