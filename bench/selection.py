"""Accelerator selection, checked against independent measurements of every candidate.

    python bench/selection.py [--profile NAME|FILE] [--rounds 7] [--json OUT.json]

For each sample model set (cnn: ONNX + OpenVINO IR variants of one CNN; mlp: ONNX; mlp-tflite:
TFLite) it runs selection from scratch with this node's firmware profile, timed. Then it loads
every verified candidate again in this process and measures them all interleaved, round-robin
with a rotating order, so each p50 is independent of selection's own numbers and every candidate
sees the same machine load. Finally a fresh Python process asks for the decision again: the
cached start. Targets (issue 3): chosen within 10% of the fastest verified candidate, CNN
selection <= 5 s, cached start <= 50 ms. Prints a table per model, the target ratios, and JSON.

Runtimes that are not installed are simply not candidates, so the same script runs on a GPU box
with onnxruntime-gpu (CUDA execution provider) and without OpenVINO.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.profiles import Profile, resolve  # noqa: E402
from agent.selection import DecisionCache, SelectionError, choose  # noqa: E402
from agent.selection.decision import CHOSEN, VERIFIED, Decision  # noqa: E402
from agent.selection.inputs import batched, random_inputs  # noqa: E402
from agent.selection.report import render  # noqa: E402
from runtimes.hardware import probe  # noqa: E402

TARGET_RATIO = 1.10
TARGET_CNN_SELECTION_S = 5.0
TARGET_CACHED_START_MS = 50.0

# model set -> the sample models whose files become its variants
MODEL_SETS = {
    "cnn": ("cnn", "cnn-openvino"),
    "mlp": ("mlp",),
    "mlp-tflite": ("mlp-tflite",),
}

# Run in a fresh interpreter: what an agent restart does before serving the model.
CACHED_START = r"""
import json, sys, time
started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from agent.profiles import resolve
from agent.selection import DecisionCache, choose
from runtimes.hardware import probe
imported = time.perf_counter()
facts = probe()
profile = resolve(sys.argv[4] or None, facts)
decision = choose(sys.argv[2], profile=profile, cache=DecisionCache(sys.argv[3]), facts=facts)
done = time.perf_counter()
print(json.dumps({"from_cache": decision.from_cache, "import_ms": (imported - started) * 1e3,
                  "decide_ms": (done - imported) * 1e3}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="force a firmware profile (default: detect)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--slice", type=float, default=0.15, help="seconds per candidate per round (default 0.15)"
    )
    parser.add_argument("--restarts", type=int, default=5, help="cached starts timed (default 5)")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefleet-bench-selection-"))
    work.mkdir(parents=True, exist_ok=True)
    facts = probe()
    profile = resolve(args.profile, facts)
    report: dict[str, Any] = {
        "machine": {
            "cpu": facts.cpu_model,
            "logical_cpus": facts.logical_cpus,
            "accelerators": [a.name for a in facts.accelerators()],
            "fingerprint": facts.fingerprint(),
            "load_average_before": os.getloadavg(),
        },
        "profile": profile.name,
        "objective": profile.selection.objective,
        "models": [],
    }
    print(
        f"profile {profile.name} (objective {profile.selection.objective}); "
        f"{facts.cpu_model}, {facts.logical_cpus} CPUs; work dir {work}"
    )
    sets = make_model_sets(work)
    for name, directory in sets.items():
        report["models"].append(bench_model(name, directory, work, profile, args))
    report["machine"]["load_average_after"] = os.getloadavg()
    report["targets"] = targets(report)
    print_targets(report["targets"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\nJSON:")
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def make_model_sets(work: Path) -> dict[str, Path]:
    """Sample models grouped into model directories of variants (what the agent would get)."""
    from agent.samples import write_sample_repository

    samples = work / "samples"
    try:
        write_sample_repository(samples)
    except ImportError as exc:
        # A GPU box may lack openvino or tflite: keep the ONNX models written before the failure.
        print(f"note: {exc.name} is missing, so some sample variants were not generated")
    sets = {}
    for name, members in MODEL_SETS.items():
        target = work / "models" / name / "1"
        target.mkdir(parents=True, exist_ok=True)
        for member in members:
            source = samples / member / "1"
            for path in sorted(source.glob("model.*")) if source.is_dir() else []:
                if path.suffix != ".toml":  # no pins: let selection see every candidate
                    shutil.copy(path, target / path.name)
        if any(target.iterdir()):
            sets[name] = target.parent
    return sets


def bench_model(
    name: str, directory: Path, work: Path, profile: Profile, args: argparse.Namespace
) -> dict[str, Any]:
    database = work / "state" / f"{name}.db"
    print(
        f"\n== {name}: selecting ({', '.join(p.name for p in sorted((directory / '1').iterdir()))})"
    )
    started = time.perf_counter()
    try:
        decision = choose(
            directory,
            profile=profile,
            cache=DecisionCache(database),
            state_dir=work / "state",
            progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True),
        )
    except SelectionError as exc:
        print(f"   selection failed: {exc}")
        return {"model": name, "error": str(exc)}
    selection_s = time.perf_counter() - started
    independent = measure_independently(decision, profile, args.rounds, args.slice)
    cached = cached_starts(directory, database, args.profile, args.restarts)
    entry = summarize(name, decision, selection_s, independent, cached)
    print_model(entry)
    return entry


def measure_independently(
    decision: Decision, profile: Profile, rounds: int, slice_s: float
) -> dict[str, list[float]]:
    """Latencies (ms) of every verified candidate, loaded afresh here and run interleaved."""
    from runtimes.loader import load

    sessions = {}
    for result in decision.results:
        if result.verdict not in (VERIFIED, CHOSEN):
            continue
        candidate = result.candidate
        path = decision.variant_path.parent / candidate.variant
        session = load(path, runtime=candidate.runtime, options=candidate.load_options())
        specs = [(s.name, s.datatype, s.shape) for s in session.inputs]
        inputs = random_inputs(specs)
        if profile.selection.objective != "latency":
            inputs = batched(inputs, specs, profile.selection.batch_size)
        for _ in range(10):
            session.infer(inputs)
        sessions[candidate.label()] = (session, inputs)
    latencies: dict[str, list[float]] = {label: [] for label in sessions}
    labels = list(sessions)
    clock = time.perf_counter
    for round_index in range(rounds):
        shift = round_index % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            session, inputs = sessions[label]
            deadline = clock() + slice_s
            runs = 0
            while runs < 5 or clock() < deadline:
                begun = clock()
                session.infer(inputs)
                latencies[label].append((clock() - begun) * 1e3)
                runs += 1
    for session, _ in sessions.values():
        session.close()
    return latencies


def cached_starts(directory: Path, database: Path, profile: str | None, count: int) -> list[dict]:
    runs = []
    for _ in range(count):
        begun = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CACHED_START,
                str(ROOT),
                str(directory),
                str(database),
                profile or "",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["process_ms"] = (time.perf_counter() - begun) * 1e3
        runs.append(run)
    return runs


def summarize(
    name: str,
    decision: Decision,
    selection_s: float,
    independent: dict[str, list[float]],
    cached: list[dict],
) -> dict[str, Any]:
    p50 = {label: statistics.median(values) for label, values in independent.items()}
    fastest = min(p50.values()) if p50 else None
    chosen_label = decision.chosen.candidate.label()
    rows = []
    for result in decision.results:
        label = result.candidate.label()
        rows.append(
            {
                "candidate": label,
                "verdict": result.verdict,
                "reason": result.reason,
                "max_error": result.max_error,
                "selection_p50_ms": result.p50_ms,
                "independent_p50_ms": p50.get(label),
                "independent_runs": len(independent.get(label, [])),
                "vs_fastest": p50[label] / fastest if label in p50 and fastest else None,
            }
        )
    return {
        "model": name,
        "variants": list(decision.key.variants),
        "selection_seconds": selection_s,
        "chosen": chosen_label,
        "chosen_vs_fastest": p50[chosen_label] / fastest if fastest else None,
        "fastest": min(p50, key=p50.get) if p50 else None,
        "cached_start": {
            "all_from_cache": all(r["from_cache"] for r in cached),
            "decide_ms_median": statistics.median(r["decide_ms"] for r in cached),
            "import_ms_median": statistics.median(r["import_ms"] for r in cached),
            "process_ms_median": statistics.median(r["process_ms"] for r in cached),
        },
        "candidates": rows,
    }


def print_model(entry: dict[str, Any]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}" if value < 0.1 else f"{value:.3f}"

    table = [
        [
            row["candidate"],
            row["verdict"] + (" *" if row["verdict"] == CHOSEN else ""),
            ms(row["selection_p50_ms"]),
            ms(row["independent_p50_ms"]),
            "-" if row["vs_fastest"] is None else f"{row['vs_fastest']:.3f}",
        ]
        for row in entry["candidates"]
    ]
    columns = ["candidate", "verdict", "selection p50 ms", "independent p50 ms", "vs fastest"]
    print(render(columns, table))
    cached = entry["cached_start"]
    print(
        f"selection {entry['selection_seconds']:.2f} s; chosen/fastest "
        f"{entry['chosen_vs_fastest']:.3f}; cached start: decide {cached['decide_ms_median']:.1f} "
        f"ms (imports {cached['import_ms_median']:.0f} ms, whole process "
        f"{cached['process_ms_median']:.0f} ms), from cache: {cached['all_from_cache']}"
    )


def targets(report: dict[str, Any]) -> dict[str, Any]:
    models = [m for m in report["models"] if "error" not in m]
    worst_ratio = max(m["chosen_vs_fastest"] for m in models)
    cnn = next((m for m in models if m["model"] == "cnn"), None)
    cached = max(m["cached_start"]["decide_ms_median"] for m in models)
    return {
        "chosen_vs_fastest_worst": worst_ratio,
        "chosen_vs_fastest_ok": worst_ratio <= TARGET_RATIO,
        "cnn_selection_seconds": cnn["selection_seconds"] if cnn else None,
        "cnn_selection_ratio": cnn["selection_seconds"] / TARGET_CNN_SELECTION_S if cnn else None,
        "cached_start_ms_worst": cached,
        "cached_start_ratio": cached / TARGET_CACHED_START_MS,
    }


def print_targets(result: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print("\ntargets")
    print(
        f"  chosen within 10% of the fastest verified: worst ratio "
        f"{result['chosen_vs_fastest_worst']:.3f} (target <= {TARGET_RATIO:.2f}) "
        f"{verdict(result['chosen_vs_fastest_ok'])}"
    )
    if result["cnn_selection_seconds"] is not None:
        print(
            f"  CNN selection {result['cnn_selection_seconds']:.2f} s = "
            f"{result['cnn_selection_ratio']:.2f} x the 5 s target "
            f"{verdict(result['cnn_selection_ratio'] <= 1)}"
        )
    print(
        f"  cached start {result['cached_start_ms_worst']:.1f} ms = "
        f"{result['cached_start_ratio']:.2f} x the 50 ms target "
        f"{verdict(result['cached_start_ratio'] <= 1)}"
    )


if __name__ == "__main__":
    sys.exit(main())
