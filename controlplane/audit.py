"""The audit log: who did what to the fleet's identities and models, when, and from where.

Each record is one row of the `audit` table (the database every control-plane process shares, so
the CLI's records and the server's land in one place) and one log line (`audit: EVENT`) for
journald. A record names things by their ids: token id, device id, certificate serial, the peer's
address; never a token secret, a key or a certificate body.

    audit.record("enroll", device_id="dev-...", token_id="k3x...", serial="1f...", peer="10.0.0.5")
    audit.entries(event="enroll")

Events: token.create, enroll (ok / refused), renew (ok / refused), certificate.refused,
device.revoke, model.push, publisher.add, publisher.remove.
"""

from __future__ import annotations

import getpass
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlite_utils import Database

from provisioning.ca import utc_now

log = logging.getLogger(__name__)

OK = "ok"
REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: datetime
    event: str
    outcome: str
    device_id: str | None = None
    token_id: str | None = None
    serial: str | None = None
    peer: str | None = None
    detail: str | None = None


class AuditLog:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utc_now) -> None:
        self._db = db
        self._clock = clock

    def record(
        self,
        event: str,
        outcome: str = OK,
        *,
        device_id: str | None = None,
        token_id: str | None = None,
        serial: str | None = None,
        peer: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Append a record. A failing write is logged, not raised: the audited action (a
        refusal, a committed revocation) must not turn into a server error because of it."""
        entry = AuditEntry(
            self._clock(), event, outcome, device_id, token_id, serial, peer or cli_peer(), detail
        )
        log.info(
            "audit: %s %s",
            event,
            outcome,
            extra={k: v for k, v in _fields(entry).items() if v is not None and k != "at"},
        )
        try:
            self._db.execute(
                "INSERT INTO audit (at, event, outcome, device_id, token_id, serial, peer, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [int(entry.at.timestamp()), *list(_fields(entry).values())[1:]],
            )
        except sqlite3.Error:
            log.exception("could not write the audit record %s", event)

    def entries(self, event: str | None = None) -> list[AuditEntry]:
        """Records in the order they were written, all or those of one event."""
        sql = "SELECT at, event, outcome, device_id, token_id, serial, peer, detail FROM audit"
        rows = self._db.execute(
            sql + (" WHERE event = ? ORDER BY rowid" if event else " ORDER BY rowid"),
            [event] if event else [],
        ).fetchall()
        return [AuditEntry(datetime.fromtimestamp(r[0], UTC), *r[1:]) for r in rows]


def cli_peer() -> str:
    """Who acts when no network peer does: the local user running the command."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local"


def _fields(entry: AuditEntry) -> dict:
    return {name: getattr(entry, name) for name in AuditEntry.__slots__}
