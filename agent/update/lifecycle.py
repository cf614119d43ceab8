"""The update lifecycle of one node: from a desired model version to that version serving.

`Lifecycle.update()` is the algorithm, one journal state per step:

    job for model@version: resume the open one, or look the version up in TUF and start one
    DOWNLOADING -> VERIFIED      resumable HTTPS download; TUF length and hashes
    VERIFIED -> UNPACKED         safe extraction of each variant's archive into one package
    UNPACKED -> SIGNATURE_OK     publisher signature; publisher allowed for this model name
    SIGNATURE_OK -> SELECTED     accelerator selection among the variants (golden vectors)
    SELECTED -> SELF_TESTED      load as serving will, run every golden set
    SELF_TESTED -> ACTIVE        atomic switch; previous version kept; older ones collected

A step that fails for good marks the job FAILED with its reason and removes its files; one that
may succeed later (network) leaves the job where it is. `recover()` runs first in every run:
it finishes a rollback a crash interrupted, puts serving back to what the journal says is
active, deletes scratch files, and leaves open jobs to resume. `watch()` judges the health of
a version activated under a health policy, in the run that activated it or, if that run died
first, in the next; `roll_back()` returns serving to the previous version.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import TargetFile

from agent import __version__ as AGENT_VERSION
from agent.serving.repository import version_number
from agent.update.agent_client import AgentClient
from agent.update.checkpoints import Checkpoints
from agent.update.choice import Choice, choose_variant, prepare_serving, self_test
from agent.update.config import HealthPolicy, UpdateSettings
from agent.update.desired import DesiredModel
from agent.update.errors import (
    ActivationFailed,
    DownloadFailed,
    SignatureRefused,
    TrustFailed,
    UnpackFailed,
    UpdateError,
)
from agent.update.health import HealthWatch, Verdict
from agent.update.journal import (
    ACTIVE,
    DOWNLOADING,
    FAILED,
    HEALTH,
    ROLE_ACTIVE,
    ROLE_PREVIOUS,
    ROLLED_BACK,
    ROLLING_BACK,
    SELECTED,
    SELF_TESTED,
    SIGNATURE_OK,
    UNPACKED,
    VERIFIED,
    Installed,
    Job,
    Journal,
)
from agent.update.layout import Layout, discard, empty, fsync_dir, place
from agent.update.transport import TargetTooLong, Transport, download_resumable
from agent.update.trust import TrustedRepository, check_target, target_url
from provisioning.archive import ArchiveError, safe_extract
from provisioning.package import ManifestError, Package
from provisioning.publishers import authenticate_package
from provisioning.signing import SignatureError

log = logging.getLogger(__name__)

# Outcomes besides the journal's terminal states.
PENDING = "PENDING"  # stopped for a reason that may pass (network); resumes next run
REFUSED = "REFUSED"  # rolled back before; not retried unless asked
UP_TO_DATE = "UP_TO_DATE"


@dataclass
class Outcome:
    model: str
    version: int
    state: str
    reason: str = ""
    job_id: int | None = None
    # Seconds spent in each step during this run (the benchmark's breakdown).
    timings: dict[str, float] = field(default_factory=dict)


class UpdateBusy(Exception):
    """Another update run holds the node's update lock."""


