"""The serving data plane: what both the REST and the gRPC front ends call.

It owns the loaded model versions, their states (for the repository index and readiness), and
the inference path: find the version, validate, queue on its scheduler, wait with a deadline,
pick the requested outputs, count it all in Prometheus. A model file is loaded in a child
process before the agent loads it itself (`TrialLoads`): one that crashes its runtime costs its
own version, not the agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, memory
from agent.serving.classification import classify
from agent.serving.errors import (
    InferenceFailed,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ServingError,
)
from agent.serving.metrics import Metrics, ModelMetrics
from agent.serving.model import ModelIncompatible, ModelMetadata, ServedModel
from agent.serving.repository import (
    ModelMissing,
    ModelRepository,
    ModelVersionSource,
    RepositoryError,
)
from agent.serving.scheduler import Job, Outcome, Scheduler
from agent.serving.tensors import InferenceRequest, InferenceResponse, Tensor
from runtimes import load as load_session
from runtimes.base import LoadOptions, ModelLoadError, RuntimeAdapterError, Session
from runtimes.datatypes import from_numpy
from runtimes.loader import default_runtime_for

if TYPE_CHECKING:
    from agent.selection import Selector
    from agent.selection.sandbox import Sandbox

log = logging.getLogger(__name__)

# What `DataPlane.submit` calls with the answer: (response, None) or (None, error).
Answer = Callable[[InferenceResponse | None, ServingError | None], None]

EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
    "classification",
    "metrics",
)

_NUMBER = re.compile(r"\s*\+?[0-9]+\s*")  # a version as Triton's std::stol reads it

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
UNLOADED_ON_REQUEST = "unloaded"

# What a version that cannot load raises; anything else is a bug, logged with its traceback.
_LOAD_ERRORS = (RepositoryError, RuntimeAdapterError, ModelIncompatible)
# How long a model file may take to load in the trial child (TrialLoads) before its version is
# UNAVAILABLE: generous, as a large model on a slow board or an NPU compile takes a while.
TRIAL_LOAD_SECONDS = 300.0
# (content digest, runtime, options) of the model files that loaded in a trial child.
_PASSED_TRIALS: set[tuple[str, str, str]] = set()
# How the selection worker ended, in a SandboxCrashed message: "(signal 11)", "(exit status 1)".
_EXIT = re.compile(r"\((signal \d+|exit status [^)]*)\)")


@dataclass(slots=True)
class VersionState:
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics | None = None,
        selector: Selector | None = None,
    ):
        """`selector` (agent.selection.Selector) measures where each model runs best; without
        one, each version loads as its model.toml says (CPU by default)."""
        self.repository = repository
        self.metrics = metrics or Metrics()
        self.selector = selector
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._latest: dict[str, ServedModel] = {}
        self._states: dict[str, dict[str, VersionState]] = {}
        # One lock per model name while someone holds or waits for it: weak, so that loads and
        # unloads of names that never existed leave nothing behind.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Why a model in the repository has no version to index (no version directory, or its
        # directory cannot be read), until it loads or is unloaded.
        self._problems: dict[str, str] = {}
        self._background: set[asyncio.Task] = set()  # loads and unloads whose caller left
        self._started = False
        self.requests_seen = 0  # inference requests received, for idle-time housekeeping

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model in the repository; a model that fails is reported, not fatal."""
        names = await asyncio.to_thread(self.repository.model_names)
        trials = TrialLoads()  # one child process for the whole start
        try:
            for name in names:
                await self._load_model(name, trials, at_start=True)
        finally:
            await asyncio.to_thread(trials.close)
        self._started = True

    async def stop(self) -> None:
        for name in list(self._models):
            await self.unload_model(name)

    # --- health and metadata --------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once started and every model meant to serve is loaded (strict readiness).

        A model unloaded on purpose (repository extension) does not make the node unready.
        """
        if not self._started:
            return False
        return all(
            s.state == READY or s.reason == UNLOADED_ON_REQUEST
            for versions in self._states.values()
            for s in versions.values()
        )

    def server_metadata(self) -> dict:
        return {"name": "edgefleet", "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The loaded version (latest if None); ModelNotFound / ModelNotReady otherwise."""
        versions = self._models.get(name)
        if version is None or version == "":
            found = self._latest.get(name)
        else:
            found = versions.get(version) if versions else None
            if found is None and versions and _NUMBER.fullmatch(version):
                found = versions.get(_canonical(version))  # "01", "+1": version 1, as Triton
        if found is not None:
            return found
        state = self._states.get(name, {})
        if (version and version in state) or (not version and state):
            detail = state.get(version).reason if version else "no version is loaded"
            raise ModelNotReady(
                f"model {name} version {version or 'latest'} is not ready: {detail}"
            )
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        raise ModelNotFound(f"{what} not found")

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        model = self.model(name, version)
        return ModelMetadata(
            name=model.name,
            versions=sorted(self._models.get(name, {}), key=int),
            platform=model.platform,
            inputs=list(model.inputs.values()),
            outputs=list(model.outputs.values()),
        )

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[tuple[str, str, ModelMetrics]]:
        """(name, version, counters) of the loaded versions asked for: every model's without a
        name, every version of the model's without a version (as Triton); ModelNotFound /
        ModelNotReady for a model or version that is not loaded."""
        if not name:
            if version:
                raise InvalidInput(f"version {version!r} without a model name: name the model")
            chosen = list(self._all_loaded())
        elif version:
            chosen = [self.model(name, version)]
        else:
            chosen = list(self._models.get(name, {}).values()) or [self.model(name)]
        chosen.sort(key=lambda m: (m.name, int(m.version)))
        return [(m.name, m.version, m.metrics) for m in chosen]

    def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.model(name, version)
        except ModelNotReady:
            return False
        return True

    # --- inference ------------------------------------------------------------------------

    def idle(self) -> bool:
        """No request queued or running on any model."""
        return all(m.scheduler.pending == 0 for m in self._all_loaded())

    def _all_loaded(self):
        return (m for versions in self._models.values() for m in versions.values())

    def submit(self, request: InferenceRequest, done: Answer, timeout: float | None = None) -> Job:
        """Validate `request` and queue it on its model; `done(response, None)` or
        `done(None, error)` is called once, on the loop, unless the returned job is cancelled
        first. Input refused outright raises the ServingError at once. `timeout` (s) may
        shorten the model's own, as may the request's `timeout` parameter (µs, as Triton)."""
        self.requests_seen += 1
        start = time.perf_counter_ns()
        try:
            model = self.model(request.model_name, request.model_version)
        except ModelNotReady as exc:
            self._count_not_ready(request.model_name, request.model_version, exc)
            raise
        m = model.metrics
        try:
            inputs, rows = model.validate(request)
            limit = _timeout_s(request)
            if timeout is not None and (limit is None or timeout < limit):
                limit = timeout

            def finished(outcome: Outcome | None, error: ServingError | None) -> None:
                if error is not None:
                    m.failure(_reason(error), time.perf_counter_ns() - start)
                    done(None, error)
                    return
                try:
                    outputs = _select_outputs(model, request, outcome.arrays, outcome.span)
                except Exception as exc:  # the client must get an answer, whatever went wrong
                    if isinstance(exc, ValueError):  # a classification too large to answer
                        error = InvalidInput(f"model {model.name}: {exc}")
                    else:
                        log.exception("model %s: preparing the answer failed", model.name)
                        error = InferenceFailed(f"model {model.name}: {type(exc).__name__}: {exc}")
                    m.failure(_reason(error), time.perf_counter_ns() - start)
                    done(None, error)
                    return
                m.succeeded(time.perf_counter_ns() - start, outcome.queue_ns, outcome.compute_ns)
                response = InferenceResponse(model.name, model.version, outputs, request.id)
                done(response, None)

            return model.scheduler.submit(inputs, rows, finished, limit)
        except ServingError as exc:
            m.failure(_reason(exc))
            raise

    def _count_not_ready(self, name: str, version: str | None, error: ModelNotReady) -> None:
        """A model the repository has but cannot serve now: counted against the version asked
        for, or the highest known one (an update's health watch looks for these). Unknown
        names and versions are not counted: any client could grow the label sets without end."""
        states = self._states.get(name)
        if not states:
            return
        if version and version not in states and _NUMBER.fullmatch(version):
            version = _canonical(version)
        if not version:
            version = max(states, key=int)
        if version in states:
            self.metrics.for_model(name, version).failure(_reason(error))

    def count_rejected(self, name: str, version: str | None, error: ServingError) -> None:
        """Count a request a front end refused before it reached `submit` (it would not decode)."""
        model = self._latest.get(name) if not version else self._models.get(name, {}).get(version)
        if model is not None:
            model.metrics.failure(_reason(error))

    # --- repository extension -------------------------------------------------------------

    async def read_repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """repository_index with the disk read off the event loop (a slow mount, a huge root)."""
        on_disk = await asyncio.to_thread(self._names_on_disk)
        return self.repository_index(ready_only, on_disk)

    def repository_index(
        self, ready_only: bool = False, on_disk: list[str] | None = None
    ) -> list[IndexEntry]:
        """Every model known or in the repository, with each version's state. Reads the
        repository's directory unless given its model names (`on_disk`)."""
        entries = []
        names = set(self._states)
        names.update(self._names_on_disk() if on_disk is None else on_disk)
        for name in sorted(names):
            states = self._states.get(name)
            if not states:
                reason = self._problems.get(name, "not loaded")
                entries.append(IndexEntry(name, "", UNAVAILABLE, reason))
                continue
            for version, s in sorted(states.items(), key=lambda kv: int(kv[0])):
                entries.append(IndexEntry(name, version, s.state, s.reason))
        if ready_only:
            entries = [e for e in entries if e.state == READY]
        return entries

    def _names_on_disk(self) -> list[str]:
        try:
            return self.repository.model_names()
        except RepositoryError as exc:
            log.warning("cannot list the model repository: %s", exc)
            return []

    async def load_model(self, name: str) -> None:
        """(Re)load every version of `name` from the repository; a reload replaces in place.

        A version that fails keeps its previous load serving, if it had one, and the call raises
        ModelLoadFailed naming every failure. Versions gone from disk are unloaded, and so is
        the whole model when its directory is gone (ModelNotFound) or holds no version. The load
        goes on to its end if the caller stops waiting (a client's deadline, a reset), so no
        version is left LOADING.
        """
        await self._to_the_end(self._load_with_trials(name))

    async def _load_with_trials(self, name: str) -> None:
        trials = TrialLoads()
        try:
            await self._load_model(name, trials)
        finally:
            await asyncio.to_thread(trials.close)

    async def _to_the_end(self, work: Coroutine[Any, Any, None]) -> None:
        """Await `work` in a task of its own that a cancelled caller does not cancel."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(_forget_task(self._background))
        await asyncio.shield(task)

    async def _load_model(self, name: str, trials: TrialLoads, *, at_start: bool = False) -> None:
        """load_model's work; at start, failures are only logged and indexed."""
        failures: list[str] = []
        async with self._lock(name):
            try:
                versions = await asyncio.to_thread(self.repository.versions, name)
            except ModelMissing as exc:  # gone from disk: what was served of it goes
                await self._drop_model(name)
                self._problems.pop(name, None)
                log.warning("model %s: %s", name, exc)
                if at_start:
                    return
                raise ModelNotFound(str(exc)) from exc
            except RepositoryError as exc:  # unreadable: whatever is loaded keeps serving
                log.warning("model %s: %s", name, exc)
                if name not in self._models:
                    self._problems[name] = str(exc)
                if at_start:
                    return
                raise ModelLoadFailed(f"model {name} failed to load: {exc}") from exc
            if not versions:
                problem = f"model {name!r} has no numeric version directory"
                await self._drop_model(name)
                self._problems[name] = problem
                log.warning("%s", problem)
                if at_start:
                    return
                raise ModelNotFound(problem)
            self._problems.pop(name, None)
            states = self._states.setdefault(name, {})
            loaded = self._models.setdefault(name, {})
            for version in versions:
                states[version] = VersionState(LOADING)
                try:
                    model = await self._load_version(name, version, trials)
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # cancelled: say so, then go
                        self._load_failed(name, version, f"loading was interrupted ({exc!r})")
                        raise
                    reason = str(exc)
                    if not isinstance(exc, _LOAD_ERRORS):
                        log.exception("model %s version %s: loading failed", name, version)
                        reason = f"internal error: {type(exc).__name__}: {exc}"
                    self._load_failed(name, version, reason)
                    failures.append(f"version {version}: {reason}")
                    continue
                old = loaded.get(version)
                loaded[version] = model
                states[version] = VersionState(READY)
                self._refresh_latest(name)
                if old is not None:
                    await _retire(old)
            for version in [v for v in states if v not in versions]:  # removed from disk
                states.pop(version)
                old = loaded.pop(version, None)
                self._refresh_latest(name)
                if old is not None:
                    await _retire(old)
            log.info("model %s: %s", name, {v: s.state for v, s in states.items()})
        memory.release_free_memory()
        if failures and not at_start:
            raise ModelLoadFailed(f"model {name} failed to load: " + "; ".join(failures))

    def _load_failed(self, name: str, version: str, reason: str) -> None:
        log.warning("model %s version %s failed to load: %s", name, version, reason)
        if version in self._models.get(name, {}):  # a failed reload must not take down a copy
            reason = f"reload failed, serving the previous load: {reason}"
            self._states[name][version] = VersionState(READY, reason)
        else:
            self._states[name][version] = VersionState(UNAVAILABLE, reason)

    async def _drop_model(self, name: str) -> None:
        """Unload every version of a model that is gone from the repository, and forget it."""
        loaded = self._models.pop(name, {})
        self._latest.pop(name, None)
        self._states.pop(name, None)
        for model in loaded.values():
            await _retire(model)

    async def unload_model(self, name: str) -> None:
        """Unload every version of `name`; it goes on to its end if the caller stops waiting."""
        await self._to_the_end(self._unload_model(name))

    async def _unload_model(self, name: str) -> None:
        async with self._lock(name):
            if name not in self._states and name not in self._models:
                raise ModelNotFound(f"model {name!r} not found")
            loaded = self._models.pop(name, {})
            self._latest.pop(name, None)
            states = self._states.setdefault(name, {})
            for version in states:
                states[version] = VersionState(UNLOADING)
            for model in loaded.values():
                await _retire(model)
            for version in states:
                states[version] = VersionState(UNAVAILABLE, UNLOADED_ON_REQUEST)
            self._problems.pop(name, None)
        memory.release_free_memory()

    # --- internals ------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _refresh_latest(self, name: str) -> None:
        versions = self._models.get(name) or {}
        if versions:
            self._latest[name] = versions[max(versions, key=int)]
        else:
            self._latest.pop(name, None)

    async def _load_version(self, name: str, version: str, trials: TrialLoads) -> ServedModel:
        source = await asyncio.to_thread(self.repository.source, name, version)
        config = source.config
        if self.selector is not None and not config.pins_everything(len(source.model_files)):
            # Selection loaded this very file in its worker when it measured (a stored decision
            # is keyed by the file's digest), so the agent does not try it again.
            session, model_file = await self._open_selected(source)
        else:
            model_file = source.model_file()
            options = config.load_options()
            await asyncio.to_thread(trials.check, model_file, config.runtime, options)
            session = await asyncio.to_thread(
                load_session, model_file, runtime=config.runtime, options=options
            )
        try:
            ServedModel.check_compatible(session, source.config)
            labels = await asyncio.to_thread(
                ServedModel.load_labels, source.directory, config, session
            )
        except ModelIncompatible:
            session.close()
            raise
        metrics = self.metrics.for_model(name, version)
        scheduler = Scheduler(
            f"{name}:{version}", session.infer, source.config, metrics, asyncio.get_running_loop()
        )
        return ServedModel(source, session, scheduler, metrics, model_file, labels)

    async def _open_selected(self, source: ModelVersionSource) -> tuple[Session, Path]:
        """Load on the measured choice (a stored decision returns in milliseconds)."""
        from agent.selection import SelectionError

        try:
            decision = await asyncio.to_thread(
                self.selector.decide,
                source.directory,
                model=source.name,
                config=source.config.selection_settings(),
            )
        except SelectionError as exc:
            rows = "; ".join(f"{r.candidate.label()}: {r.reason}" for r in exc.results if r.reason)
            raise ModelIncompatible(f"{exc}" + (f" ({rows})" if rows else "")) from None
        except (ValueError, LookupError) as exc:  # tolerance, pin, variant files, golden vectors
            raise ModelIncompatible(f"accelerator selection: {exc}") from None
        log.info(
            "model %s version %s runs on %s %s (%s, %s)",
            source.name,
            source.version,
            decision.runtime,
            decision.device,
            decision.variant,
            "stored decision" if decision.from_cache else "measured now",
        )
        session = await asyncio.to_thread(decision.load, source.config.idle_spin)
        return session, decision.variant_path


