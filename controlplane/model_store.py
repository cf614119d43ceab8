"""Publishing a signed package: check the publisher, split it into variants, add TUF targets.

    store = ModelStore(TufRepository(state / "tuf"))
    published = store.push(Path("cnn-pkg"))       # -> [PublishedVariant(...), ...]

`push` accepts a package only if its signature verifies with a registered publisher's key and
that publisher may sign the model's name, which is what every node checks again on its own.
It first copies the package into a private scratch directory and verifies and packs that copy,
so a file changed in the package directory meanwhile cannot be published unsigned.
Each variant becomes one target, `<model>/<version>/<variant>.tar`: a deterministic tar of the
manifest, the golden vectors, the signature and that variant's files, so a node downloads only
what it can run. Custom metadata on the target names model, version, variant, runtime,
precision and the publisher's key id. Blobs are content-addressed in the TUF repository.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from controlplane.publishers import PublisherRegistry
from controlplane.tuf_repository import NewTarget, TufRepository, TufRepositoryError
from provisioning.archive import pack, snapshot
from provisioning.package import SIGNATURE_FILE, Manifest
from provisioning.publishers import Publisher, authenticate_package
from provisioning.signing import UNSIGNED

# Beside a package but never part of it (git metadata): not copied, so not published.
_NOT_PACKAGE = tuple(name for name in UNSIGNED if name != SIGNATURE_FILE)


class PushRefused(ValueError):
    """The package cannot be published; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class PublishedVariant:
    target: str
    sha256: str
    length: int
    custom: dict


def target_path(model: str, version: int | str, variant: str) -> str:
    return f"{model}/{version}/{variant}.tar"


class ModelStore:
    def __init__(self, repository: TufRepository) -> None:
        self.repository = repository
        self.publishers = PublisherRegistry(repository)

    def push(self, package_dir: Path) -> list[PublishedVariant]:
        package_dir = Path(package_dir)
        with tempfile.TemporaryDirectory(prefix="edgefleet-push-") as scratch:
            copy = Path(scratch) / "package"
            try:
                snapshot(package_dir, copy, skip=_NOT_PACKAGE)
                publisher, package = authenticate_package(
                    copy, self.publishers.current(), strict=False
                )
            except ValueError as exc:  # ArchiveError, SignatureError, ManifestError
                message = str(exc).replace(f"{copy}/", "").replace(f"{copy}: ", "")
                raise PushRefused(f"{package_dir}: {message}") from None
            except OSError as exc:  # exc.filename: the package, or a file in it (relative)
                where = "" if exc.filename == str(package_dir) else f" ({exc.filename})"
                raise PushRefused(f"{package_dir}: cannot read{where}: {exc.strerror}") from None
            return self._publish(publisher, package.manifest, copy, Path(scratch))

    def _publish(
        self, publisher: Publisher, manifest: Manifest, package_dir: Path, scratch: Path
    ) -> list[PublishedVariant]:
        new_targets = []
        for variant in manifest.variants:
            tar = scratch / f"{variant.name}.tar"
            pack(package_dir, [*manifest.files_for([variant.name]), SIGNATURE_FILE], tar)
            custom = {
                "model": manifest.name,
                "version": manifest.version,
                "variant": variant.name,
                "runtime": variant.runtime,
                "precision": variant.precision,
                "publisher": publisher.key_id,
            }
            path = target_path(manifest.name, manifest.version, variant.name)
            new_targets.append(NewTarget(path, tar, custom))
        try:
            self.repository.add_targets(new_targets)
        except (ValueError, TufRepositoryError) as exc:
            raise PushRefused(str(exc)) from None
        targets = self.repository.targets().signed.targets
        published: list[PublishedVariant] = []
        for item in new_targets:
            info = targets[item.path]
            published.append(
                PublishedVariant(item.path, info.hashes["sha256"], info.length, item.custom)
            )
        return published
