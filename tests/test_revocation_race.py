"""Two CRL publishers at once: the running server's periodic republish and `edgefleet device
revoke`, each with its own control plane (database connection) as in two processes. Whatever
their interleaving, the published CRL and the broker's copy keep the revoked serial and the CRL
number only goes up.

The server's publisher is stopped right after it read the revoked list (before the revocation)
and let go only once the revoking one is either done or waiting for its turn, so the test is
deterministic and never relies on timing.

And a revoking process killed between its commit and its publish: the running server publishes
the revocation itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane import cli as controlplane_cli
from controlplane.config import ControlPlaneConfig, load_config
from controlplane.service import ControlPlane
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.crl import StaleCRL, build_crl, crl_number, write_crl
from provisioning.csr import build_csr
from provisioning.keys import new_private_key, write_file_atomic
from tests.trust_fixtures import write_config

WAIT = 15.0  # upper bound for anything to happen; tests never assert on durations


@dataclass
class State:
    config: ControlPlaneConfig
    device_id: str
    serial: int

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.config.crl_path.read_bytes())

    def broker_crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl((self.config.broker_dir / "crl.pem").read_bytes())

    def broker_acl(self) -> str:
        return (self.config.broker_dir / "acl").read_text()


def _free_port() -> int:
    """A loopback port nobody listens on: the broker is configured but not running."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def state(tmp_path) -> State:
    port = _free_port()
    config_path = write_config(tmp_path, port, tmp_path / "broker")
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    argv = ["broker-config", str(config.broker_dir), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--hostname", "127.0.0.1", "--config", str(config_path)]
    assert controlplane_cli.main(argv) == 0
    plane = ControlPlane.open(config)
    try:
        token, _ = plane.tokens.create(region="ae", ca_pin=plane.ca_pin)
        issued = plane.enrollment.enroll(str(token), build_csr(new_private_key()))
    finally:
        plane.close()
    return State(config, issued.device.device_id, issued.certificate.serial_number)


class Announce(logging.Handler):
    """Sets `event` when a log message contains `text`."""

    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_republish_that_read_before_a_revocation_cannot_undo_it(state, caplog):
    before = crl_number(state.crl())
    read, release, revoke_settled = threading.Event(), threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def server_republish() -> None:  # the running server: crl_due() -> publish()
        plane = ControlPlane.open(state.config)
        real = plane.registry.revoked_entries

        def read_then_stall(*args, **kwargs):
            entries = real(*args, **kwargs)
            read.set()
            release.wait(WAIT)
            return entries

        plane.registry.revoked_entries = read_then_stall
        try:
            plane.revocation.publish()
        except BaseException as exc:
            failures.append(exc)
        finally:
            plane.close()

    def operator_revoke() -> None:  # `edgefleet device revoke`, another process
        plane = ControlPlane.open(state.config)
        try:
            plane.revocation.revoke(state.device_id)
        except BaseException as exc:
            failures.append(exc)
        finally:
            plane.close()
            revoke_settled.set()

    caplog.set_level(logging.INFO, logger="controlplane.revocation")
    waiting = Announce("waiting for another CRL publisher", revoke_settled)
    logging.getLogger("controlplane.revocation").addHandler(waiting)
    server = threading.Thread(target=server_republish)
    operator = threading.Thread(target=operator_revoke)
    try:
        server.start()
        assert read.wait(WAIT)
        operator.start()
        assert revoke_settled.wait(WAIT)  # done, or blocked until the republish is through
        release.set()
        server.join(WAIT)
        operator.join(WAIT)
    finally:
        release.set()
        logging.getLogger("controlplane.revocation").removeHandler(waiting)
    assert not server.is_alive() and not operator.is_alive()
    assert failures == []

    crl, broker_crl = state.crl(), state.broker_crl()
    assert crl.get_revoked_certificate_by_serial_number(state.serial) is not None
    assert broker_crl.get_revoked_certificate_by_serial_number(state.serial) is not None
    assert f"user {state.device_id}\ntopic deny #" in state.broker_acl()
    assert crl_number(crl) == crl_number(broker_crl) == before + 2


def test_the_crl_number_goes_on_from_the_published_crl_when_the_counter_is_behind(state):
    """A database restored from a backup counts from an older number than the published CRL."""
    ca = CertificateAuthority.load(state.config.ca_dir)
    ahead = build_crl(ca, [], number=50, now=utc_now(), lifetime=timedelta(days=1))
    write_file_atomic(state.config.crl_path, ahead.public_bytes(serialization.Encoding.PEM))
    plane = ControlPlane.open(state.config)
    try:
        plane.revocation.revoke(state.device_id)
        assert crl_number(state.crl()) == crl_number(state.broker_crl()) == 51
        plane.revocation.publish()
    finally:
        plane.close()
    assert crl_number(state.crl()) == 52
    assert state.crl().get_revoked_certificate_by_serial_number(state.serial) is not None


def test_a_crl_of_an_earlier_ca_does_not_hold_the_number_up(state, tmp_path):
    other = CertificateAuthority.create(tmp_path / "other-ca")
    stranger = build_crl(other, [], number=99, now=utc_now(), lifetime=timedelta(days=1))
    write_file_atomic(state.config.crl_path, stranger.public_bytes(serialization.Encoding.PEM))
    plane = ControlPlane.open(state.config)
    try:
        plane.revocation.publish()
    finally:
        plane.close()
    assert crl_number(state.crl()) < 99
    assert state.crl().is_signature_valid(
        CertificateAuthority.load(state.config.ca_dir).certificate.public_key()
    )


def test_write_crl_and_the_broker_refuse_an_older_crl(state, tmp_path):
    ca = CertificateAuthority.load(state.config.ca_dir)

    def numbered(number: int) -> x509.CertificateRevocationList:
        return build_crl(ca, [], number=number, now=utc_now(), lifetime=timedelta(days=1))

    path = tmp_path / "crl.pem"
    write_crl(path, numbered(5), issuer=ca)
    with pytest.raises(StaleCRL, match="already holds CRL number 5"):
        write_crl(path, numbered(4), issuer=ca)
    assert crl_number(x509.load_pem_x509_crl(path.read_bytes())) == 5
    write_crl(path, numbered(6), issuer=ca)
    assert crl_number(x509.load_pem_x509_crl(path.read_bytes())) == 6

    plane = ControlPlane.open(state.config)
    try:
        newest = crl_number(state.broker_crl())
        acl = state.broker_acl()
        older = numbered(newest - 1).public_bytes(serialization.Encoding.PEM)
        with pytest.raises(StaleCRL):
            plane.broker.apply(older, [state.device_id])
    finally:
        plane.close()
    assert crl_number(state.broker_crl()) == newest
    assert state.broker_acl() == acl


KILLED_AFTER_COMMIT = """
import os, sys
from controlplane.config import load_config
from controlplane.revocation import Revocation
from controlplane.service import ControlPlane

def power_cut(self, **kwargs):  # kill -9 between the registry's commit and the CRL
    os.kill(os.getpid(), 9)

Revocation.publish = power_cut
ControlPlane.open(load_config(sys.argv[1], env={})).revocation.revoke(sys.argv[2])
"""


async def test_a_revocation_killed_before_its_publish_reaches_the_crl_and_the_broker(tmp_path):
    """The revoking process dies right after its commit: the running server finds the registry
    ahead of the CRL it published and publishes the revocation (CRL, broker CRL and ACL)."""
    from tests.trust_fixtures import free_port, start_control_plane

    env = await start_control_plane(tmp_path, broker_port=free_port(), broker_dir=tmp_path / "mq")
    try:
        credentials = await env.enroll()
        serial = credentials.certificate.serial_number
        device_id = credentials.identity.device_id
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_AFTER_COMMIT, str(env.config_path), device_id,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert await process.wait() == -signal.SIGKILL
        assert env.plane.registry.get(device_id).status == "revoked"

        def published() -> bool:
            crl = x509.load_pem_x509_crl(env.config.crl_path.read_bytes())
            broker = x509.load_pem_x509_crl((env.config.broker_dir / "crl.pem").read_bytes())
            return all(c.get_revoked_certificate_by_serial_number(serial) for c in (crl, broker))

        deadline = time.monotonic() + WAIT
        while not published() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the maintenance pass runs every 0.05 s here
        assert published()
        assert f"user {device_id}\ntopic deny #" in (env.config.broker_dir / "acl").read_text()
    finally:
        await env.server.stop()
        env.plane.close()
