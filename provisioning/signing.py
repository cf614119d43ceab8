"""Publisher signatures on model packages, in the OpenSSF model-signing format (`model.sig`).

A publisher signs a package directory with an EC key (P-256/384/521) through the `model_signing`
package in its elliptic-key mode: the signature is a Sigstore bundle holding a DSSE envelope over
an in-toto statement that lists every file with its SHA-256. The upstream CLI makes the same
file, so either tool can sign and either can verify:

    model_signing sign key DIR --signature DIR/model.sig --private_key publisher.key

A publisher's *key id* is the SHA-256 of its PEM public key, the same value model-signing puts
in the bundle as its key hint; the control plane registers publishers under it and TUF target
metadata carries it.

A node verifies a package that may hold only some of its variants (it downloads the ones it can
run), so verification works file by file: the signature must be valid for the publisher's key,
every file present must be listed in it with the same digest, and every file the node needs
must be present. model-signing's public `verify()` accepts only the complete directory, so the
signed file list is read through its verifier classes directly (one function below).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.package import SIGNATURE_FILE

# Files that sit beside a package but are never part of it: the signature itself, and what
# the upstream CLI leaves out by default (git metadata).
UNSIGNED = (SIGNATURE_FILE, ".git", ".gitattributes", ".github", ".gitignore")


class SignatureError(ValueError):
    """A package signature is missing, malformed, made by another key, or does not match."""


@dataclass(frozen=True, slots=True)
class SignedFiles:
    """What a verified signature covers: the signer's key id and each file's SHA-256."""

    key_id: str
    files: dict[str, str]


def load_public_key(data: bytes | str | Path) -> ec.EllipticCurvePublicKey:
    """An EC public key from PEM bytes or a PEM file."""
    if isinstance(data, str | Path):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read public key {data}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError("not a PEM public key (expected -----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"publisher keys are EC keys; this is a {type(key).__name__}")
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """The publisher key id: SHA-256 of the PEM public key (model-signing's key hint)."""
    return hashlib.sha256(public_key_pem(key)).hexdigest()


def sign_package(package_dir: Path, private_key: Path, password: str | None = None) -> Path:
    """Sign every file of `package_dir` into `package_dir`/model.sig and return its path."""
    # model_signing takes a second to import (sigstore); only signing and verifying need it.
    from model_signing import hashing, signing

    package_dir = Path(package_dir)
    signature = package_dir / SIGNATURE_FILE
    try:
        hashing_config = hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])
        signing.Config().use_elliptic_key_signer(
            private_key=Path(private_key), password=password
        ).set_hashing_config(hashing_config).sign(package_dir, signature)
    except OSError as exc:
        raise SignatureError(f"cannot sign {package_dir}: {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot sign {package_dir} with {private_key}: {exc}") from None
    return signature


def signature_key_id(package_dir: Path) -> str | None:
    """The key id the signature names (its key hint), before any verification; None if absent.

    Only a lookup aid: it picks which registered publisher's key to verify with.
    """
    path = Path(package_dir) / SIGNATURE_FILE
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        hint = bundle["verificationMaterial"]["publicKey"].get("hint")
    except FileNotFoundError:
        raise SignatureError(
            f"{path.parent}: the package is not signed (no {SIGNATURE_FILE})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise SignatureError(f"{path}: not a model-signing key signature") from None
    return hint if isinstance(hint, str) and hint else None


def verify_package(
    package_dir: Path,
    public_key: ec.EllipticCurvePublicKey,
    *,
    required: Iterable[str] | None = None,
    strict: bool = True,
) -> SignedFiles:
    """Check `package_dir`/model.sig against `public_key` and the files on disk.

    required: files that must be present (default: every signed file, i.e. a complete package).
    strict: every file present must be covered by the signature (what a node demands of an
    unpacked archive); without it, unsigned extras beside the package are ignored (a
    publisher's working directory), but `required` files must still be signed.
    """
    package_dir = Path(package_dir)
    signed = _signed_files(package_dir / SIGNATURE_FILE, public_key)
    # Strict: only the signature itself may be unsigned, git metadata included.
    present = _files_in(package_dir, (SIGNATURE_FILE,) if strict else UNSIGNED)
    needed = set(signed) if required is None else set(required)
    unsigned = sorted((present if strict else needed) - set(signed))
    if unsigned:
        raise SignatureError(f"not covered by the signature: {', '.join(unsigned)}")
    missing = sorted(needed - present)
    if missing:
        raise SignatureError(f"signed files missing from the package: {', '.join(missing)}")
    to_check = sorted(present & set(signed))
    actual = _digests(package_dir, to_check)
    changed = sorted(name for name in to_check if actual[name] != signed[name])
    if changed:
        raise SignatureError(f"Signature mismatch: {', '.join(changed)} changed after signing")
    return SignedFiles(key_id(public_key), {n: signed[n] for n in to_check})


def _signed_files(signature: Path, public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """Verify the bundle's DSSE signature with `public_key`; return {file: sha256} it signs."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    if signature.is_symlink() or not signature.is_file():
        raise SignatureError(f"{signature.parent}: the package is not signed (no {SIGNATURE_FILE})")
    # The verifier reads its key from a file; give it exactly the key we trust.
    with tempfile.TemporaryDirectory(prefix="edgefleet-key-") as scratch:
        key_file = Path(scratch) / "publisher.pub"
        key_file.write_bytes(public_key_pem(public_key))
        try:
            bundle = sign_sigstore_pb.Signature.read(signature)
            manifest = sign_ec_key.Verifier(key_file).verify(bundle)
        except Exception as exc:  # malformed bundles raise anything from KeyError to protobuf's
            raise SignatureError(
                f"{SIGNATURE_FILE} does not verify with key {key_id(public_key)[:16]}: "
                f"{exc or type(exc).__name__}"
            ) from None
    method = manifest.serialization_type
    if method.get("method") != "files" or method.get("hash_type") != "sha256":
        raise SignatureError(
            f"{SIGNATURE_FILE} uses {method.get('method')}/{method.get('hash_type')} hashing; "
            "sign with the default file serialization and sha256"
        )
    files: dict[str, str] = {}
    for descriptor in manifest.resource_descriptors():
        if descriptor.digest.algorithm != "sha256":
            raise SignatureError(f"{descriptor.identifier}: digest is not sha256")
        files[str(descriptor.identifier)] = descriptor.digest.digest_hex
    return files


def _files_in(package_dir: Path, skip: tuple[str, ...]) -> set[str]:
    """Package-relative paths of the regular files under `package_dir`, but for the top-level
    names in `skip`."""
    found: set[str] = set()
    for directory, dirs, files in os.walk(package_dir):
        relative_dir = Path(directory).relative_to(package_dir)
        for name in dirs + files:
            path = Path(directory) / name
            relative = (relative_dir / name).as_posix()
            if relative.split("/")[0] in skip:
                continue
            if path.is_symlink():
                raise SignatureError(f"{relative} is a symbolic link; packages hold plain files")
            if name in files:
                found.add(relative)
        dirs[:] = [d for d in dirs if (relative_dir / d).as_posix().split("/")[0] not in skip]
    return found


def _digests(package_dir: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file, computed with model-signing's own file hashing."""
    from model_signing import hashing

    manifest = (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .hash(package_dir, files_to_hash=[package_dir / n for n in names])
    )
    return {str(d.identifier): d.digest.digest_hex for d in manifest.resource_descriptors()}
