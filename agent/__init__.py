"""The EdgeFleet agent: the on-device daemon that serves models and keeps the node in sync."""

__version__ = "0.1.0"
