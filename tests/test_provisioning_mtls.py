"""Mutual TLS on the control plane's device endpoints: HTTPS and gRPC, revocation included."""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta

import aiohttp
import grpc
import pytest
from cryptography import x509

from protocol import fleet_pb2, fleet_pb2_grpc
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.identity import DeviceIdentity


async def test_enrolled_device_is_known_by_its_certificate_over_https_and_grpc(control_plane):
    env = control_plane
    device = await env.enroll()
    status, me = await env.whoami(device)
    assert status == 200
    assert (me["device_id"], me["region"], me["status"]) == (
        device.identity.device_id,
        "ae",
        "active",
    )
    assert me["certificate"]["serial"] == device.serial
    reply = await env.hello(device)
    assert (reply.device_id, reply.region, reply.server_region) == (
        device.identity.device_id,
        "ae",
        "ae",
    )
    assert reply.certificate_serial == device.serial


async def test_server_certificate_carries_the_region(control_plane):
    env = control_plane
    from provisioning.identity import region_of

    cert = x509.load_pem_x509_certificate((env.config.server_dir / "server.pem").read_bytes())
    assert region_of(cert) == "ae"


async def test_client_without_certificate_is_refused(control_plane):
    env = control_plane
    ctx = ssl.create_default_context(cafile=str(env.config.ca_dir / "ca.pem"))
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"{env.endpoints.device_url}/v1/devices/self", ssl=ctx)
    creds = grpc.ssl_channel_credentials((env.config.ca_dir / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(env.endpoints.grpc_target, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await fleet_pb2_grpc.FleetStub(channel).Hello(
                fleet_pb2.HelloRequest(), timeout=env.timeout
            )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def _refused_by_tls(env, credentials) -> None:
    with pytest.raises(aiohttp.ClientError):
        await env.whoami(credentials)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await env.hello(credentials)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_expired_certificate_is_refused(control_plane):
    env = control_plane
    expired = env.forge_credentials(
        DeviceIdentity("dev-expired", "ae"), now=utc_now() - timedelta(days=40)
    )
    assert expired.certificate.not_valid_after_utc < utc_now()
    await _refused_by_tls(env, expired)


async def test_certificate_of_another_ca_is_refused(control_plane, tmp_path):
    env = control_plane
    other = CertificateAuthority.create(tmp_path / "other-ca", name="EdgeFleet device CA")
    foreign = env.forge_credentials(DeviceIdentity("dev-foreign", "ae"), ca=other)
    await _refused_by_tls(env, foreign)


async def test_certificate_unknown_to_the_registry_is_refused(control_plane):
    env = control_plane
    unrecorded = env.forge_credentials(DeviceIdentity("dev-unrecorded", "ae"), record=False)
    status, reply = await env.whoami(unrecorded)
    assert status == 403 and "not issued to a device" in reply["message"]


async def test_revoked_certificate_is_refused_and_its_live_stream_ended(control_plane):
    env = control_plane
    device, bystander = await env.enroll(), await env.enroll()
    device_id = device.identity.device_id

    url, ctx = f"{env.endpoints.device_url}/v1/devices/self", device.ssl_context()
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.secure_channel(
            env.endpoints.grpc_target, device.grpc_channel_credentials()
        ) as channel,
        grpc.aio.secure_channel(
            env.endpoints.grpc_target, bystander.grpc_channel_credentials()
        ) as other_channel,
    ):
        stream = fleet_pb2_grpc.FleetStub(channel).Heartbeat()
        other = fleet_pb2_grpc.FleetStub(other_channel).Heartbeat()
        for call in (stream, other):
            await call.write(fleet_pb2.Beat(seq=1))
            assert (await call.read()).seq == 1
        async with session.get(url, ssl=ctx) as response:
            assert response.status == 200  # a keep-alive HTTPS connection is open too

        # Revoked from another "process": the CLI, with its own database connection.
        rc, out, err = await asyncio.to_thread(env.cli, "device", "revoke", device_id)
        assert rc == 0, err
        assert f"device {device_id} revoked" in out

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), env.timeout)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in ended.value.details()
        # The keep-alive HTTPS connection gets a 403 and is closed.
        async with session.get(url, ssl=ctx) as response:
            assert response.status == 403
            assert response.headers.get("Connection", "").lower() == "close"
        # Other devices' streams go on.
        await other.write(fleet_pb2.Beat(seq=2))
        assert (await other.read()).seq == 2
        await other.done_writing()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.hello(device)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status, reply = await env.whoami(device)
    assert status == 403 and "revoked" in reply["message"]
    assert (await env.whoami(bystander))[0] == 200

    # The published CRL lists the revoked certificate.
    crl = x509.load_pem_x509_crl(env.config.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(device.certificate.serial_number)
    assert crl.is_signature_valid(env.plane.ca.certificate.public_key())


async def test_revoking_an_unknown_device_is_a_clear_error(control_plane):
    rc, _, err = control_plane.cli("device", "revoke", "dev-nope")
    assert rc == 1 and "no device 'dev-nope'" in err


async def test_bytes_that_are_no_message_are_invalid_and_unparsed_for_a_refused_device(
    control_plane,
):
    env = control_plane
    device, revoked = await env.enroll(), await env.enroll()
    rc, _, err = await asyncio.to_thread(env.cli, "device", "revoke", revoked.identity.device_id)
    assert rc == 0, err
    garbage = b"\xff\xff\xff"  # a truncated varint: no HelloRequest or Beat

    async def codes(credentials) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        target, creds = env.endpoints.grpc_target, credentials.grpc_channel_credentials()
        async with grpc.aio.secure_channel(target, creds) as channel:
            hello = channel.unary_unary("/edgefleet.fleet.v1.Fleet/Hello")
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await hello(garbage, timeout=env.timeout)
            beats = channel.stream_stream("/edgefleet.fleet.v1.Fleet/Heartbeat")
            call = beats(timeout=env.timeout)
            await call.write(fleet_pb2.Beat(seq=1).SerializeToString())
            assert fleet_pb2.BeatAck.FromString(await call.read()).seq == 1
            await call.write(garbage)
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await call.read()
            return unary.value.code(), stream.value.code()

    assert await codes(device) == (grpc.StatusCode.INVALID_ARGUMENT,) * 2
    # The device still works afterwards.
    assert (await env.hello(device)).device_id == device.identity.device_id

    # A revoked device is refused before its bytes are looked at (its stream's first read).
    target, creds = env.endpoints.grpc_target, revoked.grpc_channel_credentials()
    async with grpc.aio.secure_channel(target, creds) as channel:
        hello = channel.unary_unary("/edgefleet.fleet.v1.Fleet/Hello")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await hello(garbage, timeout=env.timeout)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_failed_registry_read_does_not_skip_ending_a_revoked_stream(control_plane):
    """The check of open streams is retried after a failed read (a database locked by another
    process), instead of being marked done for that revocation."""
    import sqlite3

    env = control_plane
    device = await env.enroll()
    target, creds = env.endpoints.grpc_target, device.grpc_channel_credentials()
    async with grpc.aio.secure_channel(target, creds) as channel:
        stream = fleet_pb2_grpc.FleetStub(channel).Heartbeat()
        await stream.write(fleet_pb2.Beat(seq=1))
        assert (await stream.read()).seq == 1
        registry = env.plane.registry
        real = registry.is_revoked
        calls = []

        def locked_once(serial):
            calls.append(serial)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            return real(serial)

        registry.is_revoked = locked_once
        try:
            rc, _, err = await asyncio.to_thread(
                env.cli, "device", "revoke", device.identity.device_id
            )
            assert rc == 0, err
            for _ in range(200):  # the server's maintenance loop polls every 0.05 s
                if len(calls) >= 2:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(stream.read(), env.timeout)
        finally:
            registry.is_revoked = real
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_device_holds_a_bounded_number_of_streams(control_plane):
    from controlplane.grpc_api import MAX_STREAMS_PER_DEVICE

    env = control_plane
    device, other = await env.enroll(), await env.enroll()
    target = env.endpoints.grpc_target
    async with (
        grpc.aio.secure_channel(target, device.grpc_channel_credentials()) as channel,
        grpc.aio.secure_channel(target, other.grpc_channel_credentials()) as other_channel,
    ):
        stub = fleet_pb2_grpc.FleetStub(channel)
        streams = []
        for seq in range(MAX_STREAMS_PER_DEVICE):
            stream = stub.Heartbeat()
            await stream.write(fleet_pb2.Beat(seq=seq))
            assert (await stream.read()).seq == seq
            streams.append(stream)
        extra = stub.Heartbeat()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await extra.write(fleet_pb2.Beat(seq=99))
            await extra.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open streams" in refused.value.details()
        # another device is not held back, and closing a stream makes room again
        beat = fleet_pb2_grpc.FleetStub(other_channel).Heartbeat()
        await beat.write(fleet_pb2.Beat(seq=1))
        assert (await beat.read()).seq == 1
        await streams[0].done_writing()
        assert await streams[0].read() == grpc.aio.EOF  # the server ended it
        await streams[0].code()
        again = stub.Heartbeat()
        await again.write(fleet_pb2.Beat(seq=7))
        assert (await again.read()).seq == 7
