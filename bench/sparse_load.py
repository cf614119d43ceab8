#!/usr/bin/env python3
"""CPU per request at a sparse request rate: the agent next to raw onnxruntime and MLServer.

Edge apps mostly ask now and then (a camera frame a second, a sensor window), and a node runs
other work beside its models: what a request costs in CPU matters there more than peak
throughput. ONNX Runtime's intra-op threads go on spinning after each run by default; the
agent has them stop when a run ends (runtimes/onnx.py). This measures, for the sample MLP and
CNN, one request every --interval-ms from one client:

- onnxruntime session.run in this process, with ONNX Runtime's default session options;
- onnxruntime session.run with the options the agent uses (runtimes.load): the work itself;
- the agent over gRPC (raw contents), and MLServer 1.7.1 over gRPC (bench/mlserver_runtime.py,
  the agent's session options), each in its own process tree.

CPU is the process (tree) user + system time over the measurement, all threads, divided by the
requests; setups take turns within each round and the figures are medians over the rounds.

    .venv/bin/python bench/sparse_load.py [--interval-ms MS] [--requests N] [--rounds N]
                                          [--skip-mlserver] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
from common import CpuMeter, percentile, running, say, tree_cpu_seconds_fine
from serving import (
    AGENT_READY_TIMEOUT_S,
    GRPC_METHOD,
    MLSERVER_READY_TIMEOUT_S,
    MLSERVER_VERSION,
    MODELS,
    OUTPUT_ATOL,
    OUTPUT_RTOL,
    REQUEST_TIMEOUT_S,
    BenchmarkError,
    ServerSpec,
    agent_launcher,
    ensure_mlserver,
    grpc_outputs,
    grpc_request,
    launch,
    mlserver_launcher,
    source_state,
    write_repositories,
)
from tritonclient.grpc import service_pb2

from agent.samples import sample_input
from runtimes import load as load_session

WARMUP_CALLS = 10
SETTLE_S = 0.25  # longer than ONNX Runtime's threads spin after a run (~50 ms here)
ROW_LABELS = {
    "ort-defaults": "onnxruntime session.run, its default options",
    "ort-agent-options": "onnxruntime session.run, the agent's options",
    "agent": "agent, gRPC",
    "mlserver": f"MLServer {MLSERVER_VERSION}, gRPC",
}


@dataclass(frozen=True)
class Settings:
    interval_s: float
    requests: int
    rounds: int
    skip_mlserver: bool
    json_path: Path | None


@dataclass(frozen=True)
class Sample:
    """One measurement: `requests` requests, one every interval."""

    requests: int
    cpu_ms_per_request: float  # CPU of the process (tree) that ran the model
    p50_ms: float
    p99_ms: float
    foreign_cores: float  # CPU other processes used meanwhile: noise


def paced(call: Callable[[], None], settings: Settings, pid: int | None) -> Sample:
    """Call once every interval (at once when a call overran it), timing each call and the
    CPU of `pid`'s tree (None: this process)."""

    def cpu_seconds() -> float:
        return time.process_time() if pid is None else tree_cpu_seconds_fine(pid)

    latencies: list[float] = []
    meter, cpu_before = CpuMeter(pid), cpu_seconds()
    start = time.perf_counter()
    for index in range(settings.requests):
        delay = start + index * settings.interval_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        began = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - began) * 1000)
    # the last request's after-effects (threads still spinning) belong to it, not to the next
    # setup measured
    time.sleep(max(settings.interval_s, SETTLE_S))
    cpu_s, noise = cpu_seconds() - cpu_before, meter.stop()
    return Sample(
        settings.requests,
        cpu_s * 1000 / settings.requests,
        percentile(latencies, 50),
        percentile(latencies, 99),
        noise.foreign,
    )


def check_answer(where: str, outputs: dict[str, np.ndarray], expected: dict) -> None:
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            raise BenchmarkError(f"{where}: output {name} missing or of the wrong shape")
        if not np.allclose(got, want, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL):
            raise BenchmarkError(f"{where}: output {name} differs from onnxruntime's")


def raw_calls(model_file: Path, inputs: dict, expected: dict) -> dict[str, Callable[[], None]]:
    """session.run with ONNX Runtime's defaults and with the agent's options, checked once."""
    plain = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    agent_session = load_session(model_file)
    check_answer("session.run", dict(zip(names, plain.run(names, inputs), strict=True)), expected)
    check_answer("session.run (agent's options)", agent_session.infer(inputs), expected)
    calls = {
        "ort-defaults": lambda: plain.run(names, inputs),
        "ort-agent-options": lambda: agent_session.infer(inputs),
    }
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()
    return calls


