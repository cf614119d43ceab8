"""The control plane's database: schema and connection, in one module.

SQLite through sqlite-utils by default (one file, zero setup). The schema is plain SQL in the
subset PostgreSQL shares (TEXT, BIGINT, no SQLite-only types), times are Unix seconds, so the
same tables can move to PostgreSQL later. `schema_version` records what has been applied.

Tables:
- `tokens`: enrollment tokens, by id, with the SHA-256 of their secret, never the secret.
- `devices`: enrolled devices and their region, tags and status (`active` / `revoked`).
- `certificates`: every certificate issued, so revocation can list serials and prune expired.
- `settings`: small counters: CRL number, revocation generation, the generation the
  published CRL covers.
- `audit`: who did what, when, from where: token creation, enrollments, renewals, refused
  tokens and certificates, revocations, model pushes, publisher changes. Never a secret or a key.

Transactions that write go through `write_transaction` (BEGIN IMMEDIATE): a deferred transaction
that reads and then writes cannot wait for another writer (SQLite refuses the upgrade at once,
"database is locked", whatever busy_timeout says), while BEGIN IMMEDIATE waits its turn.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    uses_total BIGINT NOT NULL,
    uses_left BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    device_id TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    token_id TEXT,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    revoked_at BIGINT,
    superseded_at BIGINT
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(revoked_at, not_after);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    device_id TEXT,
    token_id TEXT,
    serial TEXT,
    peer TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
"""

# Columns added after version 1, for databases made before them.
MIGRATIONS = {2: ["ALTER TABLE certificates ADD COLUMN superseded_at BIGINT"]}


def open_database(path: Path | str) -> Database:
    """Open (creating if needed) the database at `path`, ready for several processes at once:
    the server and CLI commands such as `edgefleet device revoke` share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(path)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA foreign_keys = ON")
    if db.journal_mode != "wal":
        db.enable_wal()
    with write_transaction(db):
        fresh = "certificates" not in db.table_names()
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        applied = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if not fresh and applied is not None:
            for version in range(applied + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS.get(version, []):
                    db.execute(statement)
        db.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?) "
            "ON CONFLICT (version) DO NOTHING",
            [SCHEMA_VERSION, int(time.time())],
        )
    return db


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """A transaction that will write: BEGIN IMMEDIATE takes the write lock first, waiting up to
    busy_timeout for another writer, so a read in it is never followed by a refused upgrade.
    Inside another transaction, a savepoint of it."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.rollback()
        raise
    try:
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.conn.in_transaction:
            db.conn.rollback()
        raise


def counter(db: Database, name: str) -> int:
    row = db.execute("SELECT value FROM settings WHERE name = ?", [name]).fetchone()
    return row[0] if row else 0


def bump_counter(db: Database, name: str) -> int:
    """Increment a named counter and return its new value (call inside a transaction)."""
    db.execute(
        "INSERT INTO settings (name, value) VALUES (?, 1) "
        "ON CONFLICT (name) DO UPDATE SET value = value + 1",
        [name],
    )
    return counter(db, name)
