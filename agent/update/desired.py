"""The desired state of a node: which model versions it should run (and how to judge them).

Until the control-plane sync exists it comes from a file; the sync loop will build the same
object from its messages and call the same entry point (agent.update.apply).

    generation = 7                  # increases with every change the control plane makes

    [[models]]
    name = "cnn"
    version = 2

    [health]                        # optional: watch each new version after activation
    window_seconds = 60
    max_error_rate = 0.05
    max_p95_ms = 50
    min_requests = 20
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.update.config import HealthPolicy
from provisioning.package import MODEL_NAME

# The journal keeps versions and generations in SQLite INTEGER columns (64-bit, signed).
MAX_INTEGER = 2**63 - 1


class DesiredStateError(ValueError):
    """The desired-state document is malformed; the message names the key."""


@dataclass(frozen=True, slots=True)
class DesiredModel:
    name: str
    version: int


@dataclass(frozen=True)
class DesiredState:
    generation: int
    models: tuple[DesiredModel, ...]
    health: HealthPolicy | None = None

    @classmethod
    def load(cls, path: Path) -> DesiredState:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DesiredStateError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise DesiredStateError(f"{path}: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "desired state") -> DesiredState:
        unknown = sorted(set(data) - {"generation", "models", "health"})
        if unknown:
            raise DesiredStateError(f"{source}: unknown key(s) {', '.join(unknown)}")
        generation = data.get("generation", 0)
        if not _integer(generation, 0):
            raise DesiredStateError(f"{source}: generation must be an integer 0 to {MAX_INTEGER}")
        items = data.get("models", [])
        if not isinstance(items, list):
            raise DesiredStateError(f"{source}: models must be a list of [[models]] tables")
        models = []
        for index, item in enumerate(items):
            where = f"{source}: models[{index}]"
            if not isinstance(item, dict) or set(item) - {"name", "version"}:
                raise DesiredStateError(f"{where}: expected a table with name and version")
            name, version = item.get("name"), item.get("version")
            if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
                raise DesiredStateError(f"{where}.name: {name!r} is not a model name")
            if not _integer(version, 1):
                raise DesiredStateError(f"{where}.version: expected an integer 1 to {MAX_INTEGER}")
            if name in {m.name for m in models}:
                raise DesiredStateError(f"{where}: model {name!r} is listed twice")
            models.append(DesiredModel(name, version))
        return cls(generation, tuple(models), _health(data.get("health"), source))


def _health(table: Any, source: str) -> HealthPolicy | None:
    if table is None:
        return None
    keys = {
        "window_seconds": "window_s",
        "poll_seconds": "poll_s",
        "max_error_rate": "max_error_rate",
        "max_p95_ms": "max_p95_ms",
        "min_requests": "min_requests",
    }
    if not isinstance(table, dict) or set(table) - set(keys):
        raise DesiredStateError(f"{source}: [health] takes {', '.join(keys)}")
    values = {}
    for key, value in table.items():
        where = f"{source}: health.{key}"
        if key == "min_requests" and not _integer(value, 0):
            raise DesiredStateError(f"{where} must be a whole number >= 0, not {value!r}")
        if not _amount(value):
            raise DesiredStateError(f"{where} must be a finite number >= 0, not {value!r}")
        if key == "max_error_rate" and value > 1:
            raise DesiredStateError(f"{where} is a share of requests, 0 to 1 (0.05 is 5%)")
        if key == "poll_seconds" and value == 0:
            raise DesiredStateError(f"{where} must be more than 0")
        values[keys[key]] = value if key == "min_requests" else float(value)
    return HealthPolicy(**values)


def _integer(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_INTEGER


def _amount(value: Any) -> bool:
    """A finite number >= 0: TOML also allows inf and nan, and a limit of nan never trips."""
    if isinstance(value, float):
        return math.isfinite(value) and value >= 0
    return _integer(value, 0)
