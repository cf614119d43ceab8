"""Running candidates in the selection worker: load, confirm placement, verify, benchmark.

    trials = Trials(sandbox, variants, profile, compile_cache, progress)
    reference = trials.reference()           # CPU fp32 outputs, unless golden vectors are given
    result = trials.run(candidate, reference)
    trials.runoff(results)                   # finalists measured again, interleaved

Each step has a time limit; a candidate that overruns it is killed with the worker and recorded
as skipped, and the next candidate gets a fresh worker. Verified candidates stay loaded while
they are in contention, so the run-off does not load them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.profiles import Profile
from agent.selection.candidates import Candidate, confirm_placement
from agent.selection.compile_cache import CompileCache
from agent.selection.decision import REJECTED, SKIPPED, VERIFIED, CandidateResult
from agent.selection.inputs import (
    InputError,
    Reference,
    Spec,
    batched,
    inputs_for,
    outputs_as_reference,
    random_inputs,
)
from agent.selection.sandbox import Sandbox, SandboxCrashed, SandboxTimeout
from agent.selection.tolerance import Tolerance, compare
from agent.selection.variants import Variant
from runtimes.base import LoadOptions

# Screening ranks candidates by their fast decile (p10): load from other processes only ever
# adds time, so the fastest runs are the least disturbed estimate of what a candidate can do.
FLOOR_PERCENTILE = 10
# Candidates kept loaded for the run-off: the best few whose floor is within 2x of the best.
MAX_FINALISTS = 6
FINALIST_MARGIN = 1.0
# The run-off's rounds, and the timed runs each finalist gets at least per round.
RUNOFF_ROUNDS = 4
RUNOFF_MIN_RUNS = 3
# A screening benchmark stops early once its floor is this many times the best floor so far.
EARLY_STOP_FACTOR = 2.0
# Reference runtime for each format: the plain CPU fp32 path.
REFERENCE_RUNTIMES = {
    "onnx": ("onnxruntime", "openvino"),
    "openvino-ir": ("openvino",),
    "tflite": ("litert", "openvino"),
}
SCORE_UNITS = {
    "latency": "ms (p50)",
    "throughput": "ms per item (p50 / batch)",
    "efficiency": "mJ per item (p50 x profile watts)",
}


class SelectionError(Exception):
    """Selection cannot produce a decision; `results` holds what was tried."""

    def __init__(self, message: str, results: list[CandidateResult] | None = None):
        super().__init__(message)
        self.results = results or []


@dataclass
class _Loaded:
    generation: int  # sandbox restarts when it was loaded; a restart loses the session
    inputs: dict[str, np.ndarray]  # benchmark inputs under the candidate's names
    batch: int


class Trials:
    def __init__(
        self,
        sandbox: Sandbox,
        variants: list[Variant],
        profile: Profile,
        tolerance: Tolerance,
        compile_cache: CompileCache | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.sandbox = sandbox
        self.variants = {v.name: v for v in variants}
        self.ordered_variants = variants
        self.profile = profile
        self.settings = profile.selection
        self.tolerance = tolerance
        self.compile_cache = compile_cache
        self.progress = progress or (lambda message: None)
        self.loaded: dict[str, _Loaded] = {}
        self.compile_dirs: dict[str, Path] = {}  # candidate ident -> its CACHE_DIR
        self._first_run: float | None = None  # the last verified candidate's first inference
        self.floors: dict[str, float] = {}  # candidate ident -> screening floor, as a score
        # candidate ident -> (worker generation, load reply) of a session the reference loaded
        self.preloaded: dict[str, tuple[int, dict[str, Any]]] = {}
        # Candidates out of tolerance, by what decides their numerics (not hint or threads).
        self.out_of_tolerance: dict[tuple[str, str, str, Any], CandidateResult] = {}
        # (runtime, device) pairs whose profile entry turns OpenVINO's compile cache on
        self.cached = {
            (a.runtime, a.device)
            for a in profile.allow
            if a.runtime == "openvino" and a.options.compile_cache
        }

    # --- the reference ------------------------------------------------------------------------

    def reference(self, candidates: list[Candidate] = ()) -> Reference:
        """Outputs of the first full-precision variant on the CPU in f32, on seeded inputs.

        When one of `candidates` is exactly the reference configuration, its session stays
        loaded and `run` measures it without loading it a second time.
        """
        problems = []
        limit = self.profile.limits.max_compile_seconds
        for variant in self.ordered_variants:
            for runtime in REFERENCE_RUNTIMES[variant.format]:
                label = f"{runtime} CPU f32 [{variant.name}]"
                self.progress(f"reference: {label}")
                # The OpenVINO adapter computes in f32 unless told otherwise.
                options = LoadOptions(device="CPU")
                same = next(
                    (
                        c
                        for c in candidates
                        if (c.variant, c.runtime) == (variant.name, runtime)
                        and c.load_options() == options
                    ),
                    None,
                )
                key = same.ident if same else "reference"
                request = {
                    "op": "load",
                    "id": key,
                    "path": str(variant.path),
                    "runtime": runtime,
                    "options": options,
                }
                try:
                    reply = self.sandbox.call(request, timeout=limit)
                    if not reply["ok"]:
                        problems.append(f"{label}: {reply['error']}")
                        continue
                    specs: list[Spec] = reply["inputs"]
                    inputs = random_inputs(specs)
                    ran = self.sandbox.call(
                        {"op": "infer", "id": key, "inputs": inputs}, timeout=limit
                    )
                    if same is None:
                        self.sandbox.call({"op": "close", "id": key}, timeout=limit)
                except (SandboxTimeout, SandboxCrashed, InputError) as exc:
                    problems.append(f"{label}: {exc}")
                    continue
                if not ran["ok"]:
                    self._close(key)
                    problems.append(f"{label}: {ran['error']}")
                    continue
                if same is not None:
                    self.preloaded[key] = (self.sandbox.restarts, reply)
                datatypes = {name: datatype for name, datatype, _ in reply["outputs"]}
                return Reference(inputs, ran["outputs"], datatypes, source=label)
        raise SelectionError(
            "no CPU fp32 reference to check candidates against ("
            + "; ".join(problems)
            + "); ship golden vectors (golden.npz) with the model"
        )

    # --- one candidate --------------------------------------------------------------------------

    def run(self, candidate: Candidate, reference: Reference) -> CandidateResult:
        result = CandidateResult(candidate, SKIPPED)
        same_numerics = self.out_of_tolerance.get(_numerics(candidate))
        if same_numerics is not None:
            # A performance hint or thread count does not change what is computed.
            result.verdict, result.max_error = REJECTED, same_numerics.max_error
            result.reason = (
                f"same numerics as {same_numerics.candidate.label()}: {same_numerics.reason}"
            )
            return result
        key = candidate.ident
        limit = candidate.max_compile_seconds
        variant = self.variants[candidate.variant]
        compile_dir = None
        if self.compile_cache is not None and (candidate.runtime, candidate.device) in self.cached:
            compile_dir = self.compile_cache.dir_for(candidate, variant)
            self.compile_dirs[key] = compile_dir
        request = {
            "op": "load",
            "id": key,
            "path": str(variant.path),
            "runtime": candidate.runtime,
            "options": candidate.load_options(compile_dir),
        }
        try:
            preloaded = self.preloaded.pop(key, None)
            if preloaded is not None and preloaded[0] == self.sandbox.restarts:
                reply = preloaded[1]  # loaded as the reference, in this same worker
            else:
                reply = self.sandbox.call(request, timeout=limit)
            generation = self.sandbox.restarts  # after the call: it may have started a worker
            if not reply["ok"]:
                result.reason = f"failed to load: {reply['error']}"
                return result
            result.load_seconds = reply["load_seconds"]
            result.placement = reply["placement"]
            result.memory_mb = reply["memory_mb"]
            rejected = self._verify(candidate, reference, reply, result, limit)
            if rejected:
                result.verdict, result.reason = REJECTED, rejected
                self._close(key)
                return result
            inputs = inputs_for(reference, reply["inputs"])
            batch_inputs, batch = self._batch(inputs, reply["inputs"])
            self.loaded[key] = _Loaded(generation, batch_inputs, batch)
            stop_above = self._stop_above(candidate, batch)
            latencies = self._benchmark(key, batch_inputs, self._first_run, stop_above)
            if isinstance(latencies, str):
                result.verdict, result.reason = REJECTED, latencies
                self._close(key)
                return result
        except SandboxTimeout as exc:
            self.loaded.pop(key, None)
            result.reason = f"over its time limit: {exc} (worker stopped)"
            return result
        except SandboxCrashed as exc:
            self.loaded.pop(key, None)
            result.reason = f"crashed: {exc}"
            return result
        self._score(result, latencies, batch)
        result.verdict = VERIFIED
        return result

    def _verify(
        self,
        candidate: Candidate,
        reference: Reference,
        loaded: dict[str, Any],
        result: CandidateResult,
        limit: float,
    ) -> str | None:
        """None when the candidate runs where intended and reproduces the reference."""
        misplaced = confirm_placement(candidate, loaded["placement"])
        if misplaced:
            return misplaced
        try:
            inputs = inputs_for(reference, loaded["inputs"])
        except InputError as exc:
            return str(exc)
        ran = self.sandbox.call({"op": "infer", "id": candidate.ident, "inputs": inputs}, limit)
        if not ran["ok"]:
            return f"inference failed: {ran['error']}"
        result.memory_mb = ran["memory_mb"]
        self._first_run = ran["seconds"]
        try:
            outputs = outputs_as_reference(reference, ran["outputs"])
        except InputError as exc:
            return str(exc)
        comparison = compare(outputs, reference.outputs, reference.datatypes, self.tolerance)
        result.max_error = comparison.max_error
        if not comparison.ok:
            result.reason = comparison.problem
            self.out_of_tolerance[_numerics(candidate)] = result
            return comparison.problem
        cap = self.profile.limits.max_model_memory_mb
        if result.memory_mb is not None and result.memory_mb > cap:
            return f"uses {result.memory_mb:.0f} MiB, over the profile's {cap} MiB"
        return None

    def _batch(
        self, inputs: dict[str, np.ndarray], specs: list[Spec]
    ) -> tuple[dict[str, np.ndarray], int]:
        if self.settings.objective == "latency":
            return inputs, 1
        batch_inputs = batched(inputs, specs, self.settings.batch_size)
        first = next(iter(batch_inputs.values()))
        return batch_inputs, int(first.shape[0]) if first.ndim else 1

    def _benchmark(
        self,
        key: str,
        inputs: dict[str, np.ndarray],
        first_run: float | None,
        stop_above: float | None,
    ) -> list[float] | str:
        """Latencies in seconds, or why the benchmark failed."""
        settings = self.settings
        request = {
            "op": "benchmark",
            "id": key,
            "inputs": inputs,
            "warmup": settings.warmup_runs,
            "seconds": settings.benchmark_seconds,
            "min_runs": settings.min_runs,
            "max_runs": 100_000,
            "stop_above": stop_above,
        }
        limit = self._bench_limit(first_run, 1, settings.benchmark_seconds)
        reply = self.sandbox.call(request, timeout=limit)
        if not reply["ok"]:
            return f"benchmark failed: {reply['error']}"
        if reply["stopped_early"]:
            self.progress(f"    stopped early: over {EARLY_STOP_FACTOR:g}x the best floor so far")
        return reply["latencies"]

    def _score_per_ms(self, candidate: Candidate, batch: int) -> float:
        """The objective's score for a p50 of 1 ms."""
        per_item = 1.0 if self.settings.objective == "latency" else 1.0 / max(batch, 1)
        if self.settings.objective == "efficiency":
            per_item *= self.profile.power[candidate.device]
        return per_item

    def _stop_above(self, candidate: Candidate, batch: int) -> float | None:
        """The floor (seconds) past which this candidate cannot come near the best so far."""
        if not self.floors:
            return None
        best = min(self.floors.values())
        return best * EARLY_STOP_FACTOR / self._score_per_ms(candidate, batch) / 1e3

    def _bench_limit(self, first_run: float | None, candidates: int, seconds: float) -> float:
        """Time budget plus the minimum runs at a slow first-run pace, with room to spare."""
        settings = self.settings
        runs = max(settings.warmup_runs + settings.min_runs, RUNOFF_ROUNDS * (RUNOFF_MIN_RUNS + 1))
        return 10.0 + 2 * seconds + 3 * runs * candidates * (first_run or 1.0)

    def _score(self, result: CandidateResult, latencies: list[float], batch: int) -> None:
        ms = np.asarray(latencies) * 1e3
        per_ms = self._score_per_ms(result.candidate, batch)
        result.runs = len(latencies)
        result.p50_ms = float(np.percentile(ms, 50))
        result.p99_ms = float(np.percentile(ms, 99))
        result.score = result.p50_ms * per_ms
        floor = float(np.percentile(ms, FLOOR_PERCENTILE)) * per_ms
        self.floors[result.candidate.ident] = min(
            floor, self.floors.get(result.candidate.ident, floor)
        )

    # --- finalists ------------------------------------------------------------------------------

    def keep_contenders(self, results: list[CandidateResult]) -> None:
        """Close sessions that can no longer win, to bound memory during selection."""
        finalists = {r.candidate.ident for r in self.finalists(results)}
        for key in list(self.loaded):
            if key not in finalists:
                self._close(key)

    def finalists(self, results: list[CandidateResult]) -> list[CandidateResult]:
        """Verified candidates still loaded whose screening floor is near the best floor."""
        loaded = [
            r
            for r in results
            if r.verdict == VERIFIED
            and r.candidate.ident in self.floors
            and r.candidate.ident in self.loaded
            and self.loaded[r.candidate.ident].generation == self.sandbox.restarts
        ]
        if not loaded:
            return []
        best = min(self.floors[r.candidate.ident] for r in loaded)
        near = [r for r in loaded if self.floors[r.candidate.ident] <= best * (1 + FINALIST_MARGIN)]
        return sorted(near, key=lambda r: self.floors[r.candidate.ident])[:MAX_FINALISTS]

    def runoff(self, results: list[CandidateResult]) -> list[CandidateResult]:
        """Measure the finalists again in turn, one run each per round, and rescore them.

        Sequential benchmarks on a busy machine favour whichever ran in a quiet moment;
        interleaving spreads the machine's own noise evenly over the finalists, so their p50s
        from the run-off are the ones compared. Returns the finalists (empty without a run-off).
        """
        finalists = self.finalists(results)
        if len(finalists) < 2:
            return []
        keys = [r.candidate.ident for r in finalists]
        self.progress(f"run-off between {len(keys)} finalists")
        first = max((r.p50_ms or 1.0) / 1e3 for r in finalists)
        seconds = self.settings.runoff_seconds
        request = {
            "op": "runoff",
            "ids": keys,
            "inputs": {k: self.loaded[k].inputs for k in keys},
            "seconds": seconds,
            "rounds": RUNOFF_ROUNDS,
            "min_runs_per_slice": RUNOFF_MIN_RUNS,
        }
        try:
            reply = self.sandbox.call(request, timeout=self._bench_limit(first, len(keys), seconds))
        except (SandboxTimeout, SandboxCrashed) as exc:
            self.progress(f"run-off abandoned: {exc}; keeping the screening measurements")
            self.loaded.clear()
            return []
        if not reply["ok"]:
            self.progress(f"run-off failed: {reply['error']}; keeping the screening measurements")
            return []
        for result in finalists:
            key = result.candidate.ident
            self._score(result, reply["latencies"][key], self.loaded[key].batch)
        return finalists

    def close_all(self) -> None:
        for key in [*self.loaded, *self.preloaded]:
            self._close(key)
        self.preloaded.clear()

    def _close(self, key: str) -> None:
        self.loaded.pop(key, None)
        if self.sandbox.running:
            with contextlib.suppress(SandboxTimeout, SandboxCrashed):
                self.sandbox.call({"op": "close", "id": key}, timeout=30)


def _numerics(candidate: Candidate) -> tuple[str, str, str, Any]:
    return (
        candidate.variant,
        candidate.runtime,
        candidate.device,
        dict(candidate.options).get("precision"),
    )
