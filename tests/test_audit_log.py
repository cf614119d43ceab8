"""The audit log: what a real control plane and the operator's CLI record, and what they keep out
of it (token secrets, keys)."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from agent.identity import CertificateRenewer, IdentityStore, enroll
from controlplane import cli as controlplane_cli
from controlplane.audit import (
    MAX_REFUSAL_ROWS_PER_MINUTE,
    REFUSAL_WINDOW_S,
    REFUSED,
    AuditEntry,
    AuditLog,
)
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


# --- refusals anyone can cause are throttled, and nothing is lost -----------------------------


class FakeClock:
    def __init__(self):
        self.now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clocked(tmp_path):
    db = open_database(tmp_path / "audit.db")
    clock = FakeClock()
    yield AuditLog(db, clock), clock
    db.close()


def _refuse(audit: AuditLog, serial: str = "ab", port: int = 50000, detail: str = "revoked"):
    audit.record(
        "certificate.refused", REFUSED, serial=serial, peer=f"ipv4:10.0.0.5:{port}", detail=detail
    )


def test_a_refusal_repeated_within_its_window_is_one_row_and_a_count(clocked):
    audit, clock = clocked
    for port in range(50000, 51000):  # a revoked device reconnecting, a new port each time
        _refuse(audit, port=port)
        clock.advance(0.05)
    (first,) = audit.entries()
    assert first.detail == "revoked" and first.peer == "ipv4:10.0.0.5:50000"
    clock.advance(REFUSAL_WINDOW_S)
    _refuse(audit)
    _, second = audit.entries()
    assert second.detail == (
        f"revoked (not recorded one by one: 999 more of these in the {REFUSAL_WINDOW_S:g} s before)"
    )


def test_different_refusals_each_get_a_row(clocked):
    audit, _ = clocked
    _refuse(audit, detail="revoked")
    _refuse(audit, detail="expired")
    _refuse(audit, serial="cd")
    audit.record("certificate.refused", REFUSED, serial="ab", peer="ipv4:10.0.0.6:1")
    audit.record("enroll", REFUSED, token_id="t1", peer="10.0.0.5", detail="not known")
    assert len(audit.entries()) == 5


def test_the_maintenance_pass_writes_counts_no_later_row_carried(clocked):
    audit, clock = clocked
    for _ in range(10):
        _refuse(audit)
    audit.flush_refusals()  # the window is still open: nothing to write yet
    assert len(audit.entries()) == 1
    clock.advance(REFUSAL_WINDOW_S)
    audit.flush_refusals()
    _, counted = audit.entries()
    assert counted.serial == "ab" and counted.peer == "ipv4:10.0.0.5"
    assert (
        counted.detail
        == f"revoked (not recorded one by one: 9 more of these in {REFUSAL_WINDOW_S:g} s)"
    )
    audit.flush_refusals()
    clock.advance(REFUSAL_WINDOW_S)
    _refuse(audit)  # its count was written already: no note
    assert [e.detail for e in audit.entries()][-1] == "revoked"


def test_at_most_a_budget_of_refusal_rows_a_minute_and_the_rest_counted(clocked):
    audit, clock = clocked
    for i in range(500):  # a scanner posting made-up tokens, each refusal different
        audit.record(
            "enroll", REFUSED, token_id=f"made-up-{i}", peer="10.0.0.9", detail="not known"
        )
    assert len(audit.entries()) == MAX_REFUSAL_ROWS_PER_MINUTE
    clock.advance(60)
    audit.record("enroll", REFUSED, token_id="next", peer="10.0.0.9", detail="not known")
    assert audit.entries()[-1].detail == (
        "not known (not recorded one by one: 380 other refusals over the audit budget)"
    )
    for i in range(200):
        audit.record("enroll", REFUSED, token_id=f"again-{i}", peer="10.0.0.9")
    clock.advance(60)
    audit.flush_refusals()
    unrecorded = audit.entries("audit.unrecorded")
    assert [e.detail for e in unrecorded] == [
        f"81 refusals over the budget of {MAX_REFUSAL_ROWS_PER_MINUTE} rows a minute"
    ]


def test_accepted_actions_are_never_throttled(clocked):
    audit, _ = clocked
    for _ in range(300):
        audit.record("token.create", token_id="same", detail="region ae")
    assert len(audit.entries()) == 300


async def test_a_flood_of_bad_enrollments_writes_a_bounded_audit_log(control_plane):
    env = control_plane
    csr = "-----BEGIN CERTIFICATE REQUEST-----"
    token = env.token(uses=1)
    secret = parse_token(token).secret
    for i in range(200):
        wrong = token.replace(secret, f"{i:0{len(secret)}d}"[-len(secret) :])
        assert (await env.post_enroll({"token": wrong, "csr": csr}))[0] == 403
    refusals = env.plane.audit.entries("enroll")
    assert len(refusals) == 1  # one token id, one peer, one reason: one row, the rest counted
    assert "not known" in refusals[0].detail
    store = IdentityStore(env.root / "after-flood" / "identity")
    assert (await enroll(env.endpoints.enroll_url, token, store)).identity.device_id


def _accounted(entries: list[AuditEntry]) -> int:
    """Refusals the rows account for: each refusal row is one, plus the repeats its note counts."""
    import re

    total = 0
    for e in entries:
        if e.event == "audit.unrecorded":
            total += int(re.match(r"(\d+) refusals over", e.detail).group(1))
            continue
        if e.outcome != REFUSED:
            continue
        counts = re.findall(r"(\d+) (?:more of these|other refusals)", e.detail or "")
        carried_only = "more of these in 60 s)" in (e.detail or "")  # written by the flush
        total += sum(map(int, counts)) + (0 if carried_only else 1)
    return total


def test_a_count_is_not_dropped_with_its_key_when_too_many_refusals_are_tracked(
    clocked, monkeypatch
):
    from controlplane import audit as audit_module

    monkeypatch.setattr(audit_module, "MAX_TRACKED_REFUSALS", 4)
    audit, clock = clocked
    made = 0
    # a revoked device retrying every 2 s while a scanner posts made-up tokens; the server's
    # maintenance pass flushes every 2 s
    for second in range(0, 600):
        if second % 2 == 0:
            audit.flush_refusals()
        else:
            _refuse(audit)
            made += 1
        if second % 5 == 0:
            audit.record("enroll", REFUSED, token_id=f"made-up-{second}", peer="10.0.0.9")
            made += 1
        clock.advance(1)
    clock.advance(120)
    audit.flush_refusals()
    assert _accounted(audit.entries()) == made


def test_a_clock_stepped_back_does_not_silence_refusals(clocked):
    audit, clock = clocked
    _refuse(audit)
    _refuse(audit)  # a repeat, counted
    clock.advance(-3600)  # an NTP correction of a clock an hour fast
    audit.flush_refusals()  # the count is written, not held until the clock catches up
    assert [e.detail for e in audit.entries()][-1] == (
        f"revoked (not recorded one by one: 1 more of these in {REFUSAL_WINDOW_S:g} s)"
    )
    clock.advance(10 * REFUSAL_WINDOW_S)
    _refuse(audit, detail="expired")
    clock.advance(-3600)
    _refuse(audit, detail="expired")  # a row: its window began in the clock's future
    assert [e.detail for e in audit.entries()][-2:] == ["expired", "expired"]

    for i in range(MAX_REFUSAL_ROWS_PER_MINUTE):  # the minute's budget spent
        audit.record("enroll", REFUSED, token_id=f"made-up-{i}", peer="10.0.0.9")
    clock.advance(-3600)
    audit.record("enroll", REFUSED, token_id="after-the-step", peer="10.0.0.9")
    assert audit.entries()[-1].token_id == "after-the-step"
