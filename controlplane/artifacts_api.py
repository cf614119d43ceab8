"""TUF metadata and model artifacts over the device endpoint (HTTPS with client certificates).

    GET /v1/tuf/metadata/timestamp.json           re-signed first if it is due
    GET /v1/tuf/metadata/{N}.{root|targets|snapshot}.json
    GET /v1/tuf/targets/{dir}/{sha256}.{name}     content-addressed blob; HTTP Range supported

Mount it on the application that already requires device certificates, the device port:

    ControlPlaneServer(plane, device_routes=artifact_routes(config.state_dir / "tuf"))

Everything served here is verified by the node (TUF signatures, lengths and hashes, then the
publisher's signature), so a cache or CDN may sit in front. Versioned metadata and blobs never
change, and say so in Cache-Control; `timestamp.json` must not be cached. The same call adds a
background task that re-signs metadata before it expires, so a quiet server keeps serving
fresh metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import hdrs, web

from controlplane.tuf_repository import TufRepository, TufRepositoryError

log = logging.getLogger(__name__)

PREFIX = "/v1/tuf"
REPOSITORY = web.AppKey("edgefleet_tuf_repository", TufRepository)
_IMMUTABLE = "public, max-age=31536000, immutable"
# "the last 0 bytes": unsatisfiable (RFC 9110 14.1.1), but aiohttp serves the whole file with 206
_EMPTY_SUFFIX_RANGE = re.compile(r"\s*bytes\s*=\s*-0+\s*", re.IGNORECASE)


def artifact_routes(tuf_dir: Path) -> list[Callable[[web.Application], None]]:
    """What `ControlPlaneServer(device_routes=...)` mounts: nothing until `edgefleet tuf init`
    has created the repository (the server then needs a restart to serve it)."""
    try:
        repository = TufRepository(tuf_dir)
    except TufRepositoryError:
        log.info("no TUF repository in %s: model artifacts are not served", tuf_dir)
        return []
    return [lambda app: add_artifact_routes(app, repository)]


def add_artifact_routes(
    app: web.Application,
    repository: TufRepository,
    *,
    prefix: str = PREFIX,
    refresh_seconds: float = 60.0,
) -> None:
    """Add the metadata and target routes to `app`, and the metadata refresher to its life."""
    app[REPOSITORY] = repository

    async def metadata(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "timestamp.json" and repository.timestamp_due():
            await asyncio.to_thread(repository.refresh)
        path = repository.metadata_file(name)
        if path is None:
            raise web.HTTPNotFound(text=f"no metadata {name}\n")
        cache = "no-store" if name == "timestamp.json" else _IMMUTABLE
        return _file_response(
            request, path, {"Cache-Control": cache, "Content-Type": "application/json"}
        )

    async def target(request: web.Request) -> web.StreamResponse:
        path = repository.target_file(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(text="no such target\n")
        # Range requests get 206 and the requested bytes (resumption).
        return _file_response(
            request,
            path,
            {"Cache-Control": _IMMUTABLE, "Content-Type": "application/octet-stream"},
        )

    app.router.add_get(f"{prefix}/metadata/{{name}}", metadata)
    app.router.add_get(f"{prefix}/targets/{{path:.+}}", target)
    app.cleanup_ctx.append(_refresher(repository, refresh_seconds))


def _file_response(request: web.Request, path: Path, headers: dict) -> web.StreamResponse:
    """The file, whole or the range asked for (FileResponse); 416 for an empty suffix range."""
    if _EMPTY_SUFFIX_RANGE.fullmatch(request.headers.get(hdrs.RANGE, "")):
        return web.Response(status=416, headers={"Content-Range": f"bytes */{path.stat().st_size}"})
    return web.FileResponse(path, headers=headers)


def _refresher(repository: TufRepository, every: float):
    async def run() -> None:
        while True:
            try:
                roles = await asyncio.to_thread(repository.refresh)
                if roles:
                    log.info("TUF metadata re-signed", extra={"roles": roles})
            except Exception:
                log.exception("re-signing TUF metadata failed; retrying")
            await asyncio.sleep(every)

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name="tuf-refresh")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
