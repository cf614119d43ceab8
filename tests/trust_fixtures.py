"""Fixtures for the identity and trust tests: a real control plane and a real Mosquitto.

Everything runs on free loopback ports with its own temporary directory: the control plane
(enrollment HTTPS, device HTTPS and gRPC, all real TLS) in the test's event loop, Mosquitto as a
subprocess configured by `edgefleet broker-config`. The control plane's clock is a `Clock` the
test can move forward (token expiry), never a sleep.

tests/conftest.py loads them for every test module (pytest_plugins); helpers are methods
of what the fixtures return (`env.whoami(credentials)`, `broker.client(credentials)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import grpc
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization

from agent import cli as agent_cli
from agent.identity import DeviceCredentials, IdentityStore, enroll
from controlplane import cli as controlplane_cli
from controlplane.broker import BrokerFiles
from controlplane.config import ControlPlaneConfig, load_config
from controlplane.server import ControlPlaneServer, Endpoints
from controlplane.service import ControlPlane
from protocol import fleet_pb2, fleet_pb2_grpc
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.identity import DeviceIdentity
from provisioning.keys import new_private_key, write_file_atomic, write_private_key

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT = 15.0  # upper bound for anything to happen; tests never assert on durations


class Clock:
    """Real time plus an offset that a test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utc_now() + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    root: Path,
    broker_port: int | None = None,
    broker_dir: Path | None = None,
    *,
    renewal_interval_seconds: int = 0,
) -> Path:
    """A control plane's config for tests. Renewals are not throttled by default (tests renew
    right after enrolling); tests of the throttle set an interval."""
    lines = [
        f'state_dir = "{root / "cp"}"',
        'region = "ae"',
        "[server]",
        'public_hosts = ["127.0.0.1", "localhost"]',
        "enroll_port = 0",
        "device_port = 0",
        "grpc_port = 0",
        "max_request_bytes = 65536",
        "revocation_poll_seconds = 0.05",
        "[certificates]",
        f"renewal_interval_seconds = {renewal_interval_seconds}",
    ]
    if broker_port is not None:
        lines += [
            "[broker]",
            f'dir = "{broker_dir}"',
            f'url = "mqtts://127.0.0.1:{broker_port}"',
        ]
    path = root / "controlplane.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class TrustEnv:
    """A running control plane and what a test needs to talk to it."""

    root: Path
    config_path: Path
    config: ControlPlaneConfig
    plane: ControlPlane
    server: ControlPlaneServer
    endpoints: Endpoints
    clock: Clock
    _devices: int = field(default=0)
    timeout: float = WAIT

    def token(self, region: str = "ae", **kwargs) -> str:
        token, _ = self.plane.tokens.create(region=region, ca_pin=self.plane.ca_pin, **kwargs)
        return str(token)

    async def enroll(self, token: str | None = None) -> DeviceCredentials:
        """Enroll a new device the way the agent does; return its credentials."""
        self._devices += 1
        store = IdentityStore(self.root / "devices" / str(self._devices) / "identity")
        token = self.token() if token is None else token
        return await enroll(self.endpoints.enroll_url, token, store)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        """Run `edgefleet ARGV --config <this config>` in-process; (rc, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = controlplane_cli.main([*argv, "--config", str(self.config_path)])
        return rc, out.getvalue(), err.getvalue()

    async def agent(self, *argv: str) -> tuple[int, str, str]:
        """Run `edgefleet-agent ARGV` in-process (in a thread: it runs its own event loop)."""

        def run() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = agent_cli.main(list(argv))
            return rc, out.getvalue(), err.getvalue()

        return await asyncio.to_thread(run)

    async def hello(self, credentials: DeviceCredentials) -> fleet_pb2.HelloReply:
        """Fleet.Hello over gRPC with these credentials."""
        async with grpc.aio.secure_channel(
            self.endpoints.grpc_target, credentials.grpc_channel_credentials()
        ) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            return await stub.Hello(fleet_pb2.HelloRequest(agent_version="test"), timeout=WAIT)

    async def whoami(self, credentials: DeviceCredentials) -> tuple[int, dict]:
        """GET /v1/devices/self over HTTPS with these credentials: (status, JSON)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.endpoints.device_url}/v1/devices/self", ssl=credentials.ssl_context()
            ) as response,
        ):
            return response.status, await response.json()

    async def post_enroll(
        self, body: bytes | dict, content_type: str = "application/json"
    ) -> tuple[int, dict]:
        """A raw POST /v1/enroll, without the agent's own checks: (status, JSON)."""
        ctx = ssl.create_default_context(cafile=str(self.config.ca_dir / "ca.pem"))
        data = body if isinstance(body, bytes) else None
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.endpoints.enroll_url}/v1/enroll",
                data=data,
                json=None if data is not None else body,
                headers={"Content-Type": content_type},
                ssl=ctx,
            ) as response,
        ):
            return response.status, await response.json(content_type=None)

    def forge_credentials(
        self,
        identity: DeviceIdentity,
        *,
        ca: CertificateAuthority | None = None,
        now: datetime | None = None,
        record: bool = True,
    ) -> DeviceCredentials:
        """Credentials made outside enrollment: expired (`now` in the past) or from another CA.

        They trust this control plane's CA, so only the server side can refuse them."""
        ca = ca or self.plane.ca
        key = new_private_key()
        cert = ca.issue_device(key.public_key(), identity, now=now)
        if record and ca is self.plane.ca:
            if self.plane.registry.get(identity.device_id) is None:
                self.plane.registry.add(identity.device_id, identity.region, {}, "test")
            self.plane.registry.record_certificate(identity.device_id, cert)
        self._devices += 1
        directory = self.root / "forged" / str(self._devices)
        write_private_key(directory / "key.pem", key)
        write_file_atomic(directory / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        return DeviceCredentials(
            directory / "key.pem", directory / "cert.pem", self.config.ca_dir / "ca.pem", cert
        )


async def start_control_plane(
    root: Path,
    broker_port: int | None = None,
    broker_dir: Path | None = None,
    *,
    renewal_interval_seconds: int = 0,
) -> TrustEnv:
    config_path = write_config(
        root, broker_port, broker_dir, renewal_interval_seconds=renewal_interval_seconds
    )
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    clock = Clock()
    if broker_port is not None:
        rc = controlplane_cli.main(
            ["broker-config", str(config.broker_dir), "--port", str(broker_port),
             "--bind", "127.0.0.1", "--hostname", "127.0.0.1", "--config", str(config_path)]
        )  # fmt: skip
        assert rc == 0
    plane = ControlPlane.open(config, clock=clock)
    server = ControlPlaneServer(plane)
    endpoints = await server.start()
    return TrustEnv(root, config_path, config, plane, server, endpoints, clock)


@pytest.fixture
async def control_plane(tmp_path) -> AsyncIterator[TrustEnv]:
    """A control plane of region `ae` (no broker)."""
    env = await start_control_plane(tmp_path)
    yield env
    await env.server.stop()
    env.plane.close()


@dataclass
class Mosquitto:
    port: int
    process: subprocess.Popen
    log: Path
    directory: Path

    def client(self, credentials: DeviceCredentials) -> MqttClient:
        """An MQTT client connecting with a device's credentials."""
        return MqttClient(self.port, credentials.ssl_context())

    def control_plane_client(self) -> MqttClient:
        """An MQTT client with the control plane's own identity (written by broker-config)."""
        files = BrokerFiles(self.directory)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.client_cert), str(files.client_key))
        return MqttClient(self.port, ctx)


