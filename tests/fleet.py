"""A small fleet on loopback for the update tests and the benchmark: a device CA, a TUF
repository with a registered publisher, the artifact endpoint over mutual TLS, and a node's
update settings. Everything lives in one temporary directory; servers bind free ports.

    with Fleet.create(tmp_path, samples) as fleet:
        fleet.publish(version=1)                       # write, sign and push mlp@1
        outcomes = fleet.apply(node, {"mlp": 1})       # the node's update lifecycle

`ArtifactServer.tamper` lets a test answer a request itself (truncated, endless, swapped data);
`ArtifactServer.requests` records what the node asked for.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.update import DesiredModel, DesiredState, HealthPolicy, UpdateSettings, apply, pin_root
from agent.update.config import UpdateLimits
from agent.update.layout import Layout
from controlplane.artifacts_api import add_artifact_routes
from controlplane.model_store import ModelStore, target_path
from controlplane.publishers import PublisherRegistry
from controlplane.tuf_repository import NewTarget, TufRepository
from provisioning.archive import pack
from provisioning.ca import CertificateAuthority
from provisioning.identity import DeviceIdentity
from provisioning.keys import new_private_key, write_file_atomic, write_private_key
from provisioning.package import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from provisioning.signing import key_id, load_public_key, public_key_pem, sign_package
from provisioning.tls import client_context, server_context
from tests.packages import write_package

TEST_PROFILE = """\
name = "test-onnxruntime"
description = "ONNX Runtime on one CPU thread, measured briefly: fast selection for tests"
priority = 0
[match]
[selection]
objective = "latency"
warmup_runs = 1
benchmark_seconds = 0.05
min_runs = 3
max_selection_seconds = 60
batch_size = 1
[limits]
max_compile_seconds = 60
max_model_memory_mb = 2048
[[allow]]
runtime = "onnxruntime"
device = "CPU"
[runtimes.onnxruntime]
threads = [1]
"""

Tamper = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


@dataclass
class RecordedRequest:
    path: str
    range: str | None


class ArtifactServer:
    """The control plane's artifact endpoint (controlplane.artifacts_api) on a loopback port."""

    def __init__(self, repository: TufRepository, tls_dir: Path) -> None:
        self.repository = repository
        self.tls_dir = tls_dir
        self.tamper: Tamper | None = None
        self.requests: list[RecordedRequest] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        @web.middleware
        async def record_and_tamper(request: web.Request, handler):
            self.requests.append(RecordedRequest(request.path, request.headers.get("Range")))
            if self.tamper is not None:
                response = await self.tamper(request)
                if response is not None:
                    return response
            return await handler(request)

        app = web.Application(middlewares=[record_and_tamper])
        add_artifact_routes(app, self.repository, refresh_seconds=3600)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        context = server_context(
            self.tls_dir / "server.pem", self.tls_dir / "server.key", self.tls_dir / "ca.pem"
        )
        await web.SockSite(self._runner, sock, ssl_context=context).start()

    def _call(self, coro):
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(30)


@dataclass
class Node:
    """One node's directories and update settings."""

    state_dir: Path
    models_dir: Path
    settings: UpdateSettings

    @property
    def layout(self) -> Layout:
        return Layout(self.settings.update_dir, self.models_dir)