class TrialLoads:
    """Loads each model file in a child process, and runs it once there, before the agent
    loads it itself.

    No runtime fully checks a model file before trusting it (LiteRT has no flatbuffer verifier),
    and a file that crashes the runtime in the agent would take every model down with it. Some
    files load and then crash on their first run (a .tflite whose input is a weights tensor
    dies writing the input): the child runs each once on seeded random inputs of its declared
    shapes. In a child, a crash or a hang costs only that version: UNAVAILABLE, with the reason.
    A run cannot prove every input safe, only that ordinary ones are; a runtime's clean error
    on random inputs (ids outside a vocabulary) is not held against the file. The child is
    the selection worker: one serves a whole start, file after file, and is replaced only after
    a crash; `close` ends it, so it holds no memory while the agent serves. A file whose content
    already passed in a child of this process, with the same runtime and options, is not tried
    again (a reload, a copy). A file the runtime refuses cleanly is left to the agent's own load,
    which reports it as before.
    """

    def __init__(self, seconds: float = TRIAL_LOAD_SECONDS):
        self.seconds = seconds
        self._sandbox: Sandbox | None = None

    def check(self, path: Path, runtime: str | None, options: LoadOptions) -> None:
        """Load and run `path` in the child; ModelLoadError if it dies or overruns. Blocks."""
        runtime = runtime or default_runtime_for(path)
        key = (_content_digest(path), runtime, repr(options))
        if key in _PASSED_TRIALS:
            return
        # Not at import: the selection package costs the serving agent ~100 ms and its memory.
        from agent.selection.sandbox import Sandbox, SandboxCrashed, SandboxTimeout

        if self._sandbox is None:
            self._sandbox = Sandbox()
        request = {
            "op": "load",
            "id": "trial",
            "path": str(path),
            "runtime": runtime,
            "options": options,
        }
        doing = f"loading {path.name}"
        try:
            reply = self._sandbox.call(request, timeout=self.seconds)
            if reply["ok"]:
                doing = f"running {path.name} once on random inputs"
                ran = self._sandbox.call({"op": "try_run", "id": "trial"}, timeout=self.seconds)
                if not ran.get("ran"):
                    log.info(
                        "trial of %s: not run to the end (%s); not held against it",
                        path,
                        ran.get("why"),
                    )
                self._sandbox.call({"op": "close", "id": "trial"}, timeout=self.seconds)
        except SandboxTimeout:
            raise ModelLoadError(
                f"{doing} did not finish within {self.seconds:g} s in a trial process "
                "(stopped); the agent did not load it"
            ) from None
        except SandboxCrashed as exc:
            how = _EXIT.search(str(exc))
            raise ModelLoadError(
                f"the runtime crashed {doing} ({how[1] if how else exc}) in a trial process, "
                "so the agent did not load it; the file is likely corrupt: replace it"
            ) from None
        if reply["ok"]:
            _PASSED_TRIALS.add(key)

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def _content_digest(path: Path) -> str:
    """sha256 of a model file, and of an OpenVINO IR's weights beside it."""
    digest = hashlib.sha256()
    for part in (path, path.with_suffix(".bin")) if path.suffix.lower() == ".xml" else (path,):
        try:
            with part.open("rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {part.name}: {exc}") from None
    return digest.hexdigest()