class Lifecycle:
    def __init__(
        self,
        settings: UpdateSettings,
        checkpoints: Checkpoints | None = None,
        *,
        retry_rolled_back: bool = False,
        health: HealthPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.layout = Layout(settings.update_dir, settings.models_dir)
        self.layout.create()
        self._lock = open(self.layout.update_dir / ".lock", "a+b")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UpdateBusy(f"another update is running on {settings.state_dir}") from None
        self.journal = Journal(settings.database)
        self.checkpoints = checkpoints or Checkpoints()
        self.retry_rolled_back = retry_rolled_back
        self.health = health  # versions this run activates are watched under it
        self.agent = AgentClient(settings.agent_url) if settings.agent_url else None
        self._transport: Transport | None = None
        self._trust: TrustedRepository | None = None
        self._profile = None
        self._timings: dict[str, float] = {}

    def __enter__(self) -> Lifecycle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.journal.db.close()
        self._lock.close()

    # --- the lifecycle ----------------------------------------------------------------------

    def update(self, want: DesiredModel, generation: int = 0) -> Outcome:
        """Bring `want.name` to `want.version`, resuming whatever a previous run left open."""
        self._timings = {}
        started = self._job_for(want, generation)
        if isinstance(started, Outcome):
            return started
        job = started
        try:
            if not job.reached(VERIFIED):
                job = self._download(job)
            if not job.reached(UNPACKED):
                job = self._unpack(job)
            if not job.reached(SIGNATURE_OK):
                job = self._check_signature(job)
            if not job.reached(SELECTED):
                job = self._select(job)
            if not job.reached(SELF_TESTED):
                job = self._self_test(job)
            if not job.reached(ACTIVE):
                job = self._activate(job)
        except UpdateError as exc:
            reason = f"{exc.step}: {exc}"
            if exc.retryable:
                log.warning("update of %s@%s paused: %s", job.model, job.version, reason)
                return self._outcome(job, PENDING, reason)
            if not self._abandon(job, reason):  # it went live before the step that failed
                job = self.journal.job(job.id)
                return self._outcome(job, job.state, reason)
            return self._outcome(job, FAILED, reason)
        except OSError as exc:  # disk full, permissions: the job can resume once fixed
            return self._outcome(job, PENDING, f"{type(exc).__name__}: {exc}")
        return self._outcome(job, ACTIVE)

    def watch(self, outcome: Outcome) -> Outcome:
        """Judge an active version that owes a health verdict; roll it back if it is unhealthy.

        That is the version this run activated under a health policy, or one whose watch a
        killed run left unfinished: the watch goes on for what is left of its window, counted
        from the activation; if the window has passed, nobody saw the version healthy and it
        is rolled back.
        """
        if outcome.state not in (ACTIVE, UP_TO_DATE) or outcome.job_id is None:
            return outcome
        due = self.journal.due_watch(outcome.job_id)
        if due is None or self.agent is None:
            return outcome
        policy, activated_at = HealthPolicy(**due[0]), due[1]
        left = policy.window_s
        if "activate" not in outcome.timings:  # resumed: the window began at the activation
            left -= time.time() - activated_at
        if left > 0:
            watch = HealthWatch(replace(policy, window_s=left), self.agent.metrics)
            verdict = watch.watch(outcome.model, outcome.version)
        else:
            verdict = Verdict(
                False,
                f"no verdict: the run watching it was stopped and its {policy.window_s:g} s "
                "window has passed",
            )
        if verdict.healthy is not False:  # healthy, or no verdict (unreadable metrics): kept
            self.journal.note(outcome.job_id, HEALTH, verdict.reason)
            outcome.reason = verdict.reason
            return outcome
        rolled = self.roll_back(outcome.model, f"health: {verdict.reason}")
        if rolled is None:
            self.journal.note(outcome.job_id, HEALTH, verdict.reason)
            outcome.reason = f"unhealthy ({verdict.reason}), and no previous version to go back to"
            return outcome
        rolled.timings = outcome.timings
        return rolled

    def roll_back(self, model: str, reason: str) -> Outcome | None:
        """Serve the previous version again and record why; None if there is none."""
        active = self.journal.role(model, ROLE_ACTIVE)
        previous = self.journal.role(model, ROLE_PREVIOUS)
        if active is None or previous is None:
            return None
        # The intent first, so that recovery finishes a rollback a crash interrupts; then the
        # previous version, so serving always has a verified one; then the journal; then the
        # failed version leaves (recovery also finishes that).
        self.journal.note(active.job_id, ROLLING_BACK, reason)
        self._serve(model, previous.version)
        self.checkpoints.reached(ROLLING_BACK)
        self.journal.roll_back(model, reason)
        discard(self.layout.served(model, active.version), self.layout.trash)
        discard(self.layout.stored(model, active.version), self.layout.store / ".trash")
        self._reload(model)
        log.warning(
            "rolled %s back from %s to %s: %s", model, active.version, previous.version, reason
        )
        return Outcome(model, active.version, ROLLED_BACK, reason, active.job_id)

    def recover(self) -> None:
        """After a crash: serving back to the journal's active versions, scratch files gone."""
        layout = self.layout
        empty(layout.staging)
        empty(layout.trash)
        empty(layout.store / ".trash")
        open_jobs = {}
        for job in self.journal.open_jobs():
            unusable = _unusable(job)
            if unusable is None:
                open_jobs[job.id] = job
            else:
                self._abandon(job, unusable)
        for job_dir in layout.jobs.iterdir():
            job = open_jobs.get(version_number(job_dir.name))
            if job is None:
                shutil.rmtree(job_dir, ignore_errors=True)
                continue
            for scratch in ("package.tmp", "unpack.tmp", "select"):
                shutil.rmtree(job_dir / scratch, ignore_errors=True)
        wanted = {
            name
            for job in open_jobs.values()
            for target in job.targets
            for name in (f"{_sha(target)}.part", f"{_sha(target)}.tar")
        }
        for download in layout.downloads.iterdir():
            if download.name not in wanted:
                download.unlink(missing_ok=True)
        for model in self.journal.managed_models():
            active = self.journal.role(model, ROLE_ACTIVE)
            begun = None if active is None else self.journal.rollback_begun(active.job_id)
            if begun is not None:
                self.roll_back(model, begun)
            if self._reconcile(model):
                self._reload(model)

    # --- steps ------------------------------------------------------------------------------

    def _job_for(self, want: DesiredModel, generation: int) -> Job | Outcome:
        open_job = self.journal.open_job(want.name)
        if open_job is not None and (unusable := _unusable(open_job)) is not None:
            self._abandon(open_job, unusable)
            open_job = None
        if open_job is not None and open_job.version == want.version:
            log.info("resuming update of %s@%s after %s", want.name, want.version, open_job.state)
            return open_job
        if open_job is not None:
            self._abandon(open_job, f"superseded by version {want.version}")
        active = self.journal.role(want.name, ROLE_ACTIVE)
        if active is not None and active.version == want.version:
            return Outcome(want.name, want.version, UP_TO_DATE, job_id=active.job_id)
        previous = self.journal.role(want.name, ROLE_PREVIOUS)
        if (
            previous is not None
            and previous.version == want.version
            and self.layout.stored(want.name, previous.version).is_dir()
        ):
            return self._reinstate(previous, generation)
        last = self.journal.last_job(want.name, want.version)
        if last is not None and last.state == ROLLED_BACK and not self.retry_rolled_back:
            return Outcome(
                want.name,
                want.version,
                REFUSED,
                f"{want.name}@{want.version} was rolled back ({last.reason}); not installing it "
                "again unless asked (--retry-rolled-back)",
                last.id,
            )
        job = self.journal.start(want.name, want.version, generation, [])
        self.checkpoints.reached(DOWNLOADING)
        return job

    def _reinstate(self, previous: Installed, generation: int) -> Outcome:
        """Back to the previous version (a revert): it is in the store, verified when it was
        installed, so nothing is downloaded, measured or tested again."""
        model, version = previous.model, previous.version
        job = self.journal.start(model, version, generation, [])
        with self._timed("activate"):
            self._serve(model, version)
            for served in self._served_versions(model):
                if served > version:
                    discard(self.layout.served(model, served), self.layout.trash)
            retired = self.journal.activate(
                job, previous.variant, "reinstated from the store", self._watch_policy()
            )
            for old in retired:
                discard(self.layout.served(old.model, old.version), self.layout.trash)
                discard(self.layout.stored(old.model, old.version), self.layout.store / ".trash")
        with self._timed("reload"):
            self._reload(model)
        return self._outcome(self.journal.job(job.id), ACTIVE, "reinstated from the store")

    def _download(self, job: Job) -> Job:
        if not job.targets:
            job = self._look_up(job)
        for target in job.targets:
            info, sha = _target_file(target), _sha(target)
            verified = self.layout.verified(sha)
            if verified.exists():  # verified before a crash: renamed only after the check
                continue
            with self._timed("download"):
                self._fetch(info, self.layout.partial(sha))
            with self._timed("verify"):
                self._verify(info, self.layout.partial(sha), verified)
        detail = ", ".join(f"{t['variant']} {t['info']['length']} B" for t in job.targets)
        return self._advance(job, VERIFIED, detail)

    def _unpack(self, job: Job) -> Job:
        work = self.layout.job_dir(job.id)
        package, scratch = work / "package", work / "package.tmp"
        with self._timed("unpack"):
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(work / "unpack.tmp", ignore_errors=True)
            shutil.rmtree(package, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            scratch.mkdir()
            for target in job.targets:
                archive = self.layout.verified(_sha(target))
                into = work / "unpack.tmp" / target["variant"]
                into.parent.mkdir(exist_ok=True)
                try:
                    files = safe_extract(archive, into, self.limits.archive)
                except ArchiveError as exc:
                    raise UnpackFailed(f"{target['path']}: {exc}") from None
                _merge(into, files, scratch, target["path"])
            shutil.rmtree(work / "unpack.tmp", ignore_errors=True)
            os.rename(scratch, package)
            fsync_dir(work)
        return self._advance(job, UNPACKED)

    def _check_signature(self, job: Job) -> Job:
        variants = [t["variant"] for t in job.targets]
        with self._timed("signature"):
            publishers = self._trusted().publishers()
            try:
                publisher, package = authenticate_package(
                    self.layout.job_dir(job.id) / "package", publishers, variants=variants
                )
            except (SignatureError, ManifestError) as exc:
                raise SignatureRefused(str(exc)) from None
            manifest = package.manifest
            if (manifest.name, manifest.version) != (job.model, job.version):
                raise SignatureRefused(
                    f"the signed manifest is {manifest.name}@{manifest.version}, but this target "
                    f"is {job.model}@{job.version}"
                )
            for target in job.targets:
                claimed = target["info"].get("custom", {}).get("publisher")
                if claimed != publisher.key_id:
                    raise SignatureRefused(
                        f"{target['path']}: TUF names publisher key {str(claimed)[:16]}, the "
                        f"package is signed by {publisher.key_id[:16]}"
                    )
            if not manifest.allows_region(self.settings.region):
                raise SignatureRefused(
                    f"{manifest.name}@{manifest.version} may run in "
                    f"{list(manifest.allowed_regions)}, not in this node's region "
                    f"{self.settings.region!r}"
                )
            if not manifest.accepts_agent(AGENT_VERSION):
                raise SignatureRefused(
                    f"{manifest.name}@{manifest.version} needs agent {manifest.min_agent_version}"
                    f" or newer; this is {AGENT_VERSION}"
                )
        return self._advance(
            job, SIGNATURE_OK, f"signed by {publisher.name} ({publisher.key_id[:16]})"
        )

    def _select(self, job: Job) -> Job:
        work = self.layout.job_dir(job.id)
        variants = [t["variant"] for t in job.targets]
        with self._timed("select"):
            package = self._package(job)
            choice = choose_variant(
                package,
                variants,
                work,
                profile=self._node_profile(),
                database=self.journal.db,
                state_dir=self.settings.state_dir,
            )
            prepare_serving(package, choice, work / "serving")
            fsync_dir(work)
        detail = f"{choice.variant}: {choice.label}" + (" (cached)" if choice.from_cache else "")
        return self._advance(job, SELECTED, detail, decision=choice.to_dict())

    def _self_test(self, job: Job) -> Job:
        assert job.decision is not None
        with self._timed("self_test"):
            summary = self_test(
                self._package(job),
                Choice.from_dict(job.decision),
                self.layout.job_dir(job.id) / "serving",
            )
        return self._advance(job, SELF_TESTED, summary)

    def _activate(self, job: Job) -> Job:
        assert job.decision is not None
        layout, work = self.layout, self.layout.job_dir(job.id)
        with self._timed("activate"):
            # Keep the verified version for rollback, then switch serving to it.
            stored = layout.stored(job.model, job.version)
            place(work, stored, layout.store / ".trash")
            self._serve(job.model, job.version)
            for version in self._served_versions(job.model):
                if version > job.version:  # a downgrade: serving answers the highest version
                    discard(layout.served(job.model, version), layout.trash)
            self.checkpoints.reached("SWITCHING")
            retired = self.journal.activate(
                job, job.decision["variant"], watch=self._watch_policy()
            )
            for old in retired:
                discard(layout.served(old.model, old.version), layout.trash)
                discard(layout.stored(old.model, old.version), layout.store / ".trash")
        with self._timed("reload"):
            refused = self._reload(job.model)
        if refused is not None:
            # The job is ACTIVE and its files serve from the agent's next (re)load: not a failure
            # of the update, and the health watch still judges the version.
            self.journal.note(job.id, "RELOAD", refused)
        shutil.rmtree(work, ignore_errors=True)
        for target in job.targets:
            layout.verified(_sha(target)).unlink(missing_ok=True)
        self.checkpoints.reached(ACTIVE)
        return self.journal.job(job.id)

    # --- helpers ----------------------------------------------------------------------------

    def _look_up(self, job: Job) -> Job:
        with self._timed("tuf_refresh"):
            trust = self._trusted()
            found = trust.variants(job.model, job.version)
        runnable = self._runnable_runtimes()
        chosen = {v: t for v, t in found.items() if t.custom.get("runtime") in runnable}
        if not found:
            raise TrustFailed(f"{job.model}@{job.version} is not published in the TUF repository")
        if not chosen:
            raise TrustFailed(
                f"{job.model}@{job.version} has variants for "
                f"{sorted({t.custom.get('runtime') for t in found.values()})}, none of which "
                f"this node's profile allows ({sorted(runnable)})"
            )
        targets = []
        for variant, info in sorted(chosen.items()):
            if info.length > self.limits.max_target_bytes:
                raise TrustFailed(
                    f"{info.path} is {info.length} bytes, over this node's limit of "
                    f"{self.limits.max_target_bytes}"
                )
            targets.append({"path": info.path, "variant": variant, "info": info.to_dict()})
        return self.journal.advance(
            job, DOWNLOADING, "targets: " + ", ".join(chosen), targets=targets
        )

    def _fetch(self, info: TargetFile, partial: Path) -> None:
        url = target_url(self.settings.server_url, info)
        attempts = self.limits.download_attempts
        for attempt in range(1, attempts + 1):
            try:
                download_resumable(
                    self._transport_for(),
                    url,
                    partial,
                    info.length,
                    progress=lambda offset: self.checkpoints.reached(DOWNLOADING, offset),
                )
                return
            except TargetTooLong as exc:
                partial.unlink(missing_ok=True)
                raise TrustFailed(f"{info.path}: {exc}") from None
            except DownloadFailed as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                log.info("download of %s interrupted (%s); resuming", info.path, exc)

    def _verify(self, info: TargetFile, partial: Path, verified: Path) -> None:
        try:
            with open(partial, "rb") as handle:
                info.verify_length_and_hashes(handle)
        except tuf_exceptions.LengthOrHashMismatchError as exc:
            partial.unlink(missing_ok=True)
            raise TrustFailed(
                f"{info.path}: does not match the signed TUF metadata ({exc})"
            ) from None
        os.replace(partial, verified)
        fsync_dir(verified.parent)

    def _advance(self, job: Job, state: str, detail: str = "", **fields) -> Job:
        job = self.journal.advance(job, state, detail, **fields)
        log.info("%s@%s: %s %s", job.model, job.version, state, detail)
        self.checkpoints.reached(state)
        return job

    def _abandon(self, job: Job, reason: str) -> bool:
        """Mark `job` FAILED and delete everything it downloaded or unpacked; False, and nothing
        done, if the journal already has it finished (ACTIVE: its files are serving)."""
        current = self.journal.job(job.id)
        if current.done:
            log.warning(
                "update of %s@%s is %s; not failing it: %s",
                job.model,
                job.version,
                current.state,
                reason,
            )
            return False
        self.journal.fail(job, reason)
        log.warning("update of %s@%s failed: %s", job.model, job.version, reason)
        shutil.rmtree(self.layout.job_dir(job.id), ignore_errors=True)
        if _unusable(job) is not None:  # no file names from targets that failed the check
            return True
        for target in job.targets:
            self.layout.partial(_sha(target)).unlink(missing_ok=True)
            self.layout.verified(_sha(target)).unlink(missing_ok=True)
        return True

    def _watch_policy(self) -> dict | None:
        """The health policy to record with an activation, if its version will be watched."""
        return asdict(self.health) if self.health is not None and self.agent else None

    def _serve(self, model: str, version: int) -> None:
        """Put the stored, verified `version` into the serving repository (atomically)."""
        source = self.layout.stored(model, version) / "serving" / model / str(version)
        if not source.is_dir():
            raise ActivationFailed(f"{model}@{version} is not in the store ({source})")
        place(source, self.layout.served(model, version), self.layout.staging)

    def _served_versions(self, model: str) -> list[int]:
        directory = self.layout.models_dir / model
        if not directory.is_dir():
            return []
        versions = (version_number(p.name) for p in directory.iterdir() if p.is_dir())
        return sorted(v for v in versions if v is not None)

    def _reconcile(self, model: str) -> bool:
        """Serving holds the active version, and the previous one if lower; True if changed."""
        installed = {i.role: i.version for i in self.journal.installed(model)}
        active, previous = installed.get(ROLE_ACTIVE), installed.get(ROLE_PREVIOUS)
        wanted = {
            v for v in (active, previous) if v is not None and (active is None or v <= active)
        }
        # Versions the journal never heard of were put there by hand: not ours to remove.
        known = self.journal.known_versions(model)
        changed = False
        for version in self._served_versions(model):
            if version in known and version not in wanted:
                discard(self.layout.served(model, version), self.layout.trash)
                changed = True
        for version in wanted:
            if not self.layout.served(model, version).is_dir():
                self._serve(model, version)
                changed = True
        keep = {v for v in (active, previous) if v is not None}
        store = self.layout.store / model
        if store.is_dir():
            for entry in store.iterdir():
                if entry.is_dir() and version_number(entry.name) not in keep:
                    shutil.rmtree(entry, ignore_errors=True)
        return changed

    def _reload(self, model: str) -> str | None:
        """Have the agent reload `model`; why it did not, or None if it did (or there is none).

        Called only once the files and the journal agree, so a refusal changes neither: the
        agent loads the files when it next starts or reloads.
        """
        if self.agent is None:
            return None
        try:
            self.agent.reload(model)
        except ActivationFailed as exc:  # unreachable, or it answered an error
            log.warning("could not have the agent reload %s: %s", model, exc)
            return f"the agent did not reload {model}: {exc}"
        return None

    def _package(self, job: Job) -> Package:
        variants = [t["variant"] for t in job.targets]
        return Package.load(self.layout.job_dir(job.id) / "package", variants)

    def _trusted(self) -> TrustedRepository:
        if self._trust is None:
            trust = TrustedRepository(
                self.layout.tuf, self.settings.server_url, self._transport_for(), self.journal
            )
            trust.refresh()
            self._trust = trust
        return self._trust

    def _transport_for(self) -> Transport:
        if self._transport is None:
            self._transport = Transport(self.settings.ssl_context(), self.limits)
        return self._transport

    def _node_profile(self):
        if self._profile is None:
            from agent.profiles import resolve
            from runtimes.hardware import probe

            self._profile = resolve(self.settings.profile, probe())
        return self._profile

    def _runnable_runtimes(self) -> set[str]:
        return {allowed.runtime for allowed in self._node_profile().allow}

    def _timed(self, name: str) -> _Timer:
        return _Timer(self._timings, name)

    def _outcome(self, job: Job, state: str, reason: str = "") -> Outcome:
        return Outcome(job.model, job.version, state, reason, job.id, dict(self._timings))


class _Timer:
    def __init__(self, into: dict[str, float], name: str) -> None:
        self.into, self.name = into, name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.started


def _sha(target: dict) -> str:
    return target["info"]["hashes"]["sha256"]


def _unusable(job: Job) -> str | None:
    """Why the targets the journal holds for `job` cannot be used, or None if they can.

    A journal written before targets were checked (or damaged since) may hold any values; the
    job fails with this reason rather than wedging every later run.
    """
    for target in job.targets:
        try:
            check_target(target["variant"], _target_file(target))
        except TrustFailed as exc:
            return f"{TrustFailed.step}: {exc}"
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return f"{TrustFailed.step}: damaged target in the update journal ({exc!r})"
    return None


def _target_file(target: dict) -> TargetFile:
    return TargetFile.from_dict(copy.deepcopy(target["info"]), target["path"])


def _merge(source: Path, files: list[str], package: Path, origin: str) -> None:
    """Move one variant archive's files into the package; shared files must agree byte for byte.

    A name that is a file in one variant and a directory in another can never merge: that is
    the archives' fault, not a passing condition, so it fails the update (UnpackFailed) rather
    than surfacing as an OSError that would leave the job to be retried forever.
    """
    for relative in files:
        target = package / relative
        try:
            if target.exists():
                if target.read_bytes() != (source / relative).read_bytes():
                    raise UnpackFailed(
                        f"{origin}: {relative} differs from the same file of another variant"
                    )
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source / relative, target)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise UnpackFailed(
                f"{origin}: {relative} collides with a file or directory of another variant"
            ) from None


__all__ = ["FAILED", "PENDING", "REFUSED", "UP_TO_DATE", "Lifecycle", "Outcome", "UpdateBusy"]
