"""Installing the agent on a node: state dir, enrollment, config, hardened systemd unit.

`install` is safe to run again: an enrolled node keeps its identity (a single-use token is not
spent twice), and files whose content is unchanged are left alone. With `root` other than `/`,
everything is written below that directory as it would be on the node (paths inside the files
are the node's paths), and no user is created and systemd is not touched: that is how images
are prepared and how the tests run it.

    report = install(InstallPlan(server="https://cp:8443", token=token))
    print(report.summary())
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from agent.identity import IdentityStore, enroll
from agent.identity.enroll import check_server_url
from provisioning.ca import utc_now
from provisioning.keys import write_file_atomic

SERVICE = "edgefleet-agent"
SERVICE_USER = "edgefleet"
CONFIG_PATH = Path("/etc/edgefleet/agent.toml")
STATE_DIR = Path("/var/lib/edgefleet")
UNIT_PATH = Path(f"/etc/systemd/system/{SERVICE}.service")


class InstallError(Exception):
    """A step of installing the service failed (systemctl, useradd)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the agent's files go on the node, and where they are written (`root`)."""

    root: Path = Path("/")
    state_dir: Path = STATE_DIR
    config_path: Path = CONFIG_PATH
    unit_path: Path = UNIT_PATH

    @property
    def identity_dir(self) -> Path:
        return self.state_dir / "identity"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    def on_disk(self, path: Path) -> Path:
        """`path` as seen from this process: below `root` when installing into a directory."""
        return Path(self.root) / Path(path).relative_to("/")

    @property
    def is_live_system(self) -> bool:
        return Path(self.root).resolve() == Path("/")


@dataclass(frozen=True, slots=True)
class InstallPlan:
    server: str
    token: str
    layout: Layout = field(default_factory=Layout)
    ca_file: Path | None = None
    start: bool = True
    exec_start: tuple[str, ...] = ()


@dataclass
class InstallReport:
    device_id: str
    region: str
    enrolled_now: bool
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    started: bool = False
    next_steps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = "enrolled" if self.enrolled_now else "already enrolled"
        lines = [f"{how} as device {self.device_id} (region {self.region})"]
        lines += [f"  wrote     {p}" for p in self.written]
        lines += [f"  unchanged {p}" for p in self.unchanged]
        if self.next_steps:
            lines.append("next steps:")
            lines += [f"  {step}" for step in self.next_steps]
        return "\n".join(lines)


def default_exec_start() -> tuple[str, ...]:
    """The command systemd runs: this installation's `edgefleet-agent`, else `python -m`."""
    beside = Path(sys.executable).parent / SERVICE
    found = beside if beside.exists() else shutil.which(SERVICE)
    if found:
        return (str(found),)
    return (sys.executable, "-m", "agent.cli")


UNIT_UNSAFE = frozenset(" \t\"'\\%")  # see install(): characters a unit line reads otherwise


def render_unit(layout: Layout, exec_start: tuple[str, ...]) -> str:
    command = shlex.join((*exec_start, "serve", "--models", str(layout.models_dir)))
    return f"""\
# Written by `edgefleet-agent install`; `edgefleet-agent uninstall` removes it.
[Unit]
Description=EdgeFleet agent: serves models on this node and syncs with the control plane
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User={SERVICE_USER}
Group={SERVICE_USER}
Environment=EDGEFLEET_CONFIG={layout.config_path}
ExecStart={command}
Restart=on-failure
RestartSec=5s
UMask=0077
ProtectSystem=strict
ReadWritePaths={layout.state_dir}
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# Accelerators live in /dev (GPUs, NPUs): no PrivateDevices, no DevicePolicy=closed.

[Install]
WantedBy=multi-user.target
"""


def render_config(layout: Layout, server: str, device_id: str, region: str) -> str:
    return f"""\
# EdgeFleet agent configuration, written by `edgefleet-agent install`.
# Any setting can be overridden by an EDGEFLEET_* environment variable.
# This node is device {device_id} of region {region}; its key and certificate are in
# {layout.identity_dir} (renewed automatically, see docs/identity.md).
state_dir = {toml_string(str(layout.state_dir))}

[control_plane]
# Enrollment endpoint; the device and gRPC endpoints come with the certificate.
url = {toml_string(server)}
"""


