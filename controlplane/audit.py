"""The audit log: who did what to the fleet's identities and models, when, and from where.

Each record is one row of the `audit` table (the database every control-plane process shares, so
the CLI's records and the server's land in one place) and one log line (`audit: EVENT`) for
journald. A record names things by their ids: token id, device id, certificate serial, the peer's
address; never a token secret, a key or a certificate body.

    audit.record("enroll", device_id="dev-...", token_id="k3x...", serial="1f...", peer="10.0.0.5")
    audit.entries(event="enroll")

Events: token.create, enroll (ok / refused), renew (ok / refused), certificate.refused,
device.revoke, model.push, publisher.add, publisher.remove, audit.unrecorded (below).

Refusals are what anyone on the network can cause (a revoked device that keeps reconnecting, a
scanner posting made-up tokens), so they are throttled, per process: the same refusal (same
event, ids, peer host and detail) is written once per REFUSAL_WINDOW_S and its repeats counted
into the next row written for it, and at most MAX_REFUSAL_ROWS_PER_MINUTE refusal rows are
written a minute in all, the rest counted into the next refusal row (or an `audit.unrecorded`
row). The server's maintenance pass writes counts that no later row carried. Accepted actions
are always written.
"""

from __future__ import annotations

import getpass
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlite_utils import Database

from provisioning.ca import utc_now

log = logging.getLogger(__name__)

OK = "ok"
REFUSED = "refused"

REFUSAL_WINDOW_S = 60.0  # one row per identical refusal per window; repeats are counted
MAX_REFUSAL_ROWS_PER_MINUTE = 120  # refusal rows a minute, every kind together
MAX_TRACKED_REFUSALS = 4096  # identical-refusal counters kept (oldest dropped first)


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
        self._refusals = RefusalThrottle()

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
        at, peer = self._clock(), peer or cli_peer()
        if outcome == REFUSED:
            key = (event, device_id, token_id, serial, _host(peer), detail)
            note = self._refusals.admit(key, at.timestamp())
            if note is None:
                return
            if note:
                detail = f"{detail} {note}" if detail else note
        self._write(AuditEntry(at, event, outcome, device_id, token_id, serial, peer, detail))

    def flush_refusals(self) -> None:
        """Write the repeats counted for refusals whose window has passed with no new row to
        carry them (the server's maintenance pass calls this), so none goes unrecorded."""
        at = self._clock()
        for (event, device_id, token_id, serial, host, detail), repeats in self._refusals.due(
            at.timestamp()
        ):
            note = f"(not recorded one by one: {repeats} more of these in {REFUSAL_WINDOW_S:g} s)"
            detail = f"{detail} {note}" if detail else note
            self._write(AuditEntry(at, event, REFUSED, device_id, token_id, serial, host, detail))
        dropped = self._refusals.over_budget_due(at.timestamp())
        if dropped:
            detail = (
                f"{dropped} refusals over the budget of {MAX_REFUSAL_ROWS_PER_MINUTE} rows a minute"
            )
            self._write(AuditEntry(at, "audit.unrecorded", REFUSED, detail=detail))

    def _write(self, entry: AuditEntry) -> None:
        event, outcome = entry.event, entry.outcome
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


class RefusalThrottle:
    """Which refusals get a row of their own (see the module docstring)."""

    def __init__(self):
        self._seen: OrderedDict[tuple, list] = OrderedDict()  # key -> [written at, repeats]
        self._minute = 0.0  # when the current minute of the budget began
        self._rows = 0  # refusal rows written in it
        self._over_budget = 0  # refusals not written for the budget since the last row

    def admit(self, key: tuple, now: float) -> str | None:
        """None: count it, write nothing. Otherwise write it, with this note (may be empty) on
        what was counted instead of written since the last row."""
        seen = self._seen.get(key)
        if seen is not None and _within(now, seen[0], REFUSAL_WINDOW_S):
            seen[1] += 1
            return None
        if not _within(now, self._minute, 60.0):
            self._minute, self._rows = now, 0
        if self._rows >= MAX_REFUSAL_ROWS_PER_MINUTE:
            self._over_budget += 1
            return None
        self._rows += 1
        notes = []
        if seen is not None and seen[1]:
            notes.append(f"{seen[1]} more of these in the {REFUSAL_WINDOW_S:g} s before")
        if self._over_budget:
            notes.append(f"{self._over_budget} other refusals over the audit budget")
            self._over_budget = 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_TRACKED_REFUSALS:
            # a count not yet written is not dropped with its key: the next note carries it
            _, (_, repeats) = self._seen.popitem(last=False)
            self._over_budget += repeats
        return f"(not recorded one by one: {'; '.join(notes)})" if notes else ""

    def over_budget_due(self, now: float) -> int:
        """Refusals the budget kept out, once its minute has passed with no row to carry them."""
        dropped = 0 if _within(now, self._minute, 60.0) else self._over_budget
        self._over_budget -= dropped
        return dropped

    def due(self, now: float) -> list[tuple[tuple, int]]:
        """(key, repeats) of the refusals repeated in a window that has passed; they start over."""
        found = []
        for key, seen in self._seen.items():
            if seen[1] and not _within(now, seen[0], REFUSAL_WINDOW_S):
                found.append((key, seen[1]))
                seen[0], seen[1] = now, 0
        for key, _ in found:  # a row written: evicted last, like a refusal written by admit
            self._seen.move_to_end(key)
        return found


def _within(now: float, start: float, window: float) -> bool:
    """Whether `now` falls in the window that began at `start`. A wall clock stepped back (an
    NTP correction) puts `now` before `start`: that window is over, or refusals would go
    unwritten until the clock caught up again, hours or days later."""
    return 0 <= now - start < window


def _host(peer: str) -> str:
    """The peer without its port (a reconnecting client has a new one each time): gRPC writes
    `ipv4:10.0.0.5:51234` / `ipv6:[::1]:51234`, aiohttp the bare address."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def cli_peer() -> str:
    """Who acts when no network peer does: the local user running the command."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local"


def _fields(entry: AuditEntry) -> dict:
    return {name: getattr(entry, name) for name in AuditEntry.__slots__}
