"""Agent settings: `/etc/edgefleet/agent.toml` (written by `edgefleet-agent install`), then
`EDGEFLEET_*` variables, then command-line flags. Every default works on a laptop.

    state_dir = "/var/lib/edgefleet"

    [control_plane]
    url = "https://cp.example:8443"

    [serving]
    http = "127.0.0.1:8000"
    grpc = "127.0.0.1:8001"
    socket = "/run/edgefleet/agent.sock"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.settings import SettingsError, load_settings, state_home


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/edgefleet, else ~/.local/state/edgefleet (EDGEFLEET_STATE_DIR overrides)."""
    return state_home() / "edgefleet"


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = field(default_factory=default_state_dir, metadata={"toml": "state_dir"})
    # Enrollment endpoint of the control plane; the device endpoints come with the certificate.
    control_plane_url: str = field(default="", metadata={"toml": "control_plane.url"})
    # Model repository served locally; default: <state_dir>/models.
    models: Path | None = field(default=None, metadata={"toml": "serving.models"})
    http: str = field(default="127.0.0.1:8000", metadata={"toml": "serving.http"})
    grpc: str = field(default="127.0.0.1:8001", metadata={"toml": "serving.grpc"})
    socket: Path | None = field(default=None, metadata={"toml": "serving.socket"})
    # Measure which runtime/device/options serve each model best (agent/selection); off: load
    # each model file as model.toml says, on the CPU by default.
    select: bool = field(default=True, metadata={"toml": "serving.select"})
    # Force a firmware profile by name or path instead of detecting it.
    profile: str = field(default="", metadata={"toml": "profile"})

    @property
    def identity_dir(self) -> Path:
        return self.state_dir / "identity"

    @property
    def models_dir(self) -> Path:
        return self.models or self.state_dir / "models"


def load_config(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Defaults, then the file (`path`, else `$EDGEFLEET_CONFIG`), then the environment."""
    return load_settings(AgentConfig, path, env)


__all__ = ["AgentConfig", "SettingsError", "load_config"]
