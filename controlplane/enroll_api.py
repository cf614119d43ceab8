"""The enrollment endpoint: server-authenticated HTTPS that turns a token and a CSR into a
device certificate.

    GET  /v1/ca.pem     the device CA certificate; a device accepts it only if its SHA-256
                        matches the pin in its token, then verifies this server with it
    GET  /v1/crl.pem    the current CRL (public, like any CRL distribution point)
    POST /v1/enroll     {"token": "ef1....", "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
                        -> 201 {"device_id", "region", "tags", "certificate", "ca_certificate",
                                "serial", "not_after", "endpoints"}
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from controlplane.enrollment import Issued
from controlplane.errors import NotFound
from controlplane.json_api import json_app, read_fields
from provisioning.identity import serial_hex

if TYPE_CHECKING:
    from controlplane.server import Endpoints
    from controlplane.service import ControlPlane

PEM = "application/x-pem-file"


def enrollment_app(plane: ControlPlane, endpoints: Endpoints) -> web.Application:
    app = json_app(plane.config.max_request_bytes)

    async def ca_certificate(request: web.Request) -> web.Response:
        return web.Response(body=plane.ca.certificate_pem, content_type=PEM)

    async def crl(request: web.Request) -> web.Response:
        try:
            body = plane.config.crl_path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound("no CRL has been published yet") from exc
        return web.Response(body=body, content_type=PEM)

    async def enroll(request: web.Request) -> web.Response:
        body = await read_fields(request, "token", "csr")
        issued = plane.enrollment.enroll(body["token"], body["csr"], peer=peer_of(request))
        return web.json_response(certificate_reply(plane, issued, endpoints), status=201)

    app.router.add_get("/v1/ca.pem", ca_certificate)
    app.router.add_get("/v1/crl.pem", crl)
    app.router.add_post("/v1/enroll", enroll)
    return app


def peer_of(request: web.Request) -> str:
    """The caller's address, for the audit log."""
    return request.remote or "unknown"


def certificate_reply(plane: ControlPlane, issued: Issued, endpoints: Endpoints) -> dict:
    """The JSON a device gets with a new certificate, on enrollment and on renewal alike."""
    cert = issued.certificate
    reply = {
        "device_id": issued.device.device_id,
        "region": issued.device.region,
        "tags": issued.device.tags,
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "ca_certificate": plane.ca.certificate_pem.decode(),
        "serial": serial_hex(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "endpoints": endpoints.to_json(),
    }
    root = _tuf_root(plane)
    if root is not None:  # pinned by the device: the trust anchor of every model update
        reply["tuf_root"] = base64.b64encode(root).decode()
    return reply


def _tuf_root(plane: ControlPlane) -> bytes | None:
    from controlplane.tuf_repository import TufRepository, TufRepositoryError

    try:
        return TufRepository(plane.config.state_dir / "tuf").root_bytes()
    except TufRepositoryError:
        return None  # no model repository yet (`edgefleet tuf init`)
