"""The control plane's parts, wired together from its config.

`ControlPlane.open(config)` is what the CLI commands and the server share: the database, the
device CA, the token store, the device registry, enrollment and revocation. The clock is a
parameter so tests can move time (token expiry) without sleeping.

    plane = ControlPlane.open(load_config())
    token, record = plane.tokens.create(region="ae", ca_pin=plane.ca_pin, uses=1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlite_utils import Database

from controlplane.audit import AuditLog
from controlplane.broker import Broker
from controlplane.config import ControlPlaneConfig
from controlplane.enrollment import EnrollmentService
from controlplane.registry import DeviceRegistry
from controlplane.revocation import Revocation
from controlplane.storage import open_database
from controlplane.tokens import TokenStore
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.tokens import ca_pin


@dataclass
class ControlPlane:
    config: ControlPlaneConfig
    db: Database
    ca: CertificateAuthority
    tokens: TokenStore
    registry: DeviceRegistry
    enrollment: EnrollmentService
    revocation: Revocation
    audit: AuditLog
    broker: Broker | None
    clock: Callable[[], datetime]

    @classmethod
    def open(
        cls, config: ControlPlaneConfig, *, clock: Callable[[], datetime] = utc_now
    ) -> ControlPlane:
        ca = CertificateAuthority.load(config.ca_dir, config.lifetimes)
        db = open_database(config.database_path)
        audit = AuditLog(db, clock)
        tokens = TokenStore(db, audit, clock)
        registry = DeviceRegistry(db, clock)
        broker = None
        if config.broker_dir is not None:
            broker = Broker(
                config.broker_dir, ca, pid_file=config.broker_pid_file, url=config.broker_url
            )
        return cls(
            config=config,
            db=db,
            ca=ca,
            tokens=tokens,
            registry=registry,
            enrollment=EnrollmentService(
                db,
                ca,
                tokens,
                registry,
                audit,
                region=config.region,
                renewal_interval=timedelta(seconds=config.renewal_interval_seconds),
                clock=clock,
            ),
            revocation=Revocation(
                db,
                ca,
                registry,
                audit,
                crl_path=config.crl_path,
                crl_lifetime=config.crl_lifetime,
                broker=broker,
                clock=clock,
            ),
            audit=audit,
            broker=broker,
            clock=clock,
        )

    @property
    def ca_pin(self) -> str:
        return ca_pin(self.ca.certificate)

    def close(self) -> None:
        self.db.close()
