"""The running control plane: enrollment HTTPS, device HTTPS (mTLS) and device gRPC (mTLS).

    enrollment  https://HOST:8443  server-authenticated TLS; token + CSR -> certificate
    devices     https://HOST:8444  client certificate from the device CA required
    gRPC        HOST:8445          client certificate from the device CA required

Beside the listeners, one maintenance task keeps the server safe to leave running: it ends the
live streams of devices revoked by another process (`edgefleet device revoke`), republishes the
CRL before it goes stale or when the registry holds revocations it lacks (a revoking process that
died between its commit and its publish, a certificate a renewal superseded), renews the
server's and the broker's certificates before they expire, and writes the audit log's counts of
throttled refusals.

    server = ControlPlaneServer(ControlPlane.open(load_config()))
    endpoints = await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import grpc
from aiohttp import web

from controlplane.device_api import device_app
from controlplane.enroll_api import enrollment_app
from controlplane.errors import ConfigError
from controlplane.grpc_api import DeviceGate, FleetServicer, LiveStreams
from controlplane.server_certificate import ServerCredentials, ensure_server_certificate
from controlplane.service import ControlPlane
from protocol import fleet_pb2_grpc
from provisioning.tls import server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where devices reach this instance; sent to each device when it enrolls."""

    enroll_url: str
    device_url: str
    grpc_target: str
    mqtt_url: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


class ControlPlaneServer:
    def __init__(
        self,
        plane: ControlPlane,
        *,
        device_routes: Sequence[Callable[[web.Application], None]] = (),
    ) -> None:
        """`device_routes` mount more routes on the device port (e.g. artifacts), behind the
        same client-certificate and revocation checks."""
        self.plane = plane
        self._device_routes = tuple(device_routes)
        self.streams = LiveStreams()
        self.endpoints: Endpoints | None = None
        self._credentials = ServerCredentials.in_dir(plane.config.server_dir)
        self._contexts: list[ssl.SSLContext] = []
        self._runners: list[web.AppRunner] = []
        self._grpc: grpc.aio.Server | None = None
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self._grpc_lock = threading.Lock()
        self._maintenance: asyncio.Task | None = None
        self._seen_generation = -1

    async def start(self) -> Endpoints:
        plane, config = self.plane, self.plane.config
        self._renew_server_certificate()
        if plane.revocation.crl_due() or plane.revocation.crl_behind():
            plane.revocation.publish()
        self._seen_generation = plane.registry.revocation_generation()

        ca_file = config.ca_dir / "ca.pem"
        enroll_ctx = server_context(self._credentials.cert_file, self._credentials.key_file)
        device_ctx = server_context(
            self._credentials.cert_file, self._credentials.key_file, client_ca_file=ca_file
        )
        self._contexts = [enroll_ctx, device_ctx]
        sockets: list[socket.socket] = []
        try:
            enroll_sock = _listen(config.bind_host, config.enroll_port, sockets)
            device_sock = _listen(config.bind_host, config.device_port, sockets)
            grpc_port = await self._start_grpc(config.bind_host, config.grpc_port)
        except ConfigError:
            for sock in sockets:
                sock.close()
            raise

        host = _url_host(config.public_host)
        self.endpoints = Endpoints(
            enroll_url=f"https://{host}:{enroll_sock.getsockname()[1]}",
            device_url=f"https://{host}:{device_sock.getsockname()[1]}",
            grpc_target=f"{host}:{grpc_port}",
            mqtt_url=config.broker_url,
        )
        await self._serve(enrollment_app(plane, self.endpoints), enroll_sock, enroll_ctx)
        devices = device_app(plane, self.endpoints)
        for mount in self._device_routes:
            mount(devices)
        await self._serve(devices, device_sock, device_ctx)
        self._maintenance = asyncio.create_task(self._maintain(), name="controlplane-maintenance")
        log.info("control plane serving", extra=self.endpoints.to_json())
        return self.endpoints

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    async def _serve(self, app: web.Application, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=ctx).start()
        self._runners.append(runner)

    async def _start_grpc(self, host: str, port: int) -> int:
        self._grpc = grpc.aio.server(
            interceptors=[DeviceGate(self.plane.registry, self.streams, self.plane.audit)],
            options=[("grpc.so_reuseport", 0)],
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(
            FleetServicer(self.plane.config.region), self._grpc
        )
        credentials = grpc.dynamic_ssl_server_credentials(
            self._grpc_certificate_configuration(),
            self._fetch_grpc_certificate_configuration,
            require_client_authentication=True,
        )
        try:
            bound = self._grpc.add_secure_port(f"{_url_host(host)}:{port}", credentials)
        except RuntimeError:  # gRPC says only "Failed to bind"
            self._grpc = None
            raise ConfigError(
                f"cannot listen on {_url_host(host)}:{port} (gRPC): the port is in use or the "
                "address is not this machine's; check [server] bind_host and grpc_port"
            ) from None
        await self._grpc.start()
        return bound

    def _grpc_certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._credentials.key_file.read_bytes(), self._credentials.cert_file.read_bytes())],
            root_certificates=self.plane.ca.certificate_pem,
        )

    def _fetch_grpc_certificate_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; None keeps the current certificate.
        with self._grpc_lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return pending

    def _renew_server_certificate(self) -> bool:
        config = self.plane.config
        renewed = ensure_server_certificate(
            self._credentials,
            self.plane.ca,
            region=config.region,
            hostnames=config.public_hosts,
            now=self.plane.clock(),
        )
        if renewed and self._contexts:
            for ctx in self._contexts:
                ctx.load_cert_chain(self._credentials.cert_file, self._credentials.key_file)
            with self._grpc_lock:
                self._grpc_pending = self._grpc_certificate_configuration()
            log.info("server certificate renewed")
        return renewed

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.plane.config.revocation_poll_seconds)
            try:
                self.plane.audit.flush_refusals()
                self.end_revoked_streams()
                revocation = self.plane.revocation
                if revocation.crl_due() or revocation.crl_behind():
                    revocation.publish()
                self._renew_server_certificate()
                if self.plane.broker is not None:
                    self.plane.broker.renew_certificates(
                        self.plane.config.region, self.plane.clock()
                    )
            except Exception:
                log.exception("control-plane maintenance step failed; retrying")

    def end_revoked_streams(self) -> int:
        """End the open streams of revoked certificates, if anything was revoked since the
        last look (by this process or another)."""
        registry = self.plane.registry
        generation = registry.revocation_generation()
        if generation == self._seen_generation:
            return 0
        revoked = [s for s in self.streams.serials() if registry.is_revoked(s)]
        ended = self.streams.end(revoked)
        # Only now: if a read above failed (a locked database), the next pass tries again.
        self._seen_generation = generation
        if ended:
            log.info("ended streams of revoked certificates", extra={"serials": revoked})
        return ended


def _listen(host: str, port: int, opened: list[socket.socket]) -> socket.socket:
    """A listening socket (also appended to `opened`), or ConfigError saying why there is none."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:  # in use, not an address of this machine, a name that resolves not
        raise ConfigError(
            f"cannot listen on {_url_host(host)}:{port}: {exc.strerror or exc}; check [server] "
            "bind_host and the ports"
        ) from None
    opened.append(sock)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
