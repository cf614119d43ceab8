"""Selection decisions in the agent's SQLite state, so a restart does not measure again.

Three tables (sqlite-utils):

    selection_decisions   one row per key (SelectionKey.ident): the decision as JSON
    selection_candidates  every candidate of every decision, rejected ones with their reason
    selection_file_digests  (path, size, mtime, inode) -> sha256, so a restart does not re-hash

A decision is reused only for an identical key; for a model whose key changed, `latest(model)`
tells what changed. The newest few decisions per model are kept (a rollback to the previous
version should not measure again); older ones are deleted. A stored decision this agent cannot
read (damaged, or written by another agent version) is deleted with a warning, as if it had
never been stored: the model is measured again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from agent.selection.decision import Decision, DecisionError
from agent.selection.key import SelectionKey

log = logging.getLogger(__name__)

KEEP_PER_MODEL = 4

_DECISIONS = "selection_decisions"
_CANDIDATES = "selection_candidates"
_DIGESTS = "selection_file_digests"

_SCHEMA: dict[str, dict[str, type]] = {
    _DECISIONS: {
        "key": str,
        "model": str,
        "model_digest": str,
        "variants": str,
        "hardware": str,
        "runtimes": str,
        "profile": str,
        "policy": str,
        "decision": str,
        "created_at": float,
    },
    _CANDIDATES: {
        "key": str,
        "position": int,
        "variant": str,
        "runtime": str,
        "device": str,
        "options": str,
        "verdict": str,
        "reason": str,
        "load_seconds": float,
        "p50_ms": float,
        "p99_ms": float,
        "max_error": float,
        "memory_mb": float,
        "placement": str,
    },
    _DIGESTS: {"path": str, "stamp": str, "digest": str},
}

_T = TypeVar("_T")


def _locked(method: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(method)
    def locked(self: DecisionCache, *args: Any, **kwargs: Any) -> _T:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class DecisionCache:
    """Safe to share between threads (the data plane decides in a thread pool); one lock."""

    def __init__(self, database: str | Path | sqlite_utils.Database):
        self._lock = threading.RLock()
        if isinstance(database, sqlite_utils.Database):
            self.db = database
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(str(database), check_same_thread=False)
            self.db = sqlite_utils.Database(connection)
            self.db.enable_wal()
        with self._lock:
            self._ensure_tables()

    def _ensure_tables(self) -> None:
        names = set(self.db.table_names())
        if {_DECISIONS, _CANDIDATES, _DIGESTS} <= names and all(
            set(self.db[table].columns_dict) == set(columns) for table, columns in _SCHEMA.items()
        ):
            return  # the common case at start-up: two queries a table instead of DDL
        # Tables of these names with other columns: an older agent's, or damaged. What they
        # hold cannot be read, so they go, and their models are measured again.
        for table in (_CANDIDATES, _DECISIONS, _DIGESTS):
            if table in names and set(self.db[table].columns_dict) != set(_SCHEMA[table]):
                log.warning(
                    "table %s has columns this agent does not use; dropped (its models are "
                    "measured again)",
                    table,
                )
                self.db[table].drop()
        self.db[_DECISIONS].create(_SCHEMA[_DECISIONS], pk="key", if_not_exists=True)
        self.db[_DECISIONS].create_index(["model", "created_at"], if_not_exists=True)
        self.db[_CANDIDATES].create(
            _SCHEMA[_CANDIDATES],
            pk=("key", "position"),
            foreign_keys=[("key", _DECISIONS, "key")],
            if_not_exists=True,
        )
        self.db[_DIGESTS].create(_SCHEMA[_DIGESTS], pk="path", if_not_exists=True)

    @_locked
    def get(self, key: SelectionKey) -> Decision | None:
        rows = self._rows(
            f"select key, model, decision from {_DECISIONS} where key = ?", [key.ident]
        )
        decision = self._decode(rows[0]) if rows else None
        if decision is not None and decision.key != key:
            # The row's id is the key's digest; a row whose own key differs was not stored by
            # this agent for this key.
            self._drop(rows[0], "its key is not the one it is stored under")
            return None
        if decision is not None:
            decision.from_cache = True
        return decision

    @_locked
    def latest(self, model: str) -> Decision | None:
        rows = self._rows(
            f"select key, model, decision from {_DECISIONS} where model = ? "
            "order by created_at desc limit 1",
            [model],
        )
        return self._decode(rows[0]) if rows else None

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        """The rows of a read; none, with a warning, when the database cannot answer it."""
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as exc:
            log.warning("stored selection decisions cannot be read (measuring again): %s", exc)
            return []

    @_locked
    def put(self, decision: Decision) -> None:
        key = decision.key
        with self.db.conn:
            self.db[_CANDIDATES].delete_where("key = ?", [key.ident])
            self.db[_DECISIONS].upsert(
                {
                    "key": key.ident,
                    "model": decision.model,
                    "model_digest": key.model_digest,
                    "variants": json.dumps(list(key.variants)),
                    "hardware": key.hardware,
                    "runtimes": json.dumps(dict(key.runtimes), sort_keys=True),
                    "profile": key.profile,
                    "policy": key.policy,
                    "decision": json.dumps(decision.to_dict()),
                    "created_at": time.time(),
                },
                pk="key",
            )
            self.db[_CANDIDATES].insert_all(
                (
                    {
                        "key": key.ident,
                        "position": position,
                        "variant": r.candidate.variant,
                        "runtime": r.candidate.runtime,
                        "device": r.candidate.device,
                        "options": json.dumps(dict(r.candidate.options), sort_keys=True),
                        "verdict": r.verdict,
                        "reason": r.reason,
                        "load_seconds": r.load_seconds,
                        "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms,
                        "max_error": r.max_error,
                        "memory_mb": r.memory_mb,
                        "placement": json.dumps(r.placement),
                    }
                    for position, r in enumerate(decision.results)
                ),
                pk=("key", "position"),
            )
            self._forget_old(decision.model)

    @_locked
    def candidates(self, key: SelectionKey) -> list[dict[str, Any]]:
        """The stored rows of every candidate of a decision, in measuring order."""
        return list(self.db[_CANDIDATES].rows_where("key = ?", [key.ident], order_by="position"))

    @_locked
    def forget(self, model: str) -> int:
        """Drop every decision for a model, so the next start measures again."""
        keys = [r["key"] for r in self.db[_DECISIONS].rows_where("model = ?", [model])]
        with self.db.conn:
            for key in keys:
                self.db[_CANDIDATES].delete_where("key = ?", [key])
                self.db[_DECISIONS].delete(key)
        return len(keys)

    @_locked
    def compile_dirs_in_use(self) -> set[str]:
        """OpenVINO compile cache directories that stored decisions load from."""
        used = set()
        # a list: decoding deletes the rows it cannot use
        for row in self._rows(f"select key, model, decision from {_DECISIONS}", []):
            decision = self._decode(row)
            if decision is not None and decision.options.extra.get("CACHE_DIR"):
                used.add(decision.options.extra["CACHE_DIR"])
        return used

    def digest(self, path: Path, compute: Callable[[Path], str]) -> str:
        """`compute(path)`, remembered while the file (and an IR's .bin) keeps size and mtime."""
        stamp = _stamp(path)
        with self._lock:
            rows = self._rows(f"select stamp, digest from {_DIGESTS} where path = ?", [str(path)])
        if rows and rows[0]["stamp"] == stamp and isinstance(rows[0]["digest"], str):
            return rows[0]["digest"]
        digest = compute(path)  # outside the lock: hashing a large model takes a while
        with self._lock:
            try:
                self.db[_DIGESTS].upsert(
                    {"path": str(path), "stamp": stamp, "digest": digest}, pk="path"
                )
            except sqlite3.Error as exc:  # the digest is still right; it is computed again
                log.warning("a model file's digest cannot be stored: %s", exc)
        return digest

    def _decode(self, row: dict[str, Any]) -> Decision | None:
        """The decision of a row; None, and the row deleted, if this agent cannot use it."""
        try:
            return Decision.from_dict(json.loads(row["decision"]))
        # ValueError: not JSON, or not UTF-8 (a blob)
        except (DecisionError, ValueError, TypeError, RecursionError) as exc:
            self._drop(row, str(exc))
            return None

    def _drop(self, row: dict[str, Any], why: str) -> None:
        log.warning(
            "model %s: dropped a stored selection decision this agent cannot use (it is "
            "measured again): %s",
            row["model"],
            why,
        )
        try:
            self._delete(row["key"])
        except sqlite3.Error as exc:  # read-only or damaged: the row stays, unused
            log.warning("could not delete it: %s", exc)

    def _delete(self, key: str) -> None:
        with self.db.conn:
            self.db[_CANDIDATES].delete_where("key = ?", [key])
            self.db[_DECISIONS].delete(key)

    def _forget_old(self, model: str) -> None:
        stale = [
            row["key"]
            for row in self.db.query(
                f"select key from {_DECISIONS} where model = ? order by created_at desc "
                f"limit -1 offset {KEEP_PER_MODEL}",
                [model],
            )
        ]
        for key in stale:
            self.db[_CANDIDATES].delete_where("key = ?", [key])
            self.db[_DECISIONS].delete(key)


def _stamp(path: Path) -> str:
    parts = [path]
    if path.suffix.lower() == ".xml":
        parts.append(path.with_suffix(".bin"))
    stamps = []
    for part in parts:
        try:
            st = os.stat(part)
        except FileNotFoundError:
            stamps.append("absent")
            continue
        stamps.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "|".join(stamps)
