"""`edgefleet-agent install` / `uninstall` into a temporary root against a real control plane."""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest

from agent.identity import IdentityStore
from provisioning.tokens import new_token

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
UNIT = "etc/systemd/system/edgefleet-agent.service"
CONFIG = "etc/edgefleet/agent.toml"


async def test_install_enrolls_writes_a_verified_hardened_unit_and_is_idempotent(
    control_plane, tmp_path
):
    env = control_plane
    root = tmp_path / "root"
    token = env.token(uses=1)
    argv = ("install", "--server", env.endpoints.enroll_url, "--token", token, "--root", str(root))

    rc, out, err = await env.agent(*argv)
    assert rc == 0, err
    assert out.startswith("enrolled as device dev-")
    assert "next steps:" in out and "systemctl daemon-reload" in out

    unit = (root / UNIT).read_text()
    for line in (
        "User=edgefleet",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edgefleet",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "Environment=EDGEFLEET_CONFIG=/etc/edgefleet/agent.toml",
    ):
        assert line in unit.splitlines()
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(root / UNIT)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr

    config = tomllib.loads((root / CONFIG).read_text())
    assert config["state_dir"] == "/var/lib/edgefleet"
    assert config["control_plane"]["url"] == env.endpoints.enroll_url
    store = IdentityStore(root / "var/lib/edgefleet/identity")
    first = store.current()
    assert first.key_file.stat().st_mode & 0o777 == 0o600
    assert (await env.whoami(first))[0] == 200

    # Again, with the same (now spent) token: nothing is enrolled twice, nothing changes.
    before = {p: p.read_bytes() for p in (root / UNIT, root / CONFIG)}
    rc, out, err = await env.agent(*argv)
    assert rc == 0, err
    assert out.startswith(f"already enrolled as device {first.identity.device_id}")
    assert "wrote" not in out
    assert {p: p.read_bytes() for p in before} == before
    assert store.current().serial == first.serial
    assert len(env.plane.registry.list()) == 1

    rc, out, err = await env.agent("uninstall", "--root", str(root))
    assert rc == 0, err
    assert not (root / UNIT).exists() and not (root / CONFIG).exists()
    assert not (root / "var/lib/edgefleet").exists()
    rc, out, _ = await env.agent("uninstall", "--root", str(root))
    assert rc == 0 and "nothing to remove" in out


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not-a-token", "malformed enrollment token"),
        (None, "already been used"),
    ],
)
async def test_install_with_a_bad_token_fails_clearly_and_writes_no_unit(
    control_plane, tmp_path, token, message
):
    env = control_plane
    if token is None:
        token = env.token(uses=1)
        await env.enroll(token)
    root = tmp_path / "root"
    rc, _, err = await env.agent(
        "install",
        "--server",
        env.endpoints.enroll_url,
        "--token",
        token,
        "--root",
        str(root),
    )
    assert rc == 1 and message in err and "Traceback" not in err
    assert not (root / UNIT).exists()


async def test_install_needs_an_https_server(control_plane, tmp_path):
    token = str(new_token("A" * 43))
    rc, _, err = await control_plane.agent(
        "install", "--server", "http://cp:8443", "--token", token, "--root", str(tmp_path)
    )
    assert rc == 1 and "must be an https:// URL" in err
