"""Hardware facts: parsing recorded machines, recording this one, and a stable fingerprint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtimes.hardware import LiveSystem, RecordedSystem, probe, record

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"


def load(name: str) -> RecordedSystem:
    return RecordedSystem.load(FIXTURES / f"{name}.json")


def test_recording_this_machine_replays_to_the_same_facts(tmp_path):
    live = record(LiveSystem(), tmp_path / "node.json")
    replayed = probe(RecordedSystem.load(tmp_path / "node.json"))
    assert replayed == live
    assert replayed.fingerprint() == probe().fingerprint()
    assert json.loads((tmp_path / "node.json").read_text())["files"]["/proc/cpuinfo"]


def test_intel_core_ultra_npu_and_igpu_are_found_behind_their_nodes():
    facts = probe(load("intel-core-ultra"))
    assert facts.cpu_model == "Intel(R) Core(TM) Ultra 7 155H"
    assert (facts.logical_cpus, facts.physical_cores) == (22, 16)
    assert facts.accel_nodes == ("accel0",)
    assert facts.node_devices == {
        "/dev/dri/renderD128": "0000:00:02.0",
        "/dev/accel/accel0": "0000:00:0b.0",
    }
    kinds = {(a.kind, a.where) for a in facts.accelerators()}
    assert kinds == {("gpu", "/dev/dri/renderD128"), ("npu", "/dev/accel/accel0")}
    assert "avx512_bf16" not in facts.cpu_flags


def test_arm_boards_take_the_cpu_name_from_lscpu():
    pi = probe(load("raspberry-pi-5"))
    assert (pi.cpu_vendor, pi.cpu_model, pi.architecture) == ("ARM", "Cortex-A76", "aarch64")
    assert pi.board == "Raspberry Pi 5 Model B Rev 1.0"
    assert pi.compatible == ("raspberrypi,5-model-b", "brcm,bcm2712")
    assert "asimddp" in pi.cpu_flags
    orin = probe(load("nvidia-jetson-orin"))
    assert orin.cpu_model == "Cortex-A78AE"
    assert orin.tegra_release == "L4T R36.3.0"
    assert "nvidia,tegra234" in orin.compatible


def test_nvidia_driver_and_gpu_model():
    facts = probe(load("x86-nvidia-gpu"))
    assert facts.nvidia_driver == "550.54.15"
    assert facts.nvidia_gpus == {"0000:01:00.0": "NVIDIA GeForce RTX 4090"}
    names = [a.name for a in facts.accelerators()]
    assert "NVIDIA GeForce RTX 4090 [10de:2684, driver nvidia]" in names


def test_coral_pcie_edge_tpu():
    facts = probe(load("coral-edgetpu"))
    assert "apex_0" in facts.device_nodes
    tpu = [a for a in facts.accelerators() if a.kind == "edgetpu"]
    assert [(a.where, a.name) for a in tpu] == [
        ("/dev/apex_0", "Coral Edge TPU (PCIe) [1ac1:089a, driver apex]")
    ]


def test_coral_usb_accelerator_is_recognised():
    source = load("raspberry-pi-5")
    source.dirs["/sys/bus/usb/devices"].append("1-1")
    source.files["/sys/bus/usb/devices/1-1/idVendor"] = "18d1\n"
    source.files["/sys/bus/usb/devices/1-1/idProduct"] = "9302\n"
    facts = probe(source)
    assert ("edgetpu", "usb 1-1") in {(a.kind, a.where) for a in facts.accelerators()}
    assert facts.fingerprint() != probe(load("raspberry-pi-5")).fingerprint()


def test_fingerprint_ignores_noise_and_follows_what_matters():
    base = probe(load("x86-nvidia-gpu"))
    # A few MiB of MemTotal moves between kernels; the same GiB is the same machine.
    assert dataclasses.replace(base, memory_bytes=base.memory_bytes - 5 * 2**20).fingerprint() == (
        base.fingerprint()
    )
    assert dataclasses.replace(base, nvidia_driver="555.42.02").fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, logical_cpus=16).fingerprint() != base.fingerprint()
    flags = base.cpu_flags - {"avx512_bf16"}
    assert dataclasses.replace(base, cpu_flags=flags).fingerprint() != base.fingerprint()
    names = {probe(load(p.stem)).fingerprint() for p in FIXTURES.glob("*.json")}
    assert len(names) == len(list(FIXTURES.glob("*.json")))


def test_missing_sources_give_empty_facts_not_errors():
    empty = RecordedSystem(uname_facts={"system": "Linux", "machine": "riscv64"}, psutil_values={})
    facts = probe(empty)
    assert facts.cpu_model == ""
    assert facts.logical_cpus == 1
    assert facts.accelerators() == []
    assert facts.fingerprint().startswith("hw-")