@dataclass
class Fleet:
    root: Path
    samples: Path
    tls_dir: Path
    repository: TufRepository
    offline_keys: Path
    publisher_key: Path
    server: ArtifactServer
    profile: Path
    packages: dict[int, Path] = field(default_factory=dict)

    @classmethod
    def create(
        cls, root: Path, samples: Path, models: tuple[str, ...] = ("mlp", "cnn", "demo-*")
    ) -> Fleet:
        root = Path(root)
        tls_dir = root / "tls"
        _make_tls(tls_dir)
        repository = TufRepository.create(root / "tuf", root / "offline-root-keys")
        profile = root / "test-profile.toml"
        profile.write_text(TEST_PROFILE)
        fleet = cls(
            root=root,
            samples=samples,
            tls_dir=tls_dir,
            repository=repository,
            offline_keys=root / "offline-root-keys",
            publisher_key=root / "publisher.key",
            server=ArtifactServer(repository, tls_dir),
            profile=profile,
        )
        fleet.register_publisher("vision", list(models), fleet.publisher_key)
        return fleet

    def __enter__(self) -> Fleet:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def register_publisher(
        self, name: str, models: list[str], key_file: Path
    ) -> ec.EllipticCurvePublicKey:
        key = new_publisher_key(key_file)
        registry = PublisherRegistry(self.repository)
        registry.register(
            name, key.public_key(), models, self.repository.root_signers(self.offline_keys)
        )
        return key.public_key()

    def package(
        self, version: int, *, key: Path | None = None, name: str = "mlp", **options
    ) -> Path:
        """Write and sign (not push) a package of the sample MLP as name@version."""
        directory = self.root / "packages" / f"{name}-{version}-{len(self.packages)}"
        write_package(directory, self.samples, name=name, version=version, **options)
        sign_package(directory, key or self.publisher_key)
        self.packages[version] = directory
        return directory

    def publish(self, version: int, **options) -> Path:
        directory = self.package(version, **options)
        ModelStore(self.repository).push(directory)
        return directory

    @property
    def publisher_id(self) -> str:
        return key_id(load_public_key(self.publisher_key.with_suffix(".pub")))

    def publish_unchecked(self, directory: Path, claim: str | None = None) -> None:
        """Publish a package the way a compromised control plane could: no publisher check.

        Each variant's archive becomes a properly TUF-signed target; `claim` is the publisher
        key id the target metadata names (default: the registered publisher's).
        """
        manifest = Manifest.load(directory / MANIFEST_FILE)
        for variant in manifest.variants:
            archive = directory.with_name(f"{directory.name}-{variant.name}.tar")
            pack(directory, [*manifest.files_for([variant.name]), SIGNATURE_FILE], archive)
            self.publish_archive(manifest.name, manifest.version, variant.name, archive, claim)

    def publish_archive(
        self, name: str, version: int, variant: str, archive: Path, claim: str | None = None
    ) -> None:
        """Add any archive as the TUF target of name@version's variant (compromised server)."""
        runtime = "openvino" if variant.startswith("openvino") else "onnxruntime"
        custom = {
            "model": name,
            "version": version,
            "variant": variant,
            "runtime": runtime,
            "precision": "fp32",
            "publisher": claim or self.publisher_id,
        }
        path = target_path(name, version, variant)
        self.repository.add_targets([NewTarget(path, archive, custom)], replace=True)

    def node(self, directory: Path, *, agent_url: str | None = None, region: str = "ae") -> Node:
        state_dir, models_dir = directory / "state", directory / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        tls = self.tls_dir
        settings = UpdateSettings(
            state_dir=state_dir,
            models_dir=models_dir,
            server_url=self.server.url,
            ssl_context=lambda: client_context(
                ca_file=tls / "ca.pem", cert_file=tls / "device.pem", key_file=tls / "device.key"
            ),
            region=region,
            profile=str(self.profile),
            agent_url=agent_url,
            limits=UpdateLimits(read_timeout_s=10.0, download_chunk_bytes=16 * 1024),
        )
        node = Node(state_dir, models_dir, settings)
        pin_root(node.layout.tuf, self.repository.metadata_dir.joinpath("1.root.json").read_bytes())
        return node

    def apply(self, node: Node, models: dict[str, int], health: HealthPolicy | None = None, **kw):
        desired = DesiredState(1, tuple(DesiredModel(n, v) for n, v in models.items()), health)
        return apply(desired, node.settings, **kw)


def new_publisher_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = new_private_key()
    write_private_key(path, key)
    write_file_atomic(path.with_suffix(".pub"), public_key_pem(key.public_key()))
    return key


def _make_tls(directory: Path) -> None:
    ca = CertificateAuthority.create(directory / "ca")
    write_file_atomic(directory / "ca.pem", ca.certificate_pem)
    server_key, device_key = new_private_key(), new_private_key()
    server = ca.issue_server(server_key.public_key(), "ae", ["127.0.0.1", "localhost"])
    device = ca.issue_device(device_key.public_key(), DeviceIdentity("node-1", "ae"))
    for name, key, cert in (("server", server_key, server), ("device", device_key, device)):
        write_private_key(directory / f"{name}.key", key)
        write_file_atomic(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
