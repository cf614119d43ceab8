"""The audit log: what a real control plane and the operator's CLI record, and what they keep out
of it (token secrets, keys)."""

from __future__ import annotations

import contextlib
import io

import grpc
import pytest

from agent.identity import CertificateRenewer, IdentityStore, enroll
from controlplane import cli as controlplane_cli
from controlplane.audit import AuditEntry, AuditLog
from controlplane.config import load_config
from controlplane.storage import open_database
from provisioning.ca import CertificateAuthority
from provisioning.tokens import parse_token
from tests.fleet import new_publisher_key
from tests.packages import write_package
from tests.trust_fixtures import write_config


def events(entries: list[AuditEntry]) -> list[tuple[str, str]]:
    return [(e.event, e.outcome) for e in entries]


def assert_no_secrets(entries: list[AuditEntry], *tokens: str) -> None:
    text = "\n".join(repr(e) for e in entries)
    for token in tokens:
        assert parse_token(token).secret not in text
    assert "PRIVATE KEY" not in text and "BEGIN" not in text


async def test_identity_events_are_recorded_with_who_and_from_where(control_plane):
    env = control_plane
    audit = env.plane.audit
    token = env.token(uses=1)
    token_id = parse_token(token).token_id
    created = audit.entries("token.create")
    assert [e.token_id for e in created] == [token_id]
    assert "region ae" in created[0].detail

    store = IdentityStore(env.root / "audited" / "identity")
    credentials = await enroll(env.endpoints.enroll_url, token, store)
    device_id = credentials.identity.device_id
    (enrolled,) = audit.entries("enroll")
    assert (enrolled.outcome, enrolled.device_id, enrolled.token_id) == ("ok", device_id, token_id)
    assert enrolled.serial == credentials.serial and enrolled.peer == "127.0.0.1"

    csr = "-----BEGIN CERTIFICATE REQUEST-----"
    assert (await env.post_enroll({"token": token, "csr": csr}))[0] == 403  # spent
    secret = parse_token(token).secret
    wrong = token.replace(secret, "x" * len(secret))
    assert (await env.post_enroll({"token": wrong, "csr": csr}))[0] == 403
    refusals = audit.entries("enroll")[1:]
    assert events(refusals) == [("enroll", "refused")] * 2
    assert all(e.token_id == token_id and e.peer == "127.0.0.1" for e in refusals)
    assert "already been used" in refusals[0].detail and "not known" in refusals[1].detail

    renewed = await CertificateRenewer(store).renew()
    (renewal,) = audit.entries("renew")
    assert (renewal.device_id, renewal.serial) == (device_id, renewed.serial)
    assert credentials.serial in renewal.detail

    rc, _, err = env.cli("device", "revoke", device_id)
    assert rc == 0, err
    (revocation,) = audit.entries("device.revoke")
    assert revocation.device_id == device_id and revocation.peer.startswith("local")

    assert (await env.whoami(renewed))[0] == 403
    with pytest.raises(grpc.aio.AioRpcError):
        await env.hello(renewed)
    refused = audit.entries("certificate.refused")
    assert events(refused) == [("certificate.refused", "refused")] * 2
    assert all(e.serial == renewed.serial for e in refused)
    assert refused[0].detail.startswith("https GET /v1/devices/self")
    assert refused[1].detail.startswith("grpc") and "127.0.0.1" in refused[1].peer
    assert_no_secrets(audit.entries(), token)


def test_model_push_and_publisher_changes_are_recorded(tmp_path, sample_repo):
    config_path = write_config(tmp_path)
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    offline, cfg = tmp_path / "offline-root-keys", ("--config", str(config_path))
    key = tmp_path / "vision.key"
    new_publisher_key(key)
    package = write_package(tmp_path / "mlp", sample_repo, version=1)
    for argv in (
        ["tuf", "init", "--root-keys", str(offline), *cfg],
        ["model", "publisher", "add", "vision", "--pubkey", str(key.with_suffix(".pub")),
         "--models", "mlp", "--root-keys", str(offline), *cfg],
        ["model", "sign", str(package), "--key", str(key)],
        ["model", "push", str(package), *cfg],
        ["model", "publisher", "remove", "vision", "--root-keys", str(offline), *cfg],
    ):  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert controlplane_cli.main(argv) == 0, err.getvalue()

    db = open_database(config.database_path)
    try:
        entries = AuditLog(db).entries()
    finally:
        db.close()
    assert events(entries) == [
        ("publisher.add", "ok"),
        ("model.push", "ok"),
        ("publisher.remove", "ok"),
    ]
    added, pushed, removed = entries
    assert "publisher vision" in added.detail and "'mlp'" in added.detail
    assert "mlp/1/onnx-fp32.tar" in pushed.detail
    assert "publisher vision" in removed.detail
    assert all(e.peer.startswith("local") for e in entries)
    assert_no_secrets(entries)
