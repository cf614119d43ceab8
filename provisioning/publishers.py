"""Which publishers may sign which models: trust data signed by the TUF root keys.

The control plane registers each publisher's key and the model names it may sign. Agents get
that list as a TUF target (`edgefleet/publishers.json`, so it is as fresh and rollback-proof as
any target) whose content carries its own signatures by the *root* role's keys, at the root's
threshold. The online TUF keys therefore cannot add a publisher: taking over the control plane
alone does not let anyone get a model onto a node, and a stolen publisher key alone does not
either (it also needs the control plane to publish the target).

    {"signed": {"_type": "edgefleet-publishers", "version": 3, "expires": "2027-11-01T00:00:00Z",
                "publishers": [{"name": "vision-team", "keyid": "<sha256 of PEM>",
                                "public_key": "-----BEGIN PUBLIC KEY-----...",
                                "models": ["cnn", "detector-*"]}]},
     "signatures": [{"keyid": "<root key id>", "sig": "<hex>"}]}

Model patterns are shell-style (`fnmatch`), matched against the whole model name.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signature, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Root

from provisioning.package import MANIFEST_FILE, Package
from provisioning.signing import (
    SignatureError,
    key_id,
    load_public_key,
    signature_key_id,
    verify_package,
)

DOCUMENT_TYPE = "edgefleet-publishers"
TARGET_PATH = "edgefleet/publishers.json"


class PublisherTrustError(ValueError):
    """The publisher list is malformed, expired, rolled back or not signed by the root keys."""


@dataclass(frozen=True, slots=True)
class Publisher:
    name: str
    key_id: str
    public_key_pem: str
    models: tuple[str, ...]

    def may_sign(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "keyid": self.key_id,
            "public_key": self.public_key_pem,
            "models": list(self.models),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Publisher:
        publisher = cls(
            name=str(data["name"]),
            key_id=str(data["keyid"]),
            public_key_pem=str(data["public_key"]),
            models=tuple(str(m) for m in data["models"]),
        )
        try:
            actual = key_id(load_public_key(publisher.public_key_pem.encode()))
        except SignatureError as exc:
            raise PublisherTrustError(f"publisher {publisher.name}: {exc}") from None
        if actual != publisher.key_id:
            raise PublisherTrustError(f"publisher {publisher.name}: keyid does not match its key")
        return publisher


@dataclass(frozen=True)
class PublisherList:
    version: int
    expires: datetime
    publishers: tuple[Publisher, ...]

    def by_key(self, key: str) -> Publisher | None:
        return next((p for p in self.publishers if p.key_id == key), None)

    def by_name(self, name: str) -> Publisher | None:
        return next((p for p in self.publishers if p.name == name), None)

    def allowed_for(self, model: str) -> list[Publisher]:
        return [p for p in self.publishers if p.may_sign(model)]

    def signed_dict(self) -> dict:
        return {
            "_type": DOCUMENT_TYPE,
            "version": self.version,
            "expires": self.expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "publishers": [p.to_dict() for p in sorted(self.publishers, key=lambda p: p.name)],
        }

    def payload(self) -> bytes:
        """The canonical JSON bytes the signatures cover (TUF's canonical form)."""
        return encode_canonical(self.signed_dict()).encode("utf-8")

    def sign(self, signers: Iterable[Signer]) -> bytes:
        """The signed document, as it is stored and served."""
        payload = self.payload()
        signatures = [signer.sign(payload).to_dict() for signer in signers]
        document = {"signed": self.signed_dict(), "signatures": signatures}
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def verify(cls, data: bytes, root: Root, now: datetime | None = None) -> PublisherList:
        """Parse a signed document and check it against the root role of `root`, and expiry."""
        try:
            document = json.loads(data)
            signed = document["signed"]
            signatures = {s["keyid"]: Signature.from_dict(dict(s)) for s in document["signatures"]}
            if signed.get("_type") != DOCUMENT_TYPE:
                raise PublisherTrustError(f"not an {DOCUMENT_TYPE} document")
            listing = cls(
                version=int(signed["version"]),
                expires=datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=UTC
                ),
                publishers=tuple(Publisher.from_dict(p) for p in signed["publishers"]),
            )
            canonical = encode_canonical(signed).encode("utf-8")
        except PublisherTrustError:
            raise
        except FormatError:  # its message repeats the whole document
            raise PublisherTrustError(
                "malformed publisher list: it holds a value canonical JSON cannot encode (a float?)"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise PublisherTrustError(f"malformed publisher list: {exc!r}") from None
        if listing.payload() != canonical:
            raise PublisherTrustError("publisher list holds fields this agent does not know")
        try:
            root.verify_delegate(Root.type, listing.payload(), signatures)
        except UnsignedMetadataError as exc:
            raise PublisherTrustError(
                f"publisher list is not signed by the TUF root keys ({exc})"
            ) from None
        if listing.expires <= (now or datetime.now(UTC)):
            raise PublisherTrustError(
                f"publisher list version {listing.version} expired at {listing.expires:%Y-%m-%d}; "
                "the operator must re-sign it with the root keys"
            )
        return listing


def authenticate_package(
    package_dir: Path,
    publishers: PublisherList,
    *,
    variants: list[str] | tuple[str, ...] | None = None,
    strict: bool = True,
) -> tuple[Publisher, Package]:
    """The registered publisher whose valid signature covers the package, and the package.

    The signature names its key (model-signing's key hint); that key must belong to a registered
    publisher, verify the signature, and match every file; only then is the manifest read (it is
    authentic from there on) and the publisher checked to be allowed to sign this model name.
    variants: the variants present (a node holds some); None means a complete package.
    strict: every file present must be signed (a node's unpacked archive). Raises SignatureError
    or ManifestError saying why the package is refused.
    """
    package_dir = Path(package_dir)
    hinted = signature_key_id(package_dir)
    if hinted is not None:
        publisher = publishers.by_key(hinted)
        if publisher is None:
            raise SignatureError(
                f"signed by key {hinted[:16]}..., which belongs to no registered publisher"
            )
        candidates = [publisher]
    else:  # signatures from before model-signing 1.0 name no key: try each publisher
        candidates = list(publishers.publishers)
    for publisher in candidates:
        key = load_public_key(publisher.public_key_pem.encode())
        try:
            signed = verify_package(package_dir, key, required=(MANIFEST_FILE,), strict=strict)
        except SignatureError:
            if hinted is not None:
                raise
            continue
        break
    else:
        raise SignatureError("no registered publisher's key verifies the signature")
    package = Package.load(package_dir, variants)
    manifest = package.manifest
    names = [v.name for v in manifest.variants] if variants is None else list(variants)
    unsigned = sorted(set(manifest.files_for(names)) - set(signed.files))
    if unsigned:
        raise SignatureError(f"not covered by the signature: {', '.join(unsigned)}")
    if not publisher.may_sign(manifest.name):
        raise SignatureError(
            f"publisher {publisher.name!r} is registered for {', '.join(publisher.models)}, "
            f"not for model {manifest.name!r}"
        )
    return publisher, package
