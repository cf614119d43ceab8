"""Errors of the control plane. Each carries the HTTP status and a stable code for API clients;
the message says what was wrong and what to do, and never includes a stack trace."""

from __future__ import annotations


class ControlPlaneError(Exception):
    http_status = 500
    code = "internal"


class ConfigError(ControlPlaneError):
    code = "config"


class BadRequest(ControlPlaneError):
    http_status = 400
    code = "bad_request"


class TokenRejected(ControlPlaneError):
    """The enrollment token is unknown, expired, used up or not valid here."""

    http_status = 403
    code = "token_rejected"


class DeviceRefused(ControlPlaneError):
    """The device (or the certificate it presents) may not use this endpoint: revoked, unknown."""

    http_status = 403
    code = "device_refused"


class NotFound(ControlPlaneError):
    http_status = 404
    code = "not_found"


class TooSoon(ControlPlaneError):
    """The request is allowed again later; `retry_after` says in how many seconds."""

    http_status = 429
    code = "too_soon"

    def __init__(self, message: str, retry_after: int, countdown: str = "") -> None:
        super().__init__(message + countdown)
        self.retry_after = retry_after
        # What the audit log records: the message without the countdown, which changes every
        # second and would make each retry a refusal of its own instead of a repeat.
        self.audit_detail = message
