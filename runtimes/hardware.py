"""What this node's hardware is: CPU, memory, accelerators, drivers, and a stable fingerprint.

Facts are read through a `FactSource`. `LiveSystem` reads psutil, /proc, /sys and /dev on this
machine; `RecordedSystem` replays a JSON fixture recorded on (or transcribed from) another
machine, so matching a Jetson or a Core Ultra profile runs through the same parsing code in tests.
`record()` writes this machine's raw facts in that fixture format: exactly what `probe()` read.

    facts = probe()                          # this machine
    facts.fingerprint()                      # 'hw-3f1c0b9a2d4e5f60'
    record(LiveSystem(), Path("node.json"))  # raw facts, for a new profile's test fixture
    probe(RecordedSystem.load(Path("node.json")))

Only file reads and directory listings: no runtime is imported, so probing costs milliseconds and
a cached accelerator decision can be reused at start-up without loading ONNX Runtime or OpenVINO.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

# PCI class codes (first two bytes of /sys/bus/pci/devices/*/class).
_PCI_DISPLAY = "03"  # VGA and 3D controllers: discrete and integrated GPUs
_PCI_ACCELERATOR = "12"  # "processing accelerators": Intel NPU, Hailo, ...
_PCI_SYSTEM_PERIPHERAL = "0880"  # the Coral PCIe Edge TPU reports itself as one

VENDORS = {
    "8086": "Intel",
    "10de": "NVIDIA",
    "1002": "AMD",
    "1ac1": "Google Coral (Global Unichip)",
    "1e60": "Hailo",
    "14e4": "Broadcom",
    "1de4": "Raspberry Pi",
}

# Devices worth naming in `edgefleet-agent accelerators`; other ids are shown by vendor only.
KNOWN_DEVICES = {
    ("8086", "7d1d"): "Intel NPU (Meteor Lake)",
    ("8086", "ad1d"): "Intel NPU (Arrow Lake)",
    ("8086", "643e"): "Intel NPU (Lunar Lake)",
    ("8086", "7d55"): "Intel Arc Graphics (Meteor Lake)",
    ("8086", "7dd5"): "Intel Graphics (Meteor Lake)",
    ("8086", "64a0"): "Intel Arc Graphics 130V/140V (Lunar Lake)",
    ("1ac1", "089a"): "Coral Edge TPU (PCIe)",
    ("1e60", "2864"): "Hailo-8",
}

# USB ids of the Coral USB Accelerator: before its firmware is loaded, and after.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}

# /dev entries that reveal an accelerator even when no PCI device does (SoCs, USB sticks).
_DEV_PREFIXES = ("apex_", "hailo", "nvidia", "nvhost-", "nvmap", "nvgpu", "davinci", "vchiq")


class FactSource(Protocol):
    """Where raw facts come from; every method answers None or [] for what does not exist."""

    def uname(self) -> dict[str, str]: ...

    def psutil_facts(self) -> dict[str, int | None]: ...

    def read_text(self, path: str) -> str | None: ...

    def read_link(self, path: str) -> str | None: ...

    def list_dir(self, path: str) -> list[str]: ...

    def command(self, name: str) -> str | None: ...


class LiveSystem:
    """This machine."""

    # Commands a probe may run, by name; a fixed list, so a fixture cannot name an arbitrary one.
    _COMMANDS = {"lscpu": ["lscpu"]}

    def uname(self) -> dict[str, str]:
        return {"system": platform.system(), "machine": platform.machine()}

    def psutil_facts(self) -> dict[str, int | None]:
        import psutil

        return {
            "cpu_count_logical": psutil.cpu_count(logical=True),
            "cpu_count_physical": psutil.cpu_count(logical=False),
            "memory_total": psutil.virtual_memory().total,
        }

    def read_text(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return None

    def read_link(self, path: str) -> str | None:
        try:
            return os.readlink(path)
        except OSError:
            return None

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def command(self, name: str) -> str | None:
        try:
            done = subprocess.run(
                self._COMMANDS[name],
                capture_output=True,
                text=True,
                timeout=5,
                env={**os.environ, "LC_ALL": "C"},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None


@dataclass
class RecordedSystem:
    """Facts recorded from another machine: the JSON that `record()` writes."""

    uname_facts: dict[str, str]
    psutil_values: dict[str, int | None]
    files: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, list[str]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    about: str = ""

    @classmethod
    def load(cls, path: Path) -> RecordedSystem:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordedSystem:
        return cls(
            uname_facts=data["uname"],
            psutil_values=data["psutil"],
            files=data.get("files", {}),
            links=data.get("links", {}),
            dirs=data.get("dirs", {}),
            commands=data.get("commands", {}),
            about=data.get("about", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "about": self.about,
            "uname": self.uname_facts,
            "psutil": self.psutil_values,
            "commands": self.commands,
            "files": self.files,
            "links": self.links,
            "dirs": self.dirs,
        }

    def uname(self) -> dict[str, str]:
        return dict(self.uname_facts)

    def psutil_facts(self) -> dict[str, int | None]:
        return dict(self.psutil_values)

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)

    def read_link(self, path: str) -> str | None:
        return self.links.get(path)

    def list_dir(self, path: str) -> list[str]:
        return sorted(self.dirs.get(path, []))

    def command(self, name: str) -> str | None:
        return self.commands.get(name)


class _Recorder:
    """Wraps a source and keeps every answer it gives, to replay as a `RecordedSystem`."""

    def __init__(self, inner: FactSource):
        self._inner = inner
        self.recorded = RecordedSystem(uname_facts={}, psutil_values={})

    def uname(self) -> dict[str, str]:
        self.recorded.uname_facts = self._inner.uname()
        return self.recorded.uname_facts

    def psutil_facts(self) -> dict[str, int | None]:
        self.recorded.psutil_values = self._inner.psutil_facts()
        return self.recorded.psutil_values

    def read_text(self, path: str) -> str | None:
        text = self._inner.read_text(path)
        if text is not None:
            self.recorded.files[path] = text
        return text

    def read_link(self, path: str) -> str | None:
        target = self._inner.read_link(path)
        if target is not None:
            self.recorded.links[path] = target
        return target

    def list_dir(self, path: str) -> list[str]:
        names = self._inner.list_dir(path)
        if names:
            self.recorded.dirs[path] = names
        return names

    def command(self, name: str) -> str | None:
        output = self._inner.command(name)
        if output is not None:
            self.recorded.commands[name] = output
        return output


@dataclass(frozen=True, slots=True)
class PciDevice:
    address: str
    vendor_id: str  # 4 hex digits, no 0x
    device_id: str
    class_code: str  # 6 hex digits, no 0x
    driver: str | None

    @property
    def kind(self) -> str | None:
        """'gpu', 'accelerator' or None for devices that do not run models."""
        if self.class_code.startswith(_PCI_DISPLAY):
            return "gpu"
        if self.class_code.startswith(_PCI_ACCELERATOR):
            return "accelerator"
        if (self.vendor_id, self.device_id) == ("1ac1", "089a"):
            return "accelerator"
        return None

    @property
    def ids(self) -> str:
        return f"{self.vendor_id}:{self.device_id}"

    @property
    def name(self) -> str:
        known = KNOWN_DEVICES.get((self.vendor_id, self.device_id))
        if known:
            return known
        vendor = VENDORS.get(self.vendor_id, f"vendor {self.vendor_id}")
        return f"{vendor} device {self.device_id}"


@dataclass(frozen=True, slots=True)
class UsbDevice:
    port: str
    vendor_id: str
    product_id: str
    product: str | None

    @property
    def ids(self) -> str:
        return f"{self.vendor_id}:{self.product_id}"


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One device a model could run on besides the CPU, as found in the hardware facts."""

    kind: str  # gpu | npu | edgetpu | accelerator
    name: str
    where: str  # device node, PCI address or USB port


