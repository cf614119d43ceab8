"""Firmware profiles: what a class of device may run models on, and how to choose.

A profile is a TOML file in `firmware-profiles/`: match rules against the node's hardware facts
(`runtimes.hardware`), the selection objective, the (runtime, device) pairs allowed in
preference order with their options (threads, OpenVINO hints and precisions, compile cache), and
limits (compile seconds, model memory). The agent picks the highest-priority profile whose rules
match; configuration can force one by name or path.

    profiles = load_profiles()                 # every shipped profile, validated
    profile = detect(probe(), profiles)        # the one that fits this node
    profile = resolve("raspberry-pi-5", facts) # forced by config

A malformed file raises `ProfileError` naming the file, the key and the problem.
Match rules (all keys of [match] must hold; a list holds if any item does; at least one
[[match.any_of]] group must hold when there are any):

    architecture = ["x86_64"]            cpu_vendor = ["GenuineIntel"]
    cpu_model = ['Core\\(TM\\) Ultra']   (regular expressions)     cpu_flags = ["avx512_bf16"] (all)
    board = ['Raspberry Pi 5']           (regular expressions)     compatible = ["nvidia,tegra234"]
    any_pci = ["10de:*"]                 (GPUs and accelerators)   any_usb = ["18d1:9302"]
    any_device = ["/dev/apex_*"]         nvidia_driver = true      tegra = true
    min_memory_mb = 2048
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.hardware import HardwareFacts

OBJECTIVES = ("latency", "throughput", "efficiency")
RUNTIME_NAMES = ("onnxruntime", "openvino", "litert")
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")
# The largest values a profile may give. Past these a number is a typo, and an agent would wait
# on a timer longer than a timer can be set or allocate a batch larger than its memory.
MAX_SECONDS = 86_400.0  # any time limit or budget: a day
MAX_RUNS = 100_000  # warm-up and minimum timed runs per candidate
MAX_BATCH_SIZE = 65_536
MAX_WATTS = 100_000.0

PROFILES_DIR_ENV = "EDGEFLEET_PROFILES_DIR"
PROFILE_ENV = "EDGEFLEET_PROFILE"  # forces a profile by name or path
# Where packaged installs put the profiles when the repository layout is not there.
SYSTEM_PROFILE_DIRS = (
    Path("/etc/edgefleet/firmware-profiles"),
    Path("/usr/share/edgefleet/firmware-profiles"),
)


class ProfileError(Exception):
    """A profile file is malformed or no profile fits; the message says which and why."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Option values to try for one runtime; each list is one axis of the candidate grid."""

    threads: tuple[int, ...] = (0,)  # 0: the runtime's own default
    hints: tuple[str, ...] = ()  # OpenVINO PERFORMANCE_HINT values; () leaves it unset
    precisions: tuple[str, ...] = ()  # OpenVINO INFERENCE_PRECISION_HINT; () means f32
    compile_cache: bool = False
    cache_max_mb: int = 512


@dataclass(frozen=True)
class AllowedDevice:
    runtime: str
    device: str
    options: RuntimeOptions
    max_compile_seconds: float


@dataclass(frozen=True)
class SelectionSettings:
    objective: str = "latency"
    warmup_runs: int = 5
    benchmark_seconds: float = 0.5  # per candidate, screening
    runoff_seconds: float = 1.0  # the finalists together, interleaved
    min_runs: int = 10
    max_selection_seconds: float = 120.0
    batch_size: int = 8  # requests per run for the throughput objective, where the model batches


@dataclass(frozen=True)
class Limits:
    max_compile_seconds: float = 60.0
    max_model_memory_mb: int = 4096


@dataclass(frozen=True)
class MatchRules:
    rules: dict[str, Any] = field(default_factory=dict)
    any_of: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    priority: int
    match: MatchRules
    selection: SelectionSettings
    limits: Limits
    allow: tuple[AllowedDevice, ...]
    power: dict[str, float]
    path: Path
    digest: str  # of the file's bytes: a changed profile re-selects

    @property
    def ident(self) -> str:
        return f"{self.name}@{self.digest[:12]}"


@dataclass(frozen=True)
class MatchResult:
    profile: Profile
    matched: bool
    reasons: tuple[str, ...]  # why it matched or the first rule that failed


# --- locating and loading ---------------------------------------------------------------------


