"""Errors of the device identity: each message says what happened and what to do."""

from __future__ import annotations


class IdentityError(Exception):
    """Enrollment or renewal failed in a way an operator must look at."""


class CertificateExpired(IdentityError):
    """The device certificate expired (e.g. the node was offline too long): renewal cannot work,
    the node needs a re-enrollment token."""
