"""A model update end to end on loopback, step by step, next to merely copying the same bytes.

    python bench/update.py [--rounds 3] [--profile NAME|FILE] [--json OUT.json]

A control plane (TUF repository, registered publisher, artifact endpoint over mutual TLS) and a
node (update lifecycle + serving agent) run on this machine. The package is the sample CNN with
two variants (ONNX and OpenVINO IR); the node downloads the variants its firmware profile allows.
For each round the desired state moves to the next version and `agent.update.apply` runs until
the agent serves it; the time of each journal step is reported. Two scenarios:

- new weights: every version's ONNX weights differ (by far less than the golden tolerance), so
  accelerator selection measures again, as it must for a retrained model;
- same weights: a republished version whose variants are unchanged, so selection's stored
  decision applies (e.g. a manifest or golden-vector change).

Baselines for the same bytes: `cp` + fsync of the archive(s), and a plain HTTPS download of
them over the same mutual-TLS connection. Prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.samples import write_sample_repository  # noqa: E402
from agent.serving.server import ServeOptions  # noqa: E402
from agent.update import ACTIVE  # noqa: E402
from agent.update.config import UpdateLimits  # noqa: E402
from agent.update.journal import Journal  # noqa: E402
from agent.update.transport import Transport, download_resumable  # noqa: E402
from bench.common import say  # noqa: E402
from controlplane.model_store import ModelStore  # noqa: E402
from provisioning.signing import sign_package  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

# The journal's steps as the lifecycle times them; "reload" is the agent loading the new
# version after the switch, "other" what the run spends outside the steps (recovery, start-up).
STEPS = (
    "tuf_refresh",
    "download",
    "verify",
    "unpack",
    "signature",
    "select",
    "self_test",
    "activate",
    "reload",
)
VARIANTS = ("onnx-fp32", "openvino-ir")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="updates per scenario (default 3)")
    parser.add_argument("--profile", help="firmware profile of the node (default: detect)")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefleet-bench-update-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\nJSON:")
    print(json.dumps(report, indent=2))
    return 0


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    say("generating the sample CNN (ONNX + OpenVINO IR)")
    samples = work / "samples"
    write_sample_repository(samples)
    rounds = args.rounds
    versions = {
        "first install": [1],
        "new weights": [2 + i for i in range(rounds)],
        "same weights": [100 + i for i in range(rounds)],
    }
    with Fleet.create(work / "fleet", samples) as fleet:
        say(f"publishing {1 + 2 * rounds} versions of cnn")
        for scenario, numbers in versions.items():
            for version in numbers:
                package = fleet.package(version, name="cnn", sample="cnn", variants=VARIANTS)
                if scenario == "new weights":
                    _new_weights(package, version)
                elif scenario == "same weights":  # the last retrained weights, republished
                    source = fleet.packages[versions["new weights"][-1]] / "model.onnx"
                    shutil.copyfile(source, package / "model.onnx")
                sign_package(package, fleet.publisher_key)
                ModelStore(fleet.repository).push(package)

        models = work / "node" / "models"
        models.mkdir(parents=True)
        with ServerThread(ServeOptions(models, "127.0.0.1:0", None, None)) as agent:
            node = fleet.node(work / "node", agent_url=f"http://{agent.http_url}")
            # The node's own firmware profile (detected) unless one is forced.
            node.settings = replace(node.settings, profile=args.profile, limits=UpdateLimits())
            scenarios: dict[str, list[dict[str, float]]] = {}
            for scenario, numbers in versions.items():
                scenarios[scenario] = [_update(fleet, node, scenario, v) for v in numbers]
            last = versions["same weights"][-1]
            archives = _archives(fleet, node, last)
            baseline = _baselines(fleet, node, archives, work, rounds)
            journal = Journal(node.settings.database)
            decision = journal.job(journal.role("cnn", "active").job_id).decision
    return {
        "model": "cnn (sample CNN, 224x224 input)",
        "variants_published": list(VARIANTS),
        "variants_downloaded": [a["variant"] for a in archives],
        "bytes_downloaded": sum(a["length"] for a in archives),
        "chosen": decision,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "scenarios": {name: _summary(rows) for name, rows in scenarios.items()},
        "raw": scenarios,
        "baselines": baseline,
    }


def _update(fleet: Fleet, node, scenario: str, version: int) -> dict[str, float]:
    """One desired-state change, timed until the agent serves the new version."""
    say(f"{scenario}: cnn -> {version}")
    started = time.perf_counter()
    (outcome,) = fleet.apply(node, {"cnn": version})
    total = time.perf_counter() - started
    if outcome.state != ACTIVE:
        raise SystemExit(f"cnn@{version}: {outcome.state}: {outcome.reason}")
    timings = {step: outcome.timings.get(step, 0.0) for step in STEPS}
    timings["other"] = total - sum(timings.values())
    timings["total"] = total
    return timings


def _new_weights(package: Path, version: int) -> None:
    """Retrain, in miniature: move the last bias by far less than the golden tolerance."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(package / "model.onnx"))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "fc_b":
            bias = numpy_helper.to_array(tensor) + np.float32(version * 1e-7)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(bias, "fc_b"))
    onnx.save(model, str(package / "model.onnx"))


