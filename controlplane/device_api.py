"""The device endpoint: HTTPS that only devices of the CA reach (client certificate required).

    GET  /v1/devices/self          who the control plane takes the caller to be, its
                                   certificate, and the server's clock (for skew estimates)
    POST /v1/devices/self/renew    {"csr": "..."} -> a new certificate, same identity

TLS has already refused expired and foreign certificates; a middleware refuses revoked and
unknown ones on every request to this port (keep-alive connections included, and routes other
modules mount here), because a running Python TLS server cannot swap its CRL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography import x509

from controlplane.audit import REFUSED
from controlplane.enroll_api import certificate_reply, peer_of
from controlplane.errors import DeviceRefused
from controlplane.json_api import json_app, read_fields
from controlplane.registry import Device
from provisioning.identity import serial_hex
from provisioning.tls import peer_certificate

if TYPE_CHECKING:
    from controlplane.server import Endpoints
    from controlplane.service import ControlPlane


def device_app(plane: ControlPlane, endpoints: Endpoints) -> web.Application:
    app = json_app(plane.config.max_request_bytes)

    @web.middleware
    async def devices_only(request: web.Request, handler) -> web.StreamResponse:
        # Every route on this port, including ones mounted later (artifacts), admits only
        # active devices of the registry; TLS has only checked the CA and the dates.
        authenticate_request(plane, request)
        return await handler(request)

    app.middlewares.append(devices_only)

    def caller(request: web.Request) -> tuple[Device, x509.Certificate]:
        return authenticate_request(plane, request)

    async def whoami(request: web.Request) -> web.Response:
        device, cert = caller(request)
        return web.json_response(_describe(device, cert))

    async def renew(request: web.Request) -> web.Response:
        _, cert = caller(request)
        body = await read_fields(request, "csr")
        issued = plane.enrollment.renew(cert, body["csr"], peer=peer_of(request))
        return web.json_response(certificate_reply(plane, issued, endpoints))

    app.router.add_get("/v1/devices/self", whoami)
    app.router.add_post("/v1/devices/self/renew", renew)
    return app


def authenticate_request(
    plane: ControlPlane, request: web.Request
) -> tuple[Device, x509.Certificate]:
    """The active device behind this request's client certificate, or DeviceRefused (403).

    Runs before any handler reads a body. Handlers that need the caller call it again (one
    indexed lookup) rather than passing it through the request."""
    transport = request.transport
    cert = peer_certificate(transport.get_extra_info("ssl_object") if transport else None)
    try:
        return plane.registry.authenticate(cert), cert
    except DeviceRefused as exc:
        plane.audit.record(
            "certificate.refused",
            REFUSED,
            serial=serial_hex(cert) if cert is not None else None,
            peer=peer_of(request),
            detail=f"https {request.method} {request.path}: {exc}",
        )
        raise


def _describe(device: Device, cert: x509.Certificate) -> dict:
    return {
        "device_id": device.device_id,
        "region": device.region,
        "tags": device.tags,
        "status": device.status,
        "certificate": {
            "serial": serial_hex(cert),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
        },
        "server_time": datetime.now(UTC).isoformat(),
    }
