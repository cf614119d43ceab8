"""The device CA: one EC P-256 key that signs every device and server certificate of a fleet.

Device certificates are short-lived (30 days by default) so a lost device ages out on its own;
revocation (see `crl`) covers the time until then. The CA decides every field of what it signs:
from a CSR it takes only the public key, so a device cannot ask for another id or region.
Validity starts an hour in the past so that a peer whose clock runs a little behind does
not see a fresh certificate as "not yet valid".

    ca = CertificateAuthority.create(Path("state/ca"))
    cert = ca.issue_device(csr.public_key(), DeviceIdentity("dev-1", "ae"))
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.errors import ProvisioningError
from provisioning.identity import REGION_URN, SERVICE_URN, DeviceIdentity, check_name, device_uris
from provisioning.keys import (
    load_private_key,
    new_private_key,
    write_file_atomic,
    write_private_key,
)


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """How long what the CA signs stays valid; one place for every validity period."""

    device: timedelta = timedelta(days=30)
    server: timedelta = timedelta(days=90)
    ca: timedelta = timedelta(days=3650)
    # Backdating of notBefore: peers whose clocks run up to this far behind the CA still accept
    # a certificate the moment it is issued. Harmless: the holder had no use for it earlier.
    clock_skew: timedelta = timedelta(hours=1)


# One DNS label (letters, digits, inner '-'); a name is labels joined by dots, 253 at most.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_NAME = 253


def server_host(host: str) -> str:
    """A host name or IP address as it goes into a server certificate, or ProvisioningError.

    IP addresses and ASCII names come back as given; a name with non-ASCII letters comes back
    IDNA-encoded (`bücher.example` -> `xn--bcher-kva.example`), the form TLS clients compare.
    A leading `*.` label makes a wildcard name.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        name = ""
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if not labels or len(name) > _MAX_DNS_NAME or not all(map(_DNS_LABEL.fullmatch, labels)):
        raise ProvisioningError(
            f"host name {host!r} is not valid: give a DNS name such as broker.example.com "
            "(labels of letters, digits and '-', joined by dots) or an IP address"
        )
    return name


def utc_now() -> datetime:
    return datetime.now(UTC)


RENEW_AT = 2 / 3


def renewal_time(cert: x509.Certificate, fraction: float = RENEW_AT) -> datetime:
    """When a certificate should be replaced: after `fraction` of its lifetime (2/3 leaves a
    third, ten days of a 30-day certificate, to ride out an outage)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


class CertificateAuthority:
    """Signs certificates with the CA key kept in `directory` (`ca.key` 0600, `ca.pem`)."""

    KEY_FILE = "ca.key"
    CERT_FILE = "ca.pem"

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
        lifetimes: Lifetimes | None = None,
    ) -> None:
        self.certificate = certificate
        self._key = private_key
        self.lifetimes = lifetimes or Lifetimes()

    @classmethod
    def create(
        cls,
        directory: Path,
        name: str = "EdgeFleet device CA",
        *,
        now: datetime | None = None,
        lifetimes: Lifetimes | None = None,
    ) -> CertificateAuthority:
        """Make a new CA key and self-signed certificate; refuse to overwrite an existing CA."""
        directory = Path(directory)
        if (directory / cls.KEY_FILE).exists():
            raise ProvisioningError(
                f"a CA already exists in {directory}; replacing it would cut off every "
                "enrolled device. Remove it by hand only if that is what you want."
            )
        if not 1 <= len(name) <= 64:  # X.509's upper bound for a common name
            raise ProvisioningError(f"the CA's name must be 1-64 characters, not {len(name)}")
        lifetimes = lifetimes or Lifetimes()
        now = now or utc_now()
        key = new_private_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - lifetimes.clock_skew)
            .not_valid_after(now + lifetimes.ca)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        write_private_key(directory / cls.KEY_FILE, key)
        write_file_atomic(directory / cls.CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, lifetimes)

    @classmethod
    def load(cls, directory: Path, lifetimes: Lifetimes | None = None) -> CertificateAuthority:
        directory = Path(directory)
        cert_path = directory / cls.CERT_FILE
        if not cert_path.exists():
            raise ProvisioningError(f"no CA in {directory}; create one with: edgefleet ca init")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise ProvisioningError(f"cannot read {cert_path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ProvisioningError(f"{cert_path} is not a PEM certificate: {exc}") from None
        key = load_private_key(directory / cls.KEY_FILE)
        if key.public_key() != cert.public_key():
            raise ProvisioningError(f"{directory}: ca.key does not belong to ca.pem")
        return cls(cert, key, lifetimes)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_device(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        identity: DeviceIdentity,
        *,
        now: datetime | None = None,
        lifetime: timedelta | None = None,
    ) -> x509.Certificate:
        """A client certificate for one device: CN = id, SAN = device and region URNs."""
        return self._sign(
            public_key,
            identity.device_id,
            x509.SubjectAlternativeName(device_uris(identity)),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now or utc_now(),
            lifetime or self.lifetimes.device,
        )

    def issue_server(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        region: str,
        hostnames: Iterable[str],
        *,
        name: str = "edgefleet-controlplane",
        now: datetime | None = None,
        lifetime: timedelta | None = None,
    ) -> x509.Certificate:
        """A server certificate for a control-plane endpoint or broker of `region`.

        The region URN lets a device refuse to send region-bound data to another region's server.
        """
        check_name("region", region)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(REGION_URN + region)]
        for host in dict.fromkeys(server_host(h) for h in hostnames):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._sign(
            public_key,
            name,
            x509.SubjectAlternativeName(names),
            ExtendedKeyUsageOID.SERVER_AUTH,
            now or utc_now(),
            lifetime or self.lifetimes.server,
        )

    def issue_service_client(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        name: str,
        region: str,
        *,
        now: datetime | None = None,
        lifetime: timedelta | None = None,
    ) -> x509.Certificate:
        """A client certificate for a control-plane service itself (e.g. its MQTT connection)."""
        check_name("service name", name)
        check_name("region", region)
        san = x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier(SERVICE_URN + name),
                x509.UniformResourceIdentifier(REGION_URN + region),
            ]
        )
        return self._sign(
            public_key,
            name,
            san,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now or utc_now(),
            lifetime or self.lifetimes.server,
        )

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.issuer_name(self.certificate.subject).sign(self._key, hashes.SHA256())

    def _sign(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        common_name: str,
        san: x509.SubjectAlternativeName,
        usage: x509.ObjectIdentifier,
        now: datetime,
        lifetime: timedelta,
    ) -> x509.Certificate:
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.lifetimes.clock_skew)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=usage == ExtendedKeyUsageOID.SERVER_AUTH,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
