"""What the serving data plane holds for selection: this node's facts, profile and decisions.

    selector = Selector(state_dir)                       # probe + profile once, at start-up
    decision = selector.decide(version_dir, model="cnn", config=raw_model_toml)
    session = decision.load()

`decide` blocks for as long as measuring takes (seconds, or a minute for an NPU compile) when
no stored decision fits; from asyncio call it as `await asyncio.to_thread(selector.decide, ...)`.
With a stored decision it returns in milliseconds without importing any runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent import config as agent_config
from agent.profiles import PROFILE_ENV, Profile, resolve
from agent.selection.cache import DecisionCache
from agent.selection.decide import choose
from agent.selection.decision import Decision
from agent.selection.settings import model_settings
from runtimes.hardware import HardwareFacts, probe

STATE_DIR_ENV = "EDGEFLEET_STATE_DIR"
DATABASE = "agent.db"


def default_state_dir() -> Path:
    """$EDGEFLEET_STATE_DIR, else the agent config's default (~/.local/state/edgefleet)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    return agent_config.default_state_dir()


class Selector:
    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        profile: str | None = None,
        profiles_dir: str | Path | None = None,
        facts: HardwareFacts | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        """profile: a name or .toml path to force (default $EDGEFLEET_PROFILE, else detected)."""
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.facts = facts or probe()
        forced = profile or os.environ.get(PROFILE_ENV)
        self.profile: Profile = resolve(forced, self.facts, profiles_dir)
        self.cache = DecisionCache(self.state_dir / DATABASE)
        self.progress = progress

    def decide(
        self,
        model_dir: str | Path,
        *,
        model: str | None = None,
        config: Mapping[str, Any] | None = None,
        reuse: bool = True,
    ) -> Decision:
        """The decision for one model version; `config` is its parsed model.toml, if any."""
        tolerance, pin = model_settings(config or {})
        return choose(
            model_dir,
            profile=self.profile,
            cache=self.cache,
            state_dir=self.state_dir,
            model=model,
            tolerance=tolerance,
            pin=pin,
            facts=self.facts,
            reuse=reuse,
            progress=self.progress,
        )
