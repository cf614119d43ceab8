"""`edgefleet-agent apply DESIRED.toml`: install the model versions a desired-state file names.

Runs the update lifecycle (agent.update) once: recover from any interrupted run, then for each
model download, verify (TUF + publisher signature), select, self-test and activate its version
in the serving repository, then tell the running agent to reload it. With a [health] table the
new versions are watched and rolled back if they misbehave. The control-plane connection comes
from the node's enrollment (identity directory) unless flags say otherwise.

Exit status: 0 every model is at its version, 1 a model failed or was rolled back,
75 (EX_TEMPFAIL) an update is paused for a reason that may pass (network): run again.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path

from agent.commands.accelerators import add_profile_arguments

EX_TEMPFAIL = 75


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="install the model versions a desired-state file names (verified, crash-safe)",
        description="Bring this node to a desired state: each model version is downloaded "
        "(resumably) from the control plane, verified with TUF and the publisher's signature, "
        "unpacked safely, measured by accelerator selection, self-tested on its golden vectors "
        "and switched in atomically, keeping the previous version for rollback. Every step is "
        "journaled: after a crash, running apply again resumes where it stopped.",
    )
    p.add_argument("desired", type=Path, metavar="DESIRED.toml", help="desired-state file")
    p.add_argument("--config", type=Path, metavar="FILE", help="agent config (TOML)")
    p.add_argument("--state-dir", type=Path, help="agent state directory (default: the config's)")
    p.add_argument("--models", type=Path, help="serving model repository (default: the config's)")
    p.add_argument("--server", help="control-plane device URL (default: from the enrollment)")
    p.add_argument("--ca", type=Path, help="device CA certificate (default: from the enrollment)")
    p.add_argument("--cert", type=Path, help="device certificate (default: the enrolled one)")
    p.add_argument("--key", type=Path, help="device private key (default: the enrolled one)")
    p.add_argument("--region", help="this node's region (default: from its certificate)")
    p.add_argument(
        "--root",
        type=Path,
        metavar="ROOT.json",
        help="pin this TUF root first (once; enrollment normally does it)",
    )
    p.add_argument(
        "--agent",
        metavar="URL",
        help="running agent to reload: http://HOST:PORT or unix:PATH, 'off' for none "
        "(default: the config's serving socket, else its REST address)",
    )
    p.add_argument(
        "--retry-rolled-back",
        action="store_true",
        help="install a version even though it was rolled back on this node before",
    )
    add_profile_arguments(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli import UserError
    from agent.config import SettingsError, load_config
    from agent.identity import IdentityError
    from agent.update import (
        FAILED_STATES,
        Checkpoints,
        DesiredState,
        DesiredStateError,
        UpdateBusy,
        UpdateError,
        UpdateSettings,
        apply,
        pin_root,
    )
    from agent.update.layout import Layout
    from provisioning.logs import configure_logging

    configure_logging(args.log_level)
    try:
        desired = DesiredState.load(args.desired)
    except DesiredStateError as exc:
        raise UserError(str(exc)) from None
    try:
        config = load_config(args.config)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    if args.state_dir is not None:
        config = replace(config, state_dir=args.state_dir)
    state_dir = config.state_dir
    models_dir = args.models or config.models_dir
    try:
        connection = _connection(args, state_dir)
    except IdentityError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot read the device identity: {exc}") from None
    settings = UpdateSettings(
        state_dir=state_dir,
        models_dir=models_dir,
        server_url=connection["server"],
        ssl_context=connection["ssl_context"],
        region=connection["region"],
        profile=args.profile,
        agent_url=_agent_url(args.agent, config),
    )
    if args.root is not None:
        try:
            root_bytes = args.root.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {args.root}: {exc.strerror}") from None
        try:
            pin_root(Layout(settings.update_dir, models_dir).tuf, root_bytes)
        except UpdateError as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"cannot use the state directory {state_dir}: {exc}") from None
    try:
        outcomes = apply(
            desired,
            settings,
            checkpoints=Checkpoints.from_environment(),
            retry_rolled_back=args.retry_rolled_back,
        )
    except UpdateBusy as exc:
        raise UserError(str(exc)) from None
    except UpdateError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot use the state directory {state_dir}: {exc}") from None
    except sqlite3.Error as exc:
        raise UserError(
            f"cannot use the update journal {settings.database}: {exc}; if it is damaged, move "
            "it aside (the next run starts a new one)"
        ) from None
    for outcome in outcomes:
        steps = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in outcome.timings.items())
        line = f"{outcome.model}@{outcome.version}: {outcome.state}"
        print(f"{line}  {outcome.reason}".rstrip() + (f"  [{steps}]" if steps else ""))
    sys.stdout.flush()
    if any(o.state in FAILED_STATES for o in outcomes):
        return 1
    if any(o.state == "PENDING" for o in outcomes):
        return EX_TEMPFAIL
    return 0


def _agent_url(flag: str | None, config) -> str | None:
    """The running agent: the flag, else where the config says `serve` listens."""
    if flag is not None:
        return None if flag == "off" else flag
    if config.socket is not None:
        return f"unix:{config.socket}"
    if config.http and config.http != "off":
        return f"http://{config.http}"
    return None


def _connection(args: argparse.Namespace, state_dir: Path) -> dict:
    """Server URL, TLS files and region: flags first, else the node's enrollment."""
    from agent.cli import UserError
    from agent.identity import IdentityStore
    from provisioning.tls import client_context

    store = IdentityStore(state_dir / "identity")
    server = args.server or _enrolled_server(store)
    if not server:
        raise UserError("no --server given and this node is not enrolled (edgefleet-agent install)")
    if args.cert and args.key and args.ca:
        ca, cert, key = args.ca, args.cert, args.key
    elif (credentials := store.current()) is not None:
        ca, cert, key = credentials.ca_file, credentials.cert_file, credentials.key_file
    else:
        raise UserError(
            "no device certificate: enroll the node (edgefleet-agent install) or pass "
            "--ca, --cert and --key"
        )
    for path in (ca, cert, key):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    region = args.region or _region_of(cert)
    if not region:
        raise UserError(f"{cert} names no region; pass --region")
    return {
        "server": server,
        "region": region,
        "ssl_context": lambda: client_context(ca_file=ca, cert_file=cert, key_file=key),
    }


def _enrolled_server(store) -> str | None:
    """The device URL the node was enrolled with; None if it was not enrolled."""
    from agent.identity import IdentityError

    if not store.enrollment_file.exists():
        return None
    enrollment = store.enrollment()
    endpoints = enrollment.get("endpoints") if isinstance(enrollment, dict) else None
    url = endpoints.get("device_url") if isinstance(endpoints, dict) else None
    if not isinstance(url, str) or not url:
        raise IdentityError(
            f"{store.enrollment_file} names no device URL (endpoints.device_url); pass --server "
            "or re-enroll: edgefleet-agent enroll --token TOKEN"
        )
    return url


def _region_of(cert_file: Path) -> str | None:
    """The region the device CA wrote into the certificate (packages may be region-bound)."""
    from cryptography import x509

    from provisioning.identity import region_of

    try:
        return region_of(x509.load_pem_x509_certificate(Path(cert_file).read_bytes()))
    except ValueError:
        return None
