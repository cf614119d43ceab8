"""Package archives: a deterministic tar to publish, and an extraction that trusts nothing in it.

`pack` writes the named files of a package directory as a plain (uncompressed) POSIX tar:
sorted, with zeroed owners and times, so the same package always gives the same bytes (and so
the same content address). Model weights barely compress, and a plain tar cannot hide a
decompression bomb.

`safe_extract` is what a node runs on an archive that arrived over the network. It never calls
`tarfile.extract`: it reads member headers one by one and writes regular files itself, refusing
absolute paths, `..`, links, device nodes, FIFOs, sparse members (GNU or PAX: a few bytes of
archive that unpack to gigabytes of zeros) and anything else that is not a plain file or
directory, a member whose name collides with another's, and one whose data ends early; and
stopping at the caps of `ArchiveLimits` (member count, member size, total size, path length).
It extracts into a directory it creates, so nothing outside can be touched; on any refusal the
caller discards that directory whole.

`snapshot` copies a package directory that someone else may still be writing (a publisher's
checkout) into a private directory, following no link, so that what is verified and packed
afterwards is one fixed set of bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from provisioning.package import ManifestError, check_relative_path

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Caps on what one archive may unpack to; a package over any of them is refused."""

    max_members: int = 256
    max_member_bytes: int = 8 * 2**30
    max_total_bytes: int = 16 * 2**30
    max_path_length: int = 255


class ArchiveError(ValueError):
    """The archive is malformed or holds something a package must not contain."""


def pack(root: Path, files: list[str] | tuple[str, ...], destination: Path) -> Path:
    """Write `files` (package-relative paths) of `root` into the tar `destination`."""
    root = Path(root)
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as tar:
        for relative in sorted(set(files)):
            path = root / relative
            if path.is_symlink() or not path.is_file():
                raise ArchiveError(f"{path}: not a regular file; packages hold plain files only")
            info = tarfile.TarInfo(relative)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return destination


def snapshot(root: Path, destination: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the plain files under `root` into the new directory `destination`.

    Returns the relative paths copied. Top-level names in `skip` are left out. Every directory
    and file is opened relative to its parent's descriptor without following links, so a
    symbolic link, a device or a FIFO is refused (ArchiveError) even if it replaces a file
    while the copy runs.
    """
    destination = Path(destination)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        destination.mkdir(mode=0o700)
        return _copy_directory(root_fd, destination, "", skip)
    finally:
        os.close(root_fd)


def _copy_directory(
    dir_fd: int, destination: Path, prefix: str, skip: tuple[str, ...]
) -> list[str]:
    copied: list[str] = []
    for name in sorted(os.listdir(dir_fd)):
        if name in skip:
            continue
        relative = prefix + name
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            child = _open_plain(name, dir_fd, os.O_DIRECTORY, relative)
            try:
                (destination / relative).mkdir(mode=0o700)
                copied += _copy_directory(child, destination, relative + "/", ())
            finally:
                os.close(child)
        elif stat.S_ISREG(mode):
            source = _open_plain(name, dir_fd, os.O_NONBLOCK, relative)  # a FIFO must not block
            with open(source, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise ArchiveError(
                        f"{relative} is not a regular file; packages hold plain files only"
                    )
                with open(destination / relative, "xb") as out:
                    shutil.copyfileobj(handle, out, _CHUNK)
            copied.append(relative)
        else:
            kind = "symbolic link" if stat.S_ISLNK(mode) else "special file"
            raise ArchiveError(f"{relative} is a {kind}; packages hold plain files only")
    return copied


def _open_plain(name: str, dir_fd: int, flags: int, relative: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since it was listed
            raise ArchiveError(
                f"{relative} is a symbolic link; packages hold plain files only"
            ) from None
        raise


def safe_extract(
    archive: Path, destination: Path, limits: ArchiveLimits | None = None
) -> list[str]:
    """Extract the plain files of `archive` into the new directory `destination`.

    Returns the package-relative paths written. Raises ArchiveError naming the first member
    that breaks a rule; `destination` may then hold part of the archive and must be removed.
    """
    limits = limits or ArchiveLimits()
    destination = Path(destination)
    destination.mkdir(mode=0o700)
    written: list[str] = []
    total = 0
    with _open(archive) as tar:
        count = 0
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                raise ArchiveError(f"corrupt archive after {count} members: {exc}") from None
            if member is None:
                break
            count += 1
            if count > limits.max_members:
                raise ArchiveError(f"more than {limits.max_members} members")
            name = _member_name(member, limits)
            if member.isdir():
                _make_dirs(destination, name)
                continue
            if not member.isreg() or _is_sparse(member):
                raise ArchiveError(f"{name!r} is a {_kind(member)}; packages hold plain files only")
            if member.size > limits.max_member_bytes:
                raise ArchiveError(
                    f"{name!r} is {member.size} bytes, over the cap of "
                    f"{limits.max_member_bytes} bytes"
                )
            total += member.size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"the archive unpacks to more than {limits.max_total_bytes} bytes"
                )
            if name in written:
                raise ArchiveError(f"{name!r} appears twice")
            _write_member(tar, member, destination, name)
            written.append(name)
    return written


def _open(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:")  # plain tar only: no decompression bombs
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{Path(archive).name}: not a readable tar archive: {exc}") from None


def _member_name(member: tarfile.TarInfo, limits: ArchiveLimits) -> str:
    raw = member.name
    name = raw[:-1] if member.isdir() and raw.endswith("/") else raw
    if len(name) > limits.max_path_length:
        raise ArchiveError(f"member name longer than {limits.max_path_length} characters")
    try:
        check_relative_path(name, "archive member")
    except ManifestError:
        raise ArchiveError(
            f"member {raw!r} has an absolute path, '..' or an empty part; refusing the archive"
        ) from None
    return name


def _is_sparse(member: tarfile.TarInfo) -> bool:
    # tarfile reads GNU sparse headers and PAX GNU.sparse.* records into `sparse` (and counts
    # such a member as regular); a stray GNU.sparse record it did not use is refused as well.
    return member.issparse() or any(key.startswith("GNU.sparse.") for key in member.pax_headers)


def _kind(member: tarfile.TarInfo) -> str:
    if _is_sparse(member):
        return "sparse file (its holes would unpack to zeros never counted in the archive)"
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device node"
    if member.isfifo():
        return "FIFO"
    return f"special member (type {member.type!r})"


def _make_dirs(destination: Path, relative: str) -> Path:
    directory = destination
    for part in relative.split("/"):
        directory = directory / part
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            # Only directories this function made can be here: extraction writes nothing else.
            if directory.is_symlink() or not directory.is_dir():
                raise ArchiveError(f"{relative!r} collides with a file of the archive") from None
    return directory


def _write_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, name: str
) -> None:
    parent, _, filename = name.rpartition("/")
    directory = _make_dirs(destination, parent) if parent else destination
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"{name!r} has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(directory / filename, flags, 0o600)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        # Only this extraction writes here: the name is a directory of the archive already.
        raise ArchiveError(f"{name!r} collides with a directory of the archive") from None
    left = member.size
    with os.fdopen(fd, "wb") as out:
        while left:
            try:
                chunk = source.read(min(_CHUNK, left))
            except (tarfile.TarError, EOFError) as exc:  # the archive ends inside this member
                raise ArchiveError(f"{name!r} is truncated: {exc}") from None
            if not chunk:
                raise ArchiveError(f"{name!r} is truncated")
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())  # the caller records the extraction as done: make it so
