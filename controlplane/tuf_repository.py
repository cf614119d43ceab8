"""The control plane's TUF repository (python-tuf Metadata API): freshness for model artifacts.

    <state>/tuf/
      metadata/   1.root.json ...  N.targets.json  N.snapshot.json  timestamp.json
      targets/    <sha256>           one blob per artifact, content-addressed
      keys/       targets.pem  snapshot.pem  timestamp.pem     online keys (0600)
      .lock       writers (this server, `edgefleet model push`) take it in turn

Root is signed by a threshold of keys (2 of 3 by default) that `TufRepository.create` writes to a
separate directory meant to go offline (a USB stick, an HSM import); they are needed again only
to rotate keys and to sign the publisher list (see provisioning.publishers). Targets, snapshot
and timestamp have one online key each. Consistent snapshots are on: metadata is fetched by
version (`7.targets.json`) and targets by hash (`<dir>/<sha256>.<name>`), so every file is
immutable once written and a reader never sees half of an update: a change writes the blobs,
then the new targets and snapshot versions, and replaces `timestamp.json` last.

Timestamp expiry is short (two hours by default) so a frozen or replayed repository is noticed
quickly; `refresh()` re-signs whatever has used up half its lifetime and runs periodically in the
server (controlplane.artifacts_api). Expiries and the other knobs are in `TufSettings`.

    repo = TufRepository.create(state / "tuf", offline_dir, root_keys=3, threshold=2)
    repo.add_targets([NewTarget("cnn/2/onnx-fp32.tar", blob_path, custom={...})])
    repo.refresh()
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from provisioning.errors import ProvisioningError
from provisioning.keys import PRIVATE_MODE, load_private_key, write_file_atomic

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
# Applied with fullmatch. A version is at most 20 digits (2**64): a longer name is no file here,
# and asking the file system about one fails with "file name too long".
_VERSIONED = re.compile(r"(\d{1,20})\.(root|targets|snapshot)\.json")
_HASHED_TARGET = re.compile(r"(?:.*/)?([0-9a-f]{64})\.[^/]+")
_CHUNK = 1 << 20


class TufRepositoryError(Exception):
    """The repository is missing, damaged, or asked to do something it must not."""


@dataclass(frozen=True, slots=True)
class TufSettings:
    """Lifetimes of each role's metadata and when they are re-signed: one place for all."""

    root_expiry: timedelta = timedelta(days=365)
    targets_expiry: timedelta = timedelta(days=30)
    snapshot_expiry: timedelta = timedelta(days=7)
    timestamp_expiry: timedelta = timedelta(hours=2)
    publishers_expiry: timedelta = timedelta(days=365)
    # Re-sign a role once less than this fraction of its lifetime is left.
    refresh_at_fraction: float = 0.5
    # Versioned metadata kept for clients in the middle of an update; older versions go.
    keep_versions: int = 16

    def expiry(self, role: str) -> timedelta:
        return getattr(self, f"{role}_expiry")


@dataclass(frozen=True, slots=True)
class NewTarget:
    """An artifact to publish: its target path, the file holding it, and custom metadata."""

    path: str
    source: Path
    custom: dict[str, Any] = field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(UTC)


