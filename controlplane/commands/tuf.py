"""`edgefleet tuf init|status|refresh|root`: the TUF repository that keeps model updates fresh.

edgefleet tuf init --root-keys /media/offline/edgefleet-root [--keys 3 --threshold 2]
edgefleet tuf status
edgefleet tuf refresh        re-sign metadata that is due (the server does this by itself)
edgefleet tuf root > root.json     what nodes pin when they enroll
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, load, open_tuf_repository


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tuf", help="the TUF repository of model artifacts")
    sub = parser.add_subparsers(dest="tuf_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="create the repository: offline root keys, online keys, first metadata",
        description="Create the TUF repository under STATE_DIR/tuf. The root keys (a threshold "
        "of them signs root metadata and the publisher list) go to --root-keys, a directory "
        "to move offline afterwards; the online targets, snapshot and timestamp keys stay in "
        "the repository so the control plane can sign new targets and keep metadata fresh.",
    )
    init.add_argument("--root-keys", type=Path, required=True, metavar="DIR")
    init.add_argument("--keys", type=int, default=3, help="number of root keys (default 3)")
    init.add_argument("--threshold", type=int, default=2, help="root signatures needed (2)")
    add_config_argument(init)
    init.set_defaults(func=run_init)

    status = sub.add_parser("status", help="versions and expiry of each role")
    add_config_argument(status)
    status.set_defaults(func=run_status)

    refresh = sub.add_parser("refresh", help="re-sign metadata that is due")
    refresh.add_argument("--force", action="store_true", help="re-sign everything online now")
    add_config_argument(refresh)
    refresh.set_defaults(func=run_refresh)

    root = sub.add_parser("root", help="print the current root metadata (what nodes pin)")
    add_config_argument(root)
    root.set_defaults(func=run_root)


def run_init(args: argparse.Namespace) -> int:
    from controlplane.tuf_repository import TufRepository, TufRepositoryError

    config = load(args)
    try:
        repository = TufRepository.create(
            config.state_dir / "tuf", args.root_keys, root_keys=args.keys, threshold=args.threshold
        )
    except TufRepositoryError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # the root-key directory or the state directory cannot be made
        raise UserError(f"cannot create the TUF repository: {exc}") from None
    root = repository.root().signed.roles["root"]
    print(f"TUF repository created in {repository.directory}")
    print(f"root: {len(root.keyids)} keys in {args.root_keys}, {root.threshold} must sign")
    print(f"Move {args.root_keys} offline; it is needed to register publishers and rotate keys.")
    return 0


def run_status(args: argparse.Namespace) -> int:
    repository = open_tuf_repository(args)
    roles = {
        "root": repository.root().signed,
        "targets": repository.targets().signed,
        "snapshot": repository.snapshot().signed,
        "timestamp": repository.timestamp().signed,
    }
    for name, signed in roles.items():
        print(f"{name:<10} version {signed.version:<6} expires {signed.expires:%Y-%m-%d %H:%M} UTC")
    print(f"targets: {len(roles['targets'].targets)}")
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    roles = open_tuf_repository(args).refresh(force=args.force)
    print(f"re-signed: {', '.join(roles)}" if roles else "nothing was due")
    return 0


def run_root(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(open_tuf_repository(args).root_bytes())
    return 0
