"""Signed model updates on the node: the crash-safe lifecycle from desired state to serving.

Two keys must agree before a node runs a model: the control plane's TUF keys (freshness, no
rollback, no mix-and-match; python-tuf's ngclient over mutual TLS, from the root pinned at
enrollment) and the publisher's model-signing key (provenance; a publisher registered, in
root-signed trust data, for that model name). Every step is journaled in SQLite so a crash or
power cut at any point restarts into the last active version and resumes:

    DOWNLOADING -> VERIFIED -> UNPACKED -> SIGNATURE_OK -> SELECTED -> SELF_TESTED -> ACTIVE
    (or FAILED with its reason; ROLLED_BACK when the health watch after activation objects)

    from agent.update import DesiredState, UpdateSettings, apply
    outcomes = apply(DesiredState.load("desired.toml"), settings)

`edgefleet-agent apply desired.toml` runs this from a file; the sync loop calls `apply` with
the desired state the control plane sends. Modules: lifecycle (the steps), journal, trust
(TUF + publishers), transport (mTLS, resumable downloads), layout (files, atomic switch),
choice (selection + self-test), health, desired, checkpoints (test hook), agent_client.
"""

from __future__ import annotations

from pathlib import Path

from agent.update.checkpoints import Checkpoints
from agent.update.config import UPDATE_DIR, HealthPolicy, UpdateLimits, UpdateSettings
from agent.update.desired import DesiredModel, DesiredState, DesiredStateError
from agent.update.errors import UpdateError
from agent.update.journal import ACTIVE, FAILED, ROLLED_BACK
from agent.update.layout import Layout
from agent.update.lifecycle import PENDING, REFUSED, UP_TO_DATE, Lifecycle, Outcome, UpdateBusy
from agent.update.trust import pin_root

# Outcomes that mean the desired version is not serving and will not be without a change.
FAILED_STATES = (FAILED, ROLLED_BACK, REFUSED)


def pin_enrollment_root(state_dir: Path, root_bytes: bytes) -> bool:
    """Pin the control plane's TUF root for the node whose state is in `state_dir`.

    Enrollment calls this with the root it received over the CA-pinned TLS channel; True if
    pinned now, False if that root was already pinned; a different root raises UpdateError.
    """
    return pin_root(Layout(Path(state_dir) / UPDATE_DIR, Path(state_dir)).tuf, root_bytes)


def apply(
    desired: DesiredState,
    settings: UpdateSettings,
    *,
    checkpoints: Checkpoints | None = None,
    retry_rolled_back: bool = False,
) -> list[Outcome]:
    """Recover from any interrupted run, then bring every desired model to its version."""
    with Lifecycle(
        settings, checkpoints, retry_rolled_back=retry_rolled_back, health=desired.health
    ) as lifecycle:
        lifecycle.recover()
        outcomes = [lifecycle.update(model, desired.generation) for model in desired.models]
        # Also a version whose watch a killed run left unfinished, under the policy it began.
        outcomes = [lifecycle.watch(outcome) for outcome in outcomes]
    return outcomes


__all__ = [
    "ACTIVE",
    "FAILED",
    "FAILED_STATES",
    "PENDING",
    "REFUSED",
    "ROLLED_BACK",
    "UP_TO_DATE",
    "Checkpoints",
    "DesiredModel",
    "DesiredState",
    "DesiredStateError",
    "HealthPolicy",
    "Lifecycle",
    "Outcome",
    "UpdateBusy",
    "UpdateError",
    "UpdateLimits",
    "UpdateSettings",
    "apply",
    "pin_enrollment_root",
    "pin_root",
]
