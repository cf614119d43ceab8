"""The fleet's Mosquitto broker, as the control plane configures and steers it.

`write_broker_config` lays out a directory Mosquitto runs from (`mosquitto -c DIR/mosquitto.conf`):
mutual TLS with the device CA (`require_certificate`, the certificate CN as username and as
client id, so one device cannot take over another's session), the CRL, and an ACL that gives each
device its own subtree `edgefleet/v1/devices/<id>/#` and the control plane all of `edgefleet/v1/`.

Mosquitto reads the CRL and ACL only at start and on SIGHUP, and a CRL does not touch clients that
are already connected. So revoking a device (`Broker.apply`) rewrites both files, sends SIGHUP,
and then closes the device's live connection (`Broker.disconnect`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import re
import signal
import ssl
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.errors import ConfigError
from provisioning.ca import CertificateAuthority, renewal_time, utc_now
from provisioning.crl import write_crl
from provisioning.identity import DeviceIdentity
from provisioning.keys import (
    PRIVATE_MODE,
    new_private_key,
    private_key_pem,
    write_file_atomic,
    write_private_key,
)
from provisioning.tls import client_context

log = logging.getLogger(__name__)

TOPIC_ROOT = "edgefleet/v1"
CONTROL_PLANE_USER = "edgefleet-controlplane"
DEFAULT_PORT = 8883


def device_topic_root(device_id: str) -> str:
    return f"{TOPIC_ROOT}/devices/{device_id}"


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where each file of a broker directory lives."""

    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "broker.pem"

    @property
    def key(self) -> Path:
        return self.directory / "broker.key"

    @property
    def crl(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def client_cert(self) -> Path:
        """The control plane's own MQTT client certificate (CN edgefleet-controlplane)."""
        return self.directory / "controlplane.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "controlplane.key"

    @property
    def run_dir(self) -> Path:
        """Owned by the user Mosquitto runs as: it writes its pid file after dropping root."""
        return self.directory / "run"

    @property
    def pid(self) -> Path:
        return self.run_dir / "mosquitto.pid"


# A user name as useradd takes it (no spaces, no newlines: each is one mosquitto.conf token).
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def check_run_as(user: str) -> str:
    if not USER_NAME.fullmatch(user):
        raise ConfigError(
            f"--run-as {user!r} is not a user name (lower-case letters, digits, '_' and '-', "
            "starting with a letter or '_')"
        )
    return user


def check_bind(address: str) -> str:
    """An address to listen on, or "" for all of them."""
    if address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(
                f"--bind {address!r} is not an IP address; give e.g. 127.0.0.1 or ::, or leave "
                "it out to listen on all addresses"
            ) from None
    return address


def render_conf(
    files: BrokerFiles, *, port: int = DEFAULT_PORT, bind: str = "", run_as: str = "mosquitto"
) -> str:
    # Each value is a token of a line of its own: whitespace or a newline in one would add
    # directives (another listener, anonymous access) to the broker's config.
    check_run_as(run_as)
    check_bind(bind)
    for path in (files.pid, files.acl, files.ca, files.cert, files.key, files.crl):
        if any(c in str(path) for c in "\n\r\0"):
            raise ConfigError(f"broker directory {files.directory!s:.80} holds a line break")
    listener = f"listener {int(port)} {bind}".rstrip()
    return f"""\
# Written by `edgefleet broker-config`. Run: mosquitto -c {files.conf}
# The control plane rewrites {files.crl.name} and {files.acl.name} and sends SIGHUP on revocation.
user {run_as}
pid_file {files.pid}
per_listener_settings false
allow_anonymous false
acl_file {files.acl}

{listener}
protocol mqtt
cafile {files.ca}
certfile {files.cert}
keyfile {files.key}
crlfile {files.crl}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
"""


def render_acl(revoked_device_ids: Iterable[str]) -> str:
    lines = [
        "# Written by EdgeFleet and rewritten on every revocation: edits here are lost.",
        "# Every device: its own subtree only (%u is the certificate CN, the device id).",
        f"pattern readwrite {TOPIC_ROOT}/devices/%u/#",
        "",
        "# The control plane: the whole fleet namespace.",
        f"user {CONTROL_PLANE_USER}",
        f"topic readwrite {TOPIC_ROOT}/#",
    ]
    revoked = sorted(set(revoked_device_ids))
    if revoked:
        lines += ["", "# Revoked devices: nothing at all, even on connections opened before."]
        for device_id in revoked:
            lines += [f"user {device_id}", "topic deny #"]
    return "\n".join(lines) + "\n"


def write_broker_config(
    directory: Path,
    ca: CertificateAuthority,
    *,
    region: str,
    hostnames: Iterable[str],
    crl_pem: bytes,
    revoked_device_ids: Iterable[str],
    port: int = DEFAULT_PORT,
    bind: str = "",
    run_as: str = "mosquitto",
    now: datetime | None = None,
) -> BrokerFiles:
    """Write (or refresh) a complete broker directory; the broker's and the control plane's
    certificates are issued anew each time, so rerunning it renews them."""
    files = BrokerFiles(Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    now = now or utc_now()
    broker_key = new_private_key()
    broker_cert = ca.issue_server(
        broker_key.public_key(), region, hostnames, name="edgefleet-broker", now=now
    )
    client_key = new_private_key()
    client_cert = ca.issue_service_client(
        client_key.public_key(), CONTROL_PLANE_USER, region, now=now
    )
    pem = serialization.Encoding.PEM
    write_crl(files.crl, x509.load_pem_x509_crl(crl_pem), issuer=ca)  # first: it may be stale
    write_private_key(files.key, broker_key)
    write_file_atomic(files.cert, broker_cert.public_bytes(pem))
    write_private_key(files.client_key, client_key)
    write_file_atomic(files.client_cert, client_cert.public_bytes(pem))
    write_file_atomic(files.ca, ca.certificate_pem)
    write_file_atomic(files.acl, render_acl(revoked_device_ids).encode())
    write_file_atomic(files.conf, render_conf(files, port=port, bind=bind, run_as=run_as).encode())
    files.run_dir.mkdir(exist_ok=True)
    _give_to(run_as, files.key, files.run_dir)
    return files


def _give_to(user: str, *paths: Path) -> None:
    """Mosquitto drops root privileges before it reads its key and writes its pid file: hand
    those to the user it runs as (a no-op unless we are root)."""
    if os.geteuid() != 0 or user == "root":
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log.warning("user %s does not exist: Mosquitto cannot run as it", user)
        return
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


class Broker:
    """A running broker configured by `write_broker_config`: update its CRL/ACL, cut devices."""

    def __init__(
        self,
        directory: Path,
        ca: CertificateAuthority,
        *,
        pid_file: Path | None = None,
        url: str = "",
    ) -> None:
        self.files = BrokerFiles(Path(directory))
        self._ca = ca
        self._pid_file = Path(pid_file) if pid_file else self.files.pid
        self._url = url

    def apply(self, crl_pem: bytes, revoked_device_ids: Iterable[str]) -> bool:
        """Publish the CRL and ACL to the broker directory and make the broker reload them.

        Returns whether a running broker was signalled. Raises StaleCRL, and leaves both files
        as they are, when the directory already holds a newer CRL."""
        write_crl(self.files.crl, x509.load_pem_x509_crl(crl_pem), issuer=self._ca)
        write_file_atomic(self.files.acl, render_acl(revoked_device_ids).encode())
        return self.reload()

    def renew_certificates(self, region: str, now: datetime | None = None) -> bool:
        """Reissue the broker's certificate and the control plane's MQTT certificate at 2/3 of
        their lifetime (same names), then reload: Mosquitto 2.0 rereads them on SIGHUP.
        Returns whether anything was renewed."""
        now = now or utc_now()
        renewed = False
        broker_cert = _load_certificate(self.files.cert)
        if broker_cert is not None and now >= renewal_time(broker_cert):
            key = new_private_key()
            cert = self._ca.issue_server(
                key.public_key(), region, _host_names(broker_cert), name="edgefleet-broker", now=now
            )
            _replace_key_and_certificate(self.files.key, self.files.cert, key, cert)
            renewed = True
        client_cert = _load_certificate(self.files.client_cert)
        if client_cert is not None and now >= renewal_time(client_cert):
            key = new_private_key()
            cert = self._ca.issue_service_client(
                key.public_key(), CONTROL_PLANE_USER, region, now=now
            )
            _replace_key_and_certificate(self.files.client_key, self.files.client_cert, key, cert)
            renewed = True
        if renewed:
            log.info("broker certificates renewed", extra={"directory": str(self.files.directory)})
            self.reload()
        return renewed

    def reload(self) -> bool:
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            log.warning(
                "broker pid file %s is missing or unreadable: broker not reloaded", self._pid_file
            )
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            log.warning("broker pid %d from %s is not running: not reloaded", pid, self._pid_file)
            return False
        return True

    def disconnect(self, device: DeviceIdentity, timeout: float = 10.0) -> bool:
        """Close the device's live MQTT connection, if any, by taking over its session.

        Mosquitto 2.0 has no admin command to drop a client, but it closes an existing
        connection when another connects with the same client id. The broker sets the client id
        from the certificate CN, so the control plane connects once as the device with a
        certificate for that id valid for two minutes, whose key only lives in this call. The
        ACL already denies that id everything, so the takeover connection can do nothing else,
        and no control-plane endpoint admits it: its serial is not in the registry.
        """
        if not self._url:
            return False
        host, port = _host_port(self._url)
        import paho.mqtt.client as mqtt

        device_id = device.device_id
        key = new_private_key()
        cert = self._ca.issue_device(key.public_key(), device, lifetime=timedelta(minutes=2))
        connected = threading.Event()
        with tempfile.TemporaryDirectory(prefix="edgefleet-takeover-") as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            write_file_atomic(key_file, private_key_pem(key), PRIVATE_MODE)
            ctx = client_context(self._ca.certificate_pem, cert_file, key_file)
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
            )
            client.tls_set_context(ctx)
            client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else connected.set()
            try:
                client.connect(host, port, keepalive=10, clean_start=True)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "could not reach broker %s to disconnect %s: %s", self._url, device_id, exc
                )
                return False
            client.loop_start()
            try:
                ok = connected.wait(timeout)
            finally:
                client.disconnect()
                client.loop_stop()
        return ok


def _load_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _host_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName) + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def _replace_key_and_certificate(key_file: Path, cert_file: Path, key, cert) -> None:
    """Write a new key (keeping the old file's owner, e.g. mosquitto) and its certificate."""
    owner = key_file.stat() if key_file.exists() else None
    write_private_key(key_file, key)
    if owner is not None and os.geteuid() == 0:
        os.chown(key_file, owner.st_uid, owner.st_gid)
    write_file_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtts", "ssl") or not parts.hostname:
        raise ConfigError(f"broker url {url!r} must look like mqtts://host:port")
    return parts.hostname, parts.port or DEFAULT_PORT
