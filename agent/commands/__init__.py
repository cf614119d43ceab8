"""Subcommands of `edgefleet-agent`, one module each (see agent/cli.py)."""

import argparse
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); printed without a traceback."""

    exit_code = 1


class UsageError(UserError):
    """Flags that together ask for nothing to do; exit 2, as argparse's own usage errors."""

    exit_code = 2


def path_arg(value: str) -> Path:
    """argparse type of a path argument: an empty one would quietly mean the current directory
    (Path("") is Path("."))."""
    if not value:
        raise argparse.ArgumentTypeError("empty path; give a path ('.' for this directory)")
    return Path(value)
