"""Subcommands of `edgefleet`, one module each (see controlplane/cli.py)."""


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""
