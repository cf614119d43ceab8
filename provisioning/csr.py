"""Certificate signing requests: made on the device, checked by the control plane.

A CSR proves the device holds the private key (it is signed by it) and carries the public key
to certify. That is all the CA takes from it: names and extensions a device puts in its CSR are
ignored, the control plane decides them. The checks below refuse what should never be signed:
garbage, oversized input, a broken signature, weak or unusual keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import NameOID

from provisioning.errors import CSRRejected


@dataclass(frozen=True, slots=True)
class CSRLimits:
    """What a CSR may be; kept in one place so the policy reads at a glance."""

    max_pem_bytes: int = 16 * 1024
    ec_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1"})
    min_rsa_bits: int = 2048
    max_rsa_bits: int = 8192


DEFAULT_LIMITS = CSRLimits()
RSA_EXPONENT = 65537


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str = "edgefleet-device") -> bytes:
    """A PEM CSR for `key`. The name is only a label: the CA replaces it with the device id."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_csr(
    pem: str | bytes, limits: CSRLimits = DEFAULT_LIMITS
) -> CertificateIssuerPublicKeyTypes:
    """Return the public key of a well-formed, self-signed CSR with an acceptable key."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    if len(data) > limits.max_pem_bytes:
        raise CSRRejected(f"CSR is {len(data)} bytes; at most {limits.max_pem_bytes} are accepted")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise CSRRejected(
            "not a PEM certificate signing request (expected '-----BEGIN CERTIFICATE REQUEST-----')"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected(f"CSR cannot be parsed: {exc}") from exc
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CSRRejected(f"CSR public key is not supported: {exc}") from exc
    _check_key(key, limits)
    if not csr.is_signature_valid:
        raise CSRRejected("CSR signature does not verify: it was not signed by its own key")
    return key


def _check_key(key: object, limits: CSRLimits) -> None:
    allowed = (
        f"use EC {' or '.join(sorted(limits.ec_curves))}, "
        f"or RSA of {limits.min_rsa_bits}-{limits.max_rsa_bits} bits with exponent {RSA_EXPONENT}"
    )
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in limits.ec_curves:
            raise CSRRejected(f"CSR key is EC {key.curve.name}, which is not accepted; {allowed}")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if not limits.min_rsa_bits <= key.key_size <= limits.max_rsa_bits:
            raise CSRRejected(f"CSR key is RSA-{key.key_size}, which is not accepted; {allowed}")
        # Every key generator uses 65537; a huge exponent makes each check of the CSR's
        # signature (and each TLS handshake with the key) cost a hundred times more.
        exponent = key.public_numbers().e
        if exponent != RSA_EXPONENT:
            raise CSRRejected(
                f"CSR key is RSA with public exponent {_short(exponent)}, which is not accepted; "
                f"{allowed}"
            )
        return
    raise CSRRejected(f"CSR key type {type(key).__name__} is not accepted; {allowed}")


def _short(number: int) -> str:
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}...({len(text)} digits)"
