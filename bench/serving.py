#!/usr/bin/env python3
"""Serving benchmark: the EdgeFleet agent next to raw onnxruntime and MLServer, in one run.

1. Tools: wrk and h2load (`apt-get install -y wrk nghttp2-client`, done here when run as root),
   and unless --skip-mlserver, MLServer 1.7.1 in the benchmark's own venv `.bench-venv/`
   (created on first use, with the onnxruntime version of this venv).
2. Models: the agent's sample MLP and CNN, and for each one request encoded three ways: KServe
   v2 REST JSON, REST with the binary tensor extension (as tritonclient builds it), and a gRPC
   frame (5-byte prefix + serialized ModelInferRequest with raw_input_contents).
3. Servers, all at once on free loopback ports: the agent (MLP with the sample's batching, CNN),
   the agent again with batching off, MLServer with bench/mlserver_runtime.py. Every
   (server, protocol, model) must answer the encoded request as onnxruntime does.
4. Rounds over all measurements, compared setups back to back: onnxruntime session.run in this
   process (again after every 1-client measurement, which is compared with the session.run
   runs just before and after it); p50/p99 with 1 client and throughput with 8 and 32 (wrk
   with bench/wrk/infer.lua for REST, h2load for gRPC). A measurement taken while other
   processes kept the machine busy is taken again. Then the answers are checked again, and
   RSS of each process tree read.
5. A table of medians, the targets of issue 2 as ratios, and the JSON (--json PATH too).

    .venv/bin/python bench/serving.py [--quick] [--duration S] [--rounds N] [--skip-mlserver]
                                      [--json PATH] [--mlp-setting KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import tritonclient.http as triton_http
from common import (
    CpuMeter,
    ServerFailed,
    ServerProcess,
    free_port,
    percentile,
    running,
    say,
    start_server,
    tree_rss_bytes,
    wait_http_ready,
)
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype

from agent import __version__ as agent_version
from agent.samples import MODEL_VERSION, sample_input, write_sample_repository
from agent.serving.repository import ModelRepository
from runtimes import load as load_session

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BENCH_VENV = ROOT / ".bench-venv"
WRK_SCRIPT = BENCH_DIR / "wrk" / "infer.lua"
MLSERVER_VERSION = "1.7.1"
SYSTEM_TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client"}  # binary -> Debian package

MODELS = ("mlp", "cnn")
AFTER_LOAD_IDLE_S = 3
AGENT_PROTOCOLS = ("rest-json", "rest-binary", "grpc")
MLSERVER_PROTOCOLS = ("rest-json", "grpc")
CLIENTS = (8, 32)
PROTOCOL_LABELS = {"rest-json": "REST JSON", "rest-binary": "REST binary", "grpc": "gRPC raw"}
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
BINARY_HEADER = "Inference-Header-Content-Length"
BATCHING_KEYS = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes")

AGENT_READY_TIMEOUT_S = 60.0
MLSERVER_READY_TIMEOUT_S = 180.0
LAUNCH_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
REQUEST_TIMEOUT_S = 30
RAW_WARMUP_CALLS = 20
RAW_MIN_SAMPLES = 200
OUTPUT_RTOL, OUTPUT_ATOL = 1e-4, 1e-5


class BenchmarkError(RuntimeError):
    """Something the benchmark cannot go on without; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    duration_s: int  # per measurement and round
    rounds: int
    warmup_s: int
    attempts: int  # tries per measurement while the machine is busy with other work
    max_foreign_cores: float  # what "busy" means: CPU other processes use, in cores
    skip_mlserver: bool
    quick: bool
    json_path: Path | None
    mlp_overrides: dict


# --- workloads: one request per model, encoded for each protocol ------------------------------


@dataclass(frozen=True)
class Workload:
    model: str
    model_file: Path
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    json_body: Path
    binary_body: Path
    binary_header_length: int
    grpc_body: Path  # a whole gRPC frame: 5-byte prefix + ModelInferRequest


def make_workload(model: str, model_file: Path, bodies: Path) -> Workload:
    inputs = sample_input(model)
    session = load_session(model_file)
    try:
        expected = session.infer(inputs)
    finally:
        session.close()
    json_body = bodies / f"{model}.json"
    json_body.write_bytes(json_request(inputs))
    binary, header_length = binary_request(inputs, list(expected))
    binary_body = bodies / f"{model}.bin"
    binary_body.write_bytes(binary)
    grpc_body = bodies / f"{model}.grpc"
    grpc_body.write_bytes(grpc_frame(grpc_request(model, inputs)))
    return Workload(
        model, model_file, inputs, expected, json_body, binary_body, header_length, grpc_body
    )


def json_request(inputs: dict[str, np.ndarray]) -> bytes:
    tensors = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": np_to_triton_dtype(array.dtype),
            "data": array.ravel().tolist(),
        }
        for name, array in inputs.items()
    ]
    return json.dumps({"inputs": tensors}).encode()


def binary_request(inputs: dict[str, np.ndarray], outputs: list[str]) -> tuple[bytes, int]:
    """The body tritonclient.http sends by default: binary inputs, binary outputs asked for."""
    infer_inputs = []
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        infer_input = triton_http.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=True)
        infer_inputs.append(infer_input)
    requested = [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]
    body, header_length = triton_http.InferenceServerClient.generate_request_body(
        infer_inputs, outputs=requested
    )
    return body, header_length


