"""The outcome of selection: every candidate's measurements and verdict, and the one chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.selection.candidates import Candidate
from agent.selection.key import SelectionKey
from runtimes.base import LoadOptions, Session

CHOSEN, VERIFIED, REJECTED, SKIPPED = "chosen", "verified", "rejected", "skipped"


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
        values = dict(data)
        values["candidate"] = Candidate.from_dict(data["candidate"])
        return cls(**values)


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

    def load(self) -> Session:
        """Open the model exactly as selected."""
        from runtimes.loader import load

        return load(self.variant_path, runtime=self.runtime, options=self.options)

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
        options = data["options"]
        return cls(
            model=data["model"],
            variant=data["variant"],
            variant_path=Path(data["variant_path"]),
            runtime=data["runtime"],
            device=data["device"],
            options=LoadOptions(options["device"], options["threads"], dict(options["extra"])),
            candidate=Candidate.from_dict(data["candidate"]),
            objective=data["objective"],
            score_unit=data["score_unit"],
            profile=data["profile"],
            key=SelectionKey.from_dict(data["key"]),
            results=[CandidateResult.from_dict(r) for r in data["results"]],
            selection_seconds=float(data["selection_seconds"]),
            decided_at=data["decided_at"],
            from_cache=bool(data.get("from_cache", False)),
        )