@dataclass(frozen=True)
class HardwareFacts:
    system: str
    architecture: str
    cpu_vendor: str
    cpu_model: str
    cpu_flags: frozenset[str]
    logical_cpus: int
    physical_cores: int
    memory_bytes: int
    board: str | None  # device-tree model (SoC boards) or DMI vendor + product (PCs)
    compatible: tuple[str, ...]  # device-tree compatible strings, most specific first
    dri_nodes: tuple[str, ...]  # /dev/dri render nodes (GPUs with a DRM driver)
    accel_nodes: tuple[str, ...]  # /dev/accel nodes (NPUs: intel_vpu, ...)
    device_nodes: tuple[str, ...]  # other accelerator nodes in /dev (apex_0, hailo0, nvhost-*)
    node_devices: dict[str, str]  # device node -> the PCI address behind it, where there is one
    nvidia_driver: str | None  # kernel module version from /proc/driver/nvidia/version
    nvidia_gpus: dict[str, str]  # PCI address -> model, from /proc/driver/nvidia/gpus/*
    tegra_release: str | None  # /etc/nv_tegra_release: L4T on Jetson
    pci: tuple[PciDevice, ...]
    usb: tuple[UsbDevice, ...]

    def accelerators(self) -> list[Accelerator]:
        """The non-CPU compute devices these facts show, for people to read."""
        found: list[Accelerator] = []
        pci_nodes = {address: node for node, address in self.node_devices.items()}
        for device in self.pci:
            if device.kind is None:
                continue
            kind = device.kind
            if device.vendor_id == "8086" and kind == "accelerator":
                kind = "npu"
            elif device.vendor_id == "1ac1":
                kind = "edgetpu"
            name = self.nvidia_gpus.get(device.address) or device.name
            driver = f"driver {device.driver}" if device.driver else "no driver bound"
            where = pci_nodes.get(device.address, device.address)
            found.append(Accelerator(kind, f"{name} [{device.ids}, {driver}]", where))
        if self.tegra_release:
            soc = next((c for c in self.compatible if c.startswith("nvidia,tegra")), "tegra")
            name = f"NVIDIA {soc} integrated GPU ({self.tegra_release})"
            found.append(Accelerator("gpu", name, "SoC"))
        for usb in self.usb:
            if (usb.vendor_id, usb.product_id) in CORAL_USB_IDS:
                found.append(Accelerator("edgetpu", "Coral USB Accelerator", f"usb {usb.port}"))
        on_pci = set(self.node_devices)
        for node in self.accel_nodes:
            if f"/dev/accel/{node}" not in on_pci:
                found.append(Accelerator("npu", "NPU (platform device)", f"/dev/accel/{node}"))
        for node in self.dri_nodes:
            if f"/dev/dri/{node}" not in on_pci:
                found.append(Accelerator("gpu", "GPU (platform device)", f"/dev/dri/{node}"))
        for node in self.device_nodes:
            if f"/dev/{node}" in on_pci:
                continue
            if node.startswith("apex_"):
                found.append(Accelerator("edgetpu", "Coral Edge TPU", f"/dev/{node}"))
            elif node.startswith("hailo"):
                found.append(Accelerator("accelerator", "Hailo", f"/dev/{node}"))
        return found

    def fingerprint(self) -> str:
        """A short id that changes when anything that could change a measured choice changes.

        Memory is rounded to whole GiB because MemTotal moves by a few MiB between kernels.
        Device nodes and PCI ids count; PCI addresses and USB ports do not (re-plugging a stick
        into another port is the same hardware).
        """
        stable = {
            "system": self.system,
            "architecture": self.architecture,
            "cpu": [self.cpu_vendor, self.cpu_model, sorted(self.cpu_flags)],
            "cpus": [self.logical_cpus, self.physical_cores],
            "memory_gib": round(self.memory_bytes / 2**30),
            "board": self.board,
            "compatible": list(self.compatible),
            "nodes": sorted([*self.dri_nodes, *self.accel_nodes, *self.device_nodes]),
            "nvidia": [self.nvidia_driver, sorted(self.nvidia_gpus.values())],
            "tegra": self.tegra_release,
            "pci": sorted(d.ids + "/" + d.class_code for d in self.pci if d.kind is not None),
            "usb": sorted(u.ids for u in self.usb if (u.vendor_id, u.product_id) in CORAL_USB_IDS),
        }
        blob = json.dumps(stable, sort_keys=True).encode()
        return "hw-" + hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["fingerprint"] = self.fingerprint()
        data["accelerators"] = [asdict(a) for a in self.accelerators()]
        return data


