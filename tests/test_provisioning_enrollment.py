"""Enrollment over server-authenticated HTTPS: tokens, CSR checks, identity chosen by the CA."""

from __future__ import annotations

import json
import math
import socket
from datetime import timedelta

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity import IdentityError, IdentityStore, enroll
from agent.identity.client import post_json
from controlplane.config import load_config
from controlplane.errors import ConfigError
from controlplane.storage import open_database
from provisioning.csr import build_csr
from provisioning.errors import TokenFormatError
from provisioning.identity import DEVICE_URN, REGION_URN, device_identity_of
from provisioning.keys import new_private_key
from tests.trust_fixtures import start_control_plane, write_config


def csr_for(key, name: str = "edgefleet-device", uris: tuple[str, ...] = ()) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def test_token_from_cli_enrolls_a_device_with_its_region_and_tags(control_plane):
    env = control_plane
    rc, out, err = env.cli(
        "token", "create", "--region", "ae", "--tag", "line=3", "--uses", "1", "--expires", "24h"
    )
    assert rc == 0, err
    token = out.splitlines()[0]
    credentials = await env.enroll(token)

    cert = credentials.certificate
    identity = credentials.identity
    assert identity.region == "ae" and identity.device_id.startswith("dev-")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.device_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.UniformResourceIdentifier)) == {
        DEVICE_URN + identity.device_id,
        REGION_URN + "ae",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, hours=1)
    assert env.plane.registry.get(identity.device_id).tags == {"line": "3"}
    # The key was made on the device and is readable by its owner only.
    assert credentials.key_file.stat().st_mode & 0o777 == 0o600
    # The control plane stored the token's hash, never the token.
    secret = token.split(".")[2]
    dump = "\n".join(open_database(env.config.database_path).iterdump())
    assert secret not in dump and token.split(".")[1] in dump


async def test_forged_csr_gets_the_identity_the_control_plane_chooses(control_plane):
    env = control_plane
    victim = await env.enroll()
    key = new_private_key()
    forged = csr_for(
        key,
        name=victim.identity.device_id,
        uris=(DEVICE_URN + victim.identity.device_id, REGION_URN + "eu"),
    )
    status, reply = await env.post_enroll({"token": env.token(), "csr": forged})
    assert status == 201, reply
    cert = x509.load_pem_x509_certificate(reply["certificate"].encode())
    identity = device_identity_of(cert)
    assert identity.device_id != victim.identity.device_id
    assert identity.region == "ae"
    assert reply["device_id"] == identity.device_id
    assert cert.public_key() == key.public_key()


async def test_reused_token_is_refused(control_plane):
    env = control_plane
    token = env.token(uses=1)
    await env.enroll(token)
    with pytest.raises(IdentityError, match="already been used"):
        await env.enroll(token)


async def test_token_with_two_uses_enrolls_two_devices_then_stops(control_plane):
    env = control_plane
    token = env.token(uses=2)
    first, second = await env.enroll(token), await env.enroll(token)
    assert first.identity.device_id != second.identity.device_id
    with pytest.raises(IdentityError, match="already been used"):
        await env.enroll(token)


async def test_expired_token_is_refused(control_plane):
    env = control_plane
    token = env.token(expires_in=timedelta(hours=1))
    env.clock.advance(timedelta(hours=1, seconds=1))
    with pytest.raises(IdentityError, match="expired at"):
        await env.enroll(token)


async def test_out_of_scope_token_is_refused(control_plane):
    env = control_plane
    token = env.token(region="eu")
    with pytest.raises(IdentityError, match="is for region 'eu'"):
        await env.enroll(token)
    assert env.plane.registry.list() == []


async def test_token_of_another_control_plane_is_refused_before_anything_is_sent(control_plane):
    env = control_plane
    parts = env.token().split(".")
    parts[3] = "A" * 43  # the pin of some other CA
    store = IdentityStore(env.root / "stray" / "identity")
    with pytest.raises(IdentityError, match="does not match the pin"):
        await enroll(env.endpoints.enroll_url, ".".join(parts), store)
    assert store.current() is None


@pytest.mark.parametrize(
    "token", ["", "garbage", "ef1.short.x.y", "ef2." + "a" * 10 + "." + "b" * 43 + "." + "c" * 43]
)
async def test_malformed_token_is_refused_with_a_clear_error(control_plane, token):
    env = control_plane
    with pytest.raises(TokenFormatError, match="malformed enrollment token"):
        await env.enroll(token)
    status, reply = await env.post_enroll(
        {"token": token or " ", "csr": build_csr(new_private_key()).decode()}
    )
    assert status == 400 and "malformed enrollment token" in reply["message"]


async def test_garbage_csr_is_refused_without_spending_the_token(control_plane):
    env = control_plane
    token = env.token(uses=1)
    for csr, message in [
        ("hello", "not a PEM certificate signing request"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot be parsed",
        ),
    ]:
        status, reply = await env.post_enroll({"token": token, "csr": csr})
        assert status == 400 and message in reply["message"], reply
    # The token still has its one use.
    status, _ = await env.post_enroll(
        {"token": token, "csr": build_csr(new_private_key()).decode()}
    )
    assert status == 201


async def test_csr_with_a_broken_signature_is_refused(control_plane):
    env = control_plane
    pem = build_csr(new_private_key())
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    status, reply = await env.post_enroll({"token": env.token(), "csr": tampered.decode()})
    assert status == 400 and "signature does not verify" in reply["message"]


