"""Certificate revocation lists: built by the device CA, published as PEM files.

Mosquitto (`crlfile`) and any OpenSSL-based peer read the CRL file; they refuse every client
once its `nextUpdate` has passed, so the control plane must republish well before then (it does
at half the CRL's lifetime). Only revoked certificates that have not expired yet are listed:
an expired one is refused anyway, and the list stays small for the life of the fleet.

A CRL's number only goes up: `write_crl` refuses to replace a CRL of the same CA with a lower
numbered one, which would bring back every certificate revoked in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.ca import CertificateAuthority
from provisioning.errors import ProvisioningError
from provisioning.keys import write_file_atomic


class StaleCRL(ProvisioningError):
    """A CRL numbered below the one its CA already published at that path."""


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


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def published_number(path: Path, issuer: CertificateAuthority) -> int:
    """The number of the CRL `issuer` published at `path`; 0 when there is none, or only one of
    another CA (the CA was created anew: its numbers start over)."""
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
        if not crl.is_signature_valid(issuer.certificate.public_key()):
            return 0
        return crl_number(crl)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


def write_crl(
    path: Path, crl: x509.CertificateRevocationList, *, issuer: CertificateAuthority
) -> None:
    """Publish `crl` at `path` atomically: a reader sees the old list or the new one.

    Raises StaleCRL rather than replace a higher numbered CRL of `issuer`. Writers that may race
    also take turns (controlplane.revocation); this keeps a late one from undoing a newer list.
    """
    published = published_number(path, issuer)
    if crl_number(crl) < published:
        raise StaleCRL(
            f"{path} already holds CRL number {published}; refusing to replace it with the "
            f"older number {crl_number(crl)}"
        )
    write_file_atomic(Path(path), crl.public_bytes(serialization.Encoding.PEM))