def probe(source: FactSource | None = None) -> HardwareFacts:
    """Read the hardware facts of `source` (default: this machine)."""
    source = source or LiveSystem()
    uname = source.uname()
    counts = source.psutil_facts()
    cpu = _cpu_facts(source)
    logical = counts.get("cpu_count_logical") or cpu.get("cpus") or 1
    dri_nodes = tuple(n for n in source.list_dir("/dev/dri") if n.startswith("renderD"))
    accel_nodes = tuple(n for n in source.list_dir("/dev/accel") if n.startswith("accel"))
    device_nodes = tuple(n for n in source.list_dir("/dev") if n.startswith(_DEV_PREFIXES))
    return HardwareFacts(
        system=uname.get("system", ""),
        architecture=uname.get("machine", ""),
        cpu_vendor=cpu.get("vendor", ""),
        cpu_model=cpu.get("model", ""),
        cpu_flags=frozenset(cpu.get("flags", ())),
        logical_cpus=int(logical),
        physical_cores=int(counts.get("cpu_count_physical") or logical),
        memory_bytes=int(counts.get("memory_total") or _meminfo_total(source)),
        board=_board(source),
        compatible=_compatible(source),
        dri_nodes=dri_nodes,
        accel_nodes=accel_nodes,
        device_nodes=device_nodes,
        node_devices=_node_devices(source, dri_nodes, accel_nodes, device_nodes),
        nvidia_driver=_nvidia_driver(source),
        nvidia_gpus=_nvidia_gpus(source),
        tegra_release=_tegra_release(source.read_text("/etc/nv_tegra_release")),
        pci=_pci_devices(source),
        usb=_usb_devices(source),
    )


