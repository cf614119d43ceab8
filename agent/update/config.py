"""Settings of the update lifecycle: where things live, whom to trust, and every limit.

Limits sit in `UpdateLimits` (one place, like python-tuf's UpdaterConfig); the health policy
that follows an activation in `HealthPolicy`; the rest in `UpdateSettings`.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.archive import ArchiveLimits

# Under the agent state directory: everything the update lifecycle keeps (see layout.py).
UPDATE_DIR = "update"


@dataclass(frozen=True, slots=True)
class UpdateLimits:
    # Largest artifact accepted, whatever the (signed) TUF metadata declares.
    max_target_bytes: int = 8 * 2**30
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    # Network: a stalled read gives up after this long; a dropped transfer is resumed (HTTP
    # Range) this many times within one run before the job waits for the next run.
    read_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    download_attempts: int = 4
    download_chunk_bytes: int = 1 << 20
    # Partial downloads are flushed to disk at least this often, so a power cut loses little.
    fsync_every_bytes: int = 16 << 20
    # TUF metadata size caps (python-tuf's defaults are generous for a repository of models).
    max_metadata_bytes: int = 4 << 20
    # Versions kept per model: the active one and the previous one (instant rollback).
    keep_versions: int = 2


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """After an activation: watch the new version this long and roll back on these limits."""

    window_s: float = 60.0
    poll_s: float = 2.0
    max_error_rate: float = 0.05
    max_p95_ms: float | None = None
    # Below this many requests in the window, the figures say nothing: no verdict.
    min_requests: int = 20


@dataclass(frozen=True)
class UpdateSettings:
    state_dir: Path
    models_dir: Path
    # The control plane's device endpoint (mutual TLS), e.g. https://cp.example:8444
    server_url: str
    ssl_context: Callable[[], ssl.SSLContext]
    region: str
    # Firmware profile by name or path; None detects it from the hardware.
    profile: str | None = None
    # The running agent to reload and watch: http://127.0.0.1:8000 or unix:/run/edgefleet.sock
    agent_url: str | None = None
    limits: UpdateLimits = field(default_factory=UpdateLimits)

    @property
    def update_dir(self) -> Path:
        return self.state_dir / UPDATE_DIR

    @property
    def database(self) -> Path:
        return self.state_dir / "agent.db"
