"""The operator CLI (`edgefleet`) on bad arguments, damaged state and bad settings: one line
saying what is wrong, exit code 1 (2 for a bad argument), never a traceback."""

from __future__ import annotations

import contextlib
import io
import sqlite3

import pytest
from cryptography import x509

from controlplane import cli as controlplane_cli
from controlplane.config import load_config
from controlplane.errors import ConfigError
from provisioning.ca import CertificateAuthority
from tests.fleet import new_publisher_key
from tests.packages import write_package
from tests.trust_fixtures import write_config


def edgefleet(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = controlplane_cli.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def refused(rc: int, err: str, message: str, code: int = 1) -> bool:
    return rc == code and "Traceback" not in err and message in err


@pytest.fixture
def config_path(tmp_path):
    path = write_config(tmp_path)
    config = load_config(path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    return path


def test_a_token_lifetime_past_what_a_duration_holds_is_a_usage_error(config_path):
    rc, _, err = edgefleet(
        "token", "create", "--expires", "99999999999d", "--config", str(config_path)
    )
    assert refused(rc, err, "longer than a duration can be", code=2), err


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_a_ca_name_x509_cannot_hold_is_refused(tmp_path, name):
    path = write_config(tmp_path)
    rc, _, err = edgefleet("ca", "init", "--name", name, "--config", str(path))
    assert refused(rc, err, "the CA's name must be 1-64 characters"), err
    assert not (tmp_path / "cp" / "ca").exists()


def test_a_damaged_database_or_ca_certificate_is_named(config_path, tmp_path):
    config = load_config(config_path, env={})
    config.database_path.write_bytes(b"this is not a database" * 100)
    rc, _, err = edgefleet("token", "list", "--config", str(config_path))
    assert refused(rc, err, f"cannot open the database {config.database_path}"), err
    config.database_path.unlink()
    (config.ca_dir / "ca.pem").write_text("garbage")
    rc, _, err = edgefleet("token", "list", "--config", str(config_path))
    assert refused(rc, err, "ca.pem is not a PEM certificate"), err


def test_tuf_root_keys_given_as_a_file_is_refused(config_path, tmp_path):
    a_file = tmp_path / "keys"
    a_file.write_text("not a directory")
    rc, _, err = edgefleet("tuf", "init", "--root-keys", str(a_file), "--config", str(config_path))
    assert refused(rc, err, "is not a directory"), err
    assert a_file.read_text() == "not a directory"


def test_signing_with_a_missing_key_names_the_file(tmp_path, sample_repo):
    package = write_package(tmp_path / "mlp-1", sample_repo, version=1)
    missing = tmp_path / "missing.key"
    rc, _, err = edgefleet("model", "sign", str(package), "--key", str(missing))
    assert refused(rc, err, f"{missing}: No such file or directory"), err


def test_pushing_a_published_version_with_other_content_is_refused(
    config_path, tmp_path, sample_repo
):
    cfg = ("--config", str(config_path))
    offline = tmp_path / "offline-root-keys"
    assert edgefleet("tuf", "init", "--root-keys", str(offline), *cfg)[0] == 0
    key = tmp_path / "vision.key"
    new_publisher_key(key)
    rc, _, err = edgefleet(
        "model", "publisher", "add", "vision", "--pubkey", str(key.with_suffix(".pub")),
        "--models", "mlp", "--root-keys", str(offline), *cfg,
    )  # fmt: skip
    assert rc == 0, err
    first = write_package(tmp_path / "first", sample_repo, version=1)
    assert edgefleet("model", "sign", str(first), "--key", str(key))[0] == 0
    assert edgefleet("model", "push", str(first), *cfg)[0] == 0
    other = write_package(tmp_path / "other", sample_repo, version=1)
    (other / "notes.txt").write_text("other bytes under the same name@version")
    assert edgefleet("model", "sign", str(other), "--key", str(key))[0] == 0
    rc, _, err = edgefleet("model", "push", str(other), *cfg)
    assert refused(rc, err, "already published with other content"), err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEVICE_CERT_DAYS", "1000000000", "device_cert_days 1000000000 must be 1 to 3650"),
        ("SERVER_CERT_DAYS", "0", "server_cert_days 0 must be 1 to 3650"),
        ("CRL_DAYS", "4000", "crl_days 4000 must be 1 to 3650"),
        ("CLOCK_SKEW_SECONDS", "-5", "clock_skew_seconds must be 0 to 86400"),
        ("MAX_REQUEST_BYTES", "0", "max_request_bytes 0 must be"),  # aiohttp: 0 is no limit
        ("MAX_REQUEST_BYTES", "-1", "max_request_bytes -1 must be"),
        ("REVOCATION_POLL_SECONDS", "nan", "revocation_poll_seconds has a bad value"),
        ("REVOCATION_POLL_SECONDS", "inf", "revocation_poll_seconds has a bad value"),
        ("REVOCATION_POLL_SECONDS", "0", "revocation_poll_seconds must be over 0"),
    ],
)
def test_settings_out_of_range_are_config_errors(tmp_path, name, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(write_config(tmp_path), env={f"EDGEFLEET_{name}": value})


def test_a_database_that_is_a_directory_is_named(config_path):
    config = load_config(config_path, env={})
    config.database_path.unlink(missing_ok=True)
    config.database_path.mkdir(parents=True)
    rc, _, err = edgefleet("device", "list", "--config", str(config_path))
    assert refused(rc, err, "cannot open"), err
    with pytest.raises(sqlite3.Error):
        sqlite3.connect(config.database_path).execute("SELECT 1")


@pytest.mark.parametrize("host", ["", "bad host", "broker..example", "-broker.example"])
def test_broker_config_refuses_a_host_name_a_certificate_cannot_hold(config_path, tmp_path, host):
    broker = tmp_path / "broker"
    rc, _, err = edgefleet(
        "broker-config", str(broker), f"--hostname={host}", "--config", str(config_path)
    )
    assert refused(rc, err, f"--hostname: host name {host!r} is not valid"), err
    assert not broker.exists()


def test_broker_config_puts_an_international_name_in_its_a_label_form(config_path, tmp_path):
    broker = tmp_path / "broker"
    rc, out, err = edgefleet(
        "broker-config", str(broker), "--port", "18883", "--hostname", "bücher.example",
        "--hostname", "::1", "--config", str(config_path),
    )  # fmt: skip
    assert rc == 0, err
    assert 'url = "mqtts://xn--bcher-kva.example:18883"' in out
    cert = x509.load_pem_x509_certificate((broker / "broker.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]
    rc, out, err = edgefleet(
        "broker-config", str(broker), "--port", "18883", "--hostname", "::1",
        "--config", str(config_path),
    )  # fmt: skip
    assert rc == 0 and 'url = "mqtts://[::1]:18883"' in out, err


async def test_serve_ignores_sighup_and_stops_cleanly_with_streams_open(config_path, tmp_path):
    """`edgefleet serve` as operators run it: SIGHUP is logged and ignored; SIGTERM with a
    device's stream open stops it with exit 0, logged, and no error lines."""
    import asyncio
    import os
    import re
    import signal
    import subprocess
    import sys

    import grpc

    from agent.identity import IdentityStore, enroll
    from protocol import fleet_pb2, fleet_pb2_grpc

    rc, out, err = edgefleet("token", "create", "--config", str(config_path))
    assert rc == 0, err
    token = out.splitlines()[0]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=log.open("wb"), text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        enroll_url = re.search(r"enrollment (\S+)", line).group(1)
        grpc_target = re.search(r"gRPC (\S+)", line).group(1)
        device = await enroll(enroll_url, token, IdentityStore(tmp_path / "device"))
        async with grpc.aio.secure_channel(grpc_target, device.grpc_channel_credentials()) as ch:
            stream = fleet_pb2_grpc.FleetStub(ch).Heartbeat()
            await stream.write(fleet_pb2.Beat(seq=1))
            assert (await stream.read()).seq == 1
            proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if "SIGHUP ignored" in log.read_text():
                    break
                await asyncio.sleep(0.1)
            await stream.write(fleet_pb2.Beat(seq=2))
            assert (await stream.read()).seq == 2  # still serving
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "SIGHUP ignored" in text and '"stopping"' in text and '"stopped"' in text, text
    assert '"level": "error"' not in text, text


def set_setting(config_path, line: str, replacing: str) -> None:
    text = config_path.read_text()
    assert replacing in text
    config_path.write_text(text.replace(replacing, line))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('public_hosts = ["bad host!"]', "host name 'bad host!' is not valid"),
        ('public_hosts = [["a"], 1]', "host name \"['a']\" is not valid"),
        ('public_hosts = ["127.0.0.1"]\nbind_host = "999.1.1.1"', "bind_host '999.1.1.1' is not"),
    ],
)
def test_serve_refuses_hosts_it_cannot_use(config_path, line, message):
    set_setting(config_path, line, 'public_hosts = ["127.0.0.1", "localhost"]')
    rc, _, err = edgefleet("serve", "--config", str(config_path))
    assert refused(rc, err, message), err


@pytest.mark.parametrize("port", ["enroll_port", "grpc_port"])
def test_serve_with_a_port_in_use_says_so_in_one_line(config_path, port):
    import os
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as taken:
        number = taken.getsockname()[1]
        set_setting(config_path, f"{port} = {number}", f"{port} = 0")
        done = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config", str(config_path)],
            capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
        )  # fmt: skip
    assert refused(done.returncode, done.stderr, f"cannot listen on 127.0.0.1:{number}")
    assert len([line for line in done.stderr.splitlines() if "error" in line]) == 1, done.stderr


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("BROKER_URL", "mqtts://127.0.0.1:99999", "port 1 to 65535"),
        ("BROKER_URL", "mqtts://127.0.0.1:0", "port 1 to 65535"),
        ("BROKER_URL", "mqtts://:8883", "must be mqtts://HOST:PORT"),
        ("BROKER_DIR", "{config_path}", "is not a directory"),
    ],
)
def test_broker_settings_that_cannot_work_are_refused_at_load(config_path, setting, value, message):
    env = {f"EDGEFLEET_{setting}": value.format(config_path=config_path)}
    with pytest.raises(ConfigError, match=message):
        load_config(config_path, env=env)