def record(source: FactSource, path: Path, about: str = "") -> HardwareFacts:
    """Probe `source` and write everything the probe read to `path` as a replayable fixture."""
    recorder = _Recorder(source)
    facts = probe(recorder)
    machine = facts.board or facts.cpu_model or facts.architecture
    recorder.recorded.about = about or f"recorded with runtimes.hardware.record on {machine}"
    Path(path).write_text(json.dumps(recorder.recorded.to_dict(), indent=2, sort_keys=True) + "\n")
    return facts


# --- parsing --------------------------------------------------------------------------------


def _cpu_facts(source: FactSource) -> dict[str, Any]:
    """Vendor, model and flags from /proc/cpuinfo; lscpu where cpuinfo has no model name.

    ARM kernels list only part numbers in /proc/cpuinfo ("CPU part: 0xd0b"); lscpu turns them
    into names ("Cortex-A76"), so it is asked only there, which keeps x86 probes process-free.
    """
    cpuinfo = _key_values(source.read_text("/proc/cpuinfo") or "")
    facts: dict[str, Any] = {
        "vendor": cpuinfo.get("vendor_id") or cpuinfo.get("CPU implementer", ""),
        "model": cpuinfo.get("model name") or cpuinfo.get("Model") or "",
        "flags": (cpuinfo.get("flags") or cpuinfo.get("Features") or "").split(),
    }
    if not cpuinfo.get("model name"):
        lscpu = _key_values(source.command("lscpu") or "")
        facts["vendor"] = lscpu.get("Vendor ID") or facts["vendor"]
        facts["model"] = lscpu.get("Model name") or facts["model"]
        if not facts["flags"]:
            facts["flags"] = lscpu.get("Flags", "").split()
        if lscpu.get("CPU(s)", "").isdigit():
            facts["cpus"] = int(lscpu["CPU(s)"])
    return facts


