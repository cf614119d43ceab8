"""First contact with the control plane: enroll with a token, get a certificate.

1. fetch the device CA from the server and accept it only if its SHA-256 matches the pin
   inside the token (the TLS of this first request cannot be verified yet: nothing is
   trusted until the pin matches, and nothing secret has been sent);
2. make an EC P-256 key pair here; the private key never leaves this device;
3. send token + CSR over TLS verified with that CA; the control plane picks the identity;
4. check the certificate (issued by the CA, for this key, with an EdgeFleet identity) and
   store key (0600) and certificate together.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.identity.client import MAX_CA_BYTES, get_bytes, post_json
from agent.identity.errors import IdentityError
from agent.identity.store import DeviceCredentials, IdentityStore
from provisioning.ca import utc_now
from provisioning.csr import build_csr
from provisioning.errors import ProvisioningError
from provisioning.identity import device_identity_of, serial_hex
from provisioning.keys import new_private_key
from provisioning.tls import client_context
from provisioning.tokens import ca_pin, parse_token


async def enroll(
    server_url: str,
    token_text: str,
    store: IdentityStore,
    *,
    ca_file: Path | None = None,
) -> DeviceCredentials:
    """Enroll this device at `server_url` (the control plane's enrollment endpoint)."""
    server_url = check_server_url(server_url)
    token = parse_token(token_text)
    if ca_file is not None:
        ca_pem = Path(ca_file).read_bytes()
    else:
        ca_pem = await get_bytes(
            f"{server_url}/v1/ca.pem", ssl_context=False, max_bytes=MAX_CA_BYTES
        )
    ca_cert = _load_ca(ca_pem)
    if ca_pin(ca_cert) != token.ca_pin:
        raise IdentityError(
            f"the CA offered by {server_url} does not match the pin in the token: wrong "
            "server, or someone between this device and the control plane. Nothing was sent."
        )
    key = new_private_key()
    reply = await post_json(
        f"{server_url}/v1/enroll",
        {"token": str(token), "csr": build_csr(key).decode()},
        ssl_context=client_context(ca_pem),
    )
    certificate = check_issued(reply, ca_cert)
    credentials = store.save(key, certificate, ca_pem, enrollment_record(reply, server_url))
    if reply.get("tuf_root"):
        # The model-update trust anchor arrives over the same CA-pinned channel as the cert.
        from agent.update import pin_enrollment_root

        try:
            root = base64.b64decode(str(reply["tuf_root"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise IdentityError(f"the control plane sent an unreadable TUF root: {exc}") from exc
        pin_enrollment_root(store.directory.parent, root)
    return credentials


def check_server_url(url: object, what: str = "--server") -> str:
    """`url` without a trailing slash, if it is an https:// URL that a config file can hold."""
    if not isinstance(url, str) or not url.startswith("https://"):
        raise IdentityError(f"{what} {url!r} must be an https:// URL")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise IdentityError(f"{what} {url!r} must not contain spaces or control characters")
    return url.rstrip("/")


def check_issued(
    reply: dict[str, Any], ca_cert: x509.Certificate, now: datetime | None = None
) -> x509.Certificate:
    """The certificate in a control-plane reply, checked to come from our CA, to carry a device
    identity and to be valid at `now` (default: this device's clock)."""
    try:
        certificate = x509.load_pem_x509_certificate(str(reply["certificate"]).encode())
        certificate.verify_directly_issued_by(ca_cert)
        device_identity_of(certificate)
    except (KeyError, ValueError, TypeError, InvalidSignature, ProvisioningError) as exc:
        raise IdentityError(f"the control plane returned an unusable certificate: {exc}") from exc
    # Stored as `current`, a certificate outside its validity could never authenticate again,
    # not even to renew itself: refuse it and keep what we have.
    now = now or utc_now()
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not not_before <= now < not_after:
        state = "not valid before" if now < not_before else "expired at"
        when = not_before if now < not_before else not_after
        raise IdentityError(
            f"the control plane returned certificate {serial_hex(certificate)} that is {state} "
            f"{when.isoformat(timespec='seconds')} (this device's clock says "
            f"{now.isoformat(timespec='seconds')}); if the clock is wrong, fix it (timedatectl)"
        )
    return certificate


def enrollment_record(reply: dict[str, Any], server_url: str) -> dict[str, Any]:
    return {
        "device_id": reply.get("device_id"),
        "region": reply.get("region"),
        "tags": reply.get("tags", {}),
        "server_url": server_url,
        "endpoints": reply.get("endpoints", {}),
    }


def _load_ca(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError("the server did not return a PEM CA certificate") from exc