def test_a_revocation_whose_broker_step_fails_says_it_is_revoked_and_how_to_retry(tmp_path):
    from controlplane.service import ControlPlane
    from provisioning.csr import build_csr
    from provisioning.keys import new_private_key
    from tests.trust_fixtures import free_port

    config_path = write_config(tmp_path, free_port(), tmp_path / "broker")
    config = load_config(config_path, env={})
    CertificateAuthority.create(config.ca_dir, lifetimes=config.lifetimes)
    cfg = ("--config", str(config_path))
    assert (
        edgefleet("broker-config", str(config.broker_dir), "--hostname", "127.0.0.1", *cfg)[0] == 0
    )
    plane = ControlPlane.open(config)
    try:
        token, _ = plane.tokens.create(region="ae", ca_pin=plane.ca_pin)
        issued = plane.enrollment.enroll(str(token), build_csr(new_private_key()))
    finally:
        plane.close()
    device_id = issued.device.device_id
    (config.broker_dir / "crl.pem").unlink()
    (config.broker_dir / "crl.pem").mkdir()  # the broker's CRL cannot be replaced

    rc, _, err = edgefleet("device", "revoke", device_id, *cfg)
    assert refused(rc, err, f"device {device_id} is revoked (1 certificate(s)"), err
    assert f"run again: edgefleet device revoke {device_id}" in err
    assert len(err.strip().splitlines()) == 1
    plane = ControlPlane.open(config)
    try:
        assert plane.registry.get(device_id).status == "revoked"
    finally:
        plane.close()

    (config.broker_dir / "crl.pem").rmdir()
    rc, _, err = edgefleet("device", "revoke", device_id, *cfg)
    assert rc == 0, err
    crl = x509.load_pem_x509_crl((config.broker_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)


def test_tuf_init_with_root_keys_where_none_can_be_made_is_refused(config_path):
    rc, _, err = edgefleet(
        "tuf", "init", "--root-keys", "/proc/edgefleet-keys", "--config", str(config_path)
    )
    assert refused(rc, err, "cannot create the TUF repository"), err


def test_ca_init_with_a_state_dir_that_is_a_file_is_refused(tmp_path):
    path = write_config(tmp_path)
    (tmp_path / "cp").write_text("not a directory")
    rc, _, err = edgefleet("ca", "init", "--config", str(path))
    assert refused(rc, err, "Not a directory"), err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--run-as", "mosquitto\nlistener 18899 127.0.0.1", "is not a user name"),
        ("--run-as", "mosquitto allow_anonymous", "is not a user name"),
        ("--bind", "127.0.0.1\nallow_anonymous true", "is not an IP address"),
        ("--bind", "localhost", "is not an IP address"),
    ],
)
def test_broker_config_refuses_values_that_would_add_directives(
    config_path, tmp_path, option, value, message
):
    broker = tmp_path / "broker"
    rc, _, err = edgefleet(
        "broker-config", str(broker), f"{option}={value}", "--config", str(config_path)
    )
    assert refused(rc, err, message), err
    assert not (broker / "mosquitto.conf").exists()


@pytest.mark.parametrize(
    "values", [{"run_as": "mosquitto\nlistener 1"}, {"bind": "127.0.0.1 \nallow_anonymous true"}]
)
def test_render_conf_refuses_whitespace_in_a_value(tmp_path, values):
    from controlplane.broker import BrokerFiles, render_conf

    with pytest.raises(ConfigError):
        render_conf(BrokerFiles(tmp_path), **values)
