"""MQTT over mutual TLS with a real Mosquitto configured by `edgefleet broker-config`."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from controlplane.broker import device_topic_root
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.identity import DeviceIdentity


def test_broker_config_is_mutual_tls_with_crl_and_per_device_acl(mqtt_fleet):
    env, _ = mqtt_fleet
    conf = (env.config.broker_dir / "mosquitto.conf").read_text()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {env.config.broker_dir / 'crl.pem'}",
        "allow_anonymous false",
    ):
        assert line in conf.splitlines()
    acl = (env.config.broker_dir / "acl").read_text().splitlines()
    assert "pattern readwrite edgefleet/v1/devices/%u/#" in acl
    assert acl[acl.index("user edgefleet-controlplane") + 1] == "topic readwrite edgefleet/v1/#"
    assert (env.config.broker_dir / "broker.key").stat().st_mode & 0o777 == 0o600


async def test_device_cannot_read_or_write_another_devices_topics(mqtt_fleet):
    env, broker = mqtt_fleet
    a, b = await env.enroll(), await env.enroll()
    a_id, b_id = a.identity.device_id, b.identity.device_id
    observer = broker.control_plane_client()
    dev_a = broker.client(a)
    dev_b = broker.client(b)

    def scenario():
        for client in (observer, dev_a, dev_b):
            assert client.connect()
        assert not observer.subscribe("edgefleet/v1/#")[0].is_failure
        assert not dev_b.subscribe(f"{device_topic_root(b_id)}/#")[0].is_failure
        assert not dev_a.subscribe(f"{device_topic_root(a_id)}/#")[0].is_failure
        # Mosquitto acknowledges these subscriptions but the ACL filters every delivery.
        dev_a.subscribe(f"{device_topic_root(b_id)}/#")
        dev_a.subscribe("edgefleet/v1/#")

        # A publishes on B's topic, then on its own: the broker handles A's packets in order,
        # so once the marker is through, the forged message was delivered or dropped.
        forged = dev_a.publish(f"{device_topic_root(b_id)}/desired", b"forged-by-a")
        dev_a.publish(f"{device_topic_root(a_id)}/state", b"a-marker")
        assert observer.wait_for_message(b"a-marker")
        observer.publish(f"{device_topic_root(b_id)}/desired", b"b-marker")
        assert dev_b.wait_for_message(b"b-marker")

        # B talks on its own topic; A, subscribed to it and to everything, hears none of it.
        dev_b.publish(f"{device_topic_root(b_id)}/state", b"b-secret")
        assert observer.wait_for_message(b"b-secret")
        observer.publish(f"{device_topic_root(a_id)}/desired", b"a-marker-2")
        assert dev_a.wait_for_message(b"a-marker-2")

        everything = [p for c in (observer, dev_a, dev_b) for _, p in c.messages]
        assert b"forged-by-a" not in everything
        assert forged.is_failure  # MQTT 5 tells A its publish was not authorised
        assert [t for t, _ in dev_a.messages if not t.startswith(device_topic_root(a_id))] == []
        for client in (observer, dev_a, dev_b):
            client.close()

    await asyncio.to_thread(scenario)


async def test_revoked_device_is_cut_off_and_refused(mqtt_fleet):
    env, broker = mqtt_fleet
    device = await env.enroll()
    device_id = device.identity.device_id
    topic = f"{device_topic_root(device_id)}/desired"
    observer = broker.control_plane_client()
    live = broker.client(device)

    def connect_and_check():
        assert observer.connect() and live.connect()
        assert not live.subscribe(f"{device_topic_root(device_id)}/#")[0].is_failure
        observer.publish(topic, b"before")
        assert live.wait_for_message(b"before")

    await asyncio.to_thread(connect_and_check)
    rc, out, err = await asyncio.to_thread(env.cli, "device", "revoke", device_id)
    assert rc == 0, err
    assert "broker reloaded: yes" in out
    assert "live MQTT connection closed: yes" in out

    def after_revocation():
        # The live connection was closed by the control plane (session takeover)...
        assert live.ended.wait(15)
        live.close()
        # ...and the broker refuses the certificate from now on.
        again = broker.client(device)
        assert not again.connect()
        again.close()
        observer.close()

    await asyncio.to_thread(after_revocation)
    assert device_id in (env.config.broker_dir / "acl").read_text()


async def test_expired_and_foreign_certificates_are_refused(mqtt_fleet, tmp_path):
    env, broker = mqtt_fleet
    expired = env.forge_credentials(
        DeviceIdentity("dev-expired", "ae"), now=utc_now() - timedelta(days=40)
    )
    other_ca = CertificateAuthority.create(tmp_path / "other-ca")
    foreign = env.forge_credentials(DeviceIdentity("dev-foreign", "ae"), ca=other_ca)
    good = await env.enroll()

    def scenario():
        for credentials, accepted in ((expired, False), (foreign, False), (good, True)):
            client = broker.client(credentials)
            assert client.connect() is accepted
            client.close()

    await asyncio.to_thread(scenario)