def _archives(fleet: Fleet, node, version: int) -> list[dict[str, Any]]:
    journal = Journal(node.settings.database)
    job = journal.last_job("cnn", version)
    found = []
    for target in job.targets:
        info = target["info"]
        blob = fleet.repository.blobs_dir / info["hashes"]["sha256"]
        found.append(
            {
                "variant": target["variant"],
                "path": target["path"],
                "blob": blob,
                "length": info["length"],
            }
        )
    return found


def _baselines(fleet: Fleet, node, archives, work: Path, rounds: int) -> dict[str, dict]:
    """The same bytes, copied on disk (cp + fsync), and downloaded over the same mutual-TLS
    HTTPS with the same download code but nothing else (no TUF, no signature, no unpacking)."""
    copies, downloads = [], []
    transport = Transport(node.settings.ssl_context(), node.settings.limits)
    for _ in range(max(rounds, 3)):
        started = time.perf_counter()
        for archive in archives:
            target = work / f"copy-{archive['variant']}.tar"
            shutil.copyfile(archive["blob"], target)
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
            target.unlink()
        copies.append(time.perf_counter() - started)
        started = time.perf_counter()
        for archive in archives:
            directory, _, name = archive["path"].rpartition("/")
            url = f"{fleet.server.url}/v1/tuf/targets/{directory}/{archive['blob'].name}.{name}"
            partial = work / f"download-{archive['variant']}.part"
            download_resumable(transport, url, partial, archive["length"])
            partial.unlink()
        downloads.append(time.perf_counter() - started)
    transport.close()
    return {
        "copy (cp + fsync)": {"median_ms": statistics.median(copies) * 1e3},
        "HTTPS download (mTLS)": {"median_ms": statistics.median(downloads) * 1e3},
    }


def _summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [*STEPS, "other", "total"]
    return {
        key: {
            "median_ms": statistics.median(r[key] for r in rows) * 1e3,
            "min_ms": min(r[key] for r in rows) * 1e3,
            "max_ms": max(r[key] for r in rows) * 1e3,
        }
        for key in keys
    }


def print_report(report: dict[str, Any]) -> None:
    scenarios = report["scenarios"]
    names = list(scenarios)
    megabytes = report["bytes_downloaded"] / 1e6
    chosen = report["chosen"] or {}
    print(
        f"\nupdate of {report['model']}: variants {', '.join(report['variants_downloaded'])} "
        f"downloaded ({megabytes:.1f} MB); chosen: {chosen.get('label', '?')}; "
        f"median of {report['rounds']} updates (first install: one), {report['cpus']} CPUs"
    )
    header = f"{'step':<26}" + "".join(f"{n + ' (ms)':>22}" for n in names)
    print(header)
    print("-" * len(header))
    for step in [*STEPS, "other", "total"]:
        cells = "".join(f"{scenarios[n][step]['median_ms']:>22.1f}" for n in names)
        print(f"{'apply: ' + step if step == 'total' else '  ' + step:<26}{cells}")
    print("-" * len(header))
    for name, figures in report["baselines"].items():
        print(f"{'same bytes: ' + name:<26}{figures['median_ms']:>22.1f}")
    copy_ms = report["baselines"]["copy (cp + fsync)"]["median_ms"]
    for name in names:
        total = scenarios[name]["total"]["median_ms"]
        print(f"{name}: whole update = {total / copy_ms:.1f} x the plain copy")


if __name__ == "__main__":
    sys.exit(main())
