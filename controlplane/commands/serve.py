"""`edgefleet serve`: run the control plane's device endpoints until interrupted."""

from __future__ import annotations

import argparse

from controlplane.cli import UserError
from controlplane.commands._common import add_config_argument, open_plane


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the control plane (enrollment HTTPS, device HTTPS and gRPC, all TLS)",
        description="Run the control plane until SIGINT/SIGTERM. Needs a device CA "
        "(edgefleet ca init). Logs JSON lines to stderr.",
    )
    add_config_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from controlplane.artifacts_api import artifact_routes
    from controlplane.errors import ControlPlaneError
    from controlplane.server import ControlPlaneServer
    from provisioning.logs import configure_logging

    configure_logging()
    log = logging.getLogger("edgefleet.controlplane")
    plane = open_plane(args)

    async def serve() -> None:
        # model artifacts and TUF metadata, behind the same device-certificate checks
        server = ControlPlaneServer(
            plane, device_routes=artifact_routes(plane.config.state_dir / "tuf")
        )
        try:
            endpoints = await server.start()
        except ControlPlaneError as exc:
            await server.stop()
            raise UserError(str(exc)) from None
        print(
            f"enrollment {endpoints.enroll_url}  devices {endpoints.device_url}  "
            f"gRPC {endpoints.grpc_target}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP ("reload" to a daemon) must not kill the server without closing its state.
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
        try:
            await stop.wait()
            log.info("stopping")
        finally:
            await server.stop()
        log.info("stopped")

    try:
        asyncio.run(serve())
    finally:
        plane.close()
    return 0
