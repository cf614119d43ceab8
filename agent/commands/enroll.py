"""`edgefleet-agent enroll`: (re-)enroll an installed node, e.g. after its certificate expired.

The recovery path for a node that was offline past its certificate's expiry: an operator runs
`edgefleet token create --device ID`, and on the node `edgefleet-agent enroll --token T` gets a
new certificate for the same device id, region and tags.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.cli import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "enroll",
        help="enroll again with a (re-enrollment) token, keeping the installation",
        description="Get a new certificate with a token, e.g. a re-enrollment token from "
        "`edgefleet token create --device ID` for a node whose certificate expired offline. "
        "The server comes from the installed config unless --server is given.",
    )
    parser.add_argument("--token", default=os.environ.get("EDGEFLEET_TOKEN"))
    parser.add_argument("--server", help="enrollment URL (default: from the config)")
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from agent.identity import IdentityError, IdentityStore, enroll
    from agent.install import SERVICE, InstallError, Layout, hand_state_to_service, installed_config
    from provisioning.errors import ProvisioningError

    if not args.token:
        raise UserError("--token is required (or set EDGEFLEET_TOKEN)")
    if args.state_dir is not None and not args.state_dir.is_absolute():
        raise UserError("--state-dir must be an absolute path")
    layout = Layout(root=args.root)
    try:
        config = installed_config(layout)
    except InstallError as exc:
        raise UserError(str(exc)) from exc
    server = args.server or config.get("control_plane", {}).get("url")
    if not server:
        raise UserError("no --server given and no installed config names one")
    state_dir = args.state_dir or Path(config.get("state_dir", layout.state_dir))
    layout = Layout(root=args.root, state_dir=state_dir)
    store = IdentityStore(layout.on_disk(layout.identity_dir))
    try:
        credentials = asyncio.run(enroll(server, args.token, store))
    except (IdentityError, ProvisioningError, OSError) as exc:
        raise UserError(f"enrollment failed: {exc}") from exc
    hand_state_to_service(layout)
    identity = credentials.identity
    print(
        f"enrolled as device {identity.device_id} (region {identity.region}); certificate "
        f"{credentials.serial} valid until "
        f"{credentials.certificate.not_valid_after_utc.isoformat(timespec='seconds')}"
    )
    print(f"restart the agent to use it: systemctl restart {SERVICE}")
    return 0
