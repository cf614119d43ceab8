"""An update end to end through the real control plane and both command lines.

The operator runs `edgefleet tuf init`, `model publisher add`, `model sign` and `model push`; the
control plane serves the artifact routes on its device port (behind the device checks); an
enrolled node runs `edgefleet-agent apply` with nothing but its enrollment for connection
settings. A revoked node can no longer fetch anything.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator

from agent.serving.server import ServeOptions
from agent.update import pin_enrollment_root
from controlplane import cli as controlplane_cli
from controlplane.artifacts_api import artifact_routes
from controlplane.config import load_config
from controlplane.server import ControlPlaneServer
from controlplane.service import ControlPlane
from controlplane.tuf_repository import TufRepository
from provisioning.ca import CertificateAuthority
from tests.conftest import ServerThread
from tests.fleet import TEST_PROFILE, new_publisher_key
from tests.packages import write_package
from tests.trust_fixtures import Clock, TrustEnv, write_config


def edgefleet(*argv: str) -> str:
    """Run `edgefleet ARGV` in-process; its output (it must succeed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = controlplane_cli.main(list(argv))
    assert rc == 0, err.getvalue()
    return out.getvalue()


@contextlib.asynccontextmanager
async def serving_artifacts(tmp_path, config_path, config) -> AsyncIterator[TrustEnv]:
    """The control plane of `config` serving its TUF repository's artifact routes."""
    clock = Clock()
    plane = ControlPlane.open(config, clock=clock)
    server = ControlPlaneServer(plane, device_routes=artifact_routes(config.state_dir / "tuf"))
    endpoints = await server.start()
    try:
        yield TrustEnv(tmp_path, config_path, config, plane, server, endpoints, clock)
    finally:
        await server.stop()
        plane.close()


async def test_enrolled_node_updates_through_the_control_plane(tmp_path, sample_repo):
    config_path = write_config(tmp_path)
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    offline, cfg = tmp_path / "offline-root-keys", ("--config", str(config_path))
    edgefleet("tuf", "init", "--root-keys", str(offline), *cfg)
    key = tmp_path / "vision.key"
    new_publisher_key(key)
    edgefleet(
        "model", "publisher", "add", "vision", "--pubkey", str(key.with_suffix(".pub")),
        "--models", "mlp", "--root-keys", str(offline), *cfg,
    )  # fmt: skip
    for version in (1, 2):
        package = write_package(tmp_path / f"mlp-{version}", sample_repo, version=version)
        edgefleet("model", "sign", str(package), "--key", str(key))
        pushed = edgefleet("model", "push", str(package), *cfg)
        assert f"published mlp/{version}/onnx-fp32.tar" in pushed

    async with serving_artifacts(tmp_path, config_path, config) as env:
        credentials = await env.enroll()
        node = tmp_path / "devices" / "1"  # the identity directory is node/identity
        root = TufRepository(config.state_dir / "tuf").root_bytes()
        # enrollment pinned the control plane's root already: pinning it again changes nothing
        assert not pin_enrollment_root(node, root)
        profile = tmp_path / "profile.toml"
        profile.write_text(TEST_PROFILE)
        (node / "models").mkdir()
        with ServerThread(ServeOptions(node / "models", "127.0.0.1:0", None, None)) as agent:

            async def apply(version: int) -> tuple[int, str, str]:
                desired = node / "desired.toml"
                desired.write_text(f'[[models]]\nname = "mlp"\nversion = {version}\n')
                return await env.agent(
                    "apply", str(desired), "--state-dir", str(node), "--profile", str(profile),
                    "--agent", f"http://{agent.http_url}",
                )  # fmt: skip

            rc, out, err = await apply(1)
            assert rc == 0, err
            assert out.startswith("mlp@1: ACTIVE")
            assert agent.dataplane.model("mlp").version == "1"

            rc, out, _ = env.cli("device", "revoke", credentials.identity.device_id)
            assert rc == 0
            rc, out, err = await apply(2)
            assert rc == 75  # EX_TEMPFAIL: paused, will retry (after re-enrollment)
            assert "HTTP 403" in out
            assert agent.dataplane.model("mlp").version == "1"


async def test_artifact_route_refuses_links_and_an_empty_suffix_range(tmp_path):
    """A symbolic link in the blob store serves nothing (404), and `Range: bytes=-0`, the last
    zero bytes, is unsatisfiable (416), not the whole file."""
    import aiohttp

    config_path = write_config(tmp_path)
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    edgefleet("tuf", "init", "--root-keys", str(tmp_path / "offline"), "--config", str(config_path))
    repository = TufRepository(config.state_dir / "tuf")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"model bytes " * 100)
    digest, length = repository.store_blob(blob)
    secret = tmp_path / "outside.txt"
    secret.write_text("not a blob")
    link = "ab" * 32
    (repository.blobs_dir / link).symlink_to(secret)

    async with serving_artifacts(tmp_path, config_path, config) as env:
        device = await env.enroll()
        base = f"{env.endpoints.device_url}/v1/tuf/targets/mlp/1"
        async with aiohttp.ClientSession() as session:

            async def get(path: str, **headers: str) -> tuple[int, bytes, dict]:
                async with session.get(
                    f"{base}/{path}", headers=headers, ssl=device.ssl_context()
                ) as response:
                    return response.status, await response.read(), dict(response.headers)

            status, body, _ = await get(f"{digest}.onnx-fp32.tar")
            assert (status, len(body)) == (200, length)
            status, body, _ = await get(f"{digest}.onnx-fp32.tar", Range="bytes=-5")
            assert (status, body) == (206, b"ytes ")
            status, body, _ = await get(f"{link}.onnx-fp32.tar")
            assert status == 404 and b"not a blob" not in body
            status, body, headers = await get(f"{digest}.onnx-fp32.tar", Range="bytes=-0")
            assert status == 416 and headers["Content-Range"] == f"bytes */{length}"
