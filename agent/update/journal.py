"""The update journal: every step of every update, and which versions are installed, in SQLite.

    update_jobs        one row per attempt to install model@version: its state and why
    update_events      each state a job entered, when, with detail (the audit trail)
    update_installed   installed versions per model: active, previous (kept for rollback)
    update_trust       high-water marks of trust data (publisher list version)

A job moves DOWNLOADING -> VERIFIED -> UNPACKED -> SIGNATURE_OK -> SELECTED -> SELF_TESTED ->
ACTIVE, or ends FAILED (with its reason) or ROLLED_BACK (health watch, with its reason). A state
is written only once its step's results are durable on disk, so after a crash the job resumes
at the step after the last state recorded. Activation changes the job and the installed roles
in one transaction: the journal never names two active versions.

An ACTIVE job may still owe a health verdict: activation under a health policy records a WATCH
event (the policy) in its transaction, and the watch ends with a HEALTH event (kept) or the
rollback. A rollback first records ROLLING_BACK (its reason). So a run killed during the watch,
or inside the rollback, leaves in the journal what the next run must finish.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

DOWNLOADING = "DOWNLOADING"
VERIFIED = "VERIFIED"
UNPACKED = "UNPACKED"
SIGNATURE_OK = "SIGNATURE_OK"
SELECTED = "SELECTED"
SELF_TESTED = "SELF_TESTED"
ACTIVE = "ACTIVE"
FAILED = "FAILED"
ROLLED_BACK = "ROLLED_BACK"

STEPS = (DOWNLOADING, VERIFIED, UNPACKED, SIGNATURE_OK, SELECTED, SELF_TESTED, ACTIVE)
TERMINAL = (ACTIVE, FAILED, ROLLED_BACK)

ROLE_ACTIVE, ROLE_PREVIOUS = "active", "previous"

# Events of an ACTIVE job's health watch (no state change).
WATCH = "WATCH"  # activated under a health policy (detail: the policy as JSON)
HEALTH = "HEALTH"  # the watch's verdict, version kept
ROLLING_BACK = "ROLLING_BACK"  # a rollback began (detail: its reason)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS update_jobs (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    targets TEXT NOT NULL DEFAULT '[]',
    decision TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS update_jobs_model ON update_jobs(model, state);
CREATE TABLE IF NOT EXISTS update_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES update_jobs(id),
    state TEXT NOT NULL,
    detail TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS update_installed (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    role TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    variant TEXT NOT NULL,
    activated_at REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS update_trust (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


_JOB_COLUMNS = (
    "id",
    "model",
    "version",
    "generation",
    "state",
    "reason",
    "targets",
    "decision",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    model: str
    version: int
    generation: int
    state: str
    reason: str | None
    targets: list[dict[str, Any]]
    decision: dict[str, Any] | None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def reached(self, state: str) -> bool:
        """Whether this job has completed the step that ends in `state`."""
        return self.state in STEPS and STEPS.index(self.state) >= STEPS.index(state)


@dataclass(frozen=True, slots=True)
class Installed:
    model: str
    version: int
    role: str
    job_id: int
    variant: str


class Journal:
    def __init__(self, database: Path | sqlite_utils.Database) -> None:
        if isinstance(database, sqlite_utils.Database):
            self.db = database
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(database)
        self.db.execute("PRAGMA busy_timeout = 10000")
        if self.db.journal_mode != "wal":
            self.db.enable_wal()
        # Durable at each commit: a state is only recorded once its step's files are on disk.
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.executescript(_SCHEMA)

    # --- jobs -------------------------------------------------------------------------------

    def open_job(self, model: str) -> Job | None:
        """The unfinished job of `model`, if any (at most one: a new one supersedes it)."""
        row = self.db.execute(
            "SELECT * FROM update_jobs WHERE model = ? AND state NOT IN (?, ?, ?) "
            "ORDER BY id DESC LIMIT 1",
            [model, *TERMINAL],
        ).fetchone()
        return self._job(row) if row else None

    def open_jobs(self) -> list[Job]:
        rows = self.db.execute(
            "SELECT * FROM update_jobs WHERE state NOT IN (?, ?, ?) ORDER BY id", list(TERMINAL)
        ).fetchall()
        return [self._job(r) for r in rows]

    def job(self, job_id: int) -> Job:
        row = self.db.execute("SELECT * FROM update_jobs WHERE id = ?", [job_id]).fetchone()
        if row is None:
            raise KeyError(f"no update job {job_id}")
        return self._job(row)

    def last_job(self, model: str, version: int) -> Job | None:
        row = self.db.execute(
            "SELECT * FROM update_jobs WHERE model = ? AND version = ? ORDER BY id DESC LIMIT 1",
            [model, version],
        ).fetchone()
        return self._job(row) if row else None

    def start(self, model: str, version: int, generation: int, targets: list[dict]) -> Job:
        now = time.time()
        with self.db.conn:
            cursor = self.db.execute(
                "INSERT INTO update_jobs (model, version, generation, state, targets, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [model, version, generation, DOWNLOADING, json.dumps(targets), now, now],
            )
            job_id = cursor.lastrowid
            self._event(job_id, DOWNLOADING, f"{model}@{version}", now)
        return self.job(job_id)

    def advance(self, job: Job, state: str, detail: str = "", **fields: Any) -> Job:
        """Record that `job` completed the step ending in `state` (with optional fields)."""
        now = time.time()
        columns = {"state": state, "updated_at": now}
        for key, value in fields.items():
            columns[key] = json.dumps(value) if key in ("targets", "decision") else value
        assignments = ", ".join(f"{k} = ?" for k in columns)
        with self.db.conn:
            self.db.execute(
                f"UPDATE update_jobs SET {assignments} WHERE id = ?", [*columns.values(), job.id]
            )
            self._event(job.id, state, detail, now)
        return self.job(job.id)

    def fail(self, job: Job, reason: str) -> Job:
        return self.advance(job, FAILED, reason, reason=reason)

    def note(self, job_id: int, label: str, detail: str) -> None:
        """Add an event to a job's trail without changing its state (e.g. a health verdict)."""
        with self.db.conn:
            self._event(job_id, label, detail, time.time())

    def due_watch(self, job_id: int) -> tuple[dict[str, Any], float] | None:
        """(health policy, activation time) of an ACTIVE job whose watch gave no verdict yet."""
        if self.job(job_id).state != ACTIVE:
            return None
        labels = [e for e in self.events(job_id) if e[0] in (WATCH, HEALTH, ROLLING_BACK)]
        if not labels or labels[-1][0] != WATCH:
            return None
        return json.loads(labels[-1][1]), labels[-1][2]

    def rollback_begun(self, job_id: int) -> str | None:
        """The reason of a rollback of this (still ACTIVE) job that began and did not finish."""
        if self.job(job_id).state != ACTIVE:
            return None
        begun = [detail for label, detail, _ in self.events(job_id) if label == ROLLING_BACK]
        return begun[-1] if begun else None

    def events(self, job_id: int) -> list[tuple[str, str, float]]:
        rows = self.db.execute(
            "SELECT state, detail, at FROM update_events WHERE job_id = ? ORDER BY id", [job_id]
        ).fetchall()
        return [(r[0], r[1] or "", r[2]) for r in rows]

    # --- installed versions -----------------------------------------------------------------

    def installed(self, model: str) -> list[Installed]:
        rows = self.db.execute(
            "SELECT model, version, role, job_id, variant FROM update_installed WHERE model = ? "
            "ORDER BY activated_at DESC",
            [model],
        ).fetchall()
        return [Installed(*r) for r in rows]

    def managed_models(self) -> list[str]:
        rows = self.db.execute(
            "SELECT model FROM update_installed UNION SELECT model FROM update_jobs"
        ).fetchall()
        return sorted(r[0] for r in rows)

    def known_versions(self, model: str) -> set[int]:
        """Every version of `model` the lifecycle ever worked on."""
        rows = self.db.execute(
            "SELECT version FROM update_jobs WHERE model = ? UNION "
            "SELECT version FROM update_installed WHERE model = ?",
            [model, model],
        ).fetchall()
        return {r[0] for r in rows}

    def role(self, model: str, role: str) -> Installed | None:
        return next((i for i in self.installed(model) if i.role == role), None)

    def activate(
        self, job: Job, variant: str, detail: str = "", watch: dict[str, Any] | None = None
    ) -> list[Installed]:
        """Make job's version the active one: active -> previous, previous -> retired.

        `watch`, a health policy, records that the version is to be watched. Returns the
        retired versions, for garbage collection. One transaction.
        """
        now = time.time()
        with self.db.conn:
            current = self.installed(job.model)
            retired = [i for i in current if i.role == ROLE_PREVIOUS and i.version != job.version]
            self.db.execute(
                "DELETE FROM update_installed WHERE model = ? AND (role = ? OR version = ?)",
                [job.model, ROLE_PREVIOUS, job.version],
            )
            self.db.execute(
                "UPDATE update_installed SET role = ? WHERE model = ? AND role = ?",
                [ROLE_PREVIOUS, job.model, ROLE_ACTIVE],
            )
            self.db.execute(
                "INSERT INTO update_installed (model, version, role, job_id, variant, activated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [job.model, job.version, ROLE_ACTIVE, job.id, variant, now],
            )
            self.db.execute(
                "UPDATE update_jobs SET state = ?, updated_at = ? WHERE id = ?",
                [ACTIVE, now, job.id],
            )
            self._event(job.id, ACTIVE, detail or f"variant {variant}", now)
            if watch is not None:
                self._event(job.id, WATCH, json.dumps(watch), now)
        return retired

    def roll_back(self, model: str, reason: str) -> tuple[Installed, Installed] | None:
        """previous -> active, active -> gone (its job ROLLED_BACK). None without a previous."""
        now = time.time()
        with self.db.conn:
            active, previous = self.role(model, ROLE_ACTIVE), self.role(model, ROLE_PREVIOUS)
            if active is None or previous is None:
                return None
            self.db.execute(
                "DELETE FROM update_installed WHERE model = ? AND version = ?",
                [model, active.version],
            )
            self.db.execute(
                "UPDATE update_installed SET role = ?, activated_at = ? WHERE model = ? AND "
                "version = ?",
                [ROLE_ACTIVE, now, model, previous.version],
            )
            self.db.execute(
                "UPDATE update_jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                [ROLLED_BACK, reason, now, active.job_id],
            )
            self._event(active.job_id, ROLLED_BACK, reason, now)
        return active, previous

    # --- trust high-water marks -------------------------------------------------------------

    def trust_mark(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM update_trust WHERE name = ?", [name]).fetchone()
        return row[0] if row else 0

    def raise_trust_mark(self, name: str, value: int) -> None:
        with self.db.conn:
            self.db.execute(
                "INSERT INTO update_trust (name, value) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET value = max(value, excluded.value)",
                [name, value],
            )

    # --- internals --------------------------------------------------------------------------

    def _event(self, job_id: int, state: str, detail: str, at: float) -> None:
        self.db.execute(
            "INSERT INTO update_events (job_id, state, detail, at) VALUES (?, ?, ?, ?)",
            [job_id, state, detail, at],
        )

    def _job(self, row: tuple) -> Job:
        values = dict(zip(_JOB_COLUMNS, row, strict=True))
        return Job(
            id=values["id"],
            model=values["model"],
            version=values["version"],
            generation=values["generation"],
            state=values["state"],
            reason=values["reason"],
            targets=json.loads(values["targets"] or "[]"),
            decision=json.loads(values["decision"]) if values["decision"] else None,
        )
