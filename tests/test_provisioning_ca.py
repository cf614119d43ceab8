"""The provisioning building blocks on their own: CA, certificates, CRL, CSR checks, tokens,
and the control plane's config, broker ACL and server certificate renewal."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.broker import Broker, BrokerFiles, render_acl, write_broker_config
from controlplane.commands.token import parse_duration
from controlplane.config import load_config
from controlplane.errors import ConfigError
from controlplane.server_certificate import ServerCredentials, ensure_server_certificate
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.crl import RevokedEntry, build_crl
from provisioning.csr import CSRLimits, build_csr, check_csr
from provisioning.errors import CSRRejected, ProvisioningError, TokenFormatError
from provisioning.identity import DeviceIdentity, parse_tags, region_of
from provisioning.keys import load_private_key, new_private_key
from provisioning.tokens import ca_pin, hash_secret, new_token, parse_token


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca")


def test_ca_key_is_private_and_never_overwritten(ca, tmp_path):
    directory = tmp_path / "ca"
    assert (directory / "ca.key").stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert isinstance(ca.certificate.public_key().curve, type(new_private_key().curve))
    with pytest.raises(ProvisioningError, match="already exists"):
        CertificateAuthority.create(directory)
    assert CertificateAuthority.load(directory).certificate == ca.certificate
    (directory / "ca.key").chmod(0o644)
    with pytest.raises(ProvisioningError, match="chmod 600"):
        CertificateAuthority.load(directory)


def test_device_certificate_is_short_lived_and_backdated_for_clock_skew(ca):
    now = utc_now()
    cert = ca.issue_device(new_private_key().public_key(), DeviceIdentity("dev-1", "ae"), now=now)
    assert cert.not_valid_after_utc - now <= timedelta(days=30)
    assert cert.not_valid_after_utc - now > timedelta(days=29, hours=23)
    # A peer whose clock is up to an hour behind already accepts it.
    assert cert.not_valid_before_utc <= now - timedelta(minutes=59)
    cert.verify_directly_issued_by(ca.certificate)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False


def test_server_certificate_names_its_region_and_hosts(ca):
    cert = ca.issue_server(new_private_key().public_key(), "eu", ["cp.eu.example", "10.0.0.5"])
    assert region_of(cert) == "eu"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cp.eu.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_crl_lists_revoked_serials_and_is_signed_by_the_ca(ca):
    now = utc_now()
    crl = build_crl(ca, [RevokedEntry(0xABC, now)], number=7, now=now, lifetime=timedelta(days=7))
    assert crl.get_revoked_certificate_by_serial_number(0xABC) is not None
    assert crl.get_revoked_certificate_by_serial_number(0xABD) is None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert timedelta(days=7, seconds=-1) < crl.next_update_utc - now <= timedelta(days=7)
    assert crl.is_signature_valid(ca.certificate.public_key())


def test_check_csr_accepts_p256_and_names_the_limits_otherwise():
    key = new_private_key()
    assert check_csr(build_csr(key)) == key.public_key()
    with pytest.raises(CSRRejected, match="at most 16384"):
        check_csr(b"x" * 20_000)
    with pytest.raises(CSRRejected, match="not a PEM"):
        check_csr(b"\x00\xff garbage")
    with pytest.raises(CSRRejected, match="secp256r1"):
        check_csr(build_csr(key), CSRLimits(ec_curves=frozenset({"secp384r1"})))


def test_tokens_round_trip_and_never_show_their_secret(ca):
    token = new_token(ca_pin(ca.certificate))
    assert parse_token(str(token)) == token
    assert parse_token(f"  {token}\n") == token
    assert token.secret not in repr(token)
    assert hash_secret(token.secret) != token.secret and len(hash_secret(token.secret)) == 64
    for bad in ("", str(token)[:-1], str(token).replace("ef1", "ef9"), str(token) + ".x"):
        with pytest.raises(TokenFormatError, match="malformed enrollment token"):
            parse_token(bad)


def test_tags_and_durations_are_parsed_or_refused_clearly():
    assert parse_tags(["line=3", "site=dubai-1"]) == {"line": "3", "site": "dubai-1"}
    for bad in (["line"], ["Line=3"], ["line=3", "line=4"], ["line=a b"]):
        with pytest.raises(ProvisioningError):
            parse_tags(bad)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    for bad in ("", "24", "h", "1w", "-1h"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_config_file_is_overridden_by_environment(tmp_path):
    path = tmp_path / "cp.toml"
    path.write_text(
        'region = "ae"\n[server]\nenroll_port = 9443\npublic_hosts = ["cp.example"]\n'
        "[certificates]\ndevice_days = 14\n"
    )
    config = load_config(path, env={"EDGEFLEET_ENROLL_PORT": "10443", "EDGEFLEET_REGION": "eu"})
    assert (config.region, config.enroll_port, config.public_hosts) == (
        "eu",
        10443,
        ("cp.example",),
    )
    assert config.lifetimes.device == timedelta(days=14)
    defaults = load_config(None, env={})
    assert defaults.region == "local" and defaults.bind_host == "127.0.0.1"
    path.write_text("[server]\nenrol_port = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="grpc_port has a bad value"):
        load_config(None, env={"EDGEFLEET_GRPC_PORT": "many"})
    with pytest.raises(ConfigError, match="region"):
        load_config(None, env={"EDGEFLEET_REGION": "EU/1"})


def test_acl_denies_revoked_devices_everything():
    acl = render_acl(["dev-b", "dev-a"]).splitlines()
    assert acl[acl.index("user dev-a") + 1] == "topic deny #"
    assert acl[acl.index("user dev-b") + 1] == "topic deny #"
    assert "pattern readwrite edgefleet/v1/devices/%u/#" in acl


def test_server_certificate_is_renewed_at_two_thirds_or_when_names_change(ca, tmp_path):
    creds = ServerCredentials.in_dir(tmp_path / "server")
    now = utc_now()
    hosts = ("localhost", "127.0.0.1")
    assert ensure_server_certificate(creds, ca, region="ae", hostnames=hosts, now=now)
    assert not ensure_server_certificate(creds, ca, region="ae", hostnames=hosts, now=now)
    later = now + timedelta(days=59)
    assert not ensure_server_certificate(creds, ca, region="ae", hostnames=hosts, now=later)
    assert ensure_server_certificate(
        creds, ca, region="ae", hostnames=hosts, now=now + timedelta(days=61)
    )
    assert ensure_server_certificate(
        creds, ca, region="ae", hostnames=("cp.example",), now=now + timedelta(days=61)
    )
    assert creds.key_file.stat().st_mode & 0o777 == 0o600


def test_broker_certificates_are_renewed_with_their_names(ca, tmp_path):
    directory = tmp_path / "broker"
    crl = build_crl(ca, [], number=1, now=utc_now(), lifetime=timedelta(days=30))
    write_broker_config(
        directory,
        ca,
        region="ae",
        hostnames=["mqtt.ae.example", "10.1.2.3"],
        crl_pem=crl.public_bytes(serialization.Encoding.PEM),
        revoked_device_ids=[],
        run_as="root",
    )
    files = BrokerFiles(directory)
    before = x509.load_pem_x509_certificate(files.cert.read_bytes())
    broker = Broker(directory, ca)
    assert not broker.renew_certificates("ae", utc_now() + timedelta(days=59))
    assert broker.renew_certificates("ae", utc_now() + timedelta(days=61))
    after = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert after.serial_number != before.serial_number
    san = after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.ae.example"]
    assert region_of(after) == "ae"
    assert after.public_key() == load_private_key(files.key).public_key()
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    assert client.not_valid_before_utc > utc_now() + timedelta(days=60)
