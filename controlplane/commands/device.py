"""`edgefleet device list|revoke`: the device registry from the command line."""

from __future__ import annotations

import argparse

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, open_plane


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("device", help="list and revoke devices")
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="list enrolled devices")
    add_config_argument(listing)
    listing.set_defaults(func=run_list)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a device: CRL updated, broker reloaded, live connections closed",
        description="Revoke every certificate of a device. The HTTPS and gRPC endpoints refuse "
        "it at once and a running server ends its streams; the CRL is republished; with a "
        "[broker] configured, Mosquitto's CRL and ACL are updated, it is reloaded (SIGHUP) and "
        "the device's live MQTT connection is closed.",
    )
    revoke.add_argument("device_id", metavar="ID")
    add_config_argument(revoke)
    revoke.set_defaults(func=run_revoke)


def run_list(args: argparse.Namespace) -> int:
    plane = open_plane(args)
    try:
        devices = plane.registry.list()
    finally:
        plane.close()
    print(f"{'ID':<22} {'REGION':<12} {'STATUS':<8} {'ENROLLED':<26} TAGS")
    for d in devices:
        tags = ",".join(f"{k}={v}" for k, v in d.tags.items())
        print(
            f"{d.device_id:<22} {d.region:<12} {d.status:<8} "
            f"{d.enrolled_at.isoformat(timespec='seconds'):<26} {tags}"
        )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from controlplane.errors import ControlPlaneError

    plane = open_plane(args)
    try:
        # NotPublished (committed, CRL or broker step failed) is one line like any other error.
        result = plane.revocation.revoke(args.device_id)
    except ControlPlaneError as exc:
        raise UserError(str(exc)) from None
    finally:
        plane.close()
    print(f"device {result.device_id} revoked ({len(result.serials)} certificate(s))")
    print(f"  CRL published: {plane.config.crl_path}")
    if plane.broker is None:
        print("  no [broker] configured: nothing to reload")
    else:
        print(f"  broker reloaded: {'yes' if result.broker_reloaded else 'NO (not running?)'}")
        print(f"  live MQTT connection closed: {'yes' if result.broker_disconnected else 'no'}")
    return 0