def _rsa_key_with_exponent(e: int) -> rsa.RSAPrivateKey:
    """An RSA-2048 key with public exponent `e` (key generators only make 3 and 65537)."""
    while True:
        base = rsa.generate_private_key(65537, 2048).private_numbers()
        p, q = base.p, base.q
        if math.gcd(e, (p - 1) * (q - 1)) == 1:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA-1024, which is not accepted"),
        (lambda: ec.generate_private_key(ec.SECP192R1()), "EC secp192r1, which is not accepted"),
        (lambda: rsa.generate_private_key(3, 2048), "public exponent 3, which is not accepted"),
        # A huge exponent makes every signature check of the key ~60 times dearer.
        (lambda: _rsa_key_with_exponent((1 << 2040) + 1), "12623830...(615 digits), which"),
    ],
    ids=["rsa-1024", "p-192", "rsa-e3", "rsa-huge-e"],
)
async def test_weak_key_types_are_refused(control_plane, make_key, message):
    env = control_plane
    token = env.token()
    status, reply = await env.post_enroll({"token": token, "csr": csr_for(make_key())})
    assert status == 400 and message in reply["message"], reply
    assert "EC secp256r1 or secp384r1" in reply["message"]
    assert env.plane.tokens.get(token.split(".")[1]).uses_left == 1


async def test_a_csr_is_not_parsed_for_a_token_that_is_not_valid(control_plane):
    """Without a token's secret nobody makes the control plane parse and verify a CSR."""
    env = control_plane
    token = env.token()
    prefix, token_id, secret, pin = token.split(".")
    forged = ".".join([prefix, token_id, "A" * len(secret), pin])  # the right id, not its secret
    status, reply = await env.post_enroll({"token": forged, "csr": "not a CSR"})
    assert status in (401, 403) and "not known to this control plane" in reply["message"], reply
    assert env.plane.tokens.get(token.split(".")[1]).uses_left == 1


async def test_oversized_and_non_json_bodies_are_refused(control_plane):
    env = control_plane
    huge = json.dumps({"token": env.token(), "csr": "A" * 200_000}).encode()
    status, reply = await env.post_enroll(huge)
    assert status == 413 and "65536 bytes" in reply["message"]

    status, reply = await env.post_enroll(b"{not json")
    assert status == 400 and "not valid JSON" in reply["message"]
    # Python's parser refuses integers of over 4300 digits with a plain ValueError.
    for body in (b"1" * 5000, b'{"token": "t", "csr": "c", "n": %s}' % (b"1" * 5000)):
        status, reply = await env.post_enroll(body)
        assert status == 400 and "not valid JSON" in reply["message"], reply
    status, reply = await env.post_enroll(b"token=x", content_type="text/plain")
    assert status == 400 and "Content-Type: application/json" in reply["message"]
    status, reply = await env.post_enroll({"token": env.token()})
    assert status == 400 and "'csr' is missing" in reply["message"]


@pytest.mark.parametrize("status", [200, 201, 400])
@pytest.mark.parametrize(
    "reply",
    [b"[" * 50_000 + b"]" * 50_000, b"not json", b"[1, 2]", b"\xff\xfe", b"9" * 5000],
)
async def test_a_reply_that_is_not_a_json_object_is_an_identity_error(status, reply):
    """What the device gets back is parsed as carefully as what the server gets: a reply
    nested past the JSON parser, or not JSON at all, is a clear IdentityError."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=reply, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/enroll", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/enroll"
    expected = "refused the request" if status >= 400 else "not a JSON object"
    try:
        with pytest.raises(IdentityError, match=expected):
            await post_json(url, {"token": "t"}, ssl_context=None)
    finally:
        await runner.cleanup()


async def test_a_device_gets_at_most_one_certificate_per_renewal_interval(tmp_path):
    """A device (or a thief of its key) renewing in a loop adds no certificates: 429 with
    Retry-After until the interval since its last certificate has passed."""
    env = await start_control_plane(tmp_path, renewal_interval_seconds=3600)
    try:
        device = await env.enroll()
        url = f"{env.endpoints.device_url}/v1/devices/self/renew"

        async def renew() -> tuple[int, str | None, dict]:
            csr = build_csr(new_private_key()).decode()
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json={"csr": csr}, ssl=device.ssl_context()) as response,
            ):
                return response.status, response.headers.get("Retry-After"), await response.json()

        def certificates() -> int:
            return env.plane.db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]

        def refusals_recorded() -> int:
            sql = "SELECT COUNT(*) FROM audit WHERE event = 'renew' AND outcome = 'refused'"
            return env.plane.db.execute(sql).fetchone()[0]

        issued = certificates()
        for _ in range(10):
            status, retry_after, reply = await renew()
            assert status == 429 and reply["error"] == "too_soon", reply
            assert 0 < int(retry_after) <= 3600
            assert "may renew again from" in reply["message"]
            assert f"(in {retry_after} s)" in reply["message"]
            env.clock.advance(timedelta(seconds=1))  # each retry is told another countdown
        assert certificates() == issued
        # ...and is still the same refusal to the audit log: one row, its repeats counted
        assert refusals_recorded() == 1

        env.clock.advance(timedelta(seconds=3590))
        status, _, reply = await renew()
        assert status == 200, reply
        assert certificates() == issued + 1
        status, _, reply = await renew()  # the same certificate again, at once: too soon
        assert status == 429 and reply["error"] == "too_soon", reply
        assert certificates() == issued + 1
    finally:
        await env.server.stop()
        env.plane.close()


@pytest.mark.parametrize("seconds", ["-1", str(10 * 86400), "1.5"])
def test_a_renewal_interval_devices_could_not_keep_to_is_a_config_error(tmp_path, seconds):
    path = write_config(tmp_path)
    env = {"EDGEFLEET_RENEWAL_INTERVAL_SECONDS": seconds}
    with pytest.raises(ConfigError, match="renewal_interval_seconds"):
        load_config(path, env=env)
