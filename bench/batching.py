"""What dynamic batching gains as the model's own cost grows.

bench/serving.py measures batching on the sample MLP (64 -> 256 -> 10), which runs in ~7 µs:
there a request's protocol work on the event loop (~90 µs over REST) dwarfs the run, and
batching can only save the per-execution hand-off. This benchmark shows the other side: MLPs
64 -> H -> H -> 10 of growing width H, each served by two agents, one with dynamic batching
(`max_batch_size = 32`) and one without (`max_batch_size = 0`), everything else equal (one model
thread, one runtime thread). REST JSON at 32 wrk connections, rounds interleaved; the table shows
the median req/s of each and the median of each round's on/off ratio, next to the model's own
single-row and 32-row run times from onnxruntime in this process.

    .venv/bin/python bench/batching.py [--widths 256,1024,2048] [--rounds 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import free_port, running, say, start_server, wait_http_ready
from onnx import TensorProto, helper, numpy_helper

from runtimes.loader import load

ROOT = Path(__file__).resolve().parent.parent

WRK_SCRIPT = ROOT / "bench" / "wrk" / "infer.lua"
CLIENTS = 32
BATCH = 32


def wide_mlp(width: int) -> onnx.ModelProto:
    """64 -> width -> width -> 10, ReLU between, He-initialised (fixed seed)."""
    rng = np.random.default_rng(width)
    sizes = [(64, width), (width, width), (width, 10)]
    initializers, nodes, x = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(sizes):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2 / fan_in)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        y = "output" if i == len(sizes) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y]))
        if y != "output":
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        f"mlp{width}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_repositories(root: Path, widths: list[int]) -> dict[str, Path]:
    repos = {"on": root / "on", "off": root / "off"}
    for mode, repo in repos.items():
        for width in widths:
            version = repo / f"mlp{width}" / "1"
            version.mkdir(parents=True)
            onnx.save(wide_mlp(width), version / "model.onnx")
            batch = BATCH if mode == "on" else 0
            (version / "model.toml").write_text(f"max_batch_size = {batch}\nthreads = 1\n")
    return repos


def run_times_us(model_file: Path) -> tuple[float, float]:
    """Median onnxruntime run time at 1 row and at BATCH rows, as the agent loads the model."""
    from runtimes.base import LoadOptions

    session = load(model_file, options=LoadOptions(threads=1))
    times = []
    for rows in (1, BATCH):
        x = {"input": np.ones((rows, 64), np.float32)}
        session.infer(x)
        samples = []
        for _ in range(200):
            start = time.perf_counter()
            session.infer(x)
            samples.append((time.perf_counter() - start) * 1e6)
        times.append(statistics.median(samples))
    return times[0], times[1]


def wrk_rps(port: int, model: str, body: Path, duration_s: int) -> float:
    command = [
        "wrk", "-t1", f"-c{CLIENTS}", f"-d{duration_s}s", "-s", str(WRK_SCRIPT),
        f"http://127.0.0.1:{port}/v2/models/{model}/infer", "--", str(body),
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    doc = json.loads(re.search(r"^WRK_RESULT (\{.*\})$", output, re.MULTILINE).group(1))
    errors = sum(doc[k] for k in ("connect_errors", "read_errors", "write_errors"))
    errors += doc["status_errors"] + doc["timeouts"]
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors on {model}")
    return doc["requests"] / (doc["duration_us"] / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="256,1024,2048", help="hidden widths H")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgefleet-batching-") as tmp:
        work = Path(tmp)
        repos = write_repositories(work / "models", widths)
        body = work / "body.json"
        row = np.linspace(-1, 1, 64, dtype=np.float32).tolist()
        body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 64],
                                                "datatype": "FP32", "data": row}]}))  # fmt: skip
        runs = {w: run_times_us(repos["on"] / f"mlp{w}" / "1" / "model.onnx") for w in widths}
        ports = {mode: free_port() for mode in repos}
        servers = {}
        for mode, repo in repos.items():
            command = [
                sys.executable, "-m", "agent.cli", "serve", "--models", str(repo),
                "--http", f"127.0.0.1:{ports[mode]}", "--grpc", "off", "--no-select",
            ]  # fmt: skip
            log = work / f"{mode}.log"
            servers[mode] = start_server(f"agent (batching {mode})", command, log, cwd=ROOT)
        results: dict[int, dict[str, list[float]]] = {w: {"on": [], "off": []} for w in widths}
        with running(servers["on"]), running(servers["off"]):
            for mode, server in servers.items():
                wait_http_ready(server, ports[mode], "/v2/health/ready", 120)
            for mode in servers:
                for width in widths:
                    wrk_rps(ports[mode], f"mlp{width}", body, 1)  # warm-up
            for round_ in range(args.rounds):
                for width in widths:
                    for mode in ("on", "off"):
                        rps = wrk_rps(ports[mode], f"mlp{width}", body, args.duration)
                        results[width][mode].append(rps)
                        say(f"round {round_ + 1} mlp{width} batching {mode}: {rps:,.0f} req/s")
    print(f"\nREST JSON, {CLIENTS} connections, medians over {args.rounds} round(s)")
    header = "model                 run 1 row  run 32 rows  on req/s  off req/s  on/off"
    print(header + "\n" + "-" * len(header))
    doc = []
    for width in widths:
        on, off = results[width]["on"], results[width]["off"]
        ratio = statistics.median(a / b for a, b in zip(on, off, strict=True))
        one, batch = runs[width]
        name = f"64-{width}-{width}-10"
        print(
            f"{name:20} {one:8.0f} µs {batch:9.0f} µs {statistics.median(on):9,.0f} "
            f"{statistics.median(off):10,.0f} {ratio:6.2f}x"
        )
        doc.append({"width": width, "run_us": [one, batch], "on": on, "off": off, "ratio": ratio})
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
