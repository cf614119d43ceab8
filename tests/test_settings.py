"""The settings loader: values from a TOML file, then the environment; bad ones refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from provisioning.settings import SettingsError, load_settings


@dataclass(frozen=True)
class Example:
    state_dir: Path = field(default=Path("/var/lib/example"), metadata={"toml": "state_dir"})
    socket: Path | None = field(default=None, metadata={"toml": "serving.socket"})
    days: int = field(default=30, metadata={"toml": "certificates.days"})
    poll_seconds: float = field(default=2.0, metadata={"toml": "poll_seconds"})


def from_file(tmp_path: Path, text: str) -> Example:
    path = tmp_path / "example.toml"
    path.write_text(text)
    return load_settings(Example, path, env={})


def test_values_come_from_the_file_then_the_environment(tmp_path):
    loaded = from_file(tmp_path, 'state_dir = "/srv/x"\n[certificates]\ndays = 7\n')
    assert (loaded.state_dir, loaded.days, loaded.poll_seconds) == (Path("/srv/x"), 7, 2.0)
    env = {"EDGEFLEET_DAYS": "9", "EDGEFLEET_POLL_SECONDS": "0.5"}
    assert load_settings(Example, env=env) == Example(days=9, poll_seconds=0.5)


def test_an_empty_path_is_refused_unless_the_setting_is_optional(tmp_path):
    with pytest.raises(SettingsError, match=r"example\.toml: state_dir is empty; give it a path"):
        from_file(tmp_path, 'state_dir = ""\n')
    with pytest.raises(SettingsError, match="EDGEFLEET_STATE_DIR: state_dir is empty"):
        load_settings(Example, env={"EDGEFLEET_STATE_DIR": ""})
    assert from_file(tmp_path, '[serving]\nsocket = ""\n').socket is None
    assert load_settings(Example, env={"EDGEFLEET_SOCKET": ""}).socket is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[certificates]\ndays = inf\n", "days has a bad value inf"),  # was an OverflowError
        ("[certificates]\ndays = -inf\n", "days has a bad value -inf"),
        ("[certificates]\ndays = nan\n", "days has a bad value nan"),
        ("poll_seconds = nan\n", "poll_seconds has a bad value nan"),
        ("poll_seconds = inf\n", "poll_seconds has a bad value inf"),
    ],
)
def test_infinite_and_nan_numbers_are_refused_in_a_file(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        from_file(tmp_path, text)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_infinite_and_nan_numbers_are_refused_in_the_environment(value):
    with pytest.raises(SettingsError, match="EDGEFLEET_POLL_SECONDS: poll_seconds has a bad value"):
        load_settings(Example, env={"EDGEFLEET_POLL_SECONDS": value})
    with pytest.raises(SettingsError, match="EDGEFLEET_DAYS: days has a bad value"):
        load_settings(Example, env={"EDGEFLEET_DAYS": value})


def test_a_fraction_for_a_whole_number_setting_is_refused_not_cut_down(tmp_path):
    with pytest.raises(SettingsError, match=r"days has a bad value 3\.5"):
        from_file(tmp_path, "[certificates]\ndays = 3.5\n")
    with pytest.raises(SettingsError, match="days has a bad value"):
        load_settings(Example, env={"EDGEFLEET_DAYS": "3.5"})
    assert from_file(tmp_path, "[certificates]\ndays = 3\n").days == 3
