"""`edgefleet-agent uninstall`: stop and remove the agent service, config and state."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.cli import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "uninstall",
        help="stop and remove the agent (service, config, state and device key)",
        description="Stop and disable the service and remove its unit, its config and the "
        "state directory, including this node's private key. To take the device out of the "
        "fleet for good, also revoke it: edgefleet device revoke ID.",
    )
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="default: from the installed config"
    )
    parser.add_argument(
        "--keep-state", action="store_true", help="keep the state directory (models, identity)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.install import STATE_DIR, InstallError, Layout, installed_config, uninstall

    try:
        state_dir = args.state_dir or Path(
            installed_config(Layout(root=args.root)).get("state_dir", STATE_DIR)
        )
        removed = uninstall(Layout(root=args.root, state_dir=state_dir), keep_state=args.keep_state)
    except (InstallError, OSError) as exc:
        raise UserError(f"uninstall failed: {exc}") from exc
    if not removed:
        print("nothing to remove: the agent is not installed here")
    for path in removed:
        print(f"removed {path}")
    return 0