@pytest.fixture
async def mqtt_fleet(tmp_path) -> AsyncIterator[tuple[TrustEnv, Mosquitto]]:
    """A control plane and a real Mosquitto set up by `edgefleet broker-config`, as deployed:
    run as root, Mosquitto drops to the `mosquitto` user, so its directory sits where that user
    can reach it (pytest's temporary directories are private to root)."""
    port = free_port()
    broker_dir = Path(tempfile.mkdtemp(prefix="edgefleet-broker-"))
    broker_dir.chmod(0o755)
    env = await start_control_plane(tmp_path, broker_port=port, broker_dir=broker_dir)
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(env.config.broker_dir / "mosquitto.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await _wait_for_port(port, process, log)
        yield env, Mosquitto(port, process, log, env.config.broker_dir)
    finally:
        process.terminate()
        process.wait(10)
        await env.server.stop()
        env.plane.close()
        shutil.rmtree(broker_dir, ignore_errors=True)


async def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"mosquitto did not listen on {port}: {log.read_text()}")


class MqttClient:
    """A paho MQTT 5 client over mutual TLS that records what happens to it."""

    def __init__(self, port: int, ctx: ssl.SSLContext, client_id: str = "") -> None:
        self.port = port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.disconnect_reason: mqtt.ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.suback: dict[int, list] = {}
        self.puback: dict[int, mqtt.ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = lambda c, u: self.ended.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def connect(self) -> bool:
        """True once the broker accepted the connection; False if it refused it."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30, clean_start=True)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return True
            if self.ended.is_set():
                return False
            time.sleep(0.01)
        raise AssertionError("neither CONNACK nor refusal from the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> list:
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(self.suback, mid)

    def publish(self, topic: str, payload: bytes) -> mqtt.ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        return self._wait(self.puback, info.mid)

    def wait_for_message(self, payload: bytes) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if any(p == payload for _, p in self.messages):
                return True
            time.sleep(0.01)
        return False

    def _wait(self, table: dict, mid: int):
        with self._acked:
            if not self._acked.wait_for(lambda: mid in table, WAIT):
                raise AssertionError(f"no acknowledgement for message {mid}")
            return table.pop(mid)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.ended.set()
        else:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_reason = reason_code
        self.ended.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._acked:
            self.suback[mid] = reason_codes
            self._acked.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked:
            self.puback[mid] = reason_code
            self._acked.notify_all()
