"""Enrollment and renewal: turning a token or a current certificate plus a CSR into a certificate.

The control plane chooses the identity: a new device gets a fresh id and the region and tags of
its token; a renewing device keeps the identity of the certificate it authenticated with. From
the CSR only the public key is used, after `provisioning.csr.check_csr` accepts it, so a CSR
asking for another id or region gets nothing its token or certificate does not already allow.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from sqlite_utils import Database

from controlplane.audit import REFUSED, AuditLog
from controlplane.errors import DeviceRefused, TokenRejected, TooSoon
from controlplane.registry import ACTIVE, Device, DeviceRegistry
from controlplane.storage import write_transaction
from controlplane.tokens import TokenStore
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.csr import check_csr
from provisioning.identity import DeviceIdentity, serial_hex
from provisioning.tokens import EnrollmentToken, ca_pin, parse_token

DEFAULT_RENEWAL_INTERVAL = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Issued:
    device: Device
    certificate: x509.Certificate


def new_device_id() -> str:
    """`dev-` and 64 random bits: unguessable, and never equal to a service name."""
    return "dev-" + secrets.token_hex(8)


class EnrollmentService:
    def __init__(
        self,
        db: Database,
        ca: CertificateAuthority,
        tokens: TokenStore,
        registry: DeviceRegistry,
        audit: AuditLog,
        *,
        region: str,
        renewal_interval: timedelta = DEFAULT_RENEWAL_INTERVAL,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._db = db
        self._ca = ca
        self._tokens = tokens
        self._registry = registry
        self._audit = audit
        self._region = region
        self._renewal_interval = renewal_interval
        self._clock = clock
        self._pin = ca_pin(ca.certificate)

    def enroll(self, token_text: str, csr_pem: str | bytes, *, peer: str | None = None) -> Issued:
        """Check the token and the CSR, use up one use of the token, issue a certificate."""
        token = parse_token(token_text)
        try:
            issued = self._enroll(token, csr_pem)
        except TokenRejected as exc:
            self._audit.record(
                "enroll", REFUSED, token_id=token.token_id, peer=peer, detail=str(exc)
            )
            raise
        self._audit.record(
            "enroll",
            device_id=issued.device.device_id,
            token_id=token.token_id,
            serial=serial_hex(issued.certificate),
            peer=peer,
            detail=f"region {issued.device.region}",
        )
        return issued

    def _enroll(self, token: EnrollmentToken, csr_pem: str | bytes) -> Issued:
        if token.ca_pin != self._pin:
            raise TokenRejected(
                "enrollment token was made by another control plane (its CA pin does not match "
                "this one's); check the --server URL"
            )
        # The token's secret first: no one without a valid token makes us parse a CSR. Then the
        # CSR, before the token is spent: a bad CSR must not burn a use.
        self._tokens.check(token, served_region=self._region)
        public_key = check_csr(csr_pem)
        with write_transaction(self._db):
            grant = self._tokens.redeem(token, served_region=self._region)
            if grant.device_id is None:
                device = self._registry.add(
                    new_device_id(), grant.region, grant.tags, grant.token_id
                )
            else:
                device = self._registry.get(grant.device_id)
                if device is None or device.status != ACTIVE:
                    raise TokenRejected(
                        f"re-enrollment token {grant.token_id} is for device {grant.device_id}, "
                        "which is revoked or gone; enroll the node as a new device"
                    )
            return self._issue(device, public_key)

    def renew(
        self, presented: x509.Certificate, csr_pem: str | bytes, *, peer: str | None = None
    ) -> Issued:
        """Issue a new certificate, same identity, to a device authenticated by `presented`.
        Once the device presents the new one, every earlier one is superseded (refused, and
        listed in the CRL): see DeviceRegistry.authenticate."""
        device = self._registry.authenticate(presented)
        public_key = check_csr(csr_pem)
        old = serial_hex(presented)
        try:
            with write_transaction(self._db):
                # Again inside the transaction: two renewals with one certificate, one wins.
                self._registry.authenticate(presented)
                self._check_renewal_interval(device)
                issued = self._issue(device, public_key)
        except (DeviceRefused, TooSoon) as exc:
            detail = exc.audit_detail if isinstance(exc, TooSoon) else str(exc)
            self._audit.record(
                "renew", REFUSED, device_id=device.device_id, serial=old, peer=peer, detail=detail
            )
            raise
        self._audit.record(
            "renew",
            device_id=device.device_id,
            serial=serial_hex(issued.certificate),
            peer=peer,
            detail=f"replaces {old}",
        )
        return issued

    def _check_renewal_interval(self, device: Device) -> None:
        """One certificate per device per renewal interval: a device (or a thief of its key)
        renewing in a loop would otherwise add certificates, and rows, without end. The agent
        renews at 2/3 of a lifetime of days; a renewal whose answer was lost is retried later."""
        last = self._registry.last_issued(device.device_id)
        if last is None:
            return
        allowed = last + self._renewal_interval
        now = self._clock()
        if now < allowed:
            wait = math.ceil((allowed - now).total_seconds())
            raise TooSoon(
                f"device {device.device_id} was issued a certificate at "
                f"{last.isoformat(timespec='seconds')}; it may renew again from "
                f"{allowed.isoformat(timespec='seconds')}",
                retry_after=wait,
                countdown=f" (in {wait} s)",
            )

    def _issue(self, device: Device, public_key) -> Issued:
        cert = self._ca.issue_device(
            public_key, DeviceIdentity(device.device_id, device.region), now=self._clock()
        )
        self._registry.record_certificate(device.device_id, cert)
        return Issued(device, cert)
