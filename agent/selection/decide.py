"""`choose()`: decide how to load one model on this node, by measuring, once.

key = (model, digest, variants, hardware, runtime versions, LiteRT delegates, profile, policy)
cached decision for key?  -> reuse it (no runtime imported, no benchmark)
discover runtimes and devices               (in the selection worker)
build candidates the profile allows         (the rest recorded with their reason)
reference outputs: golden vectors or CPU fp32
each candidate: load under its time limit, confirm placement, verify, benchmark
run-off between the finalists, choose by the profile's objective
persist the decision with every candidate's row; prune the OpenVINO compile cache
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from agent.profiles import Profile
from agent.selection.cache import DecisionCache
from agent.selection.candidates import Pin, build
from agent.selection.compile_cache import CompileCache
from agent.selection.decision import CHOSEN, SKIPPED, VERIFIED, CandidateResult, Decision
from agent.selection.inputs import GOLDEN_FILE, Reference, load_golden
from agent.selection.key import (
    SelectionKey,
    delegate_libraries,
    digest_of,
    profile_ident,
    runtime_versions,
)
from agent.selection.sandbox import Sandbox, SandboxCrashed, SandboxTimeout
from agent.selection.tolerance import Tolerance
from agent.selection.trials import SCORE_UNITS, SelectionError, Trials
from agent.selection.variants import Variant, find_variants, model_digest, version_dir
from runtimes.discovery import RuntimeDevice
from runtimes.hardware import HardwareFacts, probe

# A more preferred candidate (earlier [[allow]] entry) wins when it is this close to the fastest:
# closer than that, two measurements on a shared machine cannot tell them apart.
PREFERENCE_MARGIN = 0.03
COMPILE_CACHE_DIR = "openvino-cache"

Progress = Callable[[str], None]


def choose(
    model_dir: str | Path,
    *,
    profile: Profile,
    cache: DecisionCache | None = None,
    state_dir: str | Path | None = None,
    model: str | None = None,
    tolerance: Tolerance | None = None,
    golden: Reference | None = None,
    pin: Pin | None = None,
    facts: HardwareFacts | None = None,
    devices: list[RuntimeDevice] | None = None,
    reuse: bool = True,
    progress: Progress | None = None,
) -> Decision:
    """The decision for the model in `model_dir`: cached when nothing changed, else measured.

    model_dir: a version directory of model files, or a model directory of numbered versions.
    cache: where decisions persist; None measures every time and stores nothing.
    state_dir: the agent state dir; OpenVINO compiles into <state_dir>/openvino-cache.
    model: the name decisions are recorded under (default: the directory's name).
    tolerance: per-datatype output tolerance (default: fp32-equivalent, see tolerance.py).
    golden: reference inputs/outputs; default golden.npz beside the model, else CPU fp32 outputs.
    pin: restrict to the model's own choice (model.toml).
    facts, devices: hardware facts and runtime devices; probed and discovered when None.
    reuse: False measures again even when a decision for the same key is stored.
    Raises SelectionError (with `.results`) when no candidate passes.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    model_dir = Path(model_dir)
    name = model or _model_name(model_dir)
    tolerance = tolerance or Tolerance()
    facts = facts or probe()
    variants = find_variants(model_dir, memo=cache.digest if cache else None)
    if golden is None:
        golden = load_golden(version_dir(model_dir) / GOLDEN_FILE)
    key = _key(name, variants, facts, profile, tolerance, golden, pin)

    if cache is not None and reuse:
        cached = cache.get(key)
        rebased = _rebase(cached, variants) if cached is not None else None
        if rebased is not None:
            say(f"{name}: reusing the decision of {rebased.decided_at} (nothing changed)")
            return rebased
        previous = cache.latest(name)
        if previous is not None:
            changed = key.changes_from(previous.key)
            say(f"{name}: measuring again: {'; '.join(changed) or 'forced'}")

    compile_cache = _compile_cache(state_dir, profile)
    with Sandbox() as sandbox:
        if devices is None:
            say("discovering runtimes and devices")
            devices = _discover(sandbox)
        trials = Trials(sandbox, variants, profile, tolerance, compile_cache, say)
        results, finalists = _measure(trials, variants, devices, profile, golden, pin, started, say)
    # After a run-off only its finalists compete: their numbers come from one fair measurement.
    best = pick(finalists or results, profile)
    if best is None:
        raise SelectionError(f"{name}: no candidate passed; see the reasons per candidate", results)
    best.verdict = CHOSEN
    chosen_dir = trials.compile_dirs.get(best.candidate.ident)
    variant = next(v for v in variants if v.name == best.candidate.variant)
    decision = Decision(
        model=name,
        variant=variant.name,
        variant_path=variant.path,
        runtime=best.candidate.runtime,
        device=best.candidate.device,
        options=best.candidate.load_options(chosen_dir),
        candidate=best.candidate,
        objective=profile.selection.objective,
        score_unit=SCORE_UNITS[profile.selection.objective],
        profile=key.profile,
        key=key,
        results=results,
        selection_seconds=time.perf_counter() - started,
        decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if cache is not None:
        cache.put(decision)
    if compile_cache is not None:
        in_use = cache.compile_dirs_in_use() if cache is not None else set()
        if chosen_dir is not None:
            in_use.add(str(chosen_dir))
        losers = set(trials.compile_dirs.values()) - {chosen_dir}
        compile_cache.prune(in_use, discard=losers)
    say(f"{name}: chose {best.candidate.label()} in {decision.selection_seconds:.1f} s")
    return decision


def _measure(
    trials: Trials,
    variants: list[Variant],
    devices: list[RuntimeDevice],
    profile: Profile,
    golden: Reference | None,
    pin: Pin | None,
    started: float,
    say: Progress,
) -> tuple[list[CandidateResult], list[CandidateResult]]:
    """Every candidate's result in preference order, and the run-off's finalists (maybe none)."""
    considered = build(variants, devices, profile, pin)
    results = [CandidateResult(c.candidate, SKIPPED, c.reason) for c in considered]
    runnable = [r for r in results if r.reason is None]
    if not runnable:
        raise SelectionError("no candidate can run on this node", results)
    try:
        reference = golden or trials.reference([r.candidate for r in runnable])
    except SelectionError as exc:
        exc.results = results
        raise
    say(f"reference outputs from {reference.source}")
    budget = profile.selection.max_selection_seconds
    try:
        for index, result in enumerate(runnable, 1):
            candidate = result.candidate
            if time.perf_counter() - started > budget:
                result.reason = f"not reached: the selection budget of {budget:g} s was spent"
                continue
            say(f"[{index}/{len(runnable)}] {candidate.label()}")
            measured = trials.run(candidate, reference)
            results[results.index(result)] = measured
            say(f"    {_summary(measured)}")
            trials.keep_contenders(results)
        finalists = trials.runoff(results)
    finally:
        trials.close_all()
    return results, finalists


def pick(results: list[CandidateResult], profile: Profile) -> CandidateResult | None:
    """The verified candidate with the best score; a preferred one wins a near tie."""
    verified = [r for r in results if r.verdict == VERIFIED and r.score is not None]
    if not verified:
        return None
    fastest = min(verified, key=lambda r: (r.score, r.candidate.preference))
    assert fastest.score is not None
    near = [r for r in verified if r.score <= fastest.score * (1 + PREFERENCE_MARGIN)]
    return min(near, key=lambda r: (r.candidate.preference, r.score))


def _summary(result: CandidateResult) -> str:
    if result.verdict != VERIFIED:
        return f"{result.verdict}: {result.reason}"
    return (
        f"loaded in {result.load_seconds:.2f} s, max error {result.max_error:.2g}, "
        f"p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms ({result.runs} runs)"
    )


def _key(
    name: str,
    variants: list[Variant],
    facts: HardwareFacts,
    profile: Profile,
    tolerance: Tolerance,
    golden: Reference | None,
    pin: Pin | None,
) -> SelectionKey:
    policy = {
        "tolerance": tolerance.to_dict(),
        "golden": golden.digest() if golden is not None else None,
        "pin": pin.to_dict() if pin is not None else None,
    }
    return SelectionKey(
        model_digest=model_digest(variants),
        variants=tuple(sorted(v.name for v in variants)),
        hardware=facts.fingerprint(),
        runtimes=tuple(sorted(runtime_versions().items())),
        profile=profile_ident(profile),
        policy=digest_of(policy),
        model=name,
        delegates=delegate_libraries(),
    )


def _rebase(decision: Decision, variants: list[Variant]) -> Decision | None:
    """A cached decision pointing at today's path of the same variant (same digest); None when
    the model has no such variant (a row not stored for this key): measured again.

    None rather than StopIteration: raised in asyncio.to_thread, StopIteration never reaches
    the awaiting coroutine, and serving would wait on the model forever.
    """
    variant = next((v for v in variants if v.name == decision.variant), None)
    if variant is None:
        return None
    return replace(decision, variant_path=variant.path, from_cache=True)


def _model_name(model_dir: Path) -> str:
    resolved = model_dir.resolve()
    # cnn/1/ is version 1 of the model "cnn".
    return resolved.parent.name if resolved.name.isdigit() else resolved.name


def _compile_cache(state_dir: str | Path | None, profile: Profile) -> CompileCache | None:
    options = [a.options for a in profile.allow if a.runtime == "openvino"]
    if state_dir is None or not any(o.compile_cache for o in options):
        return None
    cap_mb = max(o.cache_max_mb for o in options if o.compile_cache)
    return CompileCache(Path(state_dir) / COMPILE_CACHE_DIR, cap_mb * 2**20)


def _discover(sandbox: Sandbox) -> list[RuntimeDevice]:
    try:
        reply = sandbox.call({"op": "discover"}, timeout=120)
    except (SandboxTimeout, SandboxCrashed) as exc:
        raise SelectionError(f"runtime discovery failed: {exc}") from None
    if not reply["ok"]:
        raise SelectionError(f"runtime discovery failed: {reply['error']}")
    return [RuntimeDevice(d["runtime"], d["device"], d["details"]) for d in reply["devices"]]