def grpc_call(channel: grpc.Channel, model: str, inputs: dict, expected: dict, where: str):
    """A unary ModelInfer of pre-serialized bytes; its answer checked once."""
    stub = channel.unary_unary(GRPC_METHOD)  # no serializers: bytes in, bytes out
    message = grpc_request(model, inputs)
    try:
        answer = stub(message, timeout=REQUEST_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise BenchmarkError(f"{where}: {exc.code().name}: {exc.details()}") from None
    check_answer(where, grpc_outputs(service_pb2.ModelInferResponse.FromString(answer)), expected)

    def call() -> None:
        stub(message, timeout=REQUEST_TIMEOUT_S)

    for _ in range(WARMUP_CALLS):
        call()
    return call


def server_specs(settings: Settings, repos, workdir: Path) -> list[ServerSpec]:
    specs = [
        ServerSpec("agent", "agent", ("grpc",), MODELS, (1,), agent_launcher(repos.agent),
                   AGENT_READY_TIMEOUT_S),
    ]  # fmt: skip
    if not settings.skip_mlserver:
        launcher = mlserver_launcher(ensure_mlserver(), repos.model_files, workdir)
        specs.append(
            ServerSpec("mlserver", f"MLServer {MLSERVER_VERSION}", ("grpc",), MODELS, (1,),
                       launcher, MLSERVER_READY_TIMEOUT_S)
        )  # fmt: skip
    return specs


def run(settings: Settings, workdir: Path) -> dict[str, dict[str, list[Sample]]]:
    """model -> setup -> one Sample per round."""
    say("generating the sample models")
    repos = write_repositories(workdir, {})
    inputs = {m: sample_input(m) for m in MODELS}
    # what every setup must answer: onnxruntime's own output with its default options
    expected = {}
    for model in MODELS:
        session = onnxruntime.InferenceSession(
            str(repos.model_files[model]), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        expected[model] = dict(zip(names, session.run(names, inputs[model]), strict=True))
    calls: dict[str, dict[str, tuple[Callable[[], None], int | None]]] = {}
    for model in MODELS:
        raw = raw_calls(repos.model_files[model], inputs[model], expected[model])
        calls[model] = {name: (call, None) for name, call in raw.items()}
    with contextlib.ExitStack() as stack:
        for spec in server_specs(settings, repos, workdir):
            server, ports = launch(spec, workdir)
            stack.enter_context(running(server))
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
            for model in MODELS:
                where = f"{spec.label} {model}"
                call = grpc_call(channel, model, inputs[model], expected[model], where)
                calls[model][spec.name] = (call, server.pid)
        samples: dict[str, dict[str, list[Sample]]] = {m: {} for m in MODELS}
        for number in range(1, settings.rounds + 1):
            say(f"round {number} of {settings.rounds}")
            for model in MODELS:
                for name, (call, pid) in calls[model].items():
                    sample = paced(call, settings, pid)
                    samples[model].setdefault(name, []).append(sample)
                    say(f"{model} {ROW_LABELS[name]}: {sample.cpu_ms_per_request:.2f} ms CPU"
                        f" per request, p50 {sample.p50_ms:.2f} ms"
                        f" (other processes {sample.foreign_cores:.2f} cores)")  # fmt: skip
    return samples


def summarize(samples: dict[str, dict[str, list[Sample]]]) -> dict:
    """Medians over the rounds, and each setup's CPU as a multiple of the work itself."""
    summary = {}
    for model, setups in samples.items():
        rows = {
            name: {
                "cpu_ms_per_request": statistics.median(s.cpu_ms_per_request for s in runs),
                "p50_ms": statistics.median(s.p50_ms for s in runs),
                "p99_ms": statistics.median(s.p99_ms for s in runs),
            }
            for name, runs in setups.items()
        }
        work = rows["ort-agent-options"]["cpu_ms_per_request"]
        for row in rows.values():
            row["cpu_vs_work"] = row["cpu_ms_per_request"] / work if work > 0 else None
        summary[model] = rows
    return summary


def format_table(summary: dict, settings: Settings) -> str:
    rate = 1 / settings.interval_s
    lines = [
        f"One request every {settings.interval_s * 1000:g} ms ({rate:g}/s), one client;"
        " medians over the rounds. CPU: user + system of the process (tree), all threads.",
        "",
        "| model | setup | CPU ms / request | x the work | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for model, rows in summary.items():
        for name, row in rows.items():
            ratio = row["cpu_vs_work"]
            lines.append(
                f"| {model} | {ROW_LABELS[name]} | {row['cpu_ms_per_request']:.2f}"
                f" | {'-' if ratio is None else f'{ratio:.2f}x'}"
                f" | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval-ms",
        type=float,
        default=100.0,
        help="time from one request to the next (default 100: 10 per second)",
    )
    parser.add_argument(
        "--requests", type=int, default=30, help="requests per measurement (default 30)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--skip-mlserver", action="store_true", help="leave MLServer out")
    parser.add_argument(
        "--quick", action="store_true", help="one round of 5 requests 20 ms apart: a smoke run"
    )
    parser.add_argument("--json", type=Path, help="also write the JSON document there")
    args = parser.parse_args(argv)  # fmt: skip
    if args.interval_ms <= 0 or args.requests < 1 or args.rounds < 1:
        parser.error("--interval-ms must be above 0, --requests and --rounds at least 1")
    if args.quick:
        args.interval_ms, args.requests, args.rounds = 20.0, 5, 1
    return Settings(
        args.interval_ms / 1000, args.requests, args.rounds, args.skip_mlserver, args.json
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-sparse-") as tmp:
            samples = run(settings, Path(tmp))
    except BenchmarkError as exc:
        print(f"sparse_load: {exc}", file=sys.stderr)
        return 1
    summary = summarize(samples)
    document = {
        "benchmark": "sparse_load",
        "source": source_state(),
        "settings": {**asdict(settings), "json_path": None},
        "onnxruntime": onnxruntime.__version__,
        "summary": summary,
        "samples": {
            model: {name: [asdict(s) for s in runs] for name, runs in setups.items()}
            for model, setups in samples.items()
        },
    }
    print(format_table(summary, settings))
    print(json.dumps(document, indent=2))
    if settings.json_path:
        settings.json_path.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
