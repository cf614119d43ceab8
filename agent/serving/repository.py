"""The model repository on disk: `<root>/<model>/<version>/model.{onnx,xml,tflite}`.

Like Triton and OpenVINO Model Server, versions are numeric directory names; the highest loaded
version answers requests that name none. A version directory holds one or more model files,
the model's variants (an OpenVINO IR's `.bin` sits beside its `.xml`), and optionally
`model.toml`. Accelerator selection picks among the variants; without it one must be named.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.serving.config import ModelConfig, ModelConfigError
from runtimes.loader import MODEL_SUFFIXES

# Model names become URL path segments and metric labels: keep them plain.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    """A model or version directory is not laid out as expected, or cannot be read."""


class ModelMissing(RepositoryError):
    """No directory for this model in the repository (any more)."""


@dataclass(frozen=True, slots=True)
class ModelVersionSource:
    """Where one model version lives on disk and how to serve it."""

    name: str
    version: str
    directory: Path
    model_files: tuple[Path, ...]  # the variants: one file per format / precision
    config: ModelConfig

    def model_file(self) -> Path:
        """The file to load when no selection runs: the pinned variant, or the only one."""
        if self.config.variant:
            for path in self.model_files:
                if path.name == self.config.variant:
                    return path
            raise RepositoryError(
                f"{self.directory}: variant {self.config.variant!r} from model.toml is not "
                f"there; files: {', '.join(p.name for p in self.model_files)}"
            )
        if len(self.model_files) > 1:
            names = ", ".join(p.name for p in self.model_files)
            raise RepositoryError(
                f"{self.directory}: more than one model file ({names}); turn accelerator "
                "selection on, or name one with `variant` in model.toml"
            )
        return self.model_files[0]


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root)

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory")
        with _reading(self.root):
            return sorted(
                p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(p.name)
            )

    def versions(self, name: str) -> list[str]:
        """Numeric version directories of a model, oldest first."""
        if not MODEL_NAME.fullmatch(name):
            raise ModelMissing(f"invalid model name {name!r}")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelMissing(f"no model {name!r} in {self.root}")
        with _reading(model_dir):
            found = [p.name for p in model_dir.iterdir() if p.is_dir()]
        return sorted((v for v in found if version_number(v) is not None), key=int)

    def source(self, name: str, version: str) -> ModelVersionSource:
        """Find the model file and read model.toml; RepositoryError says what is wrong.

        This reads the disk: from asyncio, call it in a thread (a slow or hung mount must not
        stop the server answering its health checks)."""
        version_dir = self.root / name / version
        with _reading(version_dir):
            model_files = tuple(
                sorted(
                    p
                    for p in version_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
                )
            )
        if not model_files:
            raise RepositoryError(
                f"{version_dir}: no model file (expected model.onnx, model.xml+model.bin "
                "or model.tflite)"
            )
        for path in model_files:
            if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
                raise RepositoryError(f"{path}: OpenVINO IR without its .bin weights file")
        config_file = version_dir / "model.toml"
        try:
            # is_symlink too: a dangling link is a mistake to report, not a missing model.toml
            present = config_file.exists() or config_file.is_symlink()
            config = ModelConfig.from_file(config_file) if present else ModelConfig()
        except ModelConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        return ModelVersionSource(name, version, version_dir, model_files, config)


@contextmanager
def _reading(directory: Path) -> Iterator[None]:
    """OSError while listing `directory` (gone, unreadable, a hung mount's EIO) as a
    RepositoryError naming it."""
    try:
        yield
    except OSError as exc:
        raise RepositoryError(f"cannot read {directory}: {exc.strerror or exc}") from None


def version_number(name: str) -> int | None:
    """The number a version (or job) directory's name stands for; None for other names.
    ASCII digits only: str.isdigit() is also true for "²" and "٣", which int() refuses."""
    return int(name) if name.isascii() and name.isdigit() else None
