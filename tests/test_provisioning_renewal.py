"""Certificate renewal on the device: at 2/3 of the lifetime by an injected clock, over mTLS,
hot-reloaded through a listener, while local serving keeps answering; the older certificate
superseded by it; and the documented recovery of a certificate that expired while the node was
offline."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from datetime import timedelta

import aiohttp
import grpc
import pytest
from cryptography import x509

from agent.identity import CertificateRenewer, IdentityStore, enroll
from agent.identity.errors import CertificateExpired
from agent.serving.server import ServeOptions, start
from provisioning.ca import utc_now
from provisioning.csr import build_csr
from provisioning.keys import new_private_key


class DeviceTime:
    """The device's clock and sleep: sleeping moves the clock instead of waiting."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.parked = False

    def now(self):
        return utc_now() + self.offset

    async def sleep(self, seconds: float) -> None:
        if self.parked:
            await asyncio.Event().wait()  # until the test cancels the renewer
        self.offset += timedelta(seconds=seconds)
        await asyncio.sleep(0)


async def gated_proxy(target_port: int, gate: asyncio.Event, seen: asyncio.Event):
    """A TCP proxy that holds each connection until `gate` opens: renewal in flight, on hold."""

    async def pipe(reader, writer):
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader, writer):
        seen.set()
        await gate.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def local_ready(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/v2/health/live") as response:
        return response.status


async def test_renewal_at_two_thirds_while_local_serving_continues(control_plane, sample_repo):
    env = control_plane
    device = await env.enroll()
    store = IdentityStore(device.ca_file.parent)
    old = store.current()

    # Route renewal through a proxy that holds it, to look at local serving meanwhile.
    gate, seen = asyncio.Event(), asyncio.Event()
    proxy = await gated_proxy(int(env.endpoints.device_url.rsplit(":", 1)[1]), gate, seen)
    enrollment = json.loads(store.enrollment_file.read_text())
    enrollment["endpoints"]["device_url"] = f"https://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    store.enrollment_file.write_text(json.dumps(enrollment))

    serving = await start(ServeOptions(sample_repo, http="127.0.0.1:0", grpc=None))
    time = DeviceTime()
    renewed: list = []
    reloaded = asyncio.Event()

    async def hot_reload(credentials) -> None:
        # What the sync client does: reconnect with the new certificate, no restart.
        renewed.append((time.now(), credentials))
        time.offset, time.parked = timedelta(0), True
        renewed.append(await env.hello(credentials))
        reloaded.set()

    renewer = CertificateRenewer(store, clock=time.now, sleep=time.sleep, on_renewed=[hot_reload])
    task = asyncio.create_task(renewer.run())
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(seen.wait(), env.timeout)
            attempt_at = time.now()
            # The renewal is in flight (held at the proxy): local serving answers throughout.
            for _ in range(20):
                assert await local_ready(session, serving.http_port) == 200
            assert not renewed
            gate.set()
            await asyncio.wait_for(reloaded.wait(), env.timeout)
            assert await local_ready(session, serving.http_port) == 200
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        proxy.close()
        await serving.stop(grace=0.5)

    (renewed_at, new), reply = renewed
    # Not before 2/3 of the lifetime, and well before expiry.
    assert renewer.due_at(old) <= attempt_at <= renewed_at < old.certificate.not_valid_after_utc
    assert new.serial != old.serial and new.identity == old.identity
    assert store.current().serial == new.serial
    assert new.key_file.stat().st_mode & 0o777 == 0o600
    assert new.certificate.public_key() != old.certificate.public_key()  # new key pair
    assert reply.certificate_serial == new.serial  # the reconnected client uses the new one
    assert old.cert_file.exists()  # the previous generation stays for open connections


async def test_renewal_is_not_attempted_before_it_is_due(control_plane):
    env = control_plane
    device = await env.enroll()
    store = IdentityStore(device.ca_file.parent)
    time = DeviceTime()
    slept = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError
        await time.sleep(seconds)

    renewer = CertificateRenewer(store, clock=time.now, sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await renewer.run()
    # Sleeps are capped so a jumping clock is noticed, and nothing was renewed.
    assert slept == [renewer.policy.max_sleep.total_seconds()] * 3
    assert store.current().serial == device.serial


async def test_certificate_expired_offline_is_recovered_with_a_reenrollment_token(
    control_plane, tmp_path
):
    env = control_plane
    root = tmp_path / "root"
    rc, _, err = await env.agent(
        "install", "--server", env.endpoints.enroll_url, "--token", env.token(), "--root", str(root)
    )
    assert rc == 0, err
    store = IdentityStore(root / "var/lib/edgefleet/identity")
    identity = store.current().identity

    # The node was offline past expiry: its current certificate is expired.
    key = new_private_key()
    expired = env.plane.ca.issue_device(
        key.public_key(), identity, now=utc_now() - timedelta(days=31)
    )
    env.plane.registry.record_certificate(identity.device_id, expired)
    store.save(key, expired, env.plane.ca.certificate_pem, store.enrollment())

    with pytest.raises(CertificateExpired) as failure:
        await CertificateRenewer(store).renew()
    assert f"edgefleet token create --device {identity.device_id}" in str(failure.value)
    assert "edgefleet-agent enroll --token" in str(failure.value)

    # The documented recovery: a re-enrollment token, then `edgefleet-agent enroll`.
    rc, out, err = env.cli("token", "create", "--device", identity.device_id)
    assert rc == 0, err
    token = out.splitlines()[0]
    rc, out, err = await env.agent("enroll", "--token", token, "--root", str(root))
    assert rc == 0, err
    assert f"enrolled as device {identity.device_id} (region ae)" in out
    recovered = store.current()
    assert recovered.identity == identity and recovered.serial != format(expired.serial_number, "x")
    status, me = await env.whoami(recovered)
    assert status == 200 and me["device_id"] == identity.device_id
    rc, _, err = await env.agent("enroll", "--token", token, "--root", str(root))
    assert rc == 1 and "already been used" in err

    # A revoked device gets no re-enrollment token.
    assert env.cli("device", "revoke", identity.device_id)[0] == 0
    rc, _, err = env.cli("token", "create", "--device", identity.device_id)
    assert rc == 1 and "revoked" in err


async def test_a_renewal_supersedes_the_older_certificate_everywhere(control_plane):
    """Once the device uses its renewed certificate, only that one works: a key stolen from the
    older generation can neither renew (and so compete with the device) nor use the endpoints,
    and the CRL the broker reads lists it."""
    env = control_plane
    store = IdentityStore(env.root / "renewing" / "identity")
    enrolled = await enroll(env.endpoints.enroll_url, env.token(), store)
    generation = store.directory / "generations" / enrolled.serial  # `current` moves on
    older = replace(enrolled, key_file=generation / "key.pem", cert_file=generation / "cert.pem")
    newer = await CertificateRenewer(store).renew()
    assert newer.serial != older.serial
    # Until the device presents the new certificate, the older one still works: a renewal
    # whose answer was lost on the way must not cut the node off.
    assert (await env.whoami(older))[0] == 200
    assert (await env.whoami(newer))[0] == 200  # from now on the older one is superseded

    async with aiohttp.ClientSession() as session:
        csr = build_csr(new_private_key()).decode()
        async with session.post(
            f"{env.endpoints.device_url}/v1/devices/self/renew",
            json={"csr": csr},
            ssl=older.ssl_context(),
        ) as response:
            status, reply = response.status, await response.json()
    assert status == 403 and "superseded by a renewal" in reply["message"], reply
    status, reply = await env.whoami(older)
    assert status == 403 and "superseded" in reply["message"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.hello(older)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    assert (await env.whoami(newer))[0] == 200
    assert (await env.hello(newer)).certificate_serial == newer.serial

    def listed() -> bool:
        crl = x509.load_pem_x509_crl(env.config.crl_path.read_bytes())
        return crl.get_revoked_certificate_by_serial_number(older.certificate.serial_number)

    deadline = asyncio.get_running_loop().time() + env.timeout
    while not listed() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)  # the server republishes on its next maintenance pass
    assert listed()
    crl = x509.load_pem_x509_crl(env.config.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(newer.certificate.serial_number) is None
