"""Certificate revocation lists: built by the device CA, published as PEM files.

Mosquitto (`crlfile`) and any OpenSSL-based peer read the CRL file; they refuse every client
once its `nextUpdate` has passed, so the control plane must republish well before then (it does
at half the CRL's lifetime). Only revoked certificates that have not expired yet are listed:
an expired one is refused anyway, and the list stays small for the life of the fleet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.ca import CertificateAuthority
from provisioning.keys import write_file_atomic


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime


def build_crl(
    ca: CertificateAuthority,
    revoked: Iterable[RevokedEntry],
    *,
    number: int,
    now: datetime,
    lifetime: timedelta,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .last_update(now - ca.lifetimes.clock_skew)
        .next_update(now + lifetime)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return ca.sign_crl(builder)


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Publish `crl` at `path` atomically: a reader sees the old list or the new one."""
    write_file_atomic(Path(path), crl.public_bytes(serialization.Encoding.PEM))
