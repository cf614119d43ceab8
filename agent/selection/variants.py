"""The variants of one model: its files in formats some runtime reads, with their digests.

A model directory is either a version directory (`cnn/1/` holding `model.onnx`, `model.xml` +
`model.bin`, `model-int8.onnx`, `model.tflite`, ...) or a model directory whose numbered
subdirectories are versions, in which case the highest version is used. Each model file is one
variant, named by its file name; OpenVINO IR counts its `.bin` in the digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.serving.repository import version_number
from runtimes.loader import MODEL_SUFFIXES

FORMATS = {".onnx": "onnx", ".xml": "openvino-ir", ".tflite": "tflite"}
# Names that say a variant is not full precision: never the fp32 reference when another exists.
_REDUCED = re.compile(r"int8|uint8|quant|fp16|f16|bf16|int4|edgetpu", re.IGNORECASE)
_CHUNK = 1 << 20


class VariantError(ValueError):
    """The model directory holds no usable variant."""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str  # file name inside the version directory
    path: Path
    format: str  # onnx | openvino-ir | tflite
    digest: str  # sha256 of the file (and of an IR's .bin)

    @property
    def reduced_precision(self) -> bool:
        return bool(_REDUCED.search(self.name))


# (path, size, mtime_ns) -> digest; the decision cache provides a persistent one.
DigestMemo = Callable[[Path, Callable[[Path], str]], str]


def version_dir(model_dir: Path) -> Path:
    """`model_dir` itself, or its highest numbered version subdirectory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise VariantError(f"{model_dir}: not a directory")
    versions = [p for p in model_dir.iterdir() if p.is_dir() and version_number(p.name) is not None]
    if versions and not any(p.suffix.lower() in MODEL_SUFFIXES for p in model_dir.iterdir()):
        return max(versions, key=lambda p: int(p.name))
    return model_dir


def find_variants(model_dir: Path, memo: DigestMemo | None = None) -> list[Variant]:
    """Every model file of the model, the likely fp32 reference first."""
    directory = version_dir(model_dir)
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
    )
    if not files:
        raise VariantError(
            f"{directory}: no model file ({', '.join('*' + s for s in MODEL_SUFFIXES)})"
        )
    digest = memo or (lambda path, compute: compute(path))
    variants = [
        Variant(p.name, p, FORMATS[p.suffix.lower()], digest(p, file_digest)) for p in files
    ]
    return sorted(variants, key=reference_order)


def reference_order(variant: Variant) -> tuple[int, int, str]:
    """Full precision before reduced, ONNX before IR before TFLite, then by name."""
    format_rank = {"onnx": 0, "openvino-ir": 1, "tflite": 2}[variant.format]
    return (int(variant.reduced_precision), format_rank, variant.name)


def file_digest(path: Path) -> str:
    """sha256 of a model file; an OpenVINO IR's weights (.bin) are part of it.

    Each is opened without blocking and must be a regular file once open: a FIFO would wait for
    a writer forever and /dev/zero would never end, in the agent's own process.
    """
    sha = hashlib.sha256()
    parts = [path]
    if path.suffix.lower() == ".xml" and os.path.lexists(path.with_suffix(".bin")):
        parts.append(path.with_suffix(".bin"))
    for part in parts:
        with _open_regular(part) as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
    return sha.hexdigest()


def _open_regular(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise VariantError(f"{path}: cannot read it: {exc.strerror}") from None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise VariantError(f"{path}: not a regular file; a model's files must be files")
    return handle


def model_digest(variants: list[Variant]) -> str:
    """One digest over every variant: a changed, added or removed variant changes it."""
    sha = hashlib.sha256()
    for variant in sorted(variants, key=lambda v: v.name):
        sha.update(f"{variant.name}\0{variant.digest}\n".encode())
    return sha.hexdigest()
