"""The candidate table, as people read it (the `select` command, the bench) and as JSON."""

from __future__ import annotations

from typing import Any

from agent.selection.decision import CHOSEN, CandidateResult, Decision

COLUMNS = (
    "#",
    "variant",
    "runtime",
    "device",
    "options",
    "load s",
    "p50 ms",
    "p99 ms",
    "max error",
    "mem MiB",
    "verdict",
)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _error(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def rows(results: list[CandidateResult]) -> list[list[str]]:
    table = []
    for index, r in enumerate(results, 1):
        c = r.candidate
        table.append(
            [
                str(index),
                c.variant,
                c.runtime,
                c.device,
                c.describe_options(),
                _number(r.load_seconds, 2),
                _number(r.p50_ms),
                _number(r.p99_ms),
                _error(r.max_error),
                _number(r.memory_mb, 0),
                r.verdict + (" *" if r.verdict == CHOSEN else ""),
            ]
        )
    return table


def render(columns: tuple[str, ...] | list[str], table: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(columns, *table, strict=True)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    return "\n".join(lines)


def candidate_table(results: list[CandidateResult]) -> str:
    """The table, then one line per candidate that was not measured or not accepted."""
    text = render(COLUMNS, rows(results))
    notes = [f"  {i}. {r.verdict}: {r.reason}" for i, r in enumerate(results, 1) if r.reason]
    if notes:
        text += "\n\nwhy not:\n" + "\n".join(notes)
    return text


def decision_text(decision: Decision) -> str:
    chosen = decision.chosen
    origin = "cached decision" if decision.from_cache else "measured now"
    head = (
        f"model {decision.model}: {len(decision.key.variants)} variant(s), profile "
        f"{decision.profile}, objective {decision.objective}, hardware {decision.key.hardware}"
    )
    tail = (
        f"chosen: {decision.runtime} {decision.device} {chosen.candidate.describe_options()} "
        f"[{decision.variant}]: {_number(chosen.score)} {decision.score_unit}, "
        f"runs on {', '.join(chosen.placement)}\n"
        f"({origin}: decided {decision.decided_at} in {decision.selection_seconds:.1f} s)"
    )
    return f"{head}\n\n{candidate_table(decision.results)}\n\n{tail}"


def decision_json(decision: Decision) -> dict[str, Any]:
    return decision.to_dict()
