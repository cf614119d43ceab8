"""Who a certificate speaks for: device id and region, carried as SAN URIs.

Every certificate the device CA issues names its region as `urn:edgefleet:region:<region>`;
device certificates also name the device as `urn:edgefleet:device:<id>` (and CN = id, which
Mosquitto uses as the MQTT username). Reading identity from SAN URIs rather than free-form
subject fields keeps it unambiguous: the CA writes them, nothing else does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from provisioning.errors import IdentityMissing, ProvisioningError

DEVICE_URN = "urn:edgefleet:device:"
REGION_URN = "urn:edgefleet:region:"
SERVICE_URN = "urn:edgefleet:service:"

# DNS-label-like names: they appear in MQTT topics, file names and URNs, so no '/', '+', '#'.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG_KEY = re.compile(r"[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?")
_TAG_VALUE = re.compile(r"[A-Za-z0-9_.:-]{0,63}")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The identity the control plane gives a device; never taken from the device's own claims."""

    device_id: str
    region: str

    def __post_init__(self) -> None:
        check_name("device id", self.device_id)
        check_name("region", self.region)


def check_name(what: str, value: str) -> str:
    """Accept a device id or region name, or say which characters are allowed."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ProvisioningError(
            f"{what} {value!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def parse_tags(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Turn `key=value` strings (from `--tag line=3`) into a dict, refusing bad or repeated keys."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ProvisioningError(f"tag {item!r} must look like key=value (e.g. line=3)")
        check_tag(key, value)
        if key in tags:
            raise ProvisioningError(f"tag {key!r} is given twice")
        tags[key] = value
    return tags


def check_tag(key: str, value: str) -> None:
    if not _TAG_KEY.fullmatch(key):
        raise ProvisioningError(
            f"tag key {key!r} is not valid: use lowercase letters, digits, '_', '.', '-'"
        )
    if not isinstance(value, str) or not _TAG_VALUE.fullmatch(value):
        raise ProvisioningError(
            f"tag value {value!r} for {key!r} is not valid: up to 63 of A-Z a-z 0-9 _ . : -"
        )


def device_uris(identity: DeviceIdentity) -> list[x509.UniformResourceIdentifier]:
    return [
        x509.UniformResourceIdentifier(DEVICE_URN + identity.device_id),
        x509.UniformResourceIdentifier(REGION_URN + identity.region),
    ]


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _one(cert: x509.Certificate, prefix: str) -> str | None:
    found = [uri[len(prefix) :] for uri in _uris(cert) if uri.startswith(prefix)]
    if len(found) > 1:
        raise IdentityMissing(f"certificate {serial_hex(cert)} names several {prefix}* URIs")
    return found[0] if found else None


def region_of(cert: x509.Certificate) -> str | None:
    """The region a certificate (device or server) belongs to, or None for a foreign one."""
    return _one(cert, REGION_URN)


def device_identity_of(cert: x509.Certificate) -> DeviceIdentity:
    """Read the device identity the CA wrote; refuse certificates that carry none."""
    device_id = _one(cert, DEVICE_URN)
    region = _one(cert, REGION_URN)
    if device_id is None or region is None:
        raise IdentityMissing(
            f"certificate {serial_hex(cert)} is not an EdgeFleet device certificate "
            "(no urn:edgefleet:device / urn:edgefleet:region URI)"
        )
    return DeviceIdentity(device_id, region)


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as lowercase hex, the form stored in the registry and shown to operators."""
    return format(cert.serial_number, "x")
