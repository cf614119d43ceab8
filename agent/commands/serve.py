"""`edgefleet-agent serve`: serve a model repository over KServe v2 REST and gRPC.

Settings come from the agent config (`--config`, else `$EDGEFLEET_CONFIG`), `EDGEFLEET_*`
variables and these flags, the flags winning. On an enrolled node (an identity in the state dir)
the device certificate is renewed in the background; local serving never depends on it.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from agent.commands import UsageError, UserError, path_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository on localhost (KServe v2 REST + gRPC)",
        description="Serve every model in DIR (<model>/<version>/model.{onnx,xml,tflite}) "
        "over the KServe v2 Open Inference Protocol. Binds 127.0.0.1 unless told otherwise.",
    )
    p.add_argument("--config", type=path_arg, metavar="FILE", help="agent config (TOML)")
    p.add_argument(
        "--models",
        type=path_arg,
        metavar="DIR",
        help="model repository (default <state_dir>/models)",
    )
    p.add_argument(
        "--http", metavar="HOST:PORT", help="REST address (default 127.0.0.1:8000; 'off')"
    )
    p.add_argument(
        "--grpc", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:8001; 'off')"
    )
    p.add_argument(
        "--socket", type=path_arg, metavar="PATH", help="also serve REST on a unix socket"
    )
    p.add_argument(
        "--select",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure which runtime/device serves each model best (default: on; decisions are "
        "stored in the state dir and reused)",
    )
    p.add_argument("--profile", metavar="NAME|FILE", help="force a firmware profile")
    p.add_argument(
        "--max-body-mb",
        type=int,
        default=64,
        help="largest REST request body and gRPC message (default 64)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent import memory
    from agent.config import SettingsError, load_config
    from agent.serving.server import ServeOptions, split_address
    from provisioning.logs import configure_logging

    try:
        config = load_config(args.config)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    models = args.models or config.models_dir
    if models.exists() and not models.is_dir():
        raise UserError(f"model repository {models} is not a directory")
    if not models.is_dir():
        raise UserError(
            f"model repository {models} does not exist "
            "(create one with: edgefleet-agent sample-models DIR)"
        )
    http = _address("http", args.http, config.http)
    grpc = _address("grpc", args.grpc, config.grpc)
    socket = args.socket or config.socket
    if not (http or grpc or socket):
        raise UsageError("nothing to serve: REST and gRPC are both off and no --socket is given")
    for address in (http, grpc):
        if address:
            try:
                split_address(address)
            except ValueError as exc:
                raise UserError(str(exc)) from None
    if not 1 <= args.max_body_mb <= 4096:
        raise UserError("--max-body-mb must be between 1 and 4096")
    configure_logging(args.log_level)
    memory.tune_allocator()
    select = config.select if args.select is None else args.select
    if select:  # decisions are stored there: say so now, not as "cannot listen" from start()
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot open the agent state in {config.state_dir}: {exc}") from None
    options = ServeOptions(
        models,
        http,
        grpc,
        socket,
        args.max_body_mb * 1024 * 1024,
        select=select,
        state_dir=config.state_dir,
        profile=args.profile or config.profile or None,
    )
    from agent.profiles import ProfileError

    try:
        _run_loop(_serve(options, config.identity_dir))
    except OSError as exc:
        raise UserError(f"cannot listen: {exc}") from None
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    except sqlite3.Error as exc:  # the selection decisions' database, opened at start
        raise UserError(f"cannot open the agent state in {config.state_dir}: {exc}") from None
    return 0


def _address(setting: str, flag: str | None, configured: str) -> str | None:
    """The flag's address, else the config's; None for "off". An empty one is refused rather
    than read as "off" or as the default: a reader of the config cannot tell which is meant."""
    value = configured if flag is None else flag
    if value == "":
        where = f"--{setting}" if flag is not None else f"the {setting} setting"
        raise UserError(f"{where} is empty; give HOST:PORT, or 'off' to turn it off")
    return None if value == "off" else value


def _run_loop(main) -> None:
    """uvloop where installed (about 15-20% more REST throughput), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(options, identity_dir: Path) -> None:
    import asyncio
    import logging
    import os
    import signal

    from agent.serving.server import start

    log = logging.getLogger("edgefleet.serve")
    # Handlers go in before start(): the front ends listen while the models load, and a signal
    # then must stop the start (start() closes what it opened), not kill the process.
    stop = asyncio.Event()
    starting = asyncio.ensure_future(start(options))

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            starting.cancel()
            return
        # A second signal while draining: stop now, as an impatient operator means.
        log.warning("stopping at once: signalled again while draining")
        os._exit(1)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    # SIGHUP means "reload" to a daemon and "hang up" to a terminal's child; neither may kill
    # the agent without cleanup. Models reload through the repository API.
    loop.add_signal_handler(
        signal.SIGHUP, lambda: log.info("SIGHUP ignored: reload models with the repository API")
    )
    try:
        server = await starting
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("stopping: signalled while loading the models")
        return
    where = []
    if server.http_port:
        host = options.http.rpartition(":")[0]
        where.append(f"REST http://{host}:{server.http_port}")
    if server.grpc_port:
        where.append(f"gRPC {options.grpc.rpartition(':')[0]}:{server.grpc_port}")
    if server.socket:
        where.append(f"REST unix:{server.socket}")
    index = await server.dataplane.read_repository_index()
    models = ", ".join(f"{e.name}/{e.version} {e.state}" for e in index)
    log.info("serving %s; models: %s", ", ".join(where), models or "none")
    renewal = _start_renewal(identity_dir, log)
    await stop.wait()
    log.info("stopping: draining requests")
    if renewal is not None:
        renewal.cancel()
    await server.stop()


def _start_renewal(identity_dir: Path, log):
    """Renew the device certificate in the background when this node is enrolled."""
    import asyncio

    if not identity_dir.is_dir():
        log.info("no device identity in %s: serving locally only", identity_dir)
        return None
    from agent.identity import CertificateRenewer, IdentityError, IdentityStore

    store = IdentityStore(identity_dir)
    try:
        current = store.current()
    except IdentityError as exc:
        log.warning("device identity unreadable, not renewing: %s", exc)
        return None
    if current is None:
        return None
    renewer = CertificateRenewer(store)
    renewer.add_listener(lambda creds: log.info("device certificate renewed: %s", creds.serial))
    log.info(
        "device %s: certificate renewal due %s",
        current.identity.device_id,
        renewer.due_at(current).isoformat(),
    )
    return asyncio.create_task(renewer.run())
