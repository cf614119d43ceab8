"""Firmware profiles: every shipped profile loads and matches its recorded hardware; malformed
profiles fail naming file, key and problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.profiles import (
    ProfileError,
    detect,
    explain,
    load_profile,
    load_profiles,
    profiles_dir,
    resolve,
)
from runtimes.hardware import RecordedSystem, probe

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
SHIPPED = Path(__file__).resolve().parent.parent / "firmware-profiles"

REQUIRED = {
    "generic-cpu",
    "intel-core-ultra",
    "nvidia-jetson-orin",
    "x86-nvidia-gpu",
    "raspberry-pi-5",
    "coral-edgetpu",
}


def facts_of(name: str):
    return probe(RecordedSystem.load(FIXTURES / f"{name}.json"))


def test_the_required_profiles_ship_and_validate():
    profiles = load_profiles(SHIPPED)
    assert {p.name for p in profiles} >= REQUIRED
    for profile in profiles:
        assert profile.allow, profile.name
        assert profile.selection.objective in ("latency", "throughput", "efficiency")
        assert profile.path.stem == profile.name


def test_every_shipped_profile_has_a_recorded_hardware_fixture():
    fixtures = {p.stem for p in FIXTURES.glob("*.json")}
    assert {p.name for p in load_profiles(SHIPPED)} <= fixtures


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_is_detected_on_its_recorded_hardware(name):
    assert detect(facts_of(name), load_profiles(SHIPPED)).name == name


def test_detection_explains_each_profile():
    results = {r.profile.name: r for r in explain(facts_of("intel-core-ultra"), load_profiles())}
    assert results["intel-core-ultra"].matched
    assert any("/dev/accel/accel0" in why for why in results["intel-core-ultra"].reasons)
    assert not results["raspberry-pi-5"].matched
    assert "x86_64 not in ['aarch64']" in results["raspberry-pi-5"].reasons[0]


def test_coral_on_a_raspberry_pi_wins_by_priority():
    matched = [
        r.profile.name for r in explain(facts_of("coral-edgetpu"), load_profiles()) if r.matched
    ]
    assert matched[:2] == ["coral-edgetpu", "raspberry-pi-5"]


def test_this_machine_gets_a_profile():
    assert resolve(None, probe()).name  # generic-cpu at worst


def test_config_can_force_a_profile_by_name_or_path():
    facts = facts_of("generic-cpu")
    assert resolve("raspberry-pi-5", facts).name == "raspberry-pi-5"
    assert resolve(str(SHIPPED / "coral-edgetpu.toml"), facts).name == "coral-edgetpu"
    with pytest.raises(
        ProfileError, match="no firmware profile named 'nope'; known: coral-edgetpu"
    ):
        resolve("nope", facts)


def test_profiles_dir_override(tmp_path, monkeypatch):
    shutil.copy(SHIPPED / "raspberry-pi-5.toml", tmp_path / "raspberry-pi-5.toml")
    assert [p.name for p in load_profiles(tmp_path)] == ["raspberry-pi-5"]
    monkeypatch.setenv("EDGEFLEET_PROFILES_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path
    with pytest.raises(ProfileError, match="no firmware profile matches this node"):
        resolve(None, facts_of("generic-cpu"))
    monkeypatch.setenv("EDGEFLEET_PROFILES_DIR", str(tmp_path / "missing"))
    with pytest.raises(ProfileError, match="missing: profiles directory does not exist"):
        profiles_dir()


GOOD = """
name = "test-board"
[match]
architecture = ["x86_64"]
[selection]
objective = "latency"
[[allow]]
runtime = "onnxruntime"
device = "CPU"
"""


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("name = 'x'\n[[allow]\n", "", "not valid TOML"),
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "", "not valid TOML"),
        ("colour = 'red'\n" + GOOD, "colour", "unknown key; expected one of name, description"),
        (GOOD.replace('"latency"', '"fastest"'), "selection.objective", "expected one of latency"),
        (GOOD.replace('name = "test-board"', ""), "name", "missing"),
        (GOOD.replace('name = "test-board"', 'name = "Test Board"'), "name", "lowercase"),
        (GOOD.split("[[allow]]")[0], "allow", "missing: list the allowed runtimes"),
        (GOOD.replace('"onnxruntime"', '"tensorflow"'), "allow[0].runtime", "expected one of"),
        (GOOD + "threads = [-1]\n", "allow[0].threads", "thread counts >= 0"),
        # hints are OpenVINO options: on an ONNX Runtime entry they are a typo
        (GOOD + "hints = ['LATENCY']\n", "allow[0].hints", "unknown key"),
        (
            GOOD + "[runtimes.openvino]\nhints = ['FAST']\n",
            "runtimes.openvino.hints",
            "LATENCY, THROUGHPUT",
        ),
        (GOOD.replace('["x86_64"]', '"x86_64"'), "match.architecture", "list of strings"),
        (GOOD + "[limits]\nmax_compile_seconds = 0\n", "limits.max_compile_seconds", "> 0"),
        # inf overflows select(); nan makes every time limit 0 s; 1e300 is a typo
        *(
            (
                GOOD + f"[limits]\nmax_compile_seconds = {value}\n",
                "limits.max_compile_seconds",
                f"must be > 0 and <= 86400, got {shown}",
            )
            for value, shown in (("inf", "inf"), ("nan", "nan"), ("1e300", "1e+300"))
        ),
        (GOOD + "max_compile_seconds = -inf\n", "allow[0].max_compile_seconds", "got -inf"),
        (GOOD + "[power]\nCPU = inf\n", "power.CPU", "must be > 0 and <= 100000, got inf"),
        # a batch of 10**9 is hundreds of GiB of inputs
        (
            GOOD.replace('"latency"', '"throughput"\nbatch_size = 1_000_000_000'),
            "selection.batch_size",
            "must be <= 65536, got 1000000000",
        ),
        (
            GOOD.replace('"latency"', '"latency"\nbenchmark_seconds = nan'),
            "selection.benchmark_seconds",
            "got nan",
        ),
        (
            GOOD.replace('"latency"', '"latency"\nwarmup_runs = 10_000_000'),
            "selection.warmup_runs",
            "must be <= 100000",
        ),
        (
            GOOD.replace('"latency"', '"latency"\nmin_runs = 10_000_000'),
            "selection.min_runs",
            "must be <= 100000",
        ),
        (
            GOOD.replace('architecture = ["x86_64"]', "cpu_model = ['Core(']"),
            "match.cpu_model",
            "bad regular expression",
        ),
        (
            GOOD.replace('architecture = ["x86_64"]', "any_pci = ['nvidia']"),
            "match.any_pci",
            "is not 'vendor:device'",
        ),
        (GOOD.replace('"latency"', '"efficiency"'), "power", "needs the watts of every allowed"),
        (GOOD + "[[allow]]\nruntime = 'onnxruntime'\ndevice = 'cpu'\n", "allow[1]", "listed twice"),
    ],
)
def test_malformed_profile_names_file_key_and_problem(tmp_path, text, key, problem):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert f": {key}: " in message or not key
    assert problem in message


def test_duplicate_profile_names_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD)
    with pytest.raises(ProfileError, match=r"b\.toml: name: 'test-board' is already used by"):
        load_profiles(tmp_path)


def test_allow_entries_inherit_runtime_options_and_limits(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        GOOD
        + "max_compile_seconds = 5\n"
        + "[[allow]]\nruntime = 'openvino'\ndevice = 'CPU'\nprecisions = ['f32']\n"
        + "[limits]\nmax_compile_seconds = 30\n"
        + "[runtimes.openvino]\nhints = ['LATENCY', 'THROUGHPUT']\nprecisions = ['f32', 'bf16']\n"
        + "compile_cache = true\n"
    )
    profile = load_profile(path)
    ort, ov = profile.allow
    assert ort.max_compile_seconds == 5
    assert ov.max_compile_seconds == 30
    assert ov.options.hints == ("LATENCY", "THROUGHPUT")
    assert ov.options.precisions == ("f32",)  # the entry overrides the runtime's list
    assert ov.options.compile_cache
