"""`edgefleet-agent select MODEL_DIR [--json]`: measure and choose how to run one model here."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
import tomllib
from pathlib import Path

from agent.commands.accelerators import add_profile_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="measure every allowed runtime/device/option for a model and choose one",
        description="Load each candidate (variant x runtime x device x options) the firmware "
        "profile allows, check its outputs against the CPU fp32 reference (or golden.npz), "
        "benchmark it and choose by the profile's objective. The decision is stored in the "
        "agent state and reused until the model, hardware, runtimes or profile change.",
    )
    p.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        help="a model's directory (<model>/ or <model>/<version>/)",
    )
    add_profile_arguments(p)
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="agent state directory (default: $EDGEFLEET_STATE_DIR or ~/.local/state/edgefleet)",
    )
    p.add_argument(
        "--again",
        action="store_true",
        help="measure again even if a decision for this exact key is stored",
    )
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli import UserError
    from agent.profiles import ProfileError, resolve
    from agent.selection import (
        DecisionCache,
        SelectionError,
        ToleranceError,
        choose,
        model_settings,
    )
    from agent.selection.report import candidate_table, decision_text
    from agent.selection.selector import DATABASE, default_state_dir
    from agent.selection.variants import VariantError, version_dir
    from runtimes.hardware import probe

    if not args.model_dir.is_dir():
        raise UserError(f"{args.model_dir}: no such model directory")
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    facts = probe()
    try:
        profile = resolve(args.profile, facts, args.profiles_dir)
        directory = version_dir(args.model_dir)
        tolerance, pin = model_settings(_model_toml(directory / "model.toml"))
    except (ProfileError, VariantError, ToleranceError, ValueError) as exc:
        raise UserError(str(exc)) from None
    state_dir = args.state_dir or default_state_dir()
    try:
        cache = DecisionCache(state_dir / DATABASE)
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"cannot open the agent state in {state_dir}: {exc}") from None
    progress(f"profile {profile.name}, objective {profile.selection.objective}")
    try:
        decision = choose(
            args.model_dir,
            profile=profile,
            cache=cache,
            state_dir=state_dir,
            tolerance=tolerance,
            pin=pin,
            facts=facts,
            reuse=not args.again,
            progress=progress,
        )
    except VariantError as exc:
        raise UserError(str(exc)) from None
    except SelectionError as exc:
        if exc.results:
            print(candidate_table(exc.results))
        raise UserError(str(exc)) from None
    if args.json:
        json.dump(decision.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(decision_text(decision))
    return 0


def _model_toml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: {exc}") from None
