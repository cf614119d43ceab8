"""Where the update lifecycle keeps its files, and the few file operations it trusts.

    <state>/update/
      tuf/                  pinned-root.json, python-tuf's metadata cache, the publisher list
      downloads/            <sha256>.part (resumable) -> <sha256>.tar (TUF-verified)
      jobs/<id>/            package/ (unpacked), select/ (variants for selection),
                            serving/<model>/<version>/ (what serving will load)
      store/<model>/<ver>/  installed versions: package/ and serving/, kept for rollback
    <models>/<model>/<ver>/ the serving repository: only complete directories, renamed in
    <models>/.edgefleet-staging/  .edgefleet-trash/   (serving ignores dot-directories)

A directory becomes visible under its final name only by `rename` of a complete, fsynced copy,
and leaves by `rename` into a trash directory before it is deleted. Anything named `*.tmp`,
staging or trash is scratch that recovery may delete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Layout:
    update_dir: Path
    models_dir: Path

    @property
    def tuf(self) -> Path:
        return self.update_dir / "tuf"

    @property
    def downloads(self) -> Path:
        return self.update_dir / "downloads"

    @property
    def jobs(self) -> Path:
        return self.update_dir / "jobs"

    @property
    def store(self) -> Path:
        return self.update_dir / "store"

    @property
    def staging(self) -> Path:
        return self.models_dir / ".edgefleet-staging"

    @property
    def trash(self) -> Path:
        return self.models_dir / ".edgefleet-trash"

    def partial(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.part"

    def verified(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.tar"

    def job_dir(self, job_id: int) -> Path:
        return self.jobs / str(job_id)

    def stored(self, model: str, version: int) -> Path:
        return self.store / model / str(version)

    def served(self, model: str, version: int) -> Path:
        return self.models_dir / model / str(version)

    def create(self) -> None:
        for directory in (self.tuf, self.downloads, self.jobs, self.store, self.models_dir):
            directory.mkdir(parents=True, exist_ok=True)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a directory of plain files, hard-linking where possible (same filesystem: models are
    never written in place, so sharing inodes is safe and makes activation instant)."""
    destination.mkdir(parents=True)
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if entry.is_symlink():
            raise OSError(f"{entry}: unexpected symbolic link")
        if entry.is_dir():
            copy_tree(entry, target)
            continue
        try:
            os.link(entry, target)
        except OSError:
            shutil.copyfile(entry, target)
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_dir(destination)


def place(source: Path, destination: Path, scratch: Path) -> None:
    """Copy `source` to `destination` atomically: build the copy in `scratch`, rename it in.

    An existing `destination` is moved into `scratch` first and deleted afterwards.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    staged = scratch / f"{destination.name}.{uuid.uuid4().hex[:8]}.tmp"
    copy_tree(source, staged)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        discard(destination, scratch)
    os.rename(staged, destination)
    fsync_dir(destination.parent)


def discard(path: Path, scratch: Path) -> None:
    """Remove a directory: first out of sight with one rename, then from the disk."""
    if not path.exists():
        return
    scratch.mkdir(parents=True, exist_ok=True)
    doomed = scratch / f"{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def empty(directory: Path) -> None:
    """Delete everything inside `directory` (scratch space left by an interrupted run)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
