"""What the `edgefleet` subcommands share: the --config flag and opening the control plane."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from controlplane.cli import UserError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="control-plane TOML config (default: $EDGEFLEET_CONFIG, else built-in defaults; "
        "EDGEFLEET_* variables override either)",
    )


def load(args: argparse.Namespace):
    from controlplane.config import load_config
    from controlplane.errors import ControlPlaneError

    try:
        return load_config(args.config)
    except ControlPlaneError as exc:
        raise UserError(str(exc)) from exc


def open_plane(args: argparse.Namespace):
    """The control plane named by --config, or a UserError saying what to fix."""
    from controlplane.errors import ControlPlaneError
    from controlplane.service import ControlPlane
    from provisioning.errors import ProvisioningError

    config = load(args)
    try:
        return ControlPlane.open(config)
    except (ControlPlaneError, ProvisioningError) as exc:
        raise UserError(str(exc)) from exc
    except sqlite3.Error as exc:
        raise UserError(f"cannot open the database {config.database_path}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot open the control plane's state: {exc}") from exc


def open_tuf_repository(args: argparse.Namespace):
    """The model repository (TUF) of the control plane named by --config."""
    from controlplane.tuf_repository import TufRepository, TufRepositoryError

    config = load(args)
    try:
        return TufRepository(config.state_dir / "tuf")
    except TufRepositoryError as exc:
        raise UserError(str(exc)) from None


def record_audit(args: argparse.Namespace, event: str, **fields: str | None) -> None:
    """Append to the audit log of the control plane named by --config, for commands that change
    what the fleet trusts without opening the whole control plane (model push, publishers).
    The change is made already: a log that cannot be written is a warning, not an error."""
    from controlplane.audit import AuditLog
    from controlplane.storage import open_database

    config = load(args)
    try:
        db = open_database(config.database_path)
    except (sqlite3.Error, OSError) as exc:
        print(
            f"edgefleet: warning: not recorded in the audit log {config.database_path}: {exc}",
            file=sys.stderr,
        )
        return
    try:
        AuditLog(db).record(event, **fields)
    finally:
        db.close()
