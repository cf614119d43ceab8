"""Per-model serving settings, read from the optional `model.toml` in a version directory."""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from agent.profiles import OPENVINO_HINTS, OPENVINO_PRECISIONS
from provisioning import serving_settings
from runtimes.base import LoadOptions

# model.toml holds a handful of settings; anything larger is a mistake, not a config to parse.
MAX_CONFIG_BYTES = 1024 * 1024


class ModelConfigError(ValueError):
    """model.toml is unreadable or holds an unknown key or a bad value."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # Dynamic batching: 0 turns it off. With it on, the model's first dimension is the batch.
    max_batch_size: int = 0
    # How long the scheduler may hold a batch open waiting for more requests.
    max_queue_delay_us: int = 0
    # Batch sizes the scheduler prefers to close a batch at (Triton's preferred_batch_size).
    preferred_batch_sizes: tuple[int, ...] = ()
    # Requests queued or running beyond this bound are refused with 429 / RESOURCE_EXHAUSTED;
    # one that times out or is cancelled frees its place at once.
    max_queue_size: int = 256
    # Per-request deadline, queueing included; a client may ask for less.
    timeout_ms: int = 30_000
    # Concurrent executions of this model (worker threads sharing one session).
    instances: int = 1
    # How to run the model. With accelerator selection on, each set key pins that part of the
    # choice and selection measures the rest; with it off, the model file named by `variant`
    # (or the only one) runs on `runtime` (default: by file type) and `device`.
    threads: int | None = None
    runtime: str | None = None
    device: str | None = None
    variant: str | None = None  # file name of one model file in the version directory
    hint: str | None = None  # OpenVINO performance hint: LATENCY | THROUGHPUT
    precision: str | None = None  # OpenVINO inference precision: f32 | bf16 | f16
    # Accepted output error per datatype, e.g. { FP32 = { atol = 1e-2, rtol = 1e-2 } }.
    tolerance: dict | None = None
    # Class labels for the classification extension: output name -> a text file in the version
    # directory, one label per line (line i names class i).
    labels: dict | None = None
    # Image layout of 3-dimensional inputs (batch dimension aside), as Triton's config states it
    # for clients such as its image_client: input name -> "NCHW" or "NHWC".
    input_formats: dict | None = None
    # Keep the runtime's threads spinning after each run (ONNX Runtime's default, which the
    # agent turns off): lower latency only for requests closer than ~40 ms apart, for up to a
    # core kept busy. Not a choice accelerator selection measures: applied to whatever it picks.
    idle_spin: bool = False

    def pins_everything(self, variants: int) -> bool:
        """True when model.toml leaves selection nothing to choose (runtime, device, variant)."""
        return bool(self.runtime and self.device and (self.variant or variants == 1))

    def load_options(self) -> LoadOptions:
        """How to open the model when no selection runs (OpenVINO hint/precision included)."""
        extra = {}
        if self.hint:
            extra["PERFORMANCE_HINT"] = self.hint
        if self.precision:
            extra["INFERENCE_PRECISION_HINT"] = self.precision
        return LoadOptions(self.device or "CPU", self.threads, extra, self.idle_spin)

    def selection_settings(self) -> dict:
        """The keys accelerator selection reads (agent.selection.model_settings)."""
        keys = ("runtime", "device", "variant", "threads", "hint", "precision", "tolerance")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = tomllib.loads(_read_config(path).decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "model.toml") -> ModelConfig:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise ModelConfigError(
                    f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            values[key] = _check(source, key, value)
        try:
            serving_settings.check_combination(values)
        except ValueError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None
        return cls(**values)


def _read_config(path: Path) -> bytes:
    return read_small_file(
        path, MAX_CONFIG_BYTES, "model.toml", size_hint="model.toml holds a few settings"
    )


def read_small_file(
    path: Path, limit: int, kind: str, *, follow_links: bool = True, size_hint: str = ""
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a model.toml, a label file);
    ModelConfigError if it is something else or larger, OSError if it cannot be opened.

    Opened without blocking and checked once open: a FIFO would wait for a writer forever and
    /dev/zero would never end, and a check by name first could be raced."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelConfigError(f"{path}: not a regular file; {kind} must be a file")
        data = file.read(limit + 1)
    if len(data) > limit:
        hint = f"; {size_hint}" if size_hint else ""
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        raise ModelConfigError(f"{path}: larger than {size}{hint}")
    return data


# OpenVINO options, as a firmware profile may list them.
_CHOICES = {"hint": OPENVINO_HINTS, "precision": OPENVINO_PRECISIONS}
# Keys provisioning.serving_settings checks (publishers may set most of them in a package).
_SHARED = frozenset({*serving_settings.LIMITS, *serving_settings.PUBLISHER_KEYS})


def _check(source: str, key: str, value):
    if key == "labels":
        return _check_labels(source, value)
    if key in _SHARED:
        try:
            return serving_settings.check_value(key, value)
        except ValueError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None
    if key == "tolerance":
        if not isinstance(value, dict):
            raise ModelConfigError(f"{source}: tolerance must be a table, e.g. [tolerance]")
        return value
    if not isinstance(value, str) or not value:
        raise ModelConfigError(f"{source}: {key} must be a non-empty string")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ModelConfigError(
            f"{source}: {key} must be one of {', '.join(_CHOICES[key])}; got {value!r}"
        )
    return value


def _check_labels(source: str, value) -> dict[str, str]:
    """labels = { output = "file" }: plain file names in the version directory."""
    try:
        value = serving_settings.check_value("labels", value)
    except ValueError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
    for output, name in value.items():
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ModelConfigError(
                f"{source}: labels.{output} must be the name of a file in the version directory"
            )
    return dict(value)