def toml_string(value: str) -> str:
    """`value` as a TOML basic string: JSON's escapes are TOML's too, and DEL is the one
    control character that JSON leaves as it is."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def installed_config(layout: Layout) -> dict:
    """The config an earlier install wrote under `layout.root`, or {} if there is none."""
    path = layout.on_disk(layout.config_path)
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise InstallError(f"cannot read {path}: {exc}") from exc
    # The settings that install wrote, checked here so that every command can use them as such.
    state_dir = config.get("state_dir", str(STATE_DIR))
    if not (
        isinstance(state_dir, str) and state_dir.isprintable() and Path(state_dir).is_absolute()
    ):
        raise InstallError(
            f"{path}: state_dir must be an absolute path, not {state_dir!r}; fix the file or "
            "pass --state-dir"
        )
    control_plane = config.get("control_plane", {})
    if not isinstance(control_plane, dict) or not isinstance(control_plane.get("url", ""), str):
        raise InstallError(
            f'{path}: [control_plane] must be a table with url = "https://..."; fix the file '
            "or pass --server"
        )
    return config


def install(plan: InstallPlan) -> InstallReport:
    layout = plan.layout
    text = str(layout.state_dir)
    if not text.isprintable() or any(c in UNIT_UNSAFE for c in text):
        # It goes into the config and the systemd unit, where a newline starts a new setting,
        # a space splits ReadWritePaths= in two and `%` is a specifier.
        raise InstallError(
            f"the state dir {text!r} has control characters, spaces, quotes, backslashes or "
            "'%', which a systemd unit would read otherwise; choose another"
        )
    state_dir = layout.on_disk(layout.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o750)
    layout.on_disk(layout.models_dir).mkdir(mode=0o750, exist_ok=True)
    store = IdentityStore(layout.on_disk(layout.identity_dir))

    current = store.current()
    enrolled_now = False
    if current is None or current.certificate.not_valid_after_utc <= utc_now():
        current = asyncio.run(enroll(plan.server, plan.token, store, ca_file=plan.ca_file))
        enrolled_now = True
    identity = current.identity
    recorded = store.enrollment().get("server_url")
    server = (
        check_server_url(recorded, f"the server_url in {store.enrollment_file}")
        if recorded
        else check_server_url(plan.server)
    )

    report = InstallReport(identity.device_id, identity.region, enrolled_now)
    exec_start = plan.exec_start or default_exec_start()
    files = {
        layout.config_path: render_config(layout, server, identity.device_id, identity.region),
        layout.unit_path: render_unit(layout, exec_start),
    }
    for path, content in files.items():
        target = layout.on_disk(path)
        if target.exists() and target.read_bytes() == content.encode():
            report.unchanged.append(target)
        else:
            write_file_atomic(target, content.encode(), 0o644)
            report.written.append(target)

    if layout.is_live_system and os.geteuid() == 0:
        _ensure_user(state_dir)
        if plan.start and _systemd_running():
            _systemctl("daemon-reload")
            _systemctl("enable", "--now", SERVICE)
            report.started = True
    report.next_steps = _next_steps(layout, report)
    return report


def uninstall(layout: Layout, *, keep_state: bool = False) -> list[Path]:
    """Stop and remove the service, its config and (unless `keep_state`) its state and key."""
    if layout.is_live_system and os.geteuid() == 0 and _systemd_running():
        _systemctl("disable", "--now", SERVICE, check=False)
    removed = []
    for path in (layout.unit_path, layout.config_path):
        target = layout.on_disk(path)
        if target.exists():
            target.unlink()
            removed.append(target)
    config_dir = layout.on_disk(layout.config_path.parent)
    if config_dir.is_dir() and not any(config_dir.iterdir()):
        config_dir.rmdir()
    state_dir = layout.on_disk(layout.state_dir)
    if not keep_state and state_dir.exists():
        shutil.rmtree(state_dir)
        removed.append(state_dir)
    if layout.is_live_system and os.geteuid() == 0 and _systemd_running():
        _systemctl("daemon-reload", check=False)
    return removed


def _next_steps(layout: Layout, report: InstallReport) -> list[str]:
    if report.started:
        return [
            f"systemctl status {SERVICE}      # the agent is running",
            f"journalctl -u {SERVICE} -f      # its logs (JSON lines)",
        ]
    if layout.is_live_system:
        return [
            f"systemctl daemon-reload && systemctl enable --now {SERVICE}",
            f"journalctl -u {SERVICE} -f",
        ]
    return [
        f"files are under {layout.root}; copy them to the node's / (paths inside are the node's)",
        f"on the node: useradd --system --home-dir {layout.state_dir} --shell /usr/sbin/nologin "
        f"{SERVICE_USER} && chown -R {SERVICE_USER}: {layout.state_dir}",
        f"on the node: systemctl daemon-reload && systemctl enable --now {SERVICE}",
    ]


def _ensure_user(state_dir: Path) -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--home-dir", str(state_dir),
             "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
        )  # fmt: skip
    hand_state_to_service(Layout(state_dir=state_dir))


def hand_state_to_service(layout: Layout) -> None:
    """On a live system, make the state dir (key included) the service user's, as the unit
    runs as that user. A no-op below another root, when not root, or without the user."""
    if not layout.is_live_system or os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return
    for directory, dirs, names in os.walk(layout.state_dir):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        for name in dirs + names:
            os.chown(
                os.path.join(directory, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False
            )


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(*args: str, check: bool = True) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise InstallError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")
