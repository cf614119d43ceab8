"""A node's damaged or odd local state meets the update lifecycle and `edgefleet-agent apply`:
recovery skips what it does not own, and apply ends with one line that says what is wrong,
never a traceback. Nothing here reaches a control plane.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from agent.cli import main
from agent.update import DesiredState, UpdateSettings, apply
from agent.update.journal import Journal

DESIRED = 'generation = 1\n[[models]]\nname = "cnn"\nversion = 1\n'


@pytest.mark.parametrize(
    ("where", "kept"),
    [("update/jobs/²", False), ("update/store/mlp/²", False), ("models/mlp/²", True)],
)
def test_recovery_skips_directories_named_with_non_ascii_digits(tmp_path, where, kept):
    """'²'.isdigit() is true, int('²') raises: such a name is no version or job of ours."""
    settings = UpdateSettings(
        state_dir=tmp_path,
        models_dir=tmp_path / "models",
        server_url="https://127.0.0.1:1",
        ssl_context=ssl.create_default_context,
        region="eu",
    )
    Journal(settings.database).start("mlp", 1, 1, [])  # mlp: a model the lifecycle manages
    (tmp_path / where).mkdir(parents=True)
    assert apply(DesiredState(1, ()), settings) == []
    assert (tmp_path / where).is_dir() == kept  # serving's own directories are not ours


def _apply(tmp_path: Path, capsys, *flags: str) -> str:
    (tmp_path / "desired.toml").write_text(DESIRED)
    code = main(["apply", str(tmp_path / "desired.toml"), "--agent", "off", *flags])
    error = capsys.readouterr().err
    assert code == 1
    assert error.startswith("edgefleet-agent: error: ") and error.count("\n") == 1, error
    return error


def _flags(tmp_path: Path, state_dir: Path) -> list[str]:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).touch()
    return [
        *("--state-dir", str(state_dir), "--models", str(tmp_path / "models")),
        *("--server", "https://127.0.0.1:9", "--region", "eu"),
        *("--ca", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "cert.pem")),
        *("--key", str(tmp_path / "key.pem")),
    ]


def test_apply_with_a_state_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "state").write_text("")
    error = _apply(tmp_path, capsys, *_flags(tmp_path, tmp_path / "state"))
    assert "cannot use the state directory" in error and "Not a directory" in error


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_apply_with_a_damaged_journal(tmp_path, capsys, damage):
    database = tmp_path / "state" / "agent.db"
    if damage == "garbage":
        database.parent.mkdir()
        database.write_bytes(b"\x13not sqlite\x00" * 400)
    else:
        database.mkdir(parents=True)
    error = _apply(tmp_path, capsys, *_flags(tmp_path, tmp_path / "state"))
    assert f"cannot use the update journal {database}" in error and "move it aside" in error


@pytest.mark.parametrize(
    ("enrollment", "message"),
    [
        ({"endpoints": "https://cp.example:8444"}, "names no device URL"),
        ({"endpoints": {"device_url": 8444}}, "names no device URL"),
        ([1, 2], "enrollment.json"),
    ],
    ids=["endpoints-a-string", "url-a-number", "a-list"],
)
def test_apply_with_a_damaged_enrollment(tmp_path, capsys, enrollment, message):
    identity = tmp_path / "state" / "identity"
    identity.mkdir(parents=True)
    (identity / "enrollment.json").write_text(json.dumps(enrollment))
    error = _apply(tmp_path, capsys, "--state-dir", str(tmp_path / "state"))
    assert message in error


def test_apply_with_a_damaged_device_certificate(tmp_path, capsys):
    identity = tmp_path / "state" / "identity"
    (identity / "current").mkdir(parents=True)
    (identity / "enrollment.json").write_text(
        json.dumps({"endpoints": {"device_url": "https://127.0.0.1:9"}})
    )
    for name in ("cert.pem", "key.pem"):
        (identity / "current" / name).write_text("garbage")
    error = _apply(tmp_path, capsys, "--state-dir", str(tmp_path / "state"))
    assert "cert.pem is damaged" in error