# Repository parameters the agent accepts and ignores. tritonclient sends unload_dependents on
# every unload; it concerns ensembles, which the agent does not have.
_IGNORED_PARAMETERS = {"load": frozenset(), "unload": frozenset({"unload_dependents"})}


def check_repository_parameters(action: str, names) -> None:
    """InvalidInput for load/unload parameters the agent does not take (either front end).
    Triton's config override and in-request model files (`file:...`) would bypass the signed,
    verified repository; models reach a node only through it."""
    unsupported = sorted(set(names) - _IGNORED_PARAMETERS[action])
    if unsupported:
        shown = ", ".join(name[:64] for name in unsupported[:8])
        raise InvalidInput(
            f"{action} parameters ({shown}) are not supported; models are loaded from the "
            "model repository as they are (a model's config is its model.toml)"
        )


def _forget_task(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left has been answered already

    return done


async def _retire(model: ServedModel) -> None:
    await model.scheduler.close()
    model.session.close()


def _timeout_s(request: InferenceRequest) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds, if it has one."""
    value = request.parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput("parameter 'timeout' must be a positive integer (microseconds)")
    return value / 1e6


def _select_outputs(
    model: ServedModel, request: InferenceRequest, arrays, span: slice | None
) -> list[Tensor]:
    """The requested outputs (all by default) as tensors, cut to the request's `span` of rows
    of a batch's arrays."""
    if request.outputs is None:
        tensors = []
        for name in model.outputs:
            array = arrays[name] if span is None else arrays[name][span]
            tensors.append(Tensor(name, from_numpy(array.dtype), array.shape, array, {}))
        return tensors
    tensors = []
    for out in request.outputs:
        name = out.name
        array = arrays[name] if span is None else arrays[name][span]
        count = out.parameters.get("classification") if out.parameters else None
        if count is not None:
            batched = model.config.max_batch_size > 0
            array = classify(array, count, model.labels.get(name), batched)
            tensors.append(Tensor(name, "BYTES", array.shape, array, out.parameters))
            continue
        tensors.append(Tensor(name, from_numpy(array.dtype), array.shape, array, out.parameters))
    return tensors


def _reason(exc: ServingError) -> str:
    return type(exc).__name__


def _canonical(number: str) -> str:
    """A version `_NUMBER` matched, as its directory is named: str(int(number)) without int(),
    which refuses more than 4300 digits (such a version is not found, not an error)."""
    return number.strip().lstrip("+").lstrip("0") or "0"
