"""Candidates: every (variant, runtime, device, options) a profile allows on this node.

The grid is the profile's `[[allow]]` list, in preference order, crossed with the model's
variants and each runtime's option axes (threads; OpenVINO hint and precision). A combination
that cannot run here is not silently dropped: it is `Considered` with its reason (runtime not
installed, device absent, format unreadable, precision unsupported, pinned out), so the
candidate table shows everything that was considered. A model's pin narrows the grid, and an
option value it pins (threads = 2) replaces that axis even where the profile lists others.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.profiles import AllowedDevice, Profile, RuntimeOptions
from agent.selection.variants import Variant
from runtimes.base import LoadOptions
from runtimes.discovery import RuntimeDevice
from runtimes.loader import runtimes_for

# OpenVINO OPTIMIZATION_CAPABILITIES entry that a precision needs.
_PRECISION_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# OpenVINO devices that dispatch to others; any real device they report is fine.
_VIRTUAL_DEVICES = frozenset({"AUTO", "MULTI", "HETERO", "BATCH"})
# ONNX Runtime device -> the execution provider that must head get_providers().
ORT_PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "TENSORRT": "TensorrtExecutionProvider",
    "OPENVINO": "OpenVINOExecutionProvider",
}


@dataclass(frozen=True)
class Pin:
    """A model's own choice (model.toml): only candidates that agree with every set field run."""

    runtime: str | None = None
    device: str | None = None
    variant: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # threads, hint, precision

    def allows(self, candidate: Candidate) -> bool:
        if self.runtime and candidate.runtime != self.runtime:
            return False
        if self.device and candidate.device != self.device.upper():
            return False
        if self.variant and candidate.variant != self.variant:
            return False
        mine = dict(candidate.options)
        return all(mine.get(k) == v for k, v in self.options.items())

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (
                ("runtime", self.runtime),
                ("device", self.device),
                ("variant", self.variant),
            )
            if v
        ]
        parts += [f"{k}={v}" for k, v in sorted(self.options.items())]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "device": self.device,
            "variant": self.variant,
            "options": dict(sorted(self.options.items())),
        }


@dataclass(frozen=True)
class Candidate:
    variant: str
    runtime: str
    device: str
    options: tuple[tuple[str, Any], ...]  # (name, value), sorted: threads, hint, precision
    max_compile_seconds: float
    preference: int  # position of its [[allow]] entry; lower is preferred

    @property
    def ident(self) -> str:
        """Stable id of what is loaded, for the compile cache directory and the records."""
        blob = json.dumps([self.variant, self.runtime, self.device, self.options])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe_options(self) -> str:
        # threads=0 leaves the count to the runtime (one per core, usually).
        shown = [(k, "auto" if k == "threads" and v == 0 else v) for k, v in self.options]
        return " ".join(f"{k}={v}" for k, v in shown) or "-"

    def label(self) -> str:
        return f"{self.runtime} {self.device} {self.describe_options()} [{self.variant}]"

    def load_options(self, compile_cache_dir: Path | None = None) -> LoadOptions:
        """What `runtimes.load` needs to open exactly this candidate."""
        values = dict(self.options)
        extra: dict[str, Any] = {}
        if self.runtime == "openvino":
            if "hint" in values:
                extra["PERFORMANCE_HINT"] = values["hint"]
            if "precision" in values:
                extra["INFERENCE_PRECISION_HINT"] = values["precision"]
            if compile_cache_dir is not None:
                extra["CACHE_DIR"] = str(compile_cache_dir)
        threads = values.get("threads") or None
        return LoadOptions(device=self.device, threads=threads, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "runtime": self.runtime,
            "device": self.device,
            "options": dict(self.options),
            "max_compile_seconds": self.max_compile_seconds,
            "preference": self.preference,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            variant=data["variant"],
            runtime=data["runtime"],
            device=data["device"],
            options=tuple(sorted(data["options"].items())),
            max_compile_seconds=float(data["max_compile_seconds"]),
            preference=int(data["preference"]),
        )


@dataclass(frozen=True)
class Considered:
    """One combination of the grid; `reason` says why it cannot run here (None: it can)."""

    candidate: Candidate
    reason: str | None = None


