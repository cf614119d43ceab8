"""Revocation: mark a device revoked and push that to every place that enforces it.

    registry (the HTTPS and gRPC endpoints check it on every call, and a running server ends the
              device's live streams when it sees the revocation generation change)
    CRL file (for any OpenSSL-based peer; republished before half its lifetime runs out)
    broker   (CRL + ACL rewritten, SIGHUP, then the live MQTT connection is taken over)

The CLI (`edgefleet device revoke`) and a running server both go through `Revocation.revoke`.
Publishers (a revocation, the server's periodic republish, `edgefleet broker-config`) run in
different processes, so they take turns on a lock file next to the CRL (`.crl.lock`): one that
read the revoked list before another revocation must not write after it.

A revocation commits to the registry first and publishes second, so a revoking process that dies
in between (kill -9, power cut) leaves a CRL that misses it. Each publish therefore records the
registry's revocation generation it covers (`crl_generation`), and the running server's
maintenance pass republishes whenever the registry is ahead of it (`Revocation.crl_behind`).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlite_utils import Database

from controlplane.audit import AuditLog
from controlplane.broker import Broker
from controlplane.errors import ControlPlaneError, NotFound
from controlplane.registry import DeviceRegistry
from controlplane.storage import bump_counter, counter, write_transaction
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.crl import build_crl, published_number, write_crl
from provisioning.identity import DeviceIdentity

log = logging.getLogger(__name__)

CRL_NUMBER = "crl_number"  # counter in the settings table
CRL_GENERATION = "crl_generation"  # the revocation generation the published CRL covers


@dataclass(frozen=True, slots=True)
class RevocationResult:
    device_id: str
    serials: list[str]
    broker_reloaded: bool
    broker_disconnected: bool


class NotPublished(ControlPlaneError):
    """The revocation is committed (the endpoints refuse the device) but the CRL or the broker
    could not be updated."""

    code = "not_published"

    def __init__(self, device_id: str, serials: list[str], cause: Exception) -> None:
        super().__init__(
            f"device {device_id} is revoked ({len(serials)} certificate(s); the HTTPS and gRPC "
            f"endpoints refuse it), but publishing the CRL/broker update failed: {cause}. "
            "A running server republishes it on its next pass; or fix the cause and run again: "
            f"edgefleet device revoke {device_id}"
        )
        self.device_id = device_id
        self.serials = serials


class Revocation:
    def __init__(
        self,
        db: Database,
        ca: CertificateAuthority,
        registry: DeviceRegistry,
        audit: AuditLog,
        *,
        crl_path: Path,
        crl_lifetime: timedelta,
        broker: Broker | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._db = db
        self._ca = ca
        self._registry = registry
        self._audit = audit
        self._crl_path = Path(crl_path)
        self._crl_lifetime = crl_lifetime
        self._broker = broker
        self._clock = clock

    def revoke(self, device_id: str, *, peer: str | None = None) -> RevocationResult:
        """Revoke the device in the registry, then publish. Raises NotPublished when the
        registry has the revocation but the CRL or the broker does not (yet)."""
        device = self._registry.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}; see: edgefleet device list")
        serials = self._registry.revoke(device_id)
        self._audit.record(
            "device.revoke", device_id=device_id, peer=peer, detail=f"serials {serials}"
        )
        try:
            reloaded = self.publish()
            disconnected = False
            if self._broker is not None:
                disconnected = self._broker.disconnect(DeviceIdentity(device_id, device.region))
        except Exception as exc:  # committed already: say so, whatever failed after
            raise NotPublished(device_id, serials, exc) from exc
        log.info(
            "device revoked",
            extra={"device_id": device_id, "serials": serials, "broker_reloaded": reloaded},
        )
        return RevocationResult(device_id, serials, reloaded, disconnected)

    def publish(self, *, to_broker: bool = True) -> bool:
        """Write a fresh CRL (and broker ACL); return whether a broker was reloaded."""
        with self.locked():
            # The generation first: a revocation committed after this read bumps it past what
            # is recorded below, so the next maintenance pass publishes again.
            generation = self._registry.revocation_generation()
            crl = build_crl(
                self._ca,
                self._registry.revoked_entries(),
                number=self._next_crl_number(),
                now=self._clock(),
                lifetime=self._crl_lifetime,
            )
            write_crl(self._crl_path, crl, issuer=self._ca)
            if self._broker is None or not to_broker:
                if self._broker is None:
                    self._covered(generation)
                return False
            reloaded = self._broker.apply(
                crl.public_bytes(serialization.Encoding.PEM), self._registry.revoked_device_ids()
            )
            self._covered(generation)
            return reloaded

    def crl_behind(self) -> bool:
        """Whether the registry holds revocations (or superseded certificates) that the last
        publish did not: a revoking process died between its commit and its publish."""
        return counter(self._db, CRL_GENERATION) < self._registry.revocation_generation()

    def _covered(self, generation: int) -> None:
        self._db.execute(
            "INSERT INTO settings (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
            [CRL_GENERATION, generation],
        )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the CRL publishers' lock (one publisher at a time, across processes)."""
        path = self._crl_path.with_name(".crl.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another CRL publisher", extra={"lock": str(path)})
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _next_crl_number(self) -> int:
        """The next CRL number: above the published CRL's even when the database's counter is
        behind it (a database restored from a backup), so the number never goes down."""
        with write_transaction(self._db):
            number = bump_counter(self._db, CRL_NUMBER)
            published = published_number(self._crl_path, self._ca)
            if number <= published:
                log.warning(
                    "CRL counter %d is behind the published CRL %d; continuing after it",
                    number,
                    published,
                )
                number = published + 1
                self._db.execute(
                    "UPDATE settings SET value = ? WHERE name = ?", [number, CRL_NUMBER]
                )
        return number

    def current_crl(self) -> x509.CertificateRevocationList | None:
        try:
            return x509.load_pem_x509_crl(self._crl_path.read_bytes())
        except (OSError, ValueError):
            return None

    def crl_due(self) -> bool:
        """Whether the published CRL is missing or past half its lifetime."""
        crl = self.current_crl()
        if crl is None or crl.next_update_utc is None:
            return True
        remaining = crl.next_update_utc - self._clock()
        return remaining < self._crl_lifetime / 2
