"""`edgefleet-agent serve`: serve a model repository over KServe v2 REST and gRPC."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository on localhost (KServe v2 REST + gRPC)",
        description="Serve every model in DIR (<model>/<version>/model.{onnx,xml,tflite}) "
        "over the KServe v2 Open Inference Protocol. Binds 127.0.0.1 unless told otherwise.",
    )
    p.add_argument("--models", required=True, type=Path, metavar="DIR", help="model repository")
    p.add_argument(
        "--http",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="REST address (default %(default)s; 'off' to disable)",
    )
    p.add_argument(
        "--grpc",
        default="127.0.0.1:8001",
        metavar="HOST:PORT",
        help="gRPC address (default %(default)s; 'off' to disable)",
    )
    p.add_argument("--socket", type=Path, metavar="PATH", help="also serve REST on a unix socket")
    p.add_argument("--max-body-mb", type=int, default=64, help="largest request (default 64)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent import logs, memory
    from agent.cli import UserError
    from agent.serving.server import ServeOptions, split_address

    if not args.models.is_dir():
        raise UserError(
            f"model repository {args.models} does not exist "
            "(create one with: edgefleet-agent sample-models DIR)"
        )
    http = None if args.http == "off" else args.http
    grpc = None if args.grpc == "off" else args.grpc
    for address in (http, grpc):
        if address:
            try:
                split_address(address)
            except ValueError as exc:
                raise UserError(str(exc)) from None
    if not 1 <= args.max_body_mb <= 4096:
        raise UserError("--max-body-mb must be between 1 and 4096")
    logs.setup(args.log_level)
    memory.tune_allocator()
    options = ServeOptions(args.models, http, grpc, args.socket, args.max_body_mb * 1024 * 1024)
    try:
        _run_loop(_serve(options))
    except OSError as exc:
        raise UserError(f"cannot listen: {exc}") from None
    return 0


def _run_loop(main) -> None:
    """uvloop where installed (about 15-20% more REST throughput), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(options) -> None:
    import asyncio
    import logging
    import signal

    from agent.serving.server import start

    server = await start(options)
    log = logging.getLogger("edgefleet.serve")
    where = []
    if server.http_port:
        host = options.http.rpartition(":")[0]
        where.append(f"REST http://{host}:{server.http_port}")
    if server.grpc_port:
        where.append(f"gRPC {options.grpc.rpartition(':')[0]}:{server.grpc_port}")
    if server.socket:
        where.append(f"REST unix:{server.socket}")
    models = ", ".join(
        f"{e.name}/{e.version} {e.state}" for e in server.dataplane.repository_index()
    )
    log.info("serving %s; models: %s", ", ".join(where), models)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining requests")
    await server.stop()