def grpc_request(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = np_to_triton_dtype(array.dtype)
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: compressed flag 0, big-endian length, message."""
    return struct.pack(">BI", 0, len(message)) + message


# --- model repositories ----------------------------------------------------------------------


@dataclass(frozen=True)
class Repositories:
    agent: Path  # MLP (sample batching settings) + CNN
    agent_nobatch: Path  # the same with max_batch_size = 0 for the MLP
    model_files: dict[str, Path]


def write_repositories(workdir: Path, mlp_overrides: dict) -> Repositories:
    samples = workdir / "samples"
    write_sample_repository(samples)
    agent = workdir / "agent-models"
    for model in MODELS:
        shutil.copytree(samples / model, agent / model)
    mlp_toml = agent / "mlp" / MODEL_VERSION / "model.toml"
    write_toml(mlp_toml, {**read_toml(mlp_toml), **mlp_overrides})
    nobatch = workdir / "agent-models-nobatch"
    shutil.copytree(agent, nobatch)
    nobatch_toml = nobatch / "mlp" / MODEL_VERSION / "model.toml"
    unbatched = {k: v for k, v in read_toml(nobatch_toml).items() if k not in BATCHING_KEYS}
    write_toml(nobatch_toml, {**unbatched, "max_batch_size": 0})
    files = {model: agent / model / MODEL_VERSION / "model.onnx" for model in MODELS}
    return Repositories(agent, nobatch, files)


def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text()) if path.exists() else {}


def write_toml(path: Path, values: dict) -> None:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as a model.toml value")


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TOML value") from None


# --- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls) -> Ports:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        return cls(*sorted(ports))


@dataclass(frozen=True)
class ServerSpec:
    name: str  # key in the JSON: agent, agent-nobatch, mlserver
    label: str  # for the table
    protocols: tuple[str, ...]
    models: tuple[str, ...]
    levels: tuple[int, ...]  # client counts measured: 1 for p50/p99, more for throughput
    launch: Callable[[Ports, Path], ServerProcess]
    ready_timeout_s: float
    agent_metrics: bool = False  # the agent's /metrics explains where its time goes


def agent_launcher(repository: Path) -> Callable[[Ports, Path], ServerProcess]:
    def launch(ports: Ports, logs: Path) -> ServerProcess:
        command = [
            sys.executable, "-m", "agent.cli", "serve", "--models", str(repository),
            "--http", f"127.0.0.1:{ports.http}", "--grpc", f"127.0.0.1:{ports.grpc}",
            # ONNX Runtime on the CPU, as MLServer's runtime and the raw session.run here: the
            # comparison is of serving, not of accelerator selection (bench/selection.py)
            "--no-select",
        ]  # fmt: skip
        return start_server("agent", command, logs / f"{repository.name}.log", cwd=ROOT)

    return launch


def mlserver_launcher(
    mlserver: Path, model_files: dict[str, Path], workdir: Path
) -> Callable[[Ports, Path], ServerProcess]:
    def launch(ports: Ports, logs: Path) -> ServerProcess:
        repository = write_mlserver_repository(workdir / "mlserver-models", ports, model_files)
        env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
        return start_server(
            "MLServer",
            [str(mlserver), "start", str(repository)],
            logs / "mlserver.log",
            cwd=repository,
            env=env,
        )

    return launch


def write_mlserver_repository(root: Path, ports: Ports, model_files: dict[str, Path]) -> Path:
    """settings.json tuned for MLServer's best showing: one process, no access log."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "parallel_workers": 0,
        "host": "127.0.0.1",
        "http_port": ports.http,
        "grpc_port": ports.grpc,
        "metrics_port": ports.metrics,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    for model, path in model_files.items():
        model_dir = root / model
        model_dir.mkdir(exist_ok=True)
        model_settings = {
            "name": model,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": str(path), "version": MODEL_VERSION},
        }
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return root


def launch(spec: ServerSpec, logs: Path) -> tuple[ServerProcess, Ports]:
    """Start the server and wait until it is ready, retrying on fresh ports if it exits."""
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        ports = Ports.pick()
        say(f"starting {spec.label} (REST :{ports.http}, gRPC :{ports.grpc})")
        server = spec.launch(ports, logs)
        try:
            wait_http_ready(server, ports.http, "/v2/health/ready", spec.ready_timeout_s)
            return server, ports
        except BaseException as exc:
            server.stop()
            if not isinstance(exc, ServerFailed) or attempt == LAUNCH_ATTEMPTS:
                raise
            say(f"{spec.label} failed to start (attempt {attempt}), retrying: {exc}")
    raise AssertionError("unreachable")


# --- answer checks ---------------------------------------------------------------------------


@dataclass
class Target:
    """One server, protocol and model: what a load generator hits."""

    server: str
    protocol: str
    workload: Workload
    ports: Ports
    pid: int
    agent_metrics: bool = False
    grpc_frame_bytes: int = 0  # size of a successful gRPC response frame, learnt by check()

    @property
    def name(self) -> str:
        return f"{self.server} {self.protocol} {self.workload.model}"

    @property
    def rest_path(self) -> str:
        return f"/v2/models/{self.workload.model}/infer"


def check(target: Target) -> None:
    """Send the exact bytes the load generator sends and compare the answer with onnxruntime's."""
    outputs = check_grpc(target) if target.protocol == "grpc" else check_rest(target)
    for name, expected in target.workload.expected.items():
        got = outputs.get(name)
        if got is None or got.shape != expected.shape:
            raise BenchmarkError(f"{target.name}: output {name} missing or of the wrong shape")
        if not np.allclose(got, expected, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL):
            raise BenchmarkError(f"{target.name}: output {name} differs from onnxruntime's")


def check_rest(target: Target) -> dict[str, np.ndarray]:
    workload = target.workload
    binary = target.protocol == "rest-binary"
    body = (workload.binary_body if binary else workload.json_body).read_bytes()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers = {
            "Content-Type": "application/octet-stream",
            BINARY_HEADER: str(workload.binary_header_length),
        }
    connection = http.client.HTTPConnection("127.0.0.1", target.ports.http, REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", target.rest_path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise BenchmarkError(f"{target.name}: HTTP {response.status}: {payload[:300]!r}")
    header_length = response.getheader(BINARY_HEADER)
    result = triton_http.InferenceServerClient.parse_response_body(
        payload, header_length=int(header_length) if header_length else None
    )
    return {name: result.as_numpy(name) for name in workload.expected}


def check_grpc(target: Target) -> dict[str, np.ndarray]:
    message = target.workload.grpc_body.read_bytes()[5:]
    with grpc.insecure_channel(f"127.0.0.1:{target.ports.grpc}") as channel:
        call = channel.unary_unary(GRPC_METHOD)  # no serializers: bytes in, bytes out
        try:
            answer = call(message, timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise BenchmarkError(f"{target.name}: {exc.code().name}: {exc.details()}") from None
    target.grpc_frame_bytes = len(grpc_frame(answer))
    return grpc_outputs(service_pb2.ModelInferResponse.FromString(answer))


def grpc_outputs(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            data = np.frombuffer(response.raw_output_contents[index], np.float32)
        else:
            data = np.asarray(tensor.contents.fp32_contents, np.float32)
        outputs[tensor.name] = data.reshape(tuple(tensor.shape))
    return outputs


# --- load generators -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    clients: int
    requests: int
    duration_s: float
    errors: int
    p50_us: float | None
    p99_us: float | None
    server_cores: float  # CPU the server used, in cores
    loadgen_cores: float  # CPU the load generator used
    foreign_cores: float  # CPU everything else on the machine used: noise
    loop_us: float  # the server's main thread (its event loop) CPU per request, in µs
    agent: dict[str, float] | None = None  # the agent's own account, see agent_breakdown()

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s


@dataclass(frozen=True)
class _Counts:
    requests: int
    duration_s: float
    errors: int
    p50_us: float | None = None
    p99_us: float | None = None


def run_load(target: Target, clients: int, duration_s: int, workdir: Path) -> LoadResult:
    """Closed-loop load: `clients` connections, each one request at a time."""
    generator = run_h2load if target.protocol == "grpc" else run_wrk
    before = scrape_agent(target) if target.agent_metrics else None
    meter = CpuMeter(target.pid)
    counts = generator(target, clients, duration_s, workdir)
    cpu = meter.stop()
    breakdown = agent_breakdown(before, scrape_agent(target)) if before is not None else None
    return LoadResult(
        clients,
        counts.requests,
        counts.duration_s,
        counts.errors,
        counts.p50_us,
        counts.p99_us,
        cpu.server,
        cpu.loadgen,
        cpu.foreign,
        cpu.server_main_thread_s * 1e6 / max(counts.requests, 1),
        breakdown,
    )


# The agent's per-model counters (Prometheus text, `_total` suffix) used to split its time.
_AGENT_COUNTERS = {
    "requests": "edgefleet_inference_request_success_total",
    "rows": "edgefleet_inference_count_total",
    "executions": "edgefleet_inference_exec_count_total",
    "request_us": "edgefleet_inference_request_duration_us_total",
    "queue_us": "edgefleet_inference_queue_duration_us_total",
    "compute_us": "edgefleet_inference_compute_infer_duration_us_total",
}
_SAMPLE = re.compile(r'^(\w+)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', re.MULTILINE)


def scrape_agent(target: Target) -> dict[str, float]:
    """The agent's counters for the target's model."""
    connection = http.client.HTTPConnection("127.0.0.1", target.ports.http, REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    values = {name: 0.0 for name in _AGENT_COUNTERS}
    metric_keys = {metric: key for key, metric in _AGENT_COUNTERS.items()}
    for metric, model, value in _SAMPLE.findall(text):
        if model == target.workload.model and metric in metric_keys:
            values[metric_keys[metric]] += float(value)
    return values


def agent_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per request, as the agent saw it: time in the data plane (validation to result), of it
    waiting in the queue and running the model; and rows per model execution. What the client
    saw beyond the data plane time went to the front end, the network and the client."""
    delta = {key: after[key] - before[key] for key in after}
    requests, executions = delta["requests"] or 1.0, delta["executions"] or 1.0
    return {
        "dataplane_us": delta["request_us"] / requests,
        "queue_us": delta["queue_us"] / requests,
        "compute_us_per_execution": delta["compute_us"] / executions,
        "mean_batch_rows": delta["rows"] / executions,
    }


def run_wrk(target: Target, clients: int, duration_s: int, workdir: Path) -> _Counts:
    workload = target.workload
    command = [
        "wrk", "-t1", f"-c{clients}", f"-d{duration_s}s", f"--timeout={REQUEST_TIMEOUT_S}s",
        "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{target.ports.http}{target.rest_path}", "--",
    ]  # fmt: skip
    if target.protocol == "rest-binary":
        command += [str(workload.binary_body), str(workload.binary_header_length)]
    else:
        command += [str(workload.json_body)]
    output = _run_tool(command, duration_s)
    match = re.search(r"^WRK_RESULT (\{.*\})$", output, re.MULTILINE)
    if not match:
        raise BenchmarkError(f"wrk printed no result:\n{output}")
    doc = json.loads(match.group(1))
    errors = sum(doc[k] for k in ("connect_errors", "read_errors", "write_errors"))
    errors += doc["status_errors"] + doc["timeouts"]
    return _Counts(doc["requests"], doc["duration_us"] / 1e6, errors, doc["p50_us"], doc["p99_us"])


def run_h2load(target: Target, clients: int, duration_s: int, workdir: Path) -> _Counts:
    """h2load posts the pre-encoded gRPC frame. It cannot read trailers, so a request counts as
    good only if its response carried a full frame: errors come back trailers-only, no data."""
    log = workdir / "h2load-requests.tsv"
    log.unlink(missing_ok=True)
    command = [
        "h2load", "-t1", f"-c{clients}", "-m1", f"-D{duration_s}",
        "-d", str(target.workload.grpc_body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
    ]  # fmt: skip
    if clients == 1:
        command.append(f"--log-file={log}")
    command.append(f"http://127.0.0.1:{target.ports.grpc}{GRPC_METHOD}")
    output = _run_tool(command, duration_s)
    finished = re.search(r"finished in ([\d.]+)s", output)
    requests = re.search(r"requests: .* (\d+) done, (\d+) succeeded", output)
    data = re.search(r"traffic: .*\((\d+)\) data", output)
    if not (finished and requests and data):
        raise BenchmarkError(f"unexpected h2load output:\n{output}")
    done, succeeded = int(requests.group(1)), int(requests.group(2))
    full_frames = int(data.group(1)) // target.grpc_frame_bytes
    errors = (done - succeeded) + max(0, succeeded - full_frames)
    p50 = p99 = None
    if clients == 1:
        p50, p99 = _log_percentiles(log)
    return _Counts(done, float(finished.group(1)), errors, p50, p99)


def _log_percentiles(log: Path) -> tuple[float, float]:
    """p50/p99 of h2load's per-request log (start µs, status, elapsed µs)."""
    elapsed = [float(line.split("\t")[2]) for line in log.read_text().splitlines() if line]
    if not elapsed:
        raise BenchmarkError("h2load logged no request")
    return percentile(elapsed, 50), percentile(elapsed, 99)


def _run_tool(command: list[str], duration_s: int) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + REQUEST_TIMEOUT_S + 30
    )
    if result.returncode != 0:
        raise BenchmarkError(
            f"{command[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


# --- measurements ----------------------------------------------------------------------------
#
# The machine is shared and its load changes from one minute to the next, so figures taken
# minutes apart do not compare. Every server therefore runs at once (idle unless measured), and
# the benchmark goes through all measurements in rounds, each round in an order that puts the
# setups a target compares next to each other. A figure is the median over the rounds.


_MEASUREMENT_ORDER = itertools.count()


@dataclass
class Figures:
    """One row of the table: a server (or onnxruntime itself), a protocol, a model."""

    server: str
    protocol: str
    model: str
    p50_us: float | None = None
    p99_us: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)  # clients -> requests/s
    errors: int = 0
    runs: list[dict] = field(default_factory=list)  # every round's raw result

    def add(self, run: LoadResult) -> None:
        self.errors += run.errors
        order = next(_MEASUREMENT_ORDER)  # when it ran, among every measurement of the run
        self.runs.append({**asdict(run), "throughput": run.throughput, "order": order})

    def summarize(self) -> None:
        """Medians over the rounds."""
        single = [r for r in self.runs if r["clients"] == 1]
        if single:
            self.p50_us = statistics.median(r["p50_us"] for r in single)
            self.p99_us = statistics.median(r["p99_us"] for r in single)
        for clients in sorted({r["clients"] for r in self.runs} - {1}):
            rates = [r["throughput"] for r in self.runs if r["clients"] == clients]
            self.throughput[str(clients)] = statistics.median(rates)


class RawSession:
    """onnxruntime in this process, loaded as the agent loads the model: runtimes.load with
    the options of the model's model.toml (e.g. the MLP's `threads`)."""

    def __init__(self, workload: Workload, repository: Path):
        self.workload = workload
        config = ModelRepository(repository).source(workload.model, MODEL_VERSION).config
        self.session = load_session(
            workload.model_file, runtime=config.runtime, options=config.load_options()
        )
        for _ in range(RAW_WARMUP_CALLS):
            self.session.infer(workload.inputs)

    def time(self, duration_s: float) -> LoadResult:
        inputs, infer = self.workload.inputs, self.session.infer
        samples: list[float] = []
        meter, start = CpuMeter(None), time.perf_counter()
        deadline = start + duration_s
        while time.perf_counter() < deadline or len(samples) < RAW_MIN_SAMPLES:
            began = time.perf_counter_ns()
            infer(inputs)
            samples.append((time.perf_counter_ns() - began) / 1000)
        elapsed, cpu = time.perf_counter() - start, meter.stop()
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        return LoadResult(
            1, len(samples), elapsed, 0, p50, p99, cpu.this_process, 0.0, cpu.foreign, 0.0
        )

    def close(self) -> None:
        self.session.close()


@dataclass(frozen=True)
class Measurement:
    """One entry of a round: run `measure(duration_s)` and add the result to `figures`."""

    figures: Figures
    clients: int
    measure: Callable[[float], LoadResult]

    def describe(self, run: LoadResult) -> str:
        f = self.figures
        text = f"{f.server} {f.protocol} {f.model}: {self.clients:>2} clients"
        text += f" {run.throughput:>8,.0f} req/s"
        if self.clients == 1:
            text += f", p50 {run.p50_us:,.0f} µs p99 {run.p99_us:,.0f} µs"
        text += f" (cores: server {run.server_cores:.2f}, load generator"
        text += f" {run.loadgen_cores:.2f}, other processes {run.foreign_cores:.2f})"
        if run.loop_us:
            text += f" [event loop {run.loop_us:,.1f} µs/request]"
        if run.agent:
            a = run.agent
            text += f" [data plane {a['dataplane_us']:,.0f} µs, queue {a['queue_us']:,.0f} µs,"
            text += f" run {a['compute_us_per_execution']:,.0f} µs"
            text += f" x {a['mean_batch_rows']:.1f} rows]"
        return text + (f", {run.errors} ERRORS" if run.errors else "")


def plan_round(
    specs: list[ServerSpec],
    targets: dict[tuple[str, str, str], Target],
    raw: dict[str, RawSession],
    workdir: Path,
) -> list[Measurement]:
    """The order of one round: per model and client count, session.run first, then each
    protocol on each server, so that compared setups run back to back. Measurements of one
    setup share its Figures, one row of the table."""
    rows: dict[tuple[str, str, str], Figures] = {}

    def row(server: str, protocol: str, model: str) -> Figures:
        return rows.setdefault((server, protocol, model), Figures(server, protocol, model))

    plan = []
    for model in MODELS:
        raw_run = Measurement(row("onnxruntime", "session.run", model), 1, raw[model].time)
        plan.append(raw_run)
        for clients in (1, *CLIENTS):
            for protocol in AGENT_PROTOCOLS:
                for spec in specs:
                    target = targets.get((spec.name, protocol, model))
                    if target is not None and clients in spec.levels:
                        measure = functools.partial(run_load, target, clients, workdir=workdir)
                        plan.append(Measurement(row(spec.name, protocol, model), clients, measure))
                        if clients == 1:
                            # session.run again right after: each latency is compared with
                            # the raw runs just before and after it (Results.ratio), as this
                            # host's speed drifts by a third within a minute
                            plan.append(raw_run)
    return plan


def run_rounds(plan: list[Measurement], settings: Settings) -> list[Figures]:
    for number in range(1, settings.rounds + 1):
        say(f"round {number} of {settings.rounds}: {len(plan)} measurements")
        for measurement in plan:
            measurement.figures.add(measure_quietly(measurement, settings))
    rows = list({id(m.figures): m.figures for m in plan}.values())
    for row in rows:
        row.summarize()
    return sorted(rows, key=_row_order)


def measure_quietly(measurement: Measurement, settings: Settings) -> LoadResult:
    """Measure again (up to `attempts` times) while other processes took more than
    `max_foreign_cores` of the machine; keep the quietest attempt."""
    best: LoadResult | None = None
    for attempt in range(1, settings.attempts + 1):
        run = measurement.measure(settings.duration_s)
        say(measurement.describe(run))
        if best is None or run.foreign_cores < best.foreign_cores:
            best = run
        if run.foreign_cores <= settings.max_foreign_cores:
            break
        if attempt < settings.attempts:
            say(f"  other processes used {run.foreign_cores:.2f} cores: measuring again")
    assert best is not None
    return best


def _row_order(f: Figures) -> tuple[int, int, int]:
    servers = ("onnxruntime", "agent", "agent-nobatch", "mlserver")
    protocols = ("session.run", *AGENT_PROTOCOLS)
    return servers.index(f.server), MODELS.index(f.model), protocols.index(f.protocol)


def targets_of(
    spec: ServerSpec, server: ServerProcess, ports: Ports, workloads: dict[str, Workload]
) -> dict[tuple[str, str, str], Target]:
    return {
        (spec.name, protocol, model): Target(
            spec.name, protocol, workloads[model], ports, server.pid, spec.agent_metrics
        )
        for model in spec.models
        for protocol in spec.protocols
    }


def warm_up(targets: list[Target], settings: Settings, workdir: Path) -> None:
    if not settings.warmup_s:
        return
    say(f"warming up: {settings.warmup_s} s at {max(CLIENTS)} clients per setup")
    for target in targets:
        run_load(target, max(CLIENTS), settings.warmup_s, workdir)


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    value: float | None
    bound: float
    at_least: bool  # the value must be >= bound (else <= bound)
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def as_dict(self) -> dict:
        sign = ">=" if self.at_least else "<="
        return {
            "name": self.name,
            "value": self.value,
            "target": f"{sign} {self.bound:g}{self.unit}",
            "met": self.met,
        }


Setup = tuple[str, str, str]  # server, protocol, model


class Results:
    """All figures of a run, looked up by (server, protocol, model)."""

    def __init__(self) -> None:
        self.figures: list[Figures] = []
        self.rss_mb: dict[str, dict[str, float]] = {}

    def get(self, setup: Setup) -> Figures | None:
        for f in self.figures:
            if (f.server, f.protocol, f.model) == setup:
                return f
        return None

    def ratio(self, a: Setup, b: Setup, clients: int) -> float | None:
        """Median over the rounds of a / b: p50 at 1 client, else throughput. In each round the
        two were measured back to back, so each round's ratio saw about the same machine; a
        latency against session.run is compared with the mean of the session.run p50s measured
        just before and just after it (plan_round brackets every 1-client measurement)."""
        fa, fb = self.get(a), self.get(b)
        if fa is None or fb is None or fa.errors or fb.errors:
            return None
        if clients == 1 and b[1] == "session.run":
            return _bracketed_ratio(fa.runs, fb.runs)
        key = "p50_us" if clients == 1 else "throughput"
        va = [run[key] for run in fa.runs if run["clients"] == clients]
        vb = [run[key] for run in fb.runs if run["clients"] == clients]
        if not va or len(va) != len(vb) or not all(vb):
            return None
        return statistics.median(x / y for x, y in zip(va, vb, strict=True))

    def goals(self) -> list[Goal]:
        raw_cnn = ("onnxruntime", "session.run", "cnn")
        goals = [
            Goal(
                "REST JSON MLP throughput@8, agent / MLServer",
                self.ratio(("agent", "rest-json", "mlp"), ("mlserver", "rest-json", "mlp"), 8),
                3,
                at_least=True,
            ),
            Goal(
                "gRPC MLP throughput@8, agent / MLServer",
                self.ratio(("agent", "grpc", "mlp"), ("mlserver", "grpc", "mlp"), 8),
                2,
                at_least=True,
            ),
            Goal(
                "CNN p50, agent gRPC raw / session.run",
                self.ratio(("agent", "grpc", "cnn"), raw_cnn, 1),
                1.15,
                at_least=False,
            ),
            Goal(
                "CNN p50, agent REST binary / session.run",
                self.ratio(("agent", "rest-binary", "cnn"), raw_cnn, 1),
                1.15,
                at_least=False,
            ),
        ]
        for protocol in AGENT_PROTOCOLS:
            on, off = ("agent", protocol, "mlp"), ("agent-nobatch", protocol, "mlp")
            goals.append(
                Goal(
                    f"MLP throughput@32 {PROTOCOL_LABELS[protocol]}, batching on / off",
                    self.ratio(on, off, max(CLIENTS)),
                    2,
                    at_least=True,
                )
            )
        rss = self.rss_mb.get("agent", {})
        for moment, label in (("ready", "once ready"), ("after_load", "after the load")):
            name = f"agent RSS, MLP + CNN, {label}"
            goals.append(Goal(name, rss.get(moment), 120, False, " MiB"))
        return goals


def _bracketed_ratio(runs: list[dict], raw_runs: list[dict]) -> float | None:
    """Median of each 1-client p50 over the mean p50 of the raw runs just before and after it."""
    ratios = []
    for run in (r for r in runs if r["clients"] == 1):
        before = [r for r in raw_runs if r["order"] < run["order"]]
        after = [r for r in raw_runs if r["order"] > run["order"]]
        near = [max(before, key=itemgetter("order"))] if before else []
        near += [min(after, key=itemgetter("order"))] if after else []
        if not near:
            return None
        ratios.append(run["p50_us"] / statistics.fmean(r["p50_us"] for r in near))
    return statistics.median(ratios) if ratios else None


# --- report ----------------------------------------------------------------------------------


def setup_label(server: str, protocol: str) -> str:
    servers = {
        "onnxruntime": "onnxruntime",
        "agent": "agent",
        "agent-nobatch": "agent, batching off",
        "mlserver": f"MLServer {MLSERVER_VERSION}",
    }
    return f"{servers[server]} {PROTOCOL_LABELS.get(protocol, protocol)}"


def format_table(results: Results) -> str:
    """One row per setup; `loop µs` is the server's main thread (its event loop) CPU per
    request at the most clients, `other` the CPU (cores) other processes used meanwhile."""
    most = max(CLIENTS)
    header = f"{'setup':<32} {'model':<5} {'p50 µs':>8} {'p99 µs':>8}"
    header += "".join(f" {f'req/s@{c}':>9}" for c in CLIENTS)
    header += f" {f'loop µs@{most}':>11}  errors  other"
    lines = [header, "-" * len(header)]
    for f in results.figures:
        cells = [_cell(f.p50_us), _cell(f.p99_us)]
        cells += [_cell(f.throughput.get(str(c))) for c in CLIENTS]
        row = f"{setup_label(f.server, f.protocol):<32} {f.model:<5} {cells[0]:>8} {cells[1]:>8}"
        row += "".join(f" {c:>9}" for c in cells[2:])
        loop = [r["loop_us"] for r in f.runs if r["clients"] == most and r["loop_us"]]
        row += f" {_cell(statistics.median(loop) if loop else None):>11}"
        errors = "" if f.server == "onnxruntime" else f.errors
        other = statistics.median(run["foreign_cores"] for run in f.runs)
        lines.append(row + f"  {errors:>6}  {other:5.2f}")
    return "\n".join(lines)


def format_memory(results: Results) -> str:
    lines = ["RSS of the server process tree, MLP + CNN loaded:"]
    for server, rss in results.rss_mb.items():
        lines.append(
            f"  {setup_label(server, '').strip():<22} {rss['ready']:6.0f} MiB when ready, "
            f"{rss['after_load']:6.0f} MiB after the load"
        )
    return "\n".join(lines)


def format_goals(goals: list[Goal]) -> str:
    lines = ["Targets (issue 2); a ratio is the median of each round's ratio:"]
    for goal in goals:
        doc = goal.as_dict()
        precision = 3 if goal.unit == "x" else 1
        value = "n/a" if goal.value is None else f"{goal.value:.{precision}f}{goal.unit}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal.met]
        lines.append(f"  {goal.name:<52} {value:>10}  target {doc['target']:<9} {verdict}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def source_state() -> dict:
    """Which code was measured: the commit and the files changed since (read-only git)."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.rstrip() if result.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "changed_files": changed}


def machine_info() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "agent": agent_version,
        "load_average_at_end": list(os.getloadavg()),
    }


def report_document(
    results: Results, settings: Settings, started: float, load_at_start: list[float]
) -> dict:
    return {
        "benchmark": "bench/serving.py",
        "settings": {
            "duration_s": settings.duration_s,
            "rounds": settings.rounds,
            "attempts": settings.attempts,
            "max_foreign_cores": settings.max_foreign_cores,
            "warmup_s": settings.warmup_s,
            "quick": settings.quick,
            "mlp_overrides": settings.mlp_overrides,
            "mlserver": None if settings.skip_mlserver else MLSERVER_VERSION,
        },
        "source": source_state(),
        "machine": {
            **machine_info(),
            "load_average_at_start": load_at_start,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "setups": [asdict(f) for f in results.figures],
        "rss_mb": results.rss_mb,
        "targets": [goal.as_dict() for goal in results.goals()],
    }


# --- setup: tools and the MLServer venv ------------------------------------------------------


def ensure_load_generators() -> None:
    missing = [name for name in SYSTEM_TOOLS if shutil.which(name) is None]
    if not missing:
        return
    packages = sorted({SYSTEM_TOOLS[name] for name in missing})
    install = ["apt-get", "install", "-y", *packages]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchmarkError(
            f"{', '.join(missing)} not found; install with: sudo {' '.join(install)}"
        )
    say(f"installing {' '.join(packages)} (apt-get)")
    if subprocess.run(install).returncode != 0:
        subprocess.run(["apt-get", "update"], check=False)
        if subprocess.run(install).returncode != 0:
            raise BenchmarkError(f"could not install {' '.join(packages)} with apt-get")


def ensure_mlserver(venv: Path = BENCH_VENV) -> Path:
    """The `mlserver` command of the benchmark's own venv, created on first use."""
    python, command = venv / "bin" / "python", venv / "bin" / "mlserver"
    if _mlserver_version(python) == MLSERVER_VERSION and command.exists():
        return command
    say(f"creating {venv} with MLServer {MLSERVER_VERSION} (first run only; a few minutes)")
    packages = [f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={onnxruntime.__version__}", "numpy"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", *packages],
    ]
    for step in steps:
        say(" ".join(step))
        if subprocess.run(step, stdout=sys.stderr).returncode != 0:
            raise BenchmarkError(
                f"could not build {venv} ({' '.join(step[2:])} failed); "
                "rerun with --skip-mlserver to benchmark without MLServer"
            )
    if _mlserver_version(python) != MLSERVER_VERSION:
        raise BenchmarkError(f"MLServer {MLSERVER_VERSION} did not install into {venv}")
    return command


def _mlserver_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = "import mlserver, onnxruntime; print(mlserver.__version__)"
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


# --- main ------------------------------------------------------------------------------------


def server_specs(repos: Repositories, settings: Settings, workdir: Path) -> list[ServerSpec]:
    levels = (1, *CLIENTS)
    specs = [
        ServerSpec("agent", "agent", AGENT_PROTOCOLS, MODELS, levels,
                   agent_launcher(repos.agent), AGENT_READY_TIMEOUT_S, agent_metrics=True),
        ServerSpec("agent-nobatch", "agent, batching off", AGENT_PROTOCOLS, ("mlp",),
                   (max(CLIENTS),), agent_launcher(repos.agent_nobatch), AGENT_READY_TIMEOUT_S,
                   agent_metrics=True),
    ]  # fmt: skip
    if not settings.skip_mlserver:
        mlserver = ensure_mlserver()
        specs.append(
            ServerSpec("mlserver", f"MLServer {MLSERVER_VERSION}", MLSERVER_PROTOCOLS, MODELS,
                       levels, mlserver_launcher(mlserver, repos.model_files, workdir),
                       MLSERVER_READY_TIMEOUT_S)
        )  # fmt: skip
    return specs


def run_benchmark(settings: Settings, workdir: Path) -> Results:
    ensure_load_generators()
    say("generating the sample models and request bodies")
    repos = write_repositories(workdir, settings.mlp_overrides)
    specs = server_specs(repos, settings, workdir)
    bodies = workdir / "bodies"
    bodies.mkdir()
    workloads = {m: make_workload(m, repos.model_files[m], bodies) for m in MODELS}
    results = Results()
    with contextlib.ExitStack() as stack:
        raw = {m: RawSession(workloads[m], repos.agent) for m in MODELS}
        for session in raw.values():
            stack.callback(session.close)
        servers: dict[str, ServerProcess] = {}
        targets: dict[tuple[str, str, str], Target] = {}
        for spec in specs:
            server, ports = launch(spec, workdir)
            stack.enter_context(running(server))
            servers[spec.name] = server
            targets.update(targets_of(spec, server, ports, workloads))
        say("checking every server's answers against onnxruntime's")
        for target in targets.values():
            check(target)
        rss_ready = {name: tree_rss_bytes(s.pid) / 2**20 for name, s in servers.items()}
        warm_up(list(targets.values()), settings, workdir)
        results.figures = run_rounds(plan_round(specs, targets, raw, workdir), settings)
        for target in targets.values():
            check(target)  # still answering correctly after the load
        # Every server idles a moment first: the agent hands a burst's memory back once its
        # queues drain (checked every second), and RSS is about serving, not the burst's peak.
        time.sleep(AFTER_LOAD_IDLE_S)
        for spec in specs:
            if spec.models == MODELS:  # the RSS target is about a server with both models
                after = tree_rss_bytes(servers[spec.name].pid) / 2**20
                results.rss_mb[spec.name] = {"ready": rss_ready[spec.name], "after_load": after}
    return results


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Benchmark the agent's KServe v2 serving against raw onnxruntime and "
        "MLServer: latency at 1 client, throughput at 8 and 32, batching, memory."
    )
    parser.add_argument("--quick", action="store_true",
                        help="one round of 1 s measurements, no warm-up: a smoke run")  # fmt: skip
    parser.add_argument("--duration", type=int, default=2, metavar="S",
                        help="seconds per measurement and round (default 2)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, metavar="N",
                        help="rounds over all measurements, figures are medians "
                        "(default 5)")  # fmt: skip
    parser.add_argument("--max-foreign-load", type=float, default=0.25, metavar="CORES",
                        help="measure again when other processes used more CPU than this "
                        "(default 0.25 cores)")  # fmt: skip
    parser.add_argument("--attempts", type=int, default=3, metavar="N",
                        help="tries per measurement on a busy machine (default 3)")  # fmt: skip
    parser.add_argument("--skip-mlserver", action="store_true",
                        help="leave MLServer out (e.g. when its venv cannot be built)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    parser.add_argument("--mlp-setting", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a key of the MLP's model.toml for the agent, e.g. "
                        "max_queue_delay_us=0 (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.duration, args.rounds, args.attempts) < 1:
        parser.error("--duration, --rounds and --attempts must be at least 1")
    return Settings(
        duration_s=1 if args.quick else args.duration,
        rounds=1 if args.quick else args.rounds,
        warmup_s=0 if args.quick else 1,
        attempts=1 if args.quick else args.attempts,
        max_foreign_cores=args.max_foreign_load,
        skip_mlserver=args.skip_mlserver,
        quick=args.quick,
        json_path=args.json,
        mlp_overrides=dict(args.mlp_setting),
    )


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Ctrl-C (even where the shell started us with SIGINT ignored) and SIGTERM end the run
    through the normal exception path, so every server still gets stopped."""
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started, load_at_start = time.monotonic(), list(os.getloadavg())
    try:
        with stoppable(), tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
            results = run_benchmark(settings, Path(tmp))
    except KeyboardInterrupt:
        say("interrupted; servers stopped")
        return 130
    except (BenchmarkError, ServerFailed) as exc:
        say(f"error: {exc}")
        return 1
    document = report_document(results, settings, started, load_at_start)
    print(f"Medians over {settings.rounds} round(s) of {settings.duration_s} s per measurement")
    print(format_table(results))
    print()
    print(format_memory(results))
    print()
    print(format_goals(results.goals()))
    print()
    print(json.dumps(document, indent=2))
    if settings.json_path:
        settings.json_path.write_text(json.dumps(document, indent=2) + "\n")
        say(f"wrote {settings.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
