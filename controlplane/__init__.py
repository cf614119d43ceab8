"""The EdgeFleet control plane: devices, enrollment, registry, rollouts, telemetry, admin API."""

__version__ = "0.1.0"