def _key_values(text: str) -> dict[str, str]:
    """`key : value` lines (cpuinfo, lscpu); the first occurrence of a key wins."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in values:
            values[key] = value.strip()
    return values


def _meminfo_total(source: FactSource) -> int:
    match = re.search(r"^MemTotal:\s+(\d+) kB", source.read_text("/proc/meminfo") or "", re.M)
    return int(match.group(1)) * 1024 if match else 0


def _board(source: FactSource) -> str | None:
    model = source.read_text("/proc/device-tree/model")
    if model:
        return model.strip("\x00\n ")
    vendor = (source.read_text("/sys/class/dmi/id/sys_vendor") or "").strip()
    product = (source.read_text("/sys/class/dmi/id/product_name") or "").strip()
    return " ".join(p for p in (vendor, product) if p) or None


def _compatible(source: FactSource) -> tuple[str, ...]:
    raw = source.read_text("/proc/device-tree/compatible") or ""
    return tuple(part for part in raw.split("\x00") if part.strip())


def _nvidia_driver(source: FactSource) -> str | None:
    text = source.read_text("/proc/driver/nvidia/version") or ""
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..."
    match = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


def _nvidia_gpus(source: FactSource) -> dict[str, str]:
    models = {}
    for bus in source.list_dir("/proc/driver/nvidia/gpus"):
        info = _key_values(source.read_text(f"/proc/driver/nvidia/gpus/{bus}/information") or "")
        if info.get("Model"):
            models[bus.lower()] = info["Model"]
    return models


def _node_devices(
    source: FactSource, dri: tuple[str, ...], accel: tuple[str, ...], other: tuple[str, ...]
) -> dict[str, str]:
    """Which PCI device sits behind each node, from the `device` links under /sys/class."""
    classes = [("drm", "/dev/dri", dri), ("accel", "/dev/accel", accel)]
    classes += [("apex", "/dev", tuple(n for n in other if n.startswith("apex_")))]
    mapping = {}
    for sys_class, dev_dir, nodes in classes:
        for node in nodes:
            link = source.read_link(f"/sys/class/{sys_class}/{node}/device")
            address = link.rsplit("/", 1)[-1] if link else ""
            if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", address):
                mapping[f"{dev_dir}/{node}"] = address
    return mapping


def _tegra_release(text: str | None) -> str | None:
    """'L4T R36.3.0' from '# R36 (release), REVISION: 3.0, GCID: ...'."""
    if not text:
        return None
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    if match:
        return f"L4T R{match.group(1)}.{match.group(2)}"
    return text.strip().splitlines()[0].lstrip("# ").strip() or None


def _hex_id(text: str | None, digits: int) -> str:
    value = (text or "").strip().lower().removeprefix("0x")
    return value.zfill(digits) if value else "0" * digits


def _pci_devices(source: FactSource) -> tuple[PciDevice, ...]:
    devices = []
    for address in source.list_dir("/sys/bus/pci/devices"):
        base = f"/sys/bus/pci/devices/{address}"
        driver_link = source.read_link(f"{base}/driver")
        devices.append(
            PciDevice(
                address=address,
                vendor_id=_hex_id(source.read_text(f"{base}/vendor"), 4),
                device_id=_hex_id(source.read_text(f"{base}/device"), 4),
                class_code=_hex_id(source.read_text(f"{base}/class"), 6),
                driver=driver_link.rsplit("/", 1)[-1] if driver_link else None,
            )
        )
    return tuple(devices)


def _usb_devices(source: FactSource) -> tuple[UsbDevice, ...]:
    devices = []
    for port in source.list_dir("/sys/bus/usb/devices"):
        base = f"/sys/bus/usb/devices/{port}"
        vendor = source.read_text(f"{base}/idVendor")
        if vendor is None:
            continue  # interfaces ("1-1:1.0") have no ids of their own
        product = source.read_text(f"{base}/product")
        devices.append(
            UsbDevice(
                port=port,
                vendor_id=_hex_id(vendor, 4),
                product_id=_hex_id(source.read_text(f"{base}/idProduct"), 4),
                product=product.strip() if product else None,
            )
        )
    return tuple(devices)
