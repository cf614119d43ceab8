"""The generated sample repository: layout, determinism, model contents and the CLI command."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent import samples
from agent.cli import UserError
from agent.commands import sample_models
from agent.serving.config import ModelConfig
from agent.serving.repository import ModelRepository

EXPECTED_FILES = [
    "mlp/1/model.onnx",
    "mlp/1/model.toml",
    "cnn/1/model.onnx",
    "cnn-openvino/1/model.xml",
    "cnn-openvino/1/model.bin",
    "mlp-tflite/1/model.tflite",
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    samples.write_sample_repository(root)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_writes_the_repository_layout_and_returns_the_files(tmp_path):
    started = time.perf_counter()
    written = samples.write_sample_repository(tmp_path)
    elapsed = time.perf_counter() - started

    assert [str(p.relative_to(tmp_path)) for p in written] == EXPECTED_FILES
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert elapsed < 30, f"sample generation took {elapsed:.1f} s"


def test_generation_is_deterministic(tmp_path, repo):
    samples.write_sample_repository(tmp_path)
    assert _digests(tmp_path) == _digests(repo)


def test_writing_twice_into_the_same_directory_overwrites(repo):
    before = _digests(repo)
    samples.write_sample_repository(repo)
    assert _digests(repo) == before


def test_mlp_config_is_read_by_the_serving_config(repo):
    config = ModelConfig.from_file(repo / "mlp" / "1" / "model.toml")
    assert config.max_batch_size == 32
    assert config.threads == 1


def test_the_serving_repository_finds_every_sample(repo):
    repository = ModelRepository(repo)
    assert repository.model_names() == sorted(samples.SAMPLE_MODELS)
    model_files = {
        name: repository.source(name, "1").model_file().name for name in repository.model_names()
    }
    assert model_files == {
        "cnn": "model.onnx",
        "cnn-openvino": "model.xml",
        "mlp": "model.onnx",
        "mlp-tflite": "model.tflite",
    }


def test_onnx_models_are_valid_with_a_dynamic_batch_on_the_mlp(repo):
    mlp = onnx.load(repo / "mlp" / "1" / "model.onnx")
    onnx.checker.check_model(mlp, full_check=True)
    (graph_input,) = mlp.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input"
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert dims[1].dim_value == 64

    cnn = onnx.load(repo / "cnn" / "1" / "model.onnx")
    onnx.checker.check_model(cnn, full_check=True)
    (graph_input,) = cnn.graph.input
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, 224, 224]


def test_openvino_ir_keeps_fp32_weights(repo):
    xml = (repo / "cnn-openvino" / "1" / "model.xml").read_text()
    assert 'element_type="f16"' not in xml
    assert 'element_type="f32"' in xml


def test_mlp_matches_its_numpy_reference(repo):
    session = ort.InferenceSession(
        str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = samples.sample_input("mlp")
    (output,) = session.run(None, inputs)
    expected = samples.reference_output("mlp", inputs)["output"]
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_cnn_produces_logits_of_the_advertised_shape(repo):
    session = ort.InferenceSession(
        str(repo / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run(None, samples.sample_input("cnn"))
    assert output.shape == (1, 1000)
    assert output.dtype == np.float32
    assert np.isfinite(output).all() and output.std() > 0.01


def test_sample_inputs_are_deterministic_and_typed():
    for name in samples.SAMPLE_MODELS:
        first, second = samples.sample_input(name), samples.sample_input(name)
        assert list(first) == ["input"]
        assert first["input"].dtype == np.float32
        np.testing.assert_array_equal(first["input"], second["input"])
    assert samples.sample_input("mlp")["input"].shape == (1, 64)
    assert samples.sample_input("cnn")["input"].shape == (1, 3, 224, 224)


def test_unknown_sample_names_are_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="mlp"):
        samples.sample_input("resnet")
    with pytest.raises(KeyError, match="only for mlp"):
        samples.reference_output("cnn", samples.sample_input("cnn"))


def _run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sample_models.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_writes_the_repository_and_says_how_to_serve_it(tmp_path, capsys):
    target = tmp_path / "models"
    assert _run_command(["sample-models", str(target)]) == 0
    out = capsys.readouterr().out
    for relative in EXPECTED_FILES:
        assert relative in out
        assert (target / relative).is_file()
    assert f"edgefleet-agent serve --models {target}" in out


def test_command_refuses_a_file_as_directory(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        _run_command(["sample-models", str(not_a_dir)])


def test_command_refuses_an_empty_path_instead_of_writing_here(tmp_path):
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "sample-models", ""],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "argument DIR: empty path" in result.stderr
    assert list(tmp_path.iterdir()) == []
