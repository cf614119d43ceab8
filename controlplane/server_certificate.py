"""The TLS certificate the control plane's endpoints present to devices.

Issued by the device CA (devices trust nothing else), naming the instance's region and public
host names. `ensure_server_certificate` reissues it when it is missing, when the region or names
changed, or at two thirds of its lifetime, so a long-running server never serves an expired one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from provisioning.ca import CertificateAuthority, renewal_time
from provisioning.identity import region_of
from provisioning.keys import new_private_key, write_file_atomic, write_private_key


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    cert_file: Path
    key_file: Path

    @classmethod
    def in_dir(cls, directory: Path) -> ServerCredentials:
        return cls(Path(directory) / "server.pem", Path(directory) / "server.key")

    def certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except (OSError, ValueError):
            return None


def ensure_server_certificate(
    credentials: ServerCredentials,
    ca: CertificateAuthority,
    *,
    region: str,
    hostnames: tuple[str, ...],
    now: datetime,
) -> bool:
    """Make sure a fresh server certificate is in place; return whether one was issued."""
    current = credentials.certificate()
    if current is not None and not _needs_renewal(current, ca, region, hostnames, now):
        return False
    key = new_private_key()
    cert = ca.issue_server(key.public_key(), region, hostnames, now=now)
    write_private_key(credentials.key_file, key)
    write_file_atomic(credentials.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return True


def _needs_renewal(
    cert: x509.Certificate,
    ca: CertificateAuthority,
    region: str,
    hostnames: tuple[str, ...],
    now: datetime,
) -> bool:
    if cert.issuer != ca.certificate.subject or region_of(cert) != region:
        return True
    try:
        cert.verify_directly_issued_by(ca.certificate)
    except (InvalidSignature, ValueError, TypeError):
        return True
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    named = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    named |= set(san.get_values_for_type(x509.DNSName))
    if named != set(hostnames):
        return True
    return now >= renewal_time(cert)
