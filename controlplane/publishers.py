"""The publisher registry: who may sign which models, kept as root-signed trust data.

The registry is the signed document itself (`<tuf>/trust/publishers.json`, format in
provisioning.publishers), published to nodes as the TUF target `edgefleet/publishers.json`.
Changing it needs the offline root keys: registering a publisher is as weighty as rotating a key.

    registry = PublisherRegistry(repo)
    registry.register("vision", public_key, ["cnn", "detector-*"], repo.root_signers(offline))
    registry.current().by_key(key_id)
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import Signer

from controlplane.tuf_repository import NewTarget, TufRepository, TufRepositoryError
from provisioning.keys import write_file_atomic
from provisioning.package import MODEL_NAME
from provisioning.publishers import TARGET_PATH, Publisher, PublisherList
from provisioning.signing import key_id, public_key_pem

# A model name, or a shell-style pattern of one (`*`, `?`, `[...]`).
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9*?\[][A-Za-z0-9_.*?\[\]-]{0,127}$")


class PublisherRegistry:
    def __init__(self, repository: TufRepository) -> None:
        self.repository = repository

    @property
    def path(self) -> Path:
        return self.repository.directory / "trust" / "publishers.json"

    def current(self) -> PublisherList:
        """The registered publishers (verified against the current root); empty if none yet."""
        if not self.path.is_file():
            return PublisherList(0, self.repository.clock(), ())
        return PublisherList.verify(
            self.path.read_bytes(), self.repository.root().signed, now=self.repository.clock()
        )

    def register(
        self,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        models: list[str],
        root_signers: list[Signer],
    ) -> Publisher:
        """Add a publisher, or change the models of one (same name and key)."""
        if not MODEL_NAME.fullmatch(name):
            raise TufRepositoryError(f"publisher name {name!r} must match {MODEL_NAME.pattern}")
        if not models:
            raise TufRepositoryError("name at least one model (or a pattern such as 'vision-*')")
        for pattern in models:
            if not MODEL_PATTERN.fullmatch(pattern):
                raise TufRepositoryError(
                    f"{pattern!r} is not a model name or a pattern such as 'vision-*'"
                )
        current = self.current()
        publisher = Publisher(
            name, key_id(public_key), public_key_pem(public_key).decode(), tuple(models)
        )
        clash = current.by_key(publisher.key_id)
        if clash is not None and clash.name != name:
            raise TufRepositoryError(f"that key is already registered as publisher {clash.name!r}")
        others = tuple(p for p in current.publishers if p.name != name)
        self._publish(current, (*others, publisher), root_signers)
        return publisher

    def remove(self, name: str, root_signers: list[Signer]) -> None:
        current = self.current()
        if current.by_name(name) is None:
            raise TufRepositoryError(f"no publisher named {name!r}")
        self._publish(current, tuple(p for p in current.publishers if p.name != name), root_signers)

    def _publish(
        self, current: PublisherList, publishers: tuple[Publisher, ...], signers: list[Signer]
    ) -> None:
        listing = replace(
            current,
            version=current.version + 1,
            expires=self.repository.clock() + self.repository.settings.publishers_expiry,
            publishers=publishers,
        )
        data = listing.sign(signers)
        # Check before anything is written: the signers must satisfy the root's threshold.
        PublisherList.verify(data, self.repository.root().signed, now=self.repository.clock())
        write_file_atomic(self.path, data)
        self.repository.add_targets([NewTarget(TARGET_PATH, self.path)], replace=True)
