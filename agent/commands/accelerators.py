"""`edgefleet-agent accelerators [--json]`: hardware, runtimes, firmware profile, candidates."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "accelerators",
        help="show this node's hardware, runtimes, firmware profile and candidate devices",
        description="Probe the hardware (CPU, memory, GPUs, NPUs, Edge TPUs, drivers), ask each "
        "installed runtime for its devices, pick the firmware profile, and list the "
        "(runtime, device, options) candidates that profile allows here.",
    )
    add_profile_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="also write the raw hardware facts to FILE (a fixture for a new profile's tests)",
    )
    p.set_defaults(func=run)


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    from agent.profiles import PROFILE_ENV

    p.add_argument(
        "--profile",
        default=os.environ.get(PROFILE_ENV),
        metavar="NAME|FILE",
        help=f"force a firmware profile by name or path (default: ${PROFILE_ENV}, else detect)",
    )
    p.add_argument(
        "--profiles-dir",
        type=Path,
        metavar="DIR",
        help="firmware profiles directory (default: $EDGEFLEET_PROFILES_DIR or the shipped one)",
    )


def run(args: argparse.Namespace) -> int:
    from agent.cli import UserError
    from agent.profiles import ProfileError, explain, load_profiles, resolve
    from agent.selection.candidates import device_grid
    from runtimes.discovery import discover
    from runtimes.hardware import LiveSystem, probe, record

    facts = record(LiveSystem(), args.record) if args.record else probe()
    try:
        profile = resolve(args.profile, facts, args.profiles_dir)
        matches = explain(facts, load_profiles(args.profiles_dir))
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    devices = discover()
    grid = device_grid(devices, profile)
    report: dict[str, Any] = {
        "hardware": facts.to_dict(),
        "runtimes": [
            {"runtime": d.runtime, "device": d.device, "details": d.details} for d in devices
        ],
        "profile": {
            "name": profile.name,
            "file": str(profile.path),
            "forced": bool(args.profile),
            "objective": profile.selection.objective,
            "description": profile.description,
        },
        "profiles": [
            {
                "name": m.profile.name,
                "priority": m.profile.priority,
                "matches": m.matched,
                "why": list(m.reasons),
            }
            for m in matches
        ],
        "candidates": [
            {**c.candidate.to_dict(), "available": c.reason is None, "reason": c.reason}
            for c in grid
        ],
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(_text(report))
    return 0


def _text(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    bf16 = "avx512_bf16" in hw["cpu_flags"] or "amx_bf16" in hw["cpu_flags"]
    lines = [
        f"hardware  {hw['fingerprint']}",
        f"  cpu     {hw['cpu_model'] or '?'} ({hw['cpu_vendor'] or '?'}, {hw['architecture']}), "
        f"{hw['logical_cpus']} logical / {hw['physical_cores']} physical cores"
        + (", bf16" if bf16 else ""),
        f"  memory  {hw['memory_bytes'] / 2**30:.1f} GiB",
        f"  board   {hw['board'] or '-'}",
    ]
    accelerators = hw["accelerators"]
    if accelerators:
        lines.append("  accelerators")
        lines += [f"    {a['kind']:<11} {a['name']}  ({a['where']})" for a in accelerators]
    else:
        lines.append("  accelerators  none (CPU only)")
    if hw["nvidia_driver"]:
        lines.append(f"  nvidia driver {hw['nvidia_driver']}")
    lines.append("\nruntimes")
    for d in report["runtimes"]:
        details = d["details"]
        version = str(details.get("version") or "?").split("-")[0]
        about = details.get("FULL_DEVICE_NAME") or details.get("provider") or details.get("package")
        caps = details.get("OPTIMIZATION_CAPABILITIES")
        extra = f"; {' '.join(caps)}" if isinstance(caps, list) else ""
        lines.append(f"  {d['runtime']:<12} {version:<10} {d['device']:<9} {about or ''}{extra}")
    profile = report["profile"]
    how = "forced" if profile["forced"] else "detected"
    lines.append(f"\nprofile   {profile['name']} ({how}; objective {profile['objective']})")
    lines.append(f"  {profile['description']}  [{profile['file']}]")
    for m in report["profiles"]:
        mark = "yes" if m["matches"] else "no "
        lines.append(f"  {mark} {m['name']:<20} {'; '.join(m['why'])}")
    lines.append("\ncandidates (any model; each variant multiplies these)")
    for c in report["candidates"]:
        options = " ".join(
            f"{k}={'auto' if k == 'threads' and v == 0 else v}" for k, v in c["options"].items()
        )
        state = "ok" if c["available"] else f"unavailable: {c['reason']}"
        lines.append(f"  {c['runtime']:<12} {c['device']:<9} {options:<40} {state}")
    return "\n".join(lines)