def build(
    variants: list[Variant],
    devices: list[RuntimeDevice],
    profile: Profile,
    pin: Pin | None = None,
) -> list[Considered]:
    """Every combination in preference order; those that cannot run here carry the reason."""
    present = {(d.runtime, d.device): d for d in devices}
    installed = {d.runtime for d in devices}
    allow = list(profile.allow)
    if pin and pin.runtime and pin.device:
        pinned = (pin.runtime, pin.device.upper())
        if pinned not in {(a.runtime, a.device) for a in allow}:
            # A model's pin may name a device its class profile does not list; it still has to
            # exist and pass verification.
            allow.append(
                AllowedDevice(
                    pin.runtime,
                    pin.device.upper(),
                    RuntimeOptions(),
                    profile.limits.max_compile_seconds,
                )
            )
    considered: list[Considered] = []
    for preference, allowed in enumerate(allow):
        for variant in variants:
            for options in _option_grid(allowed, pin):
                candidate = Candidate(
                    variant=variant.name,
                    runtime=allowed.runtime,
                    device=allowed.device,
                    options=options,
                    max_compile_seconds=allowed.max_compile_seconds,
                    preference=preference,
                )
                reason = _ruled_out(candidate, variant, present, installed, pin)
                considered.append(Considered(candidate, reason))
    return considered


def device_grid(devices: list[RuntimeDevice], profile: Profile) -> list[Considered]:
    """The grid without a model (variant '*'), for `edgefleet-agent accelerators`."""
    present = {(d.runtime, d.device): d for d in devices}
    installed = {d.runtime for d in devices}
    considered = []
    for preference, allowed in enumerate(profile.allow):
        for options in _option_grid(allowed):
            candidate = Candidate(
                "*",
                allowed.runtime,
                allowed.device,
                options,
                allowed.max_compile_seconds,
                preference,
            )
            considered.append(Considered(candidate, _device_problem(candidate, present, installed)))
    return considered


def _option_grid(
    allowed: AllowedDevice, pin: Pin | None = None
) -> list[tuple[tuple[str, Any], ...]]:
    axes: dict[str, tuple[Any, ...]] = {"threads": allowed.options.threads}
    if allowed.runtime == "openvino":
        if allowed.options.hints:
            axes["hint"] = allowed.options.hints
        axes["precision"] = allowed.options.precisions or ("f32",)
    if pin is not None:
        for name, value in pin.options.items():
            if name in axes or (allowed.runtime == "openvino" and name == "hint"):
                axes[name] = (value,)
    names = sorted(axes)
    return [
        tuple(zip(names, values, strict=True))
        for values in itertools.product(*(axes[n] for n in names))
    ]


def _ruled_out(
    candidate: Candidate,
    variant: Variant,
    present: dict[tuple[str, str], RuntimeDevice],
    installed: set[str],
    pin: Pin | None,
) -> str | None:
    if pin and not pin.allows(candidate):
        return f"model.toml pins {pin.describe()}"
    if candidate.runtime not in runtimes_for(variant.path):
        return f"{candidate.runtime} cannot read {variant.format} files"
    return _device_problem(candidate, present, installed)


def _device_problem(
    candidate: Candidate, present: dict[tuple[str, str], RuntimeDevice], installed: set[str]
) -> str | None:
    if candidate.runtime not in installed:
        return f"{candidate.runtime} is not installed on this node"
    device = present.get((candidate.runtime, candidate.device))
    if device is None:
        found = sorted(d for r, d in present if r == candidate.runtime)
        return (
            f"{candidate.runtime} has no {candidate.device} device here "
            f"(found: {', '.join(found) or 'none'})"
        )
    precision = dict(candidate.options).get("precision")
    capabilities = device.details.get("OPTIMIZATION_CAPABILITIES")
    if precision and precision not in _PRECISION_CAPABILITY:
        return f"no precision {precision!r} (known: {', '.join(_PRECISION_CAPABILITY)})"
    if precision and isinstance(capabilities, list):
        needed = _PRECISION_CAPABILITY[precision]
        if needed not in capabilities:
            return (
                f"{candidate.device} does not support {precision} "
                f"(OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)})"
            )
    return None


def expected_placement(candidate: Candidate) -> str:
    """What the loaded session must report to prove it runs where intended."""
    if candidate.runtime == "onnxruntime":
        return ORT_PROVIDERS.get(candidate.device, f"{candidate.device.title()}ExecutionProvider")
    return candidate.device


def confirm_placement(candidate: Candidate, placement: list[str]) -> str | None:
    """None when the session runs where the candidate says, else the mismatch.

    ONNX Runtime: the intended provider must head `get_providers()` (non-CPU sessions are also
    created with session.disable_cpu_ep_fallback, so a graph the provider cannot take fails to
    load instead of running on the CPU). OpenVINO: EXECUTION_DEVICES must name the device
    ("GPU" matches "GPU.0"). LiteRT reports its device itself.
    """
    expected = expected_placement(candidate)
    if candidate.device.partition(":")[0] in _VIRTUAL_DEVICES:
        ok = bool(placement)  # AUTO and friends choose for themselves; the table shows where
    elif candidate.runtime == "onnxruntime":
        ok = bool(placement) and placement[0] == expected
    else:
        ok = any(p.split(".")[0] == expected.split(".")[0] for p in placement)
    if ok:
        return None
    return f"asked for {expected} but the session runs on {', '.join(placement) or 'nothing'}"
