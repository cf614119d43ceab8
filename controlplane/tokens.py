"""The enrollment token store: create tokens, redeem them once per allowed use.

A token is scoped: it enrolls devices into one region, with the tags it names, a limited number
of times, until it expires. A re-enrollment token is bound to one existing device and gives it
back the same identity (the recovery path for a certificate that expired while offline).
Redeeming is a single conditional UPDATE, so two devices racing for the last use cannot both win.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlite_utils import Database

from controlplane.audit import AuditLog
from controlplane.errors import BadRequest, TokenRejected
from provisioning.ca import utc_now
from provisioning.identity import check_name, check_tag
from provisioning.tokens import EnrollmentToken, new_token, secret_matches

MAX_USES = 100_000
MAX_LIFETIME = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    token_id: str
    region: str
    tags: dict[str, str]
    uses_total: int
    uses_left: int
    expires_at: datetime
    created_at: datetime
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a redeemed token allows: the region and tags of the device, or the one device
    a re-enrollment token was made for."""

    token_id: str
    region: str
    tags: dict[str, str]
    device_id: str | None


class TokenStore:
    def __init__(
        self, db: Database, audit: AuditLog, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock

    def create(
        self,
        *,
        region: str,
        ca_pin: str,
        tags: dict[str, str] | None = None,
        uses: int = 1,
        expires_in: timedelta = timedelta(hours=24),
        device_id: str | None = None,
    ) -> tuple[EnrollmentToken, TokenRecord]:
        """Make a token; the returned `EnrollmentToken` is the only copy of its secret."""
        check_name("region", region)
        tags = dict(tags or {})
        for key, value in tags.items():
            check_tag(key, value)
        if not 1 <= uses <= MAX_USES:
            raise BadRequest(f"uses must be between 1 and {MAX_USES}")
        if not timedelta(0) < expires_in <= MAX_LIFETIME:
            raise BadRequest(f"expiry must be positive and at most {MAX_LIFETIME.days} days")
        now = self._clock()
        token = new_token(ca_pin)
        record = TokenRecord(
            token_id=token.token_id,
            region=region,
            tags=tags,
            uses_total=uses,
            uses_left=uses,
            expires_at=now + expires_in,
            created_at=now,
            device_id=device_id,
        )
        self._db.execute(
            "INSERT INTO tokens (id, secret_hash, region, tags, uses_total, uses_left, "
            "expires_at, created_at, device_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                record.token_id,
                token.secret_hash,
                region,
                json.dumps(tags, sort_keys=True),
                uses,
                uses,
                _ts(record.expires_at),
                _ts(now),
                device_id,
            ],
        )
        scope = f"region {region}, tags {json.dumps(tags, sort_keys=True)}, {uses} use(s)"
        self._audit.record(
            "token.create",
            token_id=record.token_id,
            device_id=device_id,
            detail=f"{scope}, expires {record.expires_at.isoformat(timespec='seconds')}",
        )
        return token, record

    def get(self, token_id: str) -> TokenRecord | None:
        row = self._db.execute(
            "SELECT id, region, tags, uses_total, uses_left, expires_at, created_at, device_id "
            "FROM tokens WHERE id = ?",
            [token_id],
        ).fetchone()
        return _record(row) if row else None

    def list(self) -> list[TokenRecord]:
        rows = self._db.execute(
            "SELECT id, region, tags, uses_total, uses_left, expires_at, created_at, device_id "
            "FROM tokens ORDER BY created_at"
        ).fetchall()
        return [_record(r) for r in rows]

    def check(self, token: EnrollmentToken, *, served_region: str) -> TokenRecord:
        """The record of `token` if it could enroll a device at an endpoint of `served_region`
        now; TokenRejected, with the reason, if not. Spends nothing."""
        row = self._db.execute(
            "SELECT secret_hash FROM tokens WHERE id = ?", [token.token_id]
        ).fetchone()
        if row is None or not secret_matches(token.secret, row[0]):
            raise TokenRejected(
                "enrollment token is not known to this control plane; "
                "check the --server URL, or ask for a new token"
            )
        record = self.get(token.token_id)
        assert record is not None
        now = self._clock()
        if record.expires_at <= now:
            raise TokenRejected(
                f"enrollment token {record.token_id} expired at "
                f"{record.expires_at.isoformat(timespec='seconds')}; ask for a new one "
                "(edgefleet token create)"
            )
        if record.uses_left <= 0:
            raise TokenRejected(
                f"enrollment token {record.token_id} has already been used "
                f"({record.uses_total} of {record.uses_total} uses); ask for a new one"
            )
        if record.region != served_region:
            raise TokenRejected(
                f"enrollment token {record.token_id} is for region {record.region!r}, but this "
                f"control plane enrolls devices of region {served_region!r}; "
                f"use the {record.region!r} endpoint"
            )
        return record

    def redeem(self, token: EnrollmentToken, *, served_region: str) -> TokenGrant:
        """Use up one use of `token` for an enrollment at an endpoint of `served_region`.

        Call inside the transaction that registers the device, so a failed enrollment
        gives the use back."""
        record = self.check(token, served_region=served_region)
        now = self._clock()
        taken = self._db.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 "
            "WHERE id = ? AND uses_left > 0 AND expires_at > ?",
            [record.token_id, _ts(now)],
        ).rowcount
        if taken != 1:
            raise TokenRejected(f"enrollment token {record.token_id} has just been used up")
        return TokenGrant(record.token_id, record.region, record.tags, record.device_id)


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


def _dt(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _record(row) -> TokenRecord:
    token_id, region, tags, total, left, expires, created, device_id = row
    return TokenRecord(
        token_id, region, json.loads(tags), total, left, _dt(expires), _dt(created), device_id
    )