class TufRepository:
    def __init__(
        self,
        directory: Path,
        settings: TufSettings | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings or TufSettings()
        self.clock = clock
        if not (self.metadata_dir / "timestamp.json").is_file():
            raise TufRepositoryError(
                f"no TUF repository in {self.directory}; create one with: edgefleet tuf init"
            )

    # --- layout ---------------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        return self.directory / "metadata"

    @property
    def blobs_dir(self) -> Path:
        return self.directory / "targets"

    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"

    # --- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        offline_keys_dir: Path,
        *,
        root_keys: int = 3,
        threshold: int = 2,
        settings: TufSettings | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> TufRepository:
        """A new repository: root keys into `offline_keys_dir`, online keys into the repository."""
        directory, offline_keys_dir = Path(directory), Path(offline_keys_dir)
        settings = settings or TufSettings()
        if not 1 <= threshold <= root_keys:
            raise TufRepositoryError(f"threshold {threshold} must be between 1 and {root_keys}")
        if (directory / "metadata").exists():
            raise TufRepositoryError(
                f"{directory} already holds a TUF repository; every enrolled node pins its root. "
                "Remove it by hand only if that is what you want."
            )
        if offline_keys_dir.exists() and not offline_keys_dir.is_dir():
            raise TufRepositoryError(f"{offline_keys_dir} is not a directory; give a new directory")
        if offline_keys_dir.exists() and any(offline_keys_dir.iterdir()):
            raise TufRepositoryError(f"{offline_keys_dir} is not empty; give a new directory")
        if offline_keys_dir.resolve().is_relative_to(directory.resolve()):
            raise TufRepositoryError("the root keys must not live inside the repository")
        offline_keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = clock()
        root = Root(expires=now + settings.root_expiry, consistent_snapshot=True)
        root.roles[Root.type].threshold = threshold
        for index in range(1, root_keys + 1):
            signer = CryptoSigner.generate_ecdsa()
            _write_signer(offline_keys_dir / f"root-{index}.pem", signer)
            root.add_key(signer.public_key, Root.type)
        online: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            online[role] = CryptoSigner.generate_ecdsa()
            _write_signer(directory / "keys" / f"{role}.pem", online[role])
            root.add_key(online[role].public_key, role)
        root_md = Metadata(root)
        for path in sorted(offline_keys_dir.glob("root-*.pem")):
            root_md.sign(_load_signer(path), append=True)
        (directory / "metadata").mkdir(parents=True, exist_ok=True)
        (directory / "targets").mkdir(exist_ok=True)
        _write_metadata(directory / "metadata" / "1.root.json", root_md)
        _write_metadata(directory / "metadata" / "root.json", root_md)

        targets = Metadata(Targets(expires=now + settings.targets_expiry))
        targets.sign(online[Targets.type])
        _write_metadata(directory / "metadata" / "1.targets.json", targets)
        snapshot = Metadata(Snapshot(expires=now + settings.snapshot_expiry))
        snapshot.signed.meta["targets.json"] = _meta_file(
            directory / "metadata" / "1.targets.json", 1
        )
        snapshot.sign(online[Snapshot.type])
        _write_metadata(directory / "metadata" / "1.snapshot.json", snapshot)
        timestamp = Metadata(Timestamp(expires=now + settings.timestamp_expiry))
        timestamp.signed.snapshot_meta = _meta_file(directory / "metadata" / "1.snapshot.json", 1)
        timestamp.sign(online[Timestamp.type])
        _write_metadata(directory / "metadata" / "timestamp.json", timestamp)
        return cls(directory, settings, clock)

    # --- reading ----------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_file(str(self.metadata_dir / "root.json"))

    def root_bytes(self) -> bytes:
        """The current root metadata: what a node pins when it enrolls."""
        return (self.metadata_dir / "root.json").read_bytes()

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_file(str(self.metadata_dir / f"{version}.snapshot.json"))

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return Metadata[Targets].from_file(str(self.metadata_dir / f"{version}.targets.json"))

    def metadata_file(self, name: str) -> Path | None:
        """The file to serve for a metadata request (`timestamp.json`, `7.targets.json`, ...)."""
        if name != "timestamp.json" and not _VERSIONED.fullmatch(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_file(self, url_path: str) -> Path | None:
        """The blob behind a consistent-snapshot target URL (`cnn/2/<sha256>.onnx-fp32.tar`)."""
        match = _HASHED_TARGET.fullmatch(url_path)
        if not match:
            return None
        path = self.blobs_dir / match.group(1)
        # A regular file in the store itself, not a link: a symbolic link there (put by anyone
        # but the store) must not serve a file from elsewhere on the machine.
        try:
            mode = path.lstat().st_mode
        except OSError:
            return None
        if not stat.S_ISREG(mode) or self.blobs_dir.is_symlink():
            return None
        return path

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's writer lock (one writer at a time, across processes)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def store_blob(self, source: Path) -> tuple[str, int]:
        """Copy `source` into the content-addressed store; return its sha256 and length."""
        digest, length = _sha256_file(source)
        destination = self.blobs_dir / digest
        if not destination.exists():
            temporary = destination.with_name(f".{digest}.tmp")
            shutil.copyfile(source, temporary)
            os.replace(temporary, destination)
        return digest, length

    def add_targets(self, new: list[NewTarget], *, replace: bool = False) -> int:
        """Publish `new` targets; return the new targets version.

        A target path is immutable once published (nodes and rollouts refer to it): publishing
        different bytes under an existing path needs `replace=True`.
        """
        with self.locked():
            targets = self.targets()
            for item in new:
                digest, length = self.store_blob(item.source)
                existing = targets.signed.targets.get(item.path)
                if existing is not None and existing.hashes.get("sha256") != digest and not replace:
                    raise TufRepositoryError(
                        f"{item.path} is already published with other content; publish a new "
                        "version instead"
                    )
                targets.signed.targets[item.path] = TargetFile(
                    length, {"sha256": digest}, item.path, {"custom": dict(item.custom)}
                )
            return self._publish_targets(targets)

    def refresh(self, *, force: bool = False) -> list[str]:
        """Re-sign the online roles that used up `refresh_at_fraction` of their lifetime.

        Returns the roles re-signed. A new targets version implies new snapshot and timestamp
        versions; a new snapshot implies a new timestamp.
        """
        with self.locked():
            if force or self._due(self.targets().signed, Targets.type):
                self._publish_targets(self.targets())
                return list(ONLINE_ROLES)
            if self._due(self.snapshot().signed, Snapshot.type):
                self._publish_snapshot()
                return [Snapshot.type, Timestamp.type]
            if self._due(self.timestamp().signed, Timestamp.type):
                self._publish_timestamp()
                return [Timestamp.type]
            return []

    def refresh_due(self) -> bool:
        """Whether `refresh()` has anything to do."""
        return (
            self.timestamp_due()
            or self._due(self.snapshot().signed, Snapshot.type)
            or self._due(self.targets().signed, Targets.type)
        )

    def timestamp_due(self) -> bool:
        """Whether the timestamp needs re-signing: one small file read, fit for every request."""
        return self._due(self.timestamp().signed, Timestamp.type)

    def root_signers(self, offline_keys_dir: Path) -> list[Signer]:
        """The root keys found in `offline_keys_dir`, checked to be keys of the current root."""
        root = self.root().signed
        role = root.roles[Root.type]
        signers = []
        for path in sorted(Path(offline_keys_dir).glob("*.pem")):
            try:
                signer = _load_signer(path)
            except ProvisioningError as exc:
                raise TufRepositoryError(str(exc)) from None
            if signer.public_key.keyid in role.keyids:
                signers.append(signer)
        if len(signers) < role.threshold:
            raise TufRepositoryError(
                f"{offline_keys_dir} holds {len(signers)} of this repository's root keys; "
                f"signing needs {role.threshold}"
            )
        return signers[: role.threshold]

    # --- internals --------------------------------------------------------------------------

    def _due(self, signed: Targets | Snapshot | Timestamp, role: str) -> bool:
        lifetime = self.settings.expiry(role)
        return signed.expires - self.clock() < lifetime * self.settings.refresh_at_fraction

    def _online_signer(self, role: str) -> Signer:
        path = self.keys_dir / f"{role}.pem"
        if not path.is_file():
            raise TufRepositoryError(f"the online {role} key {path} is missing")
        return _load_signer(path)

    def _publish_targets(self, targets: Metadata[Targets]) -> int:
        targets.signed.version += 1
        targets.signed.expires = self.clock() + self.settings.targets_expiry
        targets.signatures.clear()
        targets.sign(self._online_signer(Targets.type))
        version = targets.signed.version
        _write_metadata(self.metadata_dir / f"{version}.targets.json", targets)
        self._publish_snapshot(targets_version=version)
        return version

    def _publish_snapshot(self, targets_version: int | None = None) -> None:
        snapshot = self.snapshot()
        if targets_version is None:
            targets_version = snapshot.signed.meta["targets.json"].version
        snapshot.signed.version += 1
        snapshot.signed.expires = self.clock() + self.settings.snapshot_expiry
        snapshot.signed.meta["targets.json"] = _meta_file(
            self.metadata_dir / f"{targets_version}.targets.json", targets_version
        )
        snapshot.signatures.clear()
        snapshot.sign(self._online_signer(Snapshot.type))
        _write_metadata(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", snapshot)
        self._publish_timestamp(snapshot_version=snapshot.signed.version)

    def _publish_timestamp(self, snapshot_version: int | None = None) -> None:
        timestamp = self.timestamp()
        if snapshot_version is None:
            snapshot_version = timestamp.signed.snapshot_meta.version
        timestamp.signed.version += 1
        timestamp.signed.expires = self.clock() + self.settings.timestamp_expiry
        timestamp.signed.snapshot_meta = _meta_file(
            self.metadata_dir / f"{snapshot_version}.snapshot.json", snapshot_version
        )
        timestamp.signatures.clear()
        timestamp.sign(self._online_signer(Timestamp.type))
        _write_metadata(self.metadata_dir / "timestamp.json", timestamp)
        self._prune_metadata()

    def _prune_metadata(self) -> None:
        keep = self.settings.keep_versions
        newest: dict[str, int] = {}
        files = []
        for path in self.metadata_dir.iterdir():
            match = _VERSIONED.fullmatch(path.name)
            if match and match.group(2) != Root.type:  # every root version stays: chain of trust
                version, role = int(match.group(1)), match.group(2)
                newest[role] = max(newest.get(role, 0), version)
                files.append((path, role, version))
        for path, role, version in files:
            if version <= newest[role] - keep:
                path.unlink(missing_ok=True)


def _meta_file(path: Path, version: int) -> MetaFile:
    data = path.read_bytes()
    return MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})


def _write_metadata(path: Path, metadata: Metadata) -> None:
    write_file_atomic(path, metadata.to_bytes(JSONSerializer(compact=False)))


def _sha256_file(path: Path) -> tuple[str, int]:
    sha, length = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            length += len(chunk)
    return sha.hexdigest(), length


def _write_signer(path: Path, signer: CryptoSigner) -> None:
    write_file_atomic(path, signer.private_bytes, PRIVATE_MODE)


def _load_signer(path: Path) -> CryptoSigner:
    return CryptoSigner(load_private_key(path))
