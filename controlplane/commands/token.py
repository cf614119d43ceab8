"""`edgefleet token create|list`: enrollment tokens for new devices (and re-enrollment)."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, open_plane

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`, or combinations such as `1d12h`."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 30m, 24h, 7d or 1d12h"
        )
    try:
        return sum((timedelta(**{_UNITS[u]: int(n)}) for n, u in parts), timedelta())
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than a duration can be") from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("token", help="manage enrollment tokens")
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="create an enrollment token and print it (shown once, stored hashed)",
        description="Create a token that enrolls devices into one region with the given tags, "
        "a limited number of times, until it expires. With --device, a re-enrollment token "
        "that gives an existing device a new certificate under the same identity (for a node "
        "whose certificate expired while it was offline).",
    )
    create.add_argument("--region", help="region of the devices (default: the config's region)")
    create.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="tag (repeatable)"
    )
    create.add_argument("--uses", type=int, default=1, help="how many enrollments (default 1)")
    create.add_argument(
        "--expires",
        type=parse_duration,
        default=timedelta(hours=24),
        metavar="DURATION",
        help="lifetime, e.g. 30m, 24h, 7d (default 24h)",
    )
    create.add_argument("--device", metavar="ID", help="re-enrollment token for this device")
    add_config_argument(create)
    create.set_defaults(func=run_create)

    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    add_config_argument(listing)
    listing.set_defaults(func=run_list)


def run_create(args: argparse.Namespace) -> int:
    from controlplane.errors import ControlPlaneError
    from provisioning.errors import ProvisioningError
    from provisioning.identity import parse_tags

    plane = open_plane(args)
    try:
        region = args.region or plane.config.region
        tags = parse_tags(args.tag)
        if args.device:
            device = plane.registry.get(args.device)
            if device is None:
                raise UserError(f"no device {args.device!r}; see: edgefleet device list")
            if device.status != "active":
                raise UserError(f"device {args.device} is {device.status}; enroll it anew")
            region, tags = device.region, device.tags
        token, record = plane.tokens.create(
            region=region,
            tags=tags,
            uses=args.uses,
            expires_in=args.expires,
            ca_pin=plane.ca_pin,
            device_id=args.device,
        )
    except (ControlPlaneError, ProvisioningError) as exc:
        raise UserError(str(exc)) from exc
    finally:
        plane.close()
    print(token)
    scope = f"device {args.device}" if args.device else f"region {record.region}"
    tag_text = ",".join(f"{k}={v}" for k, v in record.tags.items()) or "none"
    print(
        f"# token {record.token_id}: {scope}, tags {tag_text}, {record.uses_total} use(s), "
        f"expires {record.expires_at.isoformat(timespec='seconds')}. Shown once; stored hashed.",
    )
    verb = "enroll" if args.device else "install"
    print(f"# on the device: edgefleet-agent {verb} --server URL --token <token above>")
    return 0


def run_list(args: argparse.Namespace) -> int:
    plane = open_plane(args)
    try:
        records = plane.tokens.list()
    finally:
        plane.close()
    print(f"{'ID':<12} {'REGION':<12} {'USES LEFT':<10} {'EXPIRES':<26} TAGS / DEVICE")
    for r in records:
        extra = r.device_id or ",".join(f"{k}={v}" for k, v in r.tags.items())
        print(
            f"{r.token_id:<12} {r.region:<12} {f'{r.uses_left}/{r.uses_total}':<10} "
            f"{r.expires_at.isoformat(timespec='seconds'):<26} {extra}"
        )
    return 0
