"""SSL contexts for both ends of EdgeFleet's mutual TLS.

One place decides protocol versions and verification, so the HTTPS endpoints, their clients and
the MQTT clients cannot drift apart. (gRPC takes the same files as raw PEM bytes.)
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509


def server_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS server context; with `client_ca_file`, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca_pem: bytes | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    ca_file: Path | None = None,
) -> ssl.SSLContext:
    """A TLS client context that trusts only the given CA (not the system store) and checks
    the server's host name; with `cert_file`/`key_file`, it also presents a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    """The verified certificate the peer presented on this connection, if any."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None
