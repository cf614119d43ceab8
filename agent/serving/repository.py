"""The model repository on disk: `<root>/<model>/<version>/model.{onnx,xml,tflite}`.

Like Triton and OpenVINO Model Server, versions are numeric directory names; the highest loaded
version answers requests that name none. A version directory holds exactly one model file
(an OpenVINO IR's `.bin` sits beside its `.xml`) and optionally `model.toml`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.serving.config import ModelConfig, ModelConfigError
from runtimes.loader import MODEL_SUFFIXES

# Model names become URL path segments and metric labels: keep them plain.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    """A model or version directory is not laid out as expected."""


@dataclass(frozen=True, slots=True)
class ModelVersionSource:
    """Where one model version lives on disk and how to serve it."""

    name: str
    version: str
    model_file: Path
    config: ModelConfig


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root)

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.match(p.name)
        )

    def versions(self, name: str) -> list[str]:
        """Numeric version directories of a model, oldest first."""
        if not MODEL_NAME.match(name):
            raise RepositoryError(f"invalid model name {name!r}")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise RepositoryError(f"no model {name!r} in {self.root}")
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(found, key=int)

    def source(self, name: str, version: str) -> ModelVersionSource:
        """Find the model file and read model.toml; RepositoryError says what is wrong."""
        version_dir = self.root / name / version
        candidates = sorted(
            p for p in version_dir.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
        )
        if not candidates:
            raise RepositoryError(
                f"{version_dir}: no model file (expected model.onnx, model.xml+model.bin "
                "or model.tflite)"
            )
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise RepositoryError(f"{version_dir}: more than one model file ({names})")
        model_file = candidates[0]
        if model_file.suffix.lower() == ".xml" and not model_file.with_suffix(".bin").is_file():
            raise RepositoryError(f"{model_file}: OpenVINO IR without its .bin weights file")
        config_file = version_dir / "model.toml"
        try:
            config = ModelConfig.from_file(config_file) if config_file.exists() else ModelConfig()
        except ModelConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        return ModelVersionSource(name, version, model_file, config)
