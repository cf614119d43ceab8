"""One settings loader for every EdgeFleet process: defaults, a TOML file, then the environment.

A settings class is a frozen dataclass whose fields carry their TOML key in metadata
(`field(default=..., metadata={"toml": "server.bind_host"})`). The file may not hold unknown keys;
each field can be overridden by `EDGEFLEET_<FIELD NAME>`; `EDGEFLEET_CONFIG` names the file when
none is given. Bad values are reported with where they came from (file or variable).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "EDGEFLEET_"

T = TypeVar("T")


def state_home() -> Path:
    """Where per-user state goes by default: $XDG_STATE_HOME, else ~/.local/state."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


class SettingsError(ValueError):
    """A config file or variable is missing, unreadable, unknown or holds a bad value."""


def load_settings(
    cls: type[T], path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> T:
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        values.update(_from_toml(cls, Path(path)))
    values.update(_from_env(cls, env))
    return replace(cls(), **values)


def _from_toml(cls: type, path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc
    by_key = {f.metadata["toml"]: f for f in fields(cls)}
    flat = dict(_flatten(raw))
    unknown = sorted(set(flat) - set(by_key))
    if unknown:
        raise SettingsError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(by_key))}"
        )
    return {by_key[k].name: _convert(cls, by_key[k].name, v, str(path)) for k, v in flat.items()}


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _from_env(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for f in fields(cls):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(cls, f.name, raw, ENV_PREFIX + f.name.upper())
    return values


def _convert(cls: type, name: str, value: Any, source: str) -> Any:
    kind = str({f.name: f.type for f in fields(cls)}[name])
    if "Path" in kind and "None" not in kind and value == "":
        raise SettingsError(f"{source}: {name} is empty; give it a path, or leave it out")
    if isinstance(value, str) and "\0" in value:  # the OS would cut a path there, or refuse it
        raise SettingsError(f"{source}: {name} holds a NUL character")
    try:
        if kind in ("int", "float"):
            if isinstance(value, bool) or (kind == "int" and isinstance(value, float)):
                raise ValueError  # 3.5 days is not cut down to 3 without a word
            number = int(value) if kind == "int" else float(value)
            if kind == "float" and not math.isfinite(number):  # asyncio.sleep(nan) spins
                raise ValueError
            return number
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if "Path" in kind:  # only `Path | None` fields get here empty
            return Path(value).expanduser() if str(value) else None
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
        raise SettingsError(f"{source}: {name} has a bad value {value!r}") from exc
