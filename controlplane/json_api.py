"""What the control plane's HTTPS APIs share: JSON bodies in, JSON errors out.

Every error a client can cause comes back as `{"error": code, "message": text}` with a 4xx
status, never a stack trace; the size limit on bodies is the application's `client_max_size`.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from controlplane.errors import BadRequest, ControlPlaneError, DeviceRefused, TooSoon
from provisioning.errors import ProvisioningError

log = logging.getLogger(__name__)

BODY_LIMIT = web.AppKey("body_limit", int)


def json_app(body_limit: int) -> web.Application:
    """An aiohttp application that refuses bodies over `body_limit` and answers errors in JSON."""
    app = web.Application(client_max_size=body_limit, middlewares=[error_middleware])
    app[BODY_LIMIT] = body_limit
    return app


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ControlPlaneError as exc:
        if exc.http_status >= 500:
            log.exception("request failed", extra={"path": request.path})
        response = error_response(exc.http_status, exc.code, str(exc))
        if isinstance(exc, TooSoon):
            response.headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, DeviceRefused):
            response.force_close()  # a revoked device keeps no keep-alive connection
        return response
    except ProvisioningError as exc:
        return error_response(400, "bad_request", str(exc))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[BODY_LIMIT]
        return error_response(
            413, "too_large", f"request body is larger than the {limit} bytes accepted"
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


async def read_fields(request: web.Request, *names: str) -> dict[str, str]:
    """The named string fields of a JSON object body; a clear 400 for anything else."""
    if request.content_type != "application/json":
        raise BadRequest("send a JSON object with Content-Type: application/json")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON, or an integer over Python's 4300 digits
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError:  # Python's parser recurses: "[[[[..." within the size limit
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    values = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"field {name!r} is missing or not a non-empty string")
        values[name] = value
    return values
