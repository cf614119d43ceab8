"""`edgefleet ca init`: create the device CA that every device and server certificate chains to."""

from __future__ import annotations

import argparse
import sqlite3

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, load


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ca", help="manage the device CA")
    sub = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init",
        help="create the device CA (EC P-256, key file 0600) in the state directory",
        description="Create the device CA in <state_dir>/ca. Run once per fleet: replacing "
        "the CA cuts off every enrolled device, so an existing CA is never overwritten.",
    )
    init.add_argument("--name", default="EdgeFleet device CA", help="CA common name")
    add_config_argument(init)
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    from controlplane.storage import open_database
    from provisioning.ca import CertificateAuthority
    from provisioning.errors import ProvisioningError
    from provisioning.tokens import ca_pin

    config = load(args)
    try:
        ca = CertificateAuthority.create(config.ca_dir, args.name, lifetimes=config.lifetimes)
        open_database(config.database_path).close()
    except ProvisioningError as exc:
        raise UserError(str(exc)) from exc
    except (OSError, sqlite3.Error) as exc:  # e.g. a state_dir that is a regular file
        raise UserError(f"cannot create the CA in {config.ca_dir}: {exc}") from None
    print(f"device CA created in {config.ca_dir}")
    print(f"  certificate: {config.ca_dir / ca.CERT_FILE}")
    print(f"  key:         {config.ca_dir / ca.KEY_FILE} (mode 0600; back it up offline)")
    print(f"  pin:         {ca_pin(ca.certificate)}")
    print("next: edgefleet serve   (then: edgefleet token create --region REGION)")
    return 0