def profiles_dir(override: str | Path | None = None) -> Path:
    """The profiles directory: `override`, $EDGEFLEET_PROFILES_DIR, the repository's, or /etc."""
    explicit = override or os.environ.get(PROFILES_DIR_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise ProfileError(f"{path}: profiles directory does not exist")
        return path
    repository = Path(__file__).resolve().parent.parent / "firmware-profiles"
    for candidate in (repository, *SYSTEM_PROFILE_DIRS):
        if candidate.is_dir():
            return candidate
    raise ProfileError(
        f"no firmware-profiles directory found (looked in {repository} and "
        f"{', '.join(map(str, SYSTEM_PROFILE_DIRS))}); set {PROFILES_DIR_ENV}"
    )


def load_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Every *.toml profile in the directory, validated; names must be unique."""
    directory = profiles_dir(directory)
    profiles = [load_profile(path) for path in sorted(directory.glob("*.toml"))]
    if not profiles:
        raise ProfileError(f"{directory}: no *.toml profiles")
    seen: dict[str, Path] = {}
    for profile in profiles:
        if profile.name in seen:
            raise ProfileError(
                f"{profile.path}: name: {profile.name!r} is already used by {seen[profile.name]}"
            )
        seen[profile.name] = profile.path
    return profiles


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return _Validator(path).profile(data, hashlib.sha256(raw).hexdigest())


def resolve(
    forced: str | None, facts: HardwareFacts, directory: str | Path | None = None
) -> Profile:
    """The profile to use: `forced` (a name or a .toml path) if given, else auto-detected."""
    if forced:
        if forced.endswith(".toml") or os.sep in forced:
            return load_profile(forced)
        profiles = {p.name: p for p in load_profiles(directory)}
        if forced not in profiles:
            raise ProfileError(
                f"no firmware profile named {forced!r}; known: {', '.join(sorted(profiles))}"
            )
        return profiles[forced]
    return detect(facts, load_profiles(directory))


def detect(facts: HardwareFacts, profiles: Iterable[Profile]) -> Profile:
    """The matching profile with the highest priority (ties: by name, for a stable answer)."""
    matching = [r.profile for r in explain(facts, profiles) if r.matched]
    if not matching:
        raise ProfileError(
            "no firmware profile matches this node; add a profile with an empty [match] "
            "(generic-cpu) or force one in the agent config"
        )
    return min(matching, key=lambda p: (-p.priority, p.name))


def explain(facts: HardwareFacts, profiles: Iterable[Profile]) -> list[MatchResult]:
    """Each profile with whether it matches these facts and why, best first."""
    results = [_match(profile, facts) for profile in profiles]
    return sorted(results, key=lambda r: (not r.matched, -r.profile.priority, r.profile.name))


# --- matching ---------------------------------------------------------------------------------


def _match(profile: Profile, facts: HardwareFacts) -> MatchResult:
    reasons: list[str] = []
    for key, wanted in profile.match.rules.items():
        ok, why = _RULES[key](facts, wanted)
        if not ok:
            return MatchResult(profile, False, (f"{key}: {why}",))
        reasons.append(f"{key}: {why}")
    if profile.match.any_of:
        group_reasons = []
        for group in profile.match.any_of:
            results = [(key, *_RULES[key](facts, wanted)) for key, wanted in group.items()]
            if all(ok for _, ok, _ in results):
                reasons.extend(f"{key}: {why}" for key, _, why in results)
                break
            group_reasons.extend(f"{key}: {why}" for key, ok, why in results if not ok)
        else:
            return MatchResult(
                profile, False, ("none of match.any_of holds: " + "; ".join(group_reasons),)
            )
    if not reasons:
        reasons.append("matches any machine")
    return MatchResult(profile, True, tuple(reasons))


def _one_of(actual: str, wanted: list[str]) -> tuple[bool, str]:
    return (
        actual in wanted,
        f"{actual or '(unknown)'} {'in' if actual in wanted else 'not in'} {wanted}",
    )


def _regex_any(actual: str | None, patterns: list[str]) -> tuple[bool, str]:
    ok = actual is not None and any(re.search(p, actual) for p in patterns)
    return ok, f"{actual!r} {'matches' if ok else 'does not match'} {patterns}"


def _pci_any(facts: HardwareFacts, patterns: list[str]) -> tuple[bool, str]:
    ids = [d.ids for d in facts.pci if d.kind is not None]
    hits = [i for i in ids if any(fnmatch.fnmatch(i, p.lower()) for p in patterns)]
    return bool(hits), f"PCI {', '.join(hits)}" if hits else f"no PCI GPU/accelerator in {patterns}"


def _usb_any(facts: HardwareFacts, patterns: list[str]) -> tuple[bool, str]:
    hits = [u.ids for u in facts.usb if any(fnmatch.fnmatch(u.ids, p.lower()) for p in patterns)]
    return bool(hits), f"USB {', '.join(hits)}" if hits else f"no USB device in {patterns}"


def _device_any(facts: HardwareFacts, patterns: list[str]) -> tuple[bool, str]:
    nodes = [f"/dev/dri/{n}" for n in facts.dri_nodes]
    nodes += [f"/dev/accel/{n}" for n in facts.accel_nodes]
    nodes += [f"/dev/{n}" for n in facts.device_nodes]
    hits = [n for n in nodes if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return bool(hits), ", ".join(hits) if hits else f"no device node like {patterns}"


def _flags_all(facts: HardwareFacts, flags: list[str]) -> tuple[bool, str]:
    missing = [f for f in flags if f not in facts.cpu_flags]
    return not missing, f"CPU lacks {missing}" if missing else f"CPU has {flags}"


def _compatible_any(facts: HardwareFacts, wanted: list[str]) -> tuple[bool, str]:
    hits = [c for c in facts.compatible if c in wanted]
    return bool(hits), f"device tree {hits[0]}" if hits else f"device tree not {wanted}"


def _flag(actual: bool, wanted: bool, what: str) -> tuple[bool, str]:
    return actual == wanted, f"{what} {'present' if actual else 'absent'}"


_RULES: dict[str, Callable[[HardwareFacts, Any], tuple[bool, str]]] = {
    "architecture": lambda f, w: _one_of(f.architecture, w),
    "cpu_vendor": lambda f, w: _one_of(f.cpu_vendor, w),
    "cpu_model": lambda f, w: _regex_any(f.cpu_model, w),
    "cpu_flags": _flags_all,
    "board": lambda f, w: _regex_any(f.board, w),
    "compatible": _compatible_any,
    "any_pci": _pci_any,
    "any_usb": _usb_any,
    "any_device": _device_any,
    "nvidia_driver": lambda f, w: _flag(f.nvidia_driver is not None, w, "NVIDIA driver"),
    "tegra": lambda f, w: _flag(f.tegra_release is not None, w, "L4T release"),
    "min_memory_mb": lambda f, w: (
        f.memory_bytes >= w * 2**20,
        f"{f.memory_bytes // 2**20} MiB memory (need {w})",
    ),
}


# --- validation -------------------------------------------------------------------------------

_LIST_OF_STR_RULES = (
    "architecture",
    "cpu_vendor",
    "cpu_model",
    "cpu_flags",
    "board",
    "compatible",
    "any_pci",
    "any_usb",
    "any_device",
)
_REGEX_RULES = ("cpu_model", "board")
_ID_RULES = ("any_pci", "any_usb")
_OPTION_KEYS = {
    "onnxruntime": ("threads",),
    "openvino": ("threads", "hints", "precisions", "compile_cache", "cache_max_mb"),
    "litert": ("threads",),
}


class _Validator:
    """Turns a parsed TOML document into a Profile, or fails naming the key and the problem."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.path}: {key}: {problem}")

    def profile(self, data: dict[str, Any], digest: str) -> Profile:
        self.keys(
            data,
            "",
            (
                "name",
                "description",
                "priority",
                "match",
                "selection",
                "limits",
                "allow",
                "runtimes",
                "power",
            ),
        )
        name = self.string(data, "name", required=True)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise self.fail("name", f"{name!r} must be lowercase letters, digits and dashes")
        runtimes = self.runtime_defaults(self.table(data, "runtimes"))
        limits = self.limits(self.table(data, "limits"))
        selection = self.selection(self.table(data, "selection"))
        allow = self.allow(data.get("allow"), runtimes, limits)
        power = self.power(self.table(data, "power"))
        if selection.objective == "efficiency":
            missing = sorted({a.device for a in allow} - set(power))
            if missing:
                raise self.fail(
                    "power",
                    f"objective 'efficiency' needs the watts of every allowed device; "
                    f"missing {', '.join(missing)}",
                )
        return Profile(
            name=name,
            description=self.string(data, "description") or "",
            priority=self.integer(data, "priority", "priority", default=0, minimum=-1000),
            match=self.match(self.table(data, "match")),
            selection=selection,
            limits=limits,
            allow=allow,
            power=power,
            path=self.path,
            digest=digest,
        )

    # tables

    def match(self, data: dict[str, Any]) -> MatchRules:
        rules = self.rules(data, "match", extra=("any_of",))
        groups = data.get("any_of", [])
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise self.fail("match.any_of", "expected an array of tables ([[match.any_of]])")
        any_of = tuple(self.rules(g, f"match.any_of[{i}]") for i, g in enumerate(groups))
        for index, group in enumerate(any_of):
            if not group:
                raise self.fail(f"match.any_of[{index}]", "empty group would match anything")
        return MatchRules(rules, any_of)

    def rules(
        self, data: dict[str, Any], where: str, extra: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        self.keys(data, where, (*_RULES, *extra))
        rules: dict[str, Any] = {}
        for key, value in data.items():
            if key in extra:
                continue
            full = f"{where}.{key}"
            if key in _LIST_OF_STR_RULES:
                rules[key] = self.string_list(value, full)
                if not rules[key]:
                    raise self.fail(full, "empty list never matches; remove the key instead")
            elif key in ("nvidia_driver", "tegra"):
                if not isinstance(value, bool):
                    raise self.fail(full, f"expected true or false, got {value!r}")
                rules[key] = value
            else:
                rules[key] = self.integer(data, key, full, minimum=0)
            if key in _REGEX_RULES:
                for pattern in rules[key]:
                    try:
                        re.compile(pattern)
                    except re.error as exc:
                        raise self.fail(
                            full, f"bad regular expression {pattern!r}: {exc}"
                        ) from None
            if key in _ID_RULES:
                for ids in rules[key]:
                    if not re.fullmatch(r"[0-9a-fA-F]{4}:([0-9a-fA-F]{4}|\*)", ids):
                        raise self.fail(
                            full, f"{ids!r} is not 'vendor:device' in hex, e.g. '10de:*'"
                        )
        return rules

    def selection(self, data: dict[str, Any]) -> SelectionSettings:
        where = "selection"
        self.keys(
            data,
            where,
            (
                "objective",
                "warmup_runs",
                "benchmark_seconds",
                "runoff_seconds",
                "min_runs",
                "max_selection_seconds",
                "batch_size",
            ),
        )
        objective = self.string(data, "objective", where=f"{where}.objective") or "latency"
        if objective not in OBJECTIVES:
            raise self.fail(
                f"{where}.objective", f"expected one of {', '.join(OBJECTIVES)}; got {objective!r}"
            )
        defaults = SelectionSettings()
        return SelectionSettings(
            objective=objective,
            warmup_runs=self.integer(
                data,
                "warmup_runs",
                f"{where}.warmup_runs",
                default=defaults.warmup_runs,
                minimum=0,
                maximum=MAX_RUNS,
            ),
            benchmark_seconds=self.number(
                data,
                "benchmark_seconds",
                f"{where}.benchmark_seconds",
                default=defaults.benchmark_seconds,
            ),
            runoff_seconds=self.number(
                data,
                "runoff_seconds",
                f"{where}.runoff_seconds",
                default=defaults.runoff_seconds,
            ),
            min_runs=self.integer(
                data,
                "min_runs",
                f"{where}.min_runs",
                default=defaults.min_runs,
                minimum=1,
                maximum=MAX_RUNS,
            ),
            max_selection_seconds=self.number(
                data,
                "max_selection_seconds",
                f"{where}.max_selection_seconds",
                default=defaults.max_selection_seconds,
            ),
            batch_size=self.integer(
                data,
                "batch_size",
                f"{where}.batch_size",
                default=defaults.batch_size,
                minimum=1,
                maximum=MAX_BATCH_SIZE,
            ),
        )

    def limits(self, data: dict[str, Any]) -> Limits:
        self.keys(data, "limits", ("max_compile_seconds", "max_model_memory_mb"))
        defaults = Limits()
        return Limits(
            max_compile_seconds=self.number(
                data,
                "max_compile_seconds",
                "limits.max_compile_seconds",
                default=defaults.max_compile_seconds,
            ),
            max_model_memory_mb=self.integer(
                data,
                "max_model_memory_mb",
                "limits.max_model_memory_mb",
                default=defaults.max_model_memory_mb,
                minimum=1,
            ),
        )

    def runtime_defaults(self, data: dict[str, Any]) -> dict[str, RuntimeOptions]:
        self.keys(data, "runtimes", RUNTIME_NAMES)
        return {
            runtime: self.options(
                self.table(data, runtime, f"runtimes.{runtime}"),
                runtime,
                f"runtimes.{runtime}",
                RuntimeOptions(),
            )
            for runtime in RUNTIME_NAMES
        }

    def options(
        self,
        data: dict[str, Any],
        runtime: str,
        where: str,
        base: RuntimeOptions,
        extra_keys: tuple[str, ...] = (),
    ) -> RuntimeOptions:
        self.keys(data, where, (*_OPTION_KEYS[runtime], *extra_keys))
        values: dict[str, Any] = {}
        if "threads" in data:
            threads = data["threads"]
            if (
                not isinstance(threads, list)
                or not threads
                or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in threads
                )
            ):
                raise self.fail(
                    f"{where}.threads",
                    f"expected a non-empty list of thread counts >= 0 (0: runtime default), "
                    f"got {threads!r}",
                )
            values["threads"] = tuple(threads)
        for key, allowed in (("hints", OPENVINO_HINTS), ("precisions", OPENVINO_PRECISIONS)):
            if key in data:
                items = self.string_list(data[key], f"{where}.{key}")
                bad = [i for i in items if i not in allowed]
                if bad or not items:
                    raise self.fail(
                        f"{where}.{key}",
                        f"expected a non-empty list of {', '.join(allowed)}; got {items!r}",
                    )
                values[key] = tuple(items)
        if "compile_cache" in data:
            if not isinstance(data["compile_cache"], bool):
                raise self.fail(f"{where}.compile_cache", "expected true or false")
            values["compile_cache"] = data["compile_cache"]
        if "cache_max_mb" in data:
            values["cache_max_mb"] = self.integer(
                data, "cache_max_mb", f"{where}.cache_max_mb", minimum=1
            )
        return RuntimeOptions(**{**base.__dict__, **values})

    def allow(
        self, entries: Any, runtimes: dict[str, RuntimeOptions], limits: Limits
    ) -> tuple[AllowedDevice, ...]:
        if entries is None:
            raise self.fail("allow", "missing: list the allowed runtimes and devices as [[allow]]")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise self.fail("allow", "expected an array of tables ([[allow]])")
        if not entries:
            raise self.fail("allow", "empty: a profile must allow at least one runtime and device")
        allowed: list[AllowedDevice] = []
        seen: set[tuple[str, str]] = set()
        for index, entry in enumerate(entries):
            where = f"allow[{index}]"
            runtime = self.string(entry, "runtime", where=f"{where}.runtime", required=True)
            if runtime not in RUNTIME_NAMES:
                raise self.fail(
                    f"{where}.runtime",
                    f"expected one of {', '.join(RUNTIME_NAMES)}; got {runtime!r}",
                )
            device = self.string(entry, "device", where=f"{where}.device", required=True).upper()
            if (runtime, device) in seen:
                raise self.fail(f"{where}", f"{runtime} {device} is listed twice")
            seen.add((runtime, device))
            option_data = {k: v for k, v in entry.items() if k not in ("runtime", "device")}
            options = self.options(
                option_data, runtime, where, runtimes[runtime], extra_keys=("max_compile_seconds",)
            )
            compile_seconds = self.number(
                entry,
                "max_compile_seconds",
                f"{where}.max_compile_seconds",
                default=limits.max_compile_seconds,
            )
            allowed.append(AllowedDevice(runtime, device, options, compile_seconds))
        return tuple(allowed)

    def power(self, data: dict[str, Any]) -> dict[str, float]:
        power = {}
        for device in data:
            power[device.upper()] = self.number(data, device, f"power.{device}", MAX_WATTS)
        return power

    # scalars

    def keys(self, data: dict[str, Any], where: str, known: Iterable[str]) -> None:
        known = tuple(known)
        for key in data:
            if key not in known:
                full = f"{where}.{key}" if where else key
                raise self.fail(full, f"unknown key; expected one of {', '.join(known)}")

    def table(self, data: dict[str, Any], key: str, where: str | None = None) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(where or key, f"expected a table, got {type(value).__name__}")
        return value

    def string(
        self, data: dict[str, Any], key: str, where: str | None = None, required: bool = False
    ) -> str:
        value = data.get(key)
        if value is None:
            if required:
                raise self.fail(where or key, "missing")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.fail(where or key, f"expected a non-empty string, got {value!r}")
        return value

    def string_list(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, f"expected a list of strings, got {value!r}")
        return value

    def integer(
        self,
        data: dict[str, Any],
        key: str,
        where: str,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(where, f"must be <= {maximum}, got {value}")
        return value

    def number(
        self,
        data: dict[str, Any],
        key: str,
        where: str,
        maximum: float = MAX_SECONDS,
        default: float | None = None,
    ) -> float:
        """A number in (0, maximum]; seconds unless told otherwise. nan and inf are refused."""
        value = data.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(where, f"expected a number, got {value!r}")
        if not 0 < value <= maximum:
            raise self.fail(where, f"must be > 0 and <= {maximum:g}, got {value}")
        return float(value)
