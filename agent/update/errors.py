"""Errors of the update lifecycle. Each says which step refused the update and why."""

from __future__ import annotations


class UpdateError(Exception):
    """An update step failed; the journal records `str(self)` as the reason."""

    step = "update"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        # A retryable failure (network down, server error) leaves the job to resume next time;
        # any other marks it FAILED.
        self.retryable = retryable


class DownloadFailed(UpdateError):
    step = "download"


class TrustFailed(UpdateError):
    """TUF refused the metadata or the target (rollback, freeze, mix-and-match, bad hash)."""

    step = "verify"


class UnpackFailed(UpdateError):
    step = "unpack"


class SignatureRefused(UpdateError):
    step = "signature"


class SelectionFailed(UpdateError):
    step = "select"


class SelfTestFailed(UpdateError):
    step = "self-test"


class ActivationFailed(UpdateError):
    step = "activate"
