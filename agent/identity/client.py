"""The one HTTP client the identity code uses to talk to the control plane (aiohttp)."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp

from agent.identity.errors import IdentityError

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


async def get_bytes(url: str, *, ssl_context: ssl.SSLContext | bool) -> bytes:
    async with aiohttp.ClientSession(timeout=DEFAULT_TIMEOUT) as session:
        try:
            async with session.get(url, ssl=ssl_context) as response:
                if response.status != 200:
                    raise IdentityError(f"GET {url}: HTTP {response.status}")
                return await response.read()
        except aiohttp.ClientError as exc:
            raise IdentityError(f"cannot reach {url}: {exc}") from exc


async def post_json(
    url: str, body: dict[str, Any], *, ssl_context: ssl.SSLContext
) -> dict[str, Any]:
    """POST a JSON body; return the JSON reply or raise IdentityError with the server's reason."""
    async with aiohttp.ClientSession(timeout=DEFAULT_TIMEOUT) as session:
        try:
            async with session.post(url, json=body, ssl=ssl_context) as response:
                try:
                    reply = await response.json(content_type=None)
                except (ValueError, RecursionError):  # not JSON, or nested past the parser
                    reply = None
                if response.status >= 400:
                    reason = reply.get("message") if isinstance(reply, dict) else None
                    raise IdentityError(
                        f"{url} refused the request (HTTP {response.status}): "
                        f"{reason or response.reason}"
                    )
                if not isinstance(reply, dict):
                    raise IdentityError(f"{url} answered something that is not a JSON object")
                return reply
        except aiohttp.ClientConnectorCertificateError as exc:
            raise IdentityError(
                f"TLS with {url} failed: {exc.certificate_error}. If the certificate is "
                "'not yet valid' or 'expired', check this device's clock (timedatectl)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise IdentityError(f"cannot reach {url}: {exc}") from exc
