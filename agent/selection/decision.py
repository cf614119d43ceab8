"""The outcome of selection: every candidate's measurements and verdict, and the one chosen."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import NoneType
from typing import Any

from agent.selection.candidates import Candidate
from agent.selection.key import SelectionKey
from runtimes.base import LoadOptions, Session

CHOSEN, VERIFIED, REJECTED, SKIPPED = "chosen", "verified", "rejected", "skipped"
VERDICTS = (CHOSEN, VERIFIED, REJECTED, SKIPPED)
MAX_THREADS = 1024  # as model.toml allows


class DecisionError(ValueError):
    """A stored decision this agent cannot use: damaged, or written by another agent version."""


@dataclass
class CandidateResult:
    """One candidate's row in the table.

    verdict: chosen | verified (measured, not the best) | rejected (ran, but outputs out of
    tolerance, wrong placement or over the memory limit) | skipped (not loadable here, failed to
    load, over its time limit, or not reached within the selection budget).
    """

    candidate: Candidate
    verdict: str
    reason: str | None = None
    load_seconds: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    runs: int = 0
    max_error: float | None = None
    memory_mb: float | None = None
    placement: list[str] = field(default_factory=list)
    score: float | None = None  # the objective's figure; lower is better

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "verdict": self.verdict,
            "reason": self.reason,
            "load_seconds": self.load_seconds,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "runs": self.runs,
            "max_error": self.max_error,
            "memory_mb": self.memory_mb,
            "placement": list(self.placement),
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"a result has unknown field(s) {', '.join(sorted(unknown))}")
        verdict = _typed(data, "verdict", str)
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        placement = _typed(data, "placement", list)
        if not all(isinstance(device, str) for device in placement):
            raise TypeError(f"placement {placement!r} is not a list of device names")
        number = (int, float, NoneType)
        return cls(
            candidate=Candidate.from_dict(data["candidate"]),
            verdict=verdict,
            reason=_typed(data, "reason", str, NoneType),
            load_seconds=_typed(data, "load_seconds", *number),
            p50_ms=_typed(data, "p50_ms", *number),
            p99_ms=_typed(data, "p99_ms", *number),
            runs=_typed(data, "runs", int),
            max_error=_typed(data, "max_error", *number),
            memory_mb=_typed(data, "memory_mb", *number),
            placement=placement,
            score=_typed(data, "score", *number),
        )


@dataclass
class Decision:
    """How to load the model on this node, and the evidence for it."""

    model: str
    variant: str
    variant_path: Path
    runtime: str
    device: str
    options: LoadOptions
    candidate: Candidate
    objective: str
    score_unit: str
    profile: str
    key: SelectionKey
    results: list[CandidateResult]
    selection_seconds: float
    decided_at: str
    from_cache: bool = False

    @property
    def chosen(self) -> CandidateResult:
        return next(r for r in self.results if r.verdict == CHOSEN)

    def load(self, idle_spin: bool = False) -> Session:
        """Open the model exactly as selected (`idle_spin`: model.toml's, not selection's)."""
        from runtimes.loader import load

        options = replace(self.options, idle_spin=idle_spin)
        return load(self.variant_path, runtime=self.runtime, options=options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "variant": self.variant,
            "variant_path": str(self.variant_path),
            "runtime": self.runtime,
            "device": self.device,
            "options": {
                "device": self.options.device,
                "threads": self.options.threads,
                "extra": dict(self.options.extra),
            },
            "candidate": self.candidate.to_dict(),
            "objective": self.objective,
            "score_unit": self.score_unit,
            "profile": self.profile,
            "key": self.key.to_dict(),
            "results": [r.to_dict() for r in self.results],
            "selection_seconds": self.selection_seconds,
            "decided_at": self.decided_at,
            "from_cache": self.from_cache,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """What `to_dict` wrote; DecisionError when `data` is not a decision this agent can use."""
        try:
            decision = cls(
                model=_typed(data, "model", str),
                variant=_typed(data, "variant", str),
                variant_path=Path(_typed(data, "variant_path", str)),
                runtime=_typed(data, "runtime", str),
                device=_typed(data, "device", str),
                options=_load_options(_typed(data, "options", dict)),
                candidate=Candidate.from_dict(data["candidate"]),
                objective=_typed(data, "objective", str),
                score_unit=_typed(data, "score_unit", str),
                profile=_typed(data, "profile", str),
                key=SelectionKey.from_dict(data["key"]),
                results=[CandidateResult.from_dict(r) for r in _typed(data, "results", list)],
                selection_seconds=float(_typed(data, "selection_seconds", int, float)),
                decided_at=_typed(data, "decided_at", str),
                from_cache=bool(data.get("from_cache", False)),
            )
        except KeyError as exc:
            raise DecisionError(f"stored decision: {exc} is missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise DecisionError(f"stored decision: {exc}") from None
        if [r.verdict for r in decision.results].count(CHOSEN) != 1:
            raise DecisionError("stored decision: not exactly one candidate is chosen")
        if decision.variant not in decision.key.variants:
            raise DecisionError(f"stored decision: variant {decision.variant!r} is not in its key")
        return decision


def _load_options(data: dict[str, Any]) -> LoadOptions:
    """Stored options, checked: the runtime gets them as they are."""
    threads = _typed(data, "threads", int, NoneType)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads {threads} is not between 1 and {MAX_THREADS}")
    extra = _typed(data, "extra", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError(f"extra options {extra!r} are not all text")
    return LoadOptions(_typed(data, "device", str), threads, dict(extra))


def _typed(data: dict[str, Any], name: str, *kinds: type) -> Any:
    """data[name] if it is one of `kinds` (true and false are no numbers); TypeError if not."""
    value = data[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join("null" if k is NoneType else k.__name__ for k in kinds)
        raise TypeError(f"{name} is {value!r}, not {expected}")
    return value
