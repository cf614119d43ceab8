"""Enrollment tokens: what an operator hands to a new device, once.

A token reads `ef1.<id>.<secret>.<ca-pin>`:

- `id` names the token in the control plane's store (for listing and audit, not secret);
- `secret` is 256 random bits; the control plane stores only its SHA-256, so a copy of the
  database does not let anyone enroll (a fast hash is enough for a secret this long);
- `ca-pin` is the SHA-256 of the device CA certificate: the device fetches the CA over TLS it
  cannot yet verify and accepts it only if it matches the pin (the kubeadm discovery scheme), so
  the token alone bootstraps trust in both directions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.errors import TokenFormatError

PREFIX = "ef1"
_ID = re.compile(r"[a-z0-9]{10}")
_B64 = re.compile(r"[A-Za-z0-9_-]{43}")
_HASH_DOMAIN = b"edgefleet-enrollment-token-v1\x00"


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    token_id: str
    secret: str
    ca_pin: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.token_id}.{self.secret}.{self.ca_pin}"

    def __repr__(self) -> str:  # never print the secret into logs by accident
        return f"EnrollmentToken(token_id={self.token_id!r}, secret=***)"

    @property
    def secret_hash(self) -> str:
        return hash_secret(self.secret)


def new_token(ca_pin: str) -> EnrollmentToken:
    token_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10))
    return EnrollmentToken(token_id, _b64(secrets.token_bytes(32)), ca_pin)


def parse_token(text: str) -> EnrollmentToken:
    """Split a token into its parts, or say what about it is wrong (without echoing it)."""
    text = (text or "").strip()
    parts = text.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise TokenFormatError(
            "malformed enrollment token: expected 'ef1.<id>.<secret>.<ca-pin>' as printed by "
            "'edgefleet token create'; check it was copied whole"
        )
    _, token_id, secret, pin = parts
    if not _ID.fullmatch(token_id) or not _B64.fullmatch(secret) or not _B64.fullmatch(pin):
        raise TokenFormatError(
            "malformed enrollment token: a part has the wrong length or characters; "
            "check it was copied whole"
        )
    return EnrollmentToken(token_id, secret, pin)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(_HASH_DOMAIN + secret.encode("ascii")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def ca_pin(ca_certificate: x509.Certificate) -> str:
    """The pin of a CA certificate as it appears in tokens (base64url SHA-256 of its DER)."""
    return _b64(hashlib.sha256(ca_certificate.public_bytes(serialization.Encoding.DER)).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
