"""`edgefleet broker-config DIR`: write a Mosquitto config, ACL and certificates for the fleet."""

from __future__ import annotations

import argparse
from pathlib import Path

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, open_plane


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "broker-config",
        help="write a Mosquitto config for the fleet (mTLS, CRL, per-device ACL)",
        description="Write DIR/mosquitto.conf, the ACL, the broker's certificate and key, the "
        "CA, the CRL, and the control plane's own MQTT client certificate. Rerun it to renew "
        "the certificates. Then run: mosquitto -c DIR/mosquitto.conf, and set [broker] dir "
        "(and url) in the control plane's config so revocations reach the broker.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--port", type=int, default=8883, help="MQTT over TLS port (8883)")
    parser.add_argument("--bind", default="", help="listen address (default: all)")
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or address devices use for the broker (repeatable; default: the "
        "control plane's public hosts)",
    )
    parser.add_argument(
        "--run-as",
        default="mosquitto",
        metavar="USER",
        help="user Mosquitto drops to; its key is made readable by that user (default mosquitto)",
    )
    add_config_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from controlplane.broker import Broker, check_bind, check_run_as, write_broker_config
    from controlplane.errors import ConfigError
    from provisioning.ca import server_host
    from provisioning.errors import ProvisioningError

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port")
    try:
        check_run_as(args.run_as)
        check_bind(args.bind)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    try:
        wanted = [server_host(host) for host in args.hostname]
    except ProvisioningError as exc:
        raise UserError(f"--hostname: {exc}") from None
    plane = open_plane(args)
    try:
        hostnames = wanted or [server_host(host) for host in plane.config.public_hosts]
        plane.revocation.publish(to_broker=False)
        with plane.revocation.locked():  # a revocation meanwhile is in what is read here
            crl = plane.revocation.current_crl()
            files = write_broker_config(
                args.directory,
                plane.ca,
                region=plane.config.region,
                hostnames=hostnames,
                crl_pem=crl.public_bytes(serialization.Encoding.PEM),
                revoked_device_ids=plane.registry.revoked_device_ids(),
                port=args.port,
                bind=args.bind,
                run_as=args.run_as,
            )
        # A broker already running from this directory picks up the new files.
        reloaded = files.pid.exists() and Broker(files.directory, plane.ca).reload()
    except (ProvisioningError, ConfigError, OSError) as exc:
        raise UserError(f"cannot write broker config: {exc}") from exc
    finally:
        plane.close()
    print(
        f"Mosquitto config written to {files.directory}"
        + (" (broker reloaded)" if reloaded else "")
    )
    print(f"  run:   mosquitto -c {files.conf}")
    print("  in the control plane's config (so revocations reach the broker):")
    print(f'    [broker]\n    dir = "{files.directory}"')
    print(f'    url = "mqtts://{_url_host(hostnames[0])}:{args.port}"')
    return 0


def _url_host(host: str) -> str:
    """An IPv6 address goes in brackets in a URL: mqtts://[::1]:8883."""
    return f"[{host}]" if ":" in host else host
