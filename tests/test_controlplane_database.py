"""The control plane's database shared by processes: the server enrolling devices while the
operator's CLI writes, and a database made by an earlier version.

Two real SQLite connections on one WAL file. The other writer's transaction is committed from
the enrolling connection's trace callback at the moment that connection starts a statement that
needs the write lock, so the interleaving is the same on every run and nothing waits on a clock.
"""

from __future__ import annotations

import sqlite3

import pytest

from controlplane.config import load_config
from controlplane.service import ControlPlane
from controlplane.storage import SCHEMA_VERSION, open_database
from provisioning.ca import CertificateAuthority
from provisioning.csr import build_csr
from provisioning.keys import new_private_key
from tests.trust_fixtures import write_config


@pytest.fixture
def plane(tmp_path):
    config = load_config(write_config(tmp_path), env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    plane = ControlPlane.open(config)
    yield plane
    plane.close()


def enroll(plane: ControlPlane):
    token, _ = plane.tokens.create(region="ae", ca_pin=plane.ca_pin)
    return plane.enrollment.enroll(str(token), build_csr(new_private_key()))


@pytest.mark.parametrize("action", ["enroll", "revoke"])
def test_a_write_waits_for_another_writer_instead_of_failing(plane, action):
    """The CLI (another connection) holds the write lock when the server's transaction wants
    it. A deferred transaction has read by then and SQLite refuses its upgrade at once
    ("database is locked", busy_timeout or not); BEGIN IMMEDIATE waits its turn."""
    enrolled = enroll(plane) if action == "revoke" else None
    token, _ = plane.tokens.create(region="ae", ca_pin=plane.ca_pin)
    csr = build_csr(new_private_key())

    cli = sqlite3.connect(plane.config.database_path, isolation_level=None, timeout=5)
    cli.execute("BEGIN IMMEDIATE")
    cli.execute("INSERT INTO settings (name, value) VALUES ('cli-was-here', 1)")

    def writes(sql: str) -> bool:
        words = sql.lstrip().upper()
        return words.startswith(("BEGIN IMMEDIATE", "INSERT", "UPDATE", "DELETE"))

    def on_statement(sql: str) -> None:
        if cli.in_transaction and writes(sql):
            cli.execute("COMMIT")  # the CLI's write ends just as ours wants the lock

    plane.db.conn.set_trace_callback(on_statement)
    try:
        if action == "enroll":
            issued = plane.enrollment.enroll(str(token), csr)
            assert plane.registry.get(issued.device.device_id) is not None
        else:
            assert plane.registry.revoke(enrolled.device.device_id) == [
                format(enrolled.certificate.serial_number, "x")
            ]
    finally:
        plane.db.conn.set_trace_callback(None)
        cli.close()
    assert plane.db.execute("SELECT value FROM settings WHERE name = 'cli-was-here'").fetchone()


def test_a_database_of_the_first_schema_gets_the_new_columns(tmp_path):
    path = tmp_path / "controlplane.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
        INSERT INTO schema_version VALUES (1, 0);
        CREATE TABLE devices (id TEXT PRIMARY KEY, region TEXT NOT NULL, tags TEXT NOT NULL,
            status TEXT NOT NULL, token_id TEXT, enrolled_at BIGINT NOT NULL, revoked_at BIGINT);
        CREATE TABLE certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL,
            not_before BIGINT NOT NULL, not_after BIGINT NOT NULL, issued_at BIGINT NOT NULL,
            revoked_at BIGINT);
        INSERT INTO devices VALUES ('dev-1', 'ae', '{}', 'active', NULL, 0, NULL);
        INSERT INTO certificates VALUES ('ab', 'dev-1', 0, 99, 0, NULL);
        """
    )
    old.close()
    for _ in range(2):  # and opening it again changes nothing
        db = open_database(path)
        assert "superseded_at" in db["certificates"].columns_dict
        assert db.execute("SELECT serial FROM certificates").fetchall() == [("ab",)]
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        db.close()
