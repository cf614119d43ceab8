"""What the node trusts: the TUF repository of its control plane, from the root pinned at
enrollment, and the publisher list that repository's root keys signed.

    trust = TrustedRepository(update_dir / "tuf", server_url, transport, journal)
    trust.refresh()                               # root -> timestamp -> snapshot -> targets
    targets = trust.variants("cnn", 2)            # TUF TargetFiles of cnn@2, by variant
    trust.verify_download(target, path)           # length + hashes, as TUF says
    publishers = trust.publishers()               # root-signed, never older than seen before

python-tuf's `Updater` does the TUF client workflow (rollback, freeze and mix-and-match
protection, key thresholds, root rotation); this module adds the node's own rules around it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from agent.update.errors import TrustFailed
from agent.update.journal import Journal
from agent.update.transport import MutualTlsFetcher, Transport
from provisioning.package import VARIANT_NAME
from provisioning.publishers import TARGET_PATH, PublisherList, PublisherTrustError

PINNED_ROOT = "pinned-root.json"
METADATA_PATH = "/v1/tuf/metadata/"
TARGETS_PATH = "/v1/tuf/targets/"
_PUBLISHERS_MARK = "publishers_version"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def pin_root(tuf_dir: Path, root_bytes: bytes) -> bool:
    """Pin the control plane's TUF root (at enrollment). True if pinned now, False if it already
    was; a different root than the pinned one is refused (TUF rotates roots itself)."""
    tuf_dir.mkdir(parents=True, exist_ok=True)
    pinned = tuf_dir / PINNED_ROOT
    try:
        Metadata[Root].from_bytes(root_bytes)
    except Exception as exc:
        raise TrustFailed(f"not TUF root metadata: {exc}") from None
    if pinned.exists():
        if pinned.read_bytes() == root_bytes:
            return False
        raise TrustFailed(
            f"a different TUF root is pinned in {pinned}; the repository rotates its root "
            "itself. To trust another repository, remove that file deliberately first."
        )
    temporary = pinned.with_suffix(".tmp")
    temporary.write_bytes(root_bytes)
    temporary.replace(pinned)
    return True


class TrustedRepository:
    def __init__(
        self, tuf_dir: Path, server_url: str, transport: Transport, journal: Journal
    ) -> None:
        self.tuf_dir = Path(tuf_dir)
        self.server_url = server_url.rstrip("/")
        self.transport = transport
        self.journal = journal
        pinned = self.tuf_dir / PINNED_ROOT
        if not pinned.is_file():
            raise TrustFailed(
                f"no TUF root pinned in {self.tuf_dir}; enroll the node or run "
                "`edgefleet-agent apply --root root.json` once"
            )
        limit = transport.limits.max_metadata_bytes
        config = UpdaterConfig(
            root_max_length=limit,
            timestamp_max_length=min(limit, 64 * 1024),
            snapshot_max_length=limit,
            targets_max_length=limit,
        )
        (self.tuf_dir / "metadata").mkdir(parents=True, exist_ok=True)
        (self.tuf_dir / "trust").mkdir(parents=True, exist_ok=True)
        try:
            # The pinned root bootstraps every run; newer roots the repository rotated to are
            # in metadata/root_history and are re-verified from it, one version at a time.
            self._updater = Updater(
                metadata_dir=str(self.tuf_dir / "metadata"),
                metadata_base_url=self.server_url + METADATA_PATH,
                target_dir=str(self.tuf_dir / "trust"),
                target_base_url=self.server_url + TARGETS_PATH,
                fetcher=MutualTlsFetcher(transport),
                config=config,
                bootstrap=pinned.read_bytes(),
            )
        except (OSError, tuf_exceptions.RepositoryError) as exc:
            raise TrustFailed(f"the pinned TUF root is unusable: {exc}") from None

    def refresh(self) -> None:
        """Fetch and verify fresh top-level metadata (once per run, as python-tuf requires)."""
        with _refusals():
            self._updater.refresh()

    def variants(self, model: str, version: int) -> dict[str, TargetFile]:
        """The targets of model@version by variant name, each confirmed through the Updater."""
        prefix = f"{model}/{version}/"
        # python-tuf looks targets up by path and has no listing; the names come from the
        # top-level targets metadata the Updater just verified and stored, and each one is
        # then looked up through the Updater itself.
        stored = Metadata[Targets].from_file(str(self.tuf_dir / "metadata" / "targets.json"))
        found: dict[str, TargetFile] = {}
        for path in sorted(stored.signed.targets):
            if not (path.startswith(prefix) and path.endswith(".tar")):
                continue
            info = self._targetinfo(path)
            custom = info.custom if isinstance(info.custom, dict) else {}
            variant = str(custom.get("variant", ""))
            if variant and f"{prefix}{variant}.tar" == path:
                check_target(variant, info)
                found[variant] = info
        return found

    def publishers(self) -> PublisherList:
        """The root-signed publisher list, fresh from TUF; never older than one seen before."""
        target = self._targetinfo(TARGET_PATH)
        destination = self.tuf_dir / "trust" / "publishers.json"
        cached = self._updater.find_cached_target(target, str(destination))
        if cached is None:
            with _refusals():
                self._updater.download_target(target, str(destination))
        root = Metadata[Root].from_file(str(self.tuf_dir / "metadata" / "root.json")).signed
        try:
            listing = PublisherList.verify(destination.read_bytes(), root)
        except PublisherTrustError as exc:
            raise TrustFailed(str(exc)) from None
        seen = self.journal.trust_mark(_PUBLISHERS_MARK)
        if listing.version < seen:
            raise TrustFailed(
                f"publisher list version {listing.version} is older than version {seen} this "
                "node already trusted: refusing a rollback"
            )
        self.journal.raise_trust_mark(_PUBLISHERS_MARK, listing.version)
        return listing

    def _targetinfo(self, path: str) -> TargetFile:
        with _refusals():
            info = self._updater.get_targetinfo(path)
        if info is None:
            raise TrustFailed(f"{path} is not a target of the control plane's TUF repository")
        return info


def check_target(variant: str, info: TargetFile) -> None:
    """Refuse target metadata the node cannot safely build file names from.

    Only the control plane's online TUF key signs these values, and the node uses them before
    any publisher signature is checked: the SHA-256 hash names the download, the variant a
    directory. A path separator or `..` in either would reach outside the node's directories.
    """
    sha256 = info.hashes.get("sha256")
    if sha256 is None:
        raise TrustFailed(
            f"{info.path}: the TUF metadata gives no sha256 hash, which this node needs to name "
            "and verify the download; the control plane must publish it with one"
        )
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise TrustFailed(
            f"{info.path}: TUF sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits: "
            "refusing forged or damaged target metadata"
        )
    if not isinstance(variant, str) or not VARIANT_NAME.fullmatch(variant):
        raise TrustFailed(
            f"{info.path}: TUF variant {str(variant)[:80]!r} is not a variant name "
            f"({VARIANT_NAME.pattern}): refusing forged or damaged target metadata"
        )
    length = info.length
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise TrustFailed(
            f"{info.path}: TUF length {str(length)[:80]!r} is not a whole number of bytes: "
            "refusing forged or damaged target metadata"
        )


def target_url(server_url: str, target: TargetFile) -> str:
    """Where a target is fetched: by its hash, `<dir>/<sha256>.<name>` (consistent snapshots)."""
    directory, _, name = target.path.rpartition("/")
    prefix = f"{quote(directory)}/" if directory else ""
    digest = target.hashes["sha256"]
    return f"{server_url.rstrip('/')}{TARGETS_PATH}{prefix}{digest}.{quote(name)}"


@contextmanager
def _refusals() -> Iterator[None]:
    """python-tuf's errors as the journal's: refused for good, or worth another try."""
    try:
        yield
    except tuf_exceptions.DownloadLengthMismatchError as exc:
        # More bytes than the signed metadata allows: an attack, not a bad connection.
        raise TrustFailed(f"TUF metadata refused: {exc}") from None
    except tuf_exceptions.DownloadError as exc:
        raise TrustFailed(f"cannot fetch TUF metadata: {exc}", retryable=True) from None
    except tuf_exceptions.RepositoryError as exc:
        raise TrustFailed(f"TUF metadata refused: {type(exc).__name__}: {exc}") from None
