"""The one HTTP client the identity code uses to talk to the control plane (aiohttp).

Every failure, a reply that never comes included, is an IdentityError that names the URL, and no
reply is read past a size limit: the CA is fetched before anything about the server is verified,
so whoever answers decides what arrives.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp

from agent.identity.errors import IdentityError

TIMEOUT_S = 30.0  # a whole request, from connecting to the last byte of the reply
CONNECT_TIMEOUT_S = 10.0
MAX_CA_BYTES = 64 * 1024  # a PEM CA certificate is a few KiB
MAX_REPLY_BYTES = 1024 * 1024  # a JSON reply: a certificate, the endpoints, a TUF root


async def get_bytes(
    url: str,
    *,
    ssl_context: ssl.SSLContext | bool,
    max_bytes: int = MAX_REPLY_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> bytes:
    async with _session(timeout_s) as session:
        try:
            async with session.get(url, ssl=ssl_context) as response:
                if response.status != 200:
                    raise IdentityError(f"GET {url}: HTTP {response.status}")
                return await _read(response, url, max_bytes)
        except aiohttp.ClientError as exc:
            raise IdentityError(f"cannot reach {url}: {exc}") from exc
        except TimeoutError as exc:
            raise IdentityError(_no_answer(url, timeout_s)) from exc


async def post_json(
    url: str,
    body: dict[str, Any],
    *,
    ssl_context: ssl.SSLContext,
    max_bytes: int = MAX_REPLY_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """POST a JSON body; return the JSON reply or raise IdentityError with the server's reason."""
    async with _session(timeout_s) as session:
        try:
            async with session.post(url, json=body, ssl=ssl_context) as response:
                try:
                    reply = json.loads(await _read(response, url, max_bytes))
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
        except TimeoutError as exc:
            raise IdentityError(_no_answer(url, timeout_s)) from exc


def _session(timeout_s: float) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
    return aiohttp.ClientSession(timeout=timeout)


async def _read(response: aiohttp.ClientResponse, url: str, max_bytes: int) -> bytes:
    """The body of `response`, refused as soon as it is known to be over `max_bytes`."""
    too_big = IdentityError(
        f"{url} sent a reply over {max_bytes} bytes, more than the control plane ever sends: "
        "check the server URL"
    )
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


def _no_answer(url: str, timeout_s: float) -> str:
    return f"no answer from {url} within {timeout_s:g} s: is the control plane up and reachable?"
