"""What a selection decision depends on; a change in any part means measuring again.

    (model digest, variants, hardware fingerprint, runtime versions, profile, policy)

Runtime versions come from package metadata, not from importing the runtimes, so checking a
cached decision at start-up costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Bumped when the way candidates are measured or chosen changes, so old decisions are redone.
SELECTION_FORMAT = 1

# Distributions whose version changes what a runtime does (onnxruntime-gpu ships the same module).
RUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "openvino",
    "ai-edge-litert",
    "tflite-runtime",
)


def runtime_versions() -> dict[str, str]:
    """Installed version of each runtime distribution present on this node.

    Read from the `<name>-<version>.dist-info` directory names on sys.path (one listing per
    path entry, ~1 ms), falling back to importlib.metadata, which parses each METADATA file.
    """
    wanted = {_normalize(name): name for name in RUNTIME_DISTRIBUTIONS}
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            distribution, _, release = name.removesuffix(".dist-info").partition("-")
            key = _normalize(distribution)
            if key in wanted and wanted[key] not in found and release:
                found[wanted[key]] = release
    for name in RUNTIME_DISTRIBUTIONS:
        if name in found:
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return dict(sorted(found.items()))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def digest_of(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def delegate_libraries() -> tuple[tuple[str, str], ...]:
    """(device, "path size:mtime") of each LiteRT delegate library found, without importing
    LiteRT: a delegate installed, removed or replaced offers other devices to measure."""
    from runtimes.delegates import delegates

    found = []
    for device, library in sorted(delegates().items()):
        try:
            st = os.stat(library)
        except OSError:
            continue
        found.append((device, f"{library} {st.st_size}:{st.st_mtime_ns}"))
    return tuple(found)


@dataclass(frozen=True)
class SelectionKey:
    model_digest: str
    variants: tuple[str, ...]
    hardware: str  # runtimes.hardware fingerprint
    runtimes: tuple[tuple[str, str], ...]  # (distribution, version), sorted
    profile: str  # name@digest of the profile file
    policy: str  # digest of the tolerance, golden vectors and pin that judged the candidates
    # The serving name: two models with the same files keep decisions of their own.
    model: str = ""
    # LiteRT delegate libraries found (delegate_libraries()); the devices of ONNX Runtime and
    # OpenVINO follow from the hardware fingerprint and their versions.
    delegates: tuple[tuple[str, str], ...] = ()
    format: int = SELECTION_FORMAT

    @property
    def ident(self) -> str:
        return digest_of(asdict(self))[:32]

    def changes_from(self, older: SelectionKey) -> list[str]:
        """What differs from an older key, for the log line that explains a re-selection."""
        changes = []
        if self.model_digest != older.model_digest:
            changes.append(f"model digest {older.model_digest[:12]} -> {self.model_digest[:12]}")
        if self.variants != older.variants:
            changes.append(f"variants {list(older.variants)} -> {list(self.variants)}")
        if self.hardware != older.hardware:
            changes.append(f"hardware {older.hardware} -> {self.hardware}")
        if self.runtimes != older.runtimes:
            before, after = dict(older.runtimes), dict(self.runtimes)
            for name in sorted(set(before) | set(after)):
                if before.get(name) != after.get(name):
                    was, now = before.get(name, "absent"), after.get(name, "absent")
                    changes.append(f"{name} {was} -> {now}")
        if self.delegates != older.delegates:
            was = [d for d, _ in older.delegates] or "none"
            now = [d for d, _ in self.delegates] or "none"
            changes.append(f"LiteRT delegates {was} -> {now} (or a library changed)")
        if self.profile != older.profile:
            changes.append(f"profile {older.profile} -> {self.profile}")
        if self.policy != older.policy:
            changes.append("tolerance, golden vectors or pin changed")
        if self.format != older.format:
            changes.append(f"selection format {older.format} -> {self.format}")
        return changes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["variants"] = list(self.variants)
        data["runtimes"] = dict(self.runtimes)
        data["delegates"] = [list(pair) for pair in self.delegates]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionKey:
        return cls(
            model_digest=data["model_digest"],
            variants=tuple(data["variants"]),
            hardware=data["hardware"],
            runtimes=tuple(sorted(data["runtimes"].items())),
            profile=data["profile"],
            policy=data["policy"],
            model=str(data.get("model", "")),
            delegates=tuple((str(d), str(lib)) for d, lib in data.get("delegates", ())),
            format=int(data.get("format", 0)),
        )


def profile_ident(profile: Any) -> str:
    """name@digest over the profile's file and its effective settings.

    The settings count too: a test or the bench may run a profile with a smaller time budget,
    and a decision measured under one budget is not reused under another.
    """
    settings = [profile.digest, asdict(profile.selection), asdict(profile.limits)]
    settings.append([asdict(a) for a in profile.allow])
    return f"{profile.name}@{digest_of(settings)[:12]}"
