"""`edgefleet-agent`: the device-side command line.

Each subcommand lives in its own module under `agent.commands` and exposes
`add_parser(subparsers)`, which registers the command and sets `func(args) -> int`.
Modules import their heavy dependencies inside `func`, so `--help` stays fast and
`serve` never pays for a runtime it does not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__
from agent.commands import UserError

COMMANDS = [
    "agent.commands.serve",
    "agent.commands.sample_models",
    "agent.commands.accelerators",
    "agent.commands.select",
    "agent.commands.install",
    "agent.commands.uninstall",
    "agent.commands.enroll",
    "agent.commands.apply",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="EdgeFleet agent: serve signed models on this node over KServe v2 "
        "(REST and gRPC) and keep the node in sync with the control plane.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
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
        print(f"edgefleet-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
