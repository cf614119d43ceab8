"""Private keys and the files they live in.

Keys are EC P-256: small, fast on weak CPUs, accepted by OpenSSL, Mosquitto and gRPC. A private
key file is created with mode 0600 before a byte is written (never chmod-ed afterwards, which
would leave a window where it is readable), and every file is replaced atomically so a power
cut leaves the old file or the new one, never half of each.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.errors import ProvisioningError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file_atomic(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Write `data` to `path` through a temp file in the same directory, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_file_atomic(path, private_key_pem(key), PRIVATE_MODE)


def load_private_key(path: Path, *, strict_mode: bool = True) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key; with `strict_mode`, refuse one that others can read (as ssh does)."""
    path = Path(path)
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"cannot read private key {path}: {exc.strerror}") from exc
    if strict_mode and stat.S_IMODE(info.st_mode) & 0o077:
        raise ProvisioningError(
            f"private key {path} is readable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"{path} holds a {type(key).__name__}, expected an EC key")
    return key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
