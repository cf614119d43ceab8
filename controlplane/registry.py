"""The device registry: who is enrolled, in which region, and which certificates they hold.

Every certificate the CA issues to a device is recorded here by serial. The device endpoints
(HTTPS and gRPC) admit a certificate only if this registry knows its serial and neither it nor
its device is revoked; that check, done on every call, is what Python's TLS stacks cannot do
with a CRL. A revocation bumps a generation counter so other processes notice it.

A device holds one certificate at a time: once it presents the certificate a renewal (or
re-enrollment) gave it, every earlier one is superseded, refused by the endpoints from then on
and listed in the CRL, so a key stolen from an older generation cannot compete with the device.
Not at issue: a renewal whose answer is lost on the way leaves the node the certificate it has.
Superseding bumps the same generation, so the running server republishes the CRL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from sqlite_utils import Database

from controlplane.errors import DeviceRefused, NotFound
from controlplane.storage import bump_counter, counter, write_transaction
from provisioning.ca import utc_now
from provisioning.crl import RevokedEntry
from provisioning.errors import ProvisioningError
from provisioning.identity import device_identity_of, serial_hex

ACTIVE = "active"
REVOKED = "revoked"
REVOCATION_GENERATION = "revocation_generation"


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    region: str
    tags: dict[str, str]
    status: str
    enrolled_at: datetime
    revoked_at: datetime | None = None


class DeviceRegistry:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utc_now) -> None:
        self._db = db
        self._clock = clock

    def add(self, device_id: str, region: str, tags: dict[str, str], token_id: str) -> Device:
        now = self._clock()
        self._db.execute(
            "INSERT INTO devices (id, region, tags, status, token_id, enrolled_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [device_id, region, json.dumps(tags, sort_keys=True), ACTIVE, token_id, _ts(now)],
        )
        return Device(device_id, region, dict(tags), ACTIVE, now)

    def get(self, device_id: str) -> Device | None:
        row = self._db.execute(
            "SELECT id, region, tags, status, enrolled_at, revoked_at FROM devices WHERE id = ?",
            [device_id],
        ).fetchone()
        return _device(row) if row else None

    def list(self) -> list[Device]:
        rows = self._db.execute(
            "SELECT id, region, tags, status, enrolled_at, revoked_at FROM devices "
            "ORDER BY enrolled_at, id"
        ).fetchall()
        return [_device(r) for r in rows]

    def record_certificate(self, device_id: str, cert: x509.Certificate) -> None:
        self._db.execute(
            "INSERT INTO certificates (serial, device_id, not_before, not_after, issued_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                serial_hex(cert),
                device_id,
                _ts(cert.not_valid_before_utc),
                _ts(cert.not_valid_after_utc),
                _ts(self._clock()),
            ],
        )

    def last_issued(self, device_id: str) -> datetime | None:
        """When the device's newest certificate was issued (by this control plane's clock)."""
        row = self._db.execute(
            "SELECT MAX(issued_at) FROM certificates WHERE device_id = ?", [device_id]
        ).fetchone()
        return None if row is None or row[0] is None else _dt(row[0])

    def authenticate(self, cert: x509.Certificate | None) -> Device:
        """The active device a verified client certificate belongs to, or DeviceRefused."""
        if cert is None:
            raise DeviceRefused("a device client certificate is required")
        try:
            identity = device_identity_of(cert)
        except ProvisioningError as exc:
            raise DeviceRefused(str(exc)) from exc
        serial = serial_hex(cert)
        row = self._db.execute(
            "SELECT device_id, revoked_at, superseded_at, rowid FROM certificates WHERE serial = ?",
            [serial],
        ).fetchone()
        if row is None or row[0] != identity.device_id:
            raise DeviceRefused(
                f"certificate {serial} was not issued to a device by this control plane"
            )
        device = self.get(identity.device_id)
        if row[1] is not None or device is None or device.status != ACTIVE:
            raise DeviceRefused(f"certificate {serial} of device {identity.device_id} is revoked")
        if row[2] is not None:
            raise DeviceRefused(
                f"certificate {serial} of device {identity.device_id} was superseded by a renewal "
                f"at {_dt(row[2]).isoformat(timespec='seconds')}; only the device's newest "
                "certificate is accepted (identity/current on the node)"
            )
        self._supersede_older(identity.device_id, row[3])
        return device

    def _supersede_older(self, device_id: str, rowid: int) -> None:
        """The device presents a certificate: every one issued to it before that one is
        superseded from now on (refused, and listed in the CRL). Not when the new one is issued:
        a renewal whose answer never reached the node must leave it the certificate it has."""
        older = (
            "FROM certificates WHERE device_id = ? AND rowid < ? "
            "AND revoked_at IS NULL AND superseded_at IS NULL"
        )
        if self._db.execute(f"SELECT 1 {older} LIMIT 1", [device_id, rowid]).fetchone() is None:
            return  # the usual case: one read, no write
        with write_transaction(self._db):
            self._db.execute(
                "UPDATE certificates SET superseded_at = ? "
                f"WHERE serial IN (SELECT serial {older})",
                [_ts(self._clock()), device_id, rowid],
            )
            bump_counter(self._db, REVOCATION_GENERATION)

    def is_revoked(self, serial: str) -> bool:
        """Whether the endpoints refuse this certificate now: revoked, superseded, or unknown."""
        row = self._db.execute(
            "SELECT c.revoked_at, c.superseded_at, d.status FROM certificates c JOIN devices d "
            "ON d.id = c.device_id WHERE c.serial = ?",
            [serial],
        ).fetchone()
        return row is None or row[0] is not None or row[1] is not None or row[2] != ACTIVE

    def revoke(self, device_id: str) -> list[str]:
        """Revoke a device and every certificate it holds; return the newly revoked serials."""
        now = _ts(self._clock())
        with write_transaction(self._db):
            device = self.get(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}; see: edgefleet device list")
            serials = [
                r[0]
                for r in self._db.execute(
                    "SELECT serial FROM certificates WHERE device_id = ? AND revoked_at IS NULL",
                    [device_id],
                ).fetchall()
            ]
            self._db.execute(
                "UPDATE devices SET status = ?, revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                [REVOKED, now, device_id],
            )
            self._db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                [now, device_id],
            )
            bump_counter(self._db, REVOCATION_GENERATION)
        return serials

    def revoked_entries(self) -> list[RevokedEntry]:
        """Revoked or superseded certificates not yet expired: what the CRL must list."""
        rows = self._db.execute(
            "SELECT serial, COALESCE(revoked_at, superseded_at) FROM certificates "
            "WHERE (revoked_at IS NOT NULL OR superseded_at IS NOT NULL) AND not_after > ? "
            "ORDER BY serial",
            [_ts(self._clock())],
        ).fetchall()
        return [RevokedEntry(int(serial, 16), _dt(at)) for serial, at in rows]

    def revoked_device_ids(self) -> list[str]:
        """Revoked devices that still hold an unexpired certificate: what the broker must deny."""
        rows = self._db.execute(
            "SELECT DISTINCT device_id FROM certificates "
            "WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY device_id",
            [_ts(self._clock())],
        ).fetchall()
        return [r[0] for r in rows]

    def revocation_generation(self) -> int:
        return counter(self._db, REVOCATION_GENERATION)


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


def _dt(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _device(row) -> Device:
    device_id, region, tags, status, enrolled, revoked = row
    return Device(device_id, region, json.loads(tags), status, _dt(enrolled), _dt(revoked))
