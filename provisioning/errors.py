"""Errors of the provisioning package: each says what was wrong and what to do about it."""

from __future__ import annotations


class ProvisioningError(ValueError):
    """Bad identity material (a CSR, a token, a certificate) that the caller can fix."""


class CSRRejected(ProvisioningError):
    """A certificate signing request the device CA will not sign."""


class TokenFormatError(ProvisioningError):
    """A string that is not an EdgeFleet enrollment token (typo, truncation, wrong paste)."""


class IdentityMissing(ProvisioningError):
    """A certificate without the EdgeFleet identity the CA puts into every certificate it issues."""
