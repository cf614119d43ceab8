"""Revocation: mark a device revoked and push that to every place that enforces it.

    registry (the HTTPS and gRPC endpoints check it on every call, and a running server ends the
              device's live streams when it sees the revocation generation change)
    CRL file (for any OpenSSL-based peer; republished before half its lifetime runs out)
    broker   (CRL + ACL rewritten, SIGHUP, then the live MQTT connection is taken over)

The CLI (`edgefleet device revoke`) and a running server both go through `Revocation.revoke`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlite_utils import Database

from controlplane.broker import Broker
from controlplane.errors import NotFound
from controlplane.registry import DeviceRegistry
from controlplane.storage import bump_counter
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.crl import build_crl, write_crl
from provisioning.identity import DeviceIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RevocationResult:
    device_id: str
    serials: list[str]
    broker_reloaded: bool
    broker_disconnected: bool


class Revocation:
    def __init__(
        self,
        db: Database,
        ca: CertificateAuthority,
        registry: DeviceRegistry,
        *,
        crl_path: Path,
        crl_lifetime: timedelta,
        broker: Broker | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._db = db
        self._ca = ca
        self._registry = registry
        self._crl_path = Path(crl_path)
        self._crl_lifetime = crl_lifetime
        self._broker = broker
        self._clock = clock

    def revoke(self, device_id: str) -> RevocationResult:
        device = self._registry.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}; see: edgefleet device list")
        serials = self._registry.revoke(device_id)
        reloaded = self.publish()
        disconnected = False
        if self._broker is not None:
            disconnected = self._broker.disconnect(DeviceIdentity(device_id, device.region))
        log.info(
            "device revoked",
            extra={"device_id": device_id, "serials": serials, "broker_reloaded": reloaded},
        )
        return RevocationResult(device_id, serials, reloaded, disconnected)

    def publish(self, *, to_broker: bool = True) -> bool:
        """Write a fresh CRL (and broker ACL); return whether a broker was reloaded."""
        with self._db.atomic():
            number = bump_counter(self._db, "crl_number")
        crl = build_crl(
            self._ca,
            self._registry.revoked_entries(),
            number=number,
            now=self._clock(),
            lifetime=self._crl_lifetime,
        )
        write_crl(self._crl_path, crl)
        if self._broker is None or not to_broker:
            return False
        return self._broker.apply(
            crl.public_bytes(serialization.Encoding.PEM), self._registry.revoked_device_ids()
        )

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
