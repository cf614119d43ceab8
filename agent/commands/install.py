"""`edgefleet-agent install`: enroll this node and install the agent as a systemd service."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.cli import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "install",
        help="enroll this node and install the agent as a hardened systemd service",
        description="Create the state directory, make this node's key pair (it never leaves "
        "the node), enroll with the token, write the config and a hardened systemd unit, and "
        "start the agent. Running it again is harmless: an enrolled node keeps its identity.",
    )
    parser.add_argument("--server", required=True, help="enrollment URL, e.g. https://cp:8443")
    parser.add_argument(
        "--token",
        default=os.environ.get("EDGEFLEET_TOKEN"),
        help="enrollment token from `edgefleet token create` (or $EDGEFLEET_TOKEN, which "
        "keeps it out of shell history)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install below this directory instead of / (image building, tests); "
        "creates no user and leaves systemd alone",
    )
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/edgefleet"))
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="device CA certificate, if not fetched from the server "
        "(it must still match the token's pin)",
    )
    parser.add_argument("--no-start", action="store_true", help="do not enable/start the service")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.identity import IdentityError
    from agent.install import InstallError, InstallPlan, Layout, install
    from provisioning.errors import ProvisioningError

    if not args.token:
        raise UserError("--token is required (or set EDGEFLEET_TOKEN)")
    if not args.state_dir.is_absolute():
        raise UserError("--state-dir must be an absolute path")
    plan = InstallPlan(
        server=args.server,
        token=args.token,
        layout=Layout(root=args.root, state_dir=args.state_dir),
        ca_file=args.ca_file,
        start=not args.no_start,
    )
    try:
        report = install(plan)
    except (IdentityError, InstallError, ProvisioningError, OSError) as exc:
        raise UserError(f"install failed: {exc}") from exc
    print(report.summary())
    return 0
