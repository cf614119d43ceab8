"""Subcommands of `edgefleet-agent`, one module each (see agent/cli.py)."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); printed without a traceback."""
