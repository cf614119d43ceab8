"""`edgefleet`: the operator and control-plane command line.

Each subcommand lives in its own module under `controlplane.commands` and exposes
`add_parser(subparsers)`, which registers the command and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from controlplane import __version__
from controlplane.commands import UserError

COMMANDS: list[str] = [
    "controlplane.commands.ca",
    "controlplane.commands.serve",
    "controlplane.commands.token",
    "controlplane.commands.device",
    "controlplane.commands.broker_config",
    "controlplane.commands.tuf",
    "controlplane.commands.model",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description="EdgeFleet operator CLI: run the control plane, enroll devices, "
        "publish models and roll them out.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
