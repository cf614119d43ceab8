"""Control-plane settings: a TOML file, overridden by `EDGEFLEET_*` environment variables.

Every default works on a laptop: state under `~/.local/state/edgefleet-controlplane`, endpoints on
127.0.0.1, region `local`. A file looks like

    state_dir = "/var/lib/edgefleet-controlplane"
    region = "ae"

    [server]
    bind_host = "0.0.0.0"
    public_hosts = ["cp.ae.example.com"]   # names devices use; they go into the server certificate

    [certificates]
    device_days = 30

    [broker]                                # optional: the Mosquitto that `broker-config` set up
    dir = "/etc/mosquitto/edgefleet"
    pid_file = "/run/mosquitto/mosquitto.pid"
    url = "mqtts://cp.ae.example.com:8883"

and each setting can be overridden by the environment variable named after its field:
`EDGEFLEET_REGION=eu`, `EDGEFLEET_ENROLL_PORT=9443`, `EDGEFLEET_PUBLIC_HOSTS=a.example,b.example`.
`EDGEFLEET_CONFIG` names the file when `--config` is not given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from controlplane.errors import ConfigError
from provisioning.ca import Lifetimes, server_host
from provisioning.errors import ProvisioningError
from provisioning.identity import check_name
from provisioning.settings import SettingsError, load_settings, state_home

# Request bodies are bounded (aiohttp takes 0 as "no limit"): small JSON documents only.
MIN_REQUEST_BYTES = 4096
MAX_REQUEST_BYTES = 16 << 20


def _default_state_dir() -> Path:
    # apart from the agent's (~/.local/state/edgefleet): one laptop may run both
    return state_home() / "edgefleet-controlplane"


@dataclass(frozen=True)
class ControlPlaneConfig:
    state_dir: Path = field(default_factory=_default_state_dir, metadata={"toml": "state_dir"})
    # The region this control-plane instance serves; its server certificates carry it.
    region: str = field(default="local", metadata={"toml": "region"})
    bind_host: str = field(default="127.0.0.1", metadata={"toml": "server.bind_host"})
    # Host names / addresses devices use to reach this instance; the first goes into URLs.
    public_hosts: tuple[str, ...] = field(
        default=("localhost", "127.0.0.1"), metadata={"toml": "server.public_hosts"}
    )
    enroll_port: int = field(default=8443, metadata={"toml": "server.enroll_port"})
    device_port: int = field(default=8444, metadata={"toml": "server.device_port"})
    grpc_port: int = field(default=8445, metadata={"toml": "server.grpc_port"})
    max_request_bytes: int = field(default=64 * 1024, metadata={"toml": "server.max_request_bytes"})
    # How often a running server looks for revocations made by another process (the CLI).
    revocation_poll_seconds: float = field(
        default=2.0, metadata={"toml": "server.revocation_poll_seconds"}
    )
    device_cert_days: int = field(default=30, metadata={"toml": "certificates.device_days"})
    server_cert_days: int = field(default=90, metadata={"toml": "certificates.server_days"})
    clock_skew_seconds: int = field(
        default=3600, metadata={"toml": "certificates.clock_skew_seconds"}
    )
    # A device gets at most one certificate per this many seconds (its agent renews at 2/3 of
    # the lifetime): a device, or a thief of its key, renewing in a loop gets 429 meanwhile.
    renewal_interval_seconds: int = field(
        default=3600, metadata={"toml": "certificates.renewal_interval_seconds"}
    )
    # Mosquitto refuses every client once the CRL's nextUpdate passes; the server republishes at
    # half of this, so the broker keeps working at least crl_days/2 with the control plane down.
    crl_days: int = field(default=30, metadata={"toml": "certificates.crl_days"})
    broker_dir: Path | None = field(default=None, metadata={"toml": "broker.dir"})
    broker_pid_file: Path | None = field(default=None, metadata={"toml": "broker.pid_file"})
    broker_url: str = field(default="", metadata={"toml": "broker.url"})

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "controlplane.db"

    @property
    def server_dir(self) -> Path:
        return self.state_dir / "server"

    @property
    def crl_path(self) -> Path:
        return self.state_dir / "crl.pem"

    @property
    def public_host(self) -> str:
        return self.public_hosts[0]

    @property
    def lifetimes(self) -> Lifetimes:
        return Lifetimes(
            device=timedelta(days=self.device_cert_days),
            server=timedelta(days=self.server_cert_days),
            clock_skew=timedelta(seconds=self.clock_skew_seconds),
        )

    @property
    def crl_lifetime(self) -> timedelta:
        return timedelta(days=self.crl_days)


def load_config(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> ControlPlaneConfig:
    """Defaults, then the TOML file (`path`, else `$EDGEFLEET_CONFIG`), then the environment."""
    try:
        config = load_settings(ControlPlaneConfig, path, env)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    _check(config)
    return config


def _check(config: ControlPlaneConfig) -> None:
    try:
        check_name("region", config.region)
    except ProvisioningError as exc:
        raise ConfigError(f"config: {exc}") from exc
    if not config.public_hosts:
        raise ConfigError("config: public_hosts needs at least one host name or address")
    for host in config.public_hosts:
        if not isinstance(host, str):
            raise ConfigError(
                f"config: public_hosts must be a list of host names or addresses, not {host!r}"
            )
        try:
            server_host(host)
        except ProvisioningError as exc:
            raise ConfigError(f"config: public_hosts: {exc}") from exc
    _check_bind_host(config.bind_host)
    for name in ("enroll_port", "device_port", "grpc_port"):
        port = getattr(config, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"config: {name} {port} is not a TCP port")
    ca_days = Lifetimes().ca.days
    for name in ("device_cert_days", "server_cert_days", "crl_days"):
        days = getattr(config, name)
        if not 1 <= days <= ca_days:  # nothing the CA signs may outlive it
            raise ConfigError(f"config: {name} {days} must be 1 to {ca_days} (the CA's lifetime)")
    if not 0 <= config.clock_skew_seconds <= 86400:
        raise ConfigError("config: clock_skew_seconds must be 0 to 86400 (a day)")
    if not MIN_REQUEST_BYTES <= config.max_request_bytes <= MAX_REQUEST_BYTES:
        raise ConfigError(
            f"config: max_request_bytes {config.max_request_bytes} must be "
            f"{MIN_REQUEST_BYTES} to {MAX_REQUEST_BYTES} (an enrollment request is ~2 KB)"
        )
    if not 0 <= config.renewal_interval_seconds < config.device_cert_days * 86400 / 3:
        raise ConfigError(
            "config: renewal_interval_seconds must be at least 0 and under a third of "
            "device_days (devices renew at two thirds of their certificate's lifetime)"
        )
    if config.broker_url:
        _check_broker_url(config.broker_url)
    if (
        config.broker_dir is not None
        and config.broker_dir.exists()
        and not config.broker_dir.is_dir()
    ):
        raise ConfigError(
            f"config: broker dir {config.broker_dir} is not a directory; name the directory "
            "`edgefleet broker-config` wrote"
        )
    if not 0 < config.revocation_poll_seconds <= 3600:  # also refuses nan
        raise ConfigError("config: revocation_poll_seconds must be over 0 and at most 3600")


def _check_bind_host(host: str) -> None:
    """An IP address to listen on, or a host name that resolves to one (`localhost`)."""
    if not isinstance(host, str):
        raise ConfigError(f"config: bind_host must be an address such as 0.0.0.0, not {host!r}")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    numeric = all(label.isdigit() for label in labels)
    try:
        server_host(host)
    except ProvisioningError:
        numeric = True
    if numeric or host.startswith("*"):
        raise ConfigError(
            f"config: bind_host {host!r} is not an address to listen on; give an IP address "
            "such as 0.0.0.0, 127.0.0.1 or ::"
        )


def _check_broker_url(url: str) -> None:
    usage = f"config: broker url {url!r} must be mqtts://HOST:PORT"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{usage} (port 1 to 65535)") from None
    if parts.scheme != "mqtts" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(usage)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{usage} (port 1 to 65535)")
    try:
        server_host(parts.hostname)
    except ProvisioningError as exc:
        raise ConfigError(f"{usage}: {exc}") from exc
