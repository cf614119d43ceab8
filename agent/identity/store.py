"""The identity directory of a device and the credentials in it.

    identity/
      ca.pem                    the device CA (pinned by the enrollment token)
      enrollment.json           device id, region, tags and the endpoints the control plane gave
      current -> generations/<serial>
      generations/<serial>/key.pem   private key, 0600, made on this device, never sent anywhere
      generations/<serial>/cert.pem  its certificate

A renewal writes a new generation next to the current one and then swaps the `current` symlink
with one rename, so a crash at any point leaves a matching key and certificate in `current`. The
previous generation is kept until the next renewal: a connection opened with it stays valid.
Readers that want stable paths use `identity/current/key.pem` and `identity/current/cert.pem`.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.errors import IdentityError
from provisioning.identity import DeviceIdentity, device_identity_of, serial_hex
from provisioning.keys import PRIVATE_MODE, private_key_pem, write_file_atomic
from provisioning.tls import client_context

KEEP_GENERATIONS = 2


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """One generation of key + certificate, with the CA that issued it."""

    key_file: Path
    cert_file: Path
    ca_file: Path
    certificate: x509.Certificate

    @property
    def identity(self) -> DeviceIdentity:
        return device_identity_of(self.certificate)

    @property
    def serial(self) -> str:
        return serial_hex(self.certificate)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context presenting this certificate and trusting only the device CA."""
        return client_context(
            ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
        )

    def grpc_channel_credentials(self):
        """gRPC channel credentials for the control plane's Fleet service (mutual TLS)."""
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes(),
        )


class IdentityStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def enrollment_file(self) -> Path:
        return self.directory / "enrollment.json"

    @property
    def current_dir(self) -> Path:
        return self.directory / "current"

    def current(self) -> DeviceCredentials | None:
        """The credentials in use, or None before enrollment."""
        key_file, cert_file = self.current_dir / "key.pem", self.current_dir / "cert.pem"
        if not cert_file.exists() or not key_file.exists():
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except ValueError as exc:
            raise IdentityError(f"{cert_file} is damaged; re-enroll this device") from exc
        return DeviceCredentials(key_file, cert_file, self.ca_file, cert)

    def enrollment(self) -> dict[str, Any]:
        """The enrollment record; IdentityError if it is missing or damaged."""
        path = self.enrollment_file
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise IdentityError(
                f"{self.directory} holds no enrollment; run: edgefleet-agent install"
            ) from exc
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON
            raise IdentityError(
                f"{path} is damaged ({exc}); re-enroll: edgefleet-agent enroll --token TOKEN"
            ) from exc
        if not isinstance(record, dict):
            raise IdentityError(
                f"{path} is damaged (not a JSON object); re-enroll: "
                "edgefleet-agent enroll --token TOKEN"
            )
        return record

    def save(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        ca_pem: bytes,
        enrollment: dict[str, Any],
    ) -> DeviceCredentials:
        """Install a new generation and make it current, atomically."""
        if certificate.public_key() != key.public_key():
            raise IdentityError("the certificate received does not match this device's key")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        generations = self.directory / "generations"
        target = generations / serial_hex(certificate)
        target.mkdir(parents=True, exist_ok=True)
        write_file_atomic(target / "key.pem", private_key_pem(key), PRIVATE_MODE)
        write_file_atomic(target / "cert.pem", certificate.public_bytes(serialization.Encoding.PEM))
        write_file_atomic(self.ca_file, ca_pem)
        write_file_atomic(
            self.enrollment_file, (json.dumps(enrollment, indent=2, sort_keys=True) + "\n").encode()
        )
        link = self.directory / ".current.new"
        link.unlink(missing_ok=True)
        link.symlink_to(Path("generations") / target.name)
        os.replace(link, self.current_dir)
        self._prune(generations, keep={target.name})
        credentials = self.current()
        assert credentials is not None
        return credentials

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _prune(self, generations: Path, keep: set[str]) -> None:
        entries = sorted(
            (p for p in generations.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        for old in entries[:-KEEP_GENERATIONS]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
