"""The model package: a directory a publisher signs, the control plane publishes, a node installs.

    cnn/
      edgefleet.toml        the manifest (below)
      model.onnx            variant files, anywhere below the directory
      openvino/model.xml    (an OpenVINO IR lists its .bin too)
      openvino/model.bin
      golden.npz            golden vectors: arrays input/<name> and output/<name>
      model.sig             the OpenSSF model-signing signature (see provisioning.signing)

The manifest says what the package is and how a node checks it:

    name = "cnn"                      # the serving name
    version = 2                       # a positive integer: serving orders versions numerically
    min_agent_version = "0.1.0"       # optional; older agents refuse the package
    allowed_regions = ["ae", "eu"]    # regions whose nodes may run it; ["*"] for any

    [[inputs]]                        # the model's interface, checked against each variant
    name = "input"
    datatype = "FP32"
    shape = [1, 3, 224, 224]          # -1 for a dynamic dimension

    [[outputs]]
    name = "output"
    datatype = "FP32"
    shape = [1, 1000]

    [[variants]]                      # one or more ways to run the model
    name = "onnx-fp32"
    runtime = "onnxruntime"           # onnxruntime | openvino | litert
    precision = "fp32"                # fp32 | fp16 | bf16 | int8 | uint8 | int4 | mixed
    files = ["model.onnx"]            # the first is the file the runtime opens
    # atol / rtol: optional, this variant's golden tolerance (reduced precision needs more)

    [[golden]]                        # one or more golden vector files (.npz)
    file = "golden.npz"
    atol = 1e-4
    rtol = 1e-3

Arrays live in .npz files, not in TOML. `Manifest.parse` checks every key and value strictly
and names the offending key in its error; `Package.load` also checks the files and the golden
arrays against the declared inputs and outputs. A golden file is read member by member: its
zip end record is checked first (at most `MAX_GOLDEN_MEMBERS` arrays, no zip64), then each
array's .npy header (numbers or booleans, at most `MAX_GOLDEN_BYTES` for the whole file) before
anything is allocated, since a few hundred bytes of header can declare terabytes.
"""

from __future__ import annotations

import math
import re
import struct
import tomllib
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from provisioning import serving_settings
from runtimes.datatypes import DATATYPES, to_numpy

MANIFEST_FILE = "edgefleet.toml"
SIGNATURE_FILE = "model.sig"
SERVING_CONFIG_FILE = "model.toml"  # what a node writes into each version directory

# Model names become URL path segments, metric labels and directory names on the node.
# Apply these with fullmatch: `$` alone also matches before a trailing newline.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
AGENT_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")
RUNTIMES = ("onnxruntime", "openvino", "litert")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "uint8", "int4", "mixed")
ANY_REGION = "*"
# The file each runtime opens; its companions (an IR's .bin) follow it in `files`.
_MODEL_SUFFIXES = {
    "onnxruntime": (".onnx",),
    "openvino": (".xml", ".onnx", ".tflite"),
    "litert": (".tflite",),
}
# Golden vectors live in .npz files, which cannot hold BYTES tensors.
_DATATYPES = tuple(sorted(DATATYPES - {"BYTES"}))
_MAX_FILES = 64
_MAX_DIMS = 8
# All arrays of one golden file together; a node loads them to self-test every package.
MAX_GOLDEN_BYTES = 256 * 2**20
# Arrays in one golden file, and the bytes of its zip central directory (entries of ~60 bytes
# for names like output/<name>.npy). zipfile reads the whole directory into a list before any
# member can be checked: 200k empty members took 13 s and 316 MiB.
MAX_GOLDEN_MEMBERS = 1024
MAX_GOLDEN_DIRECTORY_BYTES = 1 << 20
# The end-of-central-directory record: 22 bytes, then a comment of at most 64 KiB.
_END_RECORD = struct.Struct("<4s4H2LH")
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
# numpy kinds a golden array may have: booleans, signed and unsigned integers, floats.
_NUMERIC_KINDS = "biuf"


class ManifestError(ValueError):
    """edgefleet.toml or the files it names are not what the package format requires."""


@dataclass(frozen=True, slots=True)
class TensorDecl:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def accepts(self, array: np.ndarray) -> bool:
        if array.ndim != len(self.shape):
            return False
        return all(d in (-1, n) for d, n in zip(self.shape, array.shape, strict=True))


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    runtime: str
    precision: str
    files: tuple[str, ...]
    atol: float | None = None
    rtol: float | None = None

    @property
    def model_file(self) -> str:
        return self.files[0]

    def serving_names(self) -> dict[str, str]:
        """package path -> its name in a node's version directory: the model file as
        model.<ext> (what serving looks for), an IR's weights as model.bin (OpenVINO finds them
        by the .xml's stem), any other file where it lies next to the model file. ValueError
        for a file outside the model file's directory, and for two files (or a file and the
        node's own model.toml) that would take one name or need it as file and directory."""
        primary = PurePosixPath(self.model_file)
        names: dict[str, str] = {}
        taken = {SERVING_CONFIG_FILE: "the node's serving settings"}  # name -> what has it
        for relative in self.files:
            path = PurePosixPath(relative)
            if relative == self.model_file:
                name = f"model{primary.suffix.lower()}"
            elif primary.suffix.lower() == ".xml" and path == primary.with_suffix(".bin"):
                name = "model.bin"
            elif path.is_relative_to(primary.parent):
                name = str(path.relative_to(primary.parent))
            else:
                raise ValueError(f"{relative} is outside the directory of {self.model_file}")
            parents = [str(p) for p in PurePosixPath(name).parents][:-1]  # all but "."
            clash = next((n for n in (name, *parents) if n in taken), None)
            if clash is None:
                own = PurePosixPath(name)
                clash = next((n for n in taken if own in PurePosixPath(n).parents), None)
            if clash is not None:
                raise ValueError(
                    f"{relative} would be {name} in a node's version directory, which clashes "
                    f"with {taken[clash]} there ({clash})"
                )
            names[relative] = name
            taken[name] = relative
        return names


@dataclass(frozen=True, slots=True)
class GoldenSet:
    file: str
    atol: float
    rtol: float


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    min_agent_version: str
    allowed_regions: tuple[str, ...]
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    variants: tuple[Variant, ...]
    golden: tuple[GoldenSet, ...]
    description: str = ""
    # [serving]: how the publisher wants the model served (provisioning.serving_settings); a
    # node writes it into the version's model.toml. `labels` maps outputs to package files.
    serving: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest; a package needs {MANIFEST_FILE}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read the manifest: {exc}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = MANIFEST_FILE) -> Manifest:
        try:
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as exc:  # RecursionError: "a = [[[[..."
            raise ManifestError(f"{source}: not valid TOML: {exc}") from None
        return _Reader(source).manifest(data)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants)
        raise ManifestError(f"{self.name}@{self.version} has no variant {name!r} (has: {known})")

    def shared_files(self) -> tuple[str, ...]:
        """Files every installation needs whichever variant it runs: manifest, golden vectors,
        label files."""
        labels = tuple(dict.fromkeys(self.serving.get("labels", {}).values()))
        return (MANIFEST_FILE, *(g.file for g in self.golden), *labels)

    def files_for(self, variants: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """The files a node needs to install these variants (signature not included)."""
        files = list(self.shared_files())
        for name in variants:
            files.extend(self.variant(name).files)
        return tuple(dict.fromkeys(files))

    def all_files(self) -> tuple[str, ...]:
        return self.files_for([v.name for v in self.variants])

    def allows_region(self, region: str) -> bool:
        return ANY_REGION in self.allowed_regions or region in self.allowed_regions

    def accepts_agent(self, agent_version: str) -> bool:
        return version_tuple(agent_version) >= version_tuple(self.min_agent_version)


@dataclass(frozen=True)
class GoldenVectors:
    """One golden set loaded: what a variant must compute, and how close it must come."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float
    rtol: float
    source: str


@dataclass(frozen=True)
class Package:
    """A package directory whose manifest parsed and whose present files check out."""

    root: Path
    manifest: Manifest

    @classmethod
    def load(cls, root: Path, variants: list[str] | tuple[str, ...] | None = None) -> Package:
        """Read `root`/edgefleet.toml and check the files of `variants` (default: all).

        A node holds only the variants it downloaded, so it names them; a publisher's
        directory must hold every file the manifest lists.
        """
        root = Path(root)
        manifest = Manifest.load(root / MANIFEST_FILE)
        names = [v.name for v in manifest.variants] if variants is None else list(variants)
        package = cls(root, manifest)
        for relative in manifest.files_for(names):
            path = root / relative
            if path.is_symlink() or not path.is_file():
                raise ManifestError(
                    f"{root}: {relative} is listed in {MANIFEST_FILE} but is not a regular file "
                    "in the package"
                )
        for golden in manifest.golden:
            package.golden_vectors(golden)
        return package

    def golden_vectors(self, golden: GoldenSet) -> GoldenVectors:
        """Load one golden file and check its arrays against the declared inputs/outputs."""
        arrays = load_npz(self.root / golden.file, golden.file)
        inputs = _golden_group(arrays, "input/", self.manifest.inputs, golden.file)
        outputs = _golden_group(arrays, "output/", self.manifest.outputs, golden.file)
        unknown = sorted(k for k in arrays if not k.startswith(("input/", "output/")))
        if unknown:
            raise ManifestError(
                f"{golden.file}: unexpected arrays {unknown}; name them input/<name> or "
                "output/<name>"
            )
        return GoldenVectors(inputs, outputs, golden.atol, golden.rtol, golden.file)

    def all_golden(self) -> list[GoldenVectors]:
        return [self.golden_vectors(g) for g in self.manifest.golden]


def version_tuple(text: str) -> tuple[int, ...]:
    if not AGENT_VERSION.fullmatch(text):
        raise ManifestError(f"{text!r} is not a version like 1.2.3")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


def check_relative_path(text: str, where: str) -> str:
    """A package-relative POSIX path that cannot leave the package or hide in it."""
    if not isinstance(text, str) or not text:
        raise ManifestError(f"{where}: expected a non-empty relative path")
    path = PurePosixPath(text)
    if path.is_absolute() or "\\" in text or any(p in ("..", ".", "") for p in text.split("/")):
        raise ManifestError(
            f"{where}: {text!r} must be a plain relative path inside the package "
            "(no leading /, no '.', '..' or empty parts, '/' as separator)"
        )
    if any(ord(c) < 32 for c in text):
        raise ManifestError(f"{where}: {text!r} contains control characters")
    return text


def load_npz(path: Path, source: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz file, refused before loading if their headers declare too much."""
    try:
        _check_directory(path, source)
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_GOLDEN_MEMBERS:
                raise ManifestError(
                    f"{source}: {len(members)} arrays, over the cap of {MAX_GOLDEN_MEMBERS} per "
                    "golden file"
                )
            declared = 0
            for member in members:
                declared += _npy_bytes(archive, member, source)
                if declared > MAX_GOLDEN_BYTES:
                    raise ManifestError(
                        f"{source}: {member.filename!r} takes its arrays to {declared} bytes, "
                        f"over the cap of {MAX_GOLDEN_BYTES // 2**20} MiB per golden file; "
                        "golden vectors need only a few samples"
                    )
            arrays = {}
            for member in members:
                with archive.open(member) as stream:
                    arrays[member.filename.removesuffix(".npy")] = np.lib.format.read_array(
                        stream, allow_pickle=False
                    )
            return arrays
    except ManifestError:
        raise
    except (
        OSError,
        EOFError,
        ValueError,
        RuntimeError,  # an encrypted member
        NotImplementedError,  # an unknown compression method
        zipfile.BadZipFile,
        zlib.error,
        MemoryError,
    ) as exc:
        raise ManifestError(f"{source}: not a readable .npz file: {exc}") from None


def _check_directory(path: Path, source: str) -> None:
    """Refuse a zip whose end record announces over MAX_GOLDEN_MEMBERS entries or a central
    directory over MAX_GOLDEN_DIRECTORY_BYTES, or is zip64 (golden vectors never need it),
    before zipfile reads the directory. A file with no end record is left to zipfile's error."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        file.seek(max(0, size - _END_RECORD.size - 0xFFFF))
        tail = file.read()
    at = tail.rfind(_END_SIGNATURE)
    if at < 0 or len(tail) - at < _END_RECORD.size:
        return
    _, _, _, _, entries, directory_bytes, _, _ = _END_RECORD.unpack_from(tail, at)
    if (
        entries == 0xFFFF
        or directory_bytes == 0xFFFFFFFF
        or tail[at - 20 : at - 16] == (_ZIP64_LOCATOR)
    ):
        raise ManifestError(f"{source}: a zip64 archive; golden vectors fit a plain .npz")
    if entries > MAX_GOLDEN_MEMBERS or directory_bytes > MAX_GOLDEN_DIRECTORY_BYTES:
        raise ManifestError(
            f"{source}: {entries} arrays ({directory_bytes} bytes of zip directory), over the "
            f"cap of {MAX_GOLDEN_MEMBERS} arrays per golden file"
        )


def _npy_bytes(archive: zipfile.ZipFile, member: zipfile.ZipInfo, source: str) -> int:
    """How many bytes the array in `member` declares, from its .npy header alone."""
    if not member.filename.endswith(".npy"):
        raise ManifestError(
            f"{source}: {member.filename!r} is not a .npy array; a golden file holds only "
            "arrays input/<name> and output/<name>"
        )
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ManifestError(
                f"{source}: {member.filename!r} is .npy format {version}; save it with numpy.savez"
            )
    if dtype.hasobject:
        raise ManifestError(
            f"{source}: {member.filename!r} holds Python objects; golden arrays are numeric"
        )
    # Text, bytes, complex, dates, records and empty items (|V0) have no tensor datatype; an
    # itemsize of 0 would also let any shape through the cap on bytes.
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise ManifestError(
            f"{source}: {member.filename!r} holds {dtype.str} values; golden arrays are numbers "
            "or booleans"
        )
    if any(d < 0 for d in shape):
        raise ManifestError(f"{source}: {member.filename!r} declares the shape {shape}")
    return math.prod(shape) * dtype.itemsize


def _golden_group(
    arrays: dict[str, np.ndarray], prefix: str, declared: tuple[TensorDecl, ...], source: str
) -> dict[str, np.ndarray]:
    group = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    wanted = {d.name: d for d in declared}
    if set(group) != set(wanted):
        raise ManifestError(
            f"{source}: {prefix.rstrip('/')} arrays {sorted(group)} do not match the declared "
            f"{prefix.rstrip('/')}s {sorted(wanted)}"
        )
    for name, array in group.items():
        decl = wanted[name]
        if array.dtype != to_numpy(decl.datatype):
            raise ManifestError(
                f"{source}: {prefix}{name} is {array.dtype}, declared {decl.datatype}"
            )
        if not decl.accepts(array):
            raise ManifestError(
                f"{source}: {prefix}{name} has shape {list(array.shape)}, declared "
                f"{list(decl.shape)}"
            )
    return group


class _Reader:
    """Turns parsed TOML into a Manifest, or fails naming the key and the problem."""

    TOP = frozenset(
        {
            "name",
            "version",
            "description",
            "min_agent_version",
            "allowed_regions",
            "inputs",
            "outputs",
            "variants",
            "golden",
            "serving",
        }
    )

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: {key}: {problem}")

    def manifest(self, data: dict[str, Any]) -> Manifest:
        self.known_keys(data, self.TOP, "")
        name = self.string(data, "name", "", required=True)
        if not MODEL_NAME.fullmatch(name):
            raise self.fail("name", f"{name!r} must match {MODEL_NAME.pattern}")
        version = self.version(data.get("version"))
        min_agent = self.string(data, "min_agent_version", "", default="0")
        if not AGENT_VERSION.fullmatch(min_agent):
            raise self.fail("min_agent_version", f"{min_agent!r} is not a version like 0.1.0")
        regions = self.regions(data.get("allowed_regions"))
        inputs = self.tensors(data, "inputs")
        outputs = self.tensors(data, "outputs")
        variants = self.variants(data.get("variants"))
        golden = self.golden(data.get("golden"))
        owned: dict[str, str] = {}
        for v in variants:
            for f in v.files:
                if f in owned and owned[f] != v.name:
                    raise self.fail(
                        f"variants.{v.name}.files", f"{f!r} also belongs to variant {owned[f]!r}"
                    )
                owned[f] = v.name
        for g in golden:
            if g.file in owned:
                raise self.fail("golden.file", f"{g.file!r} is also a file of a variant")
            owned[g.file] = "golden vectors"
        serving = self.serving(data.get("serving", {}), inputs, outputs, owned)
        return Manifest(
            name=name,
            version=version,
            min_agent_version=min_agent,
            allowed_regions=regions,
            inputs=inputs,
            outputs=outputs,
            variants=variants,
            golden=golden,
            description=self.string(data, "description", "", default=""),
            serving=serving,
        )

    def known_keys(
        self, table: dict[str, Any], known: set[str] | frozenset[str], where: str
    ) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.fail(
                where or "(top level)",
                f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            )

    def string(
        self,
        table: dict[str, Any],
        key: str,
        where: str,
        *,
        required: bool = False,
        default: str | None = None,
    ) -> str:
        full = f"{where}{key}"
        if key not in table:
            if required:
                raise self.fail(full, "is required")
            return default or ""
        value = table[key]
        if not isinstance(value, str) or (required and not value):
            raise self.fail(full, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, table: dict[str, Any], key: str, where: str) -> float | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise self.fail(f"{where}{key}", f"expected a number >= 0, got {value!r}")
        return float(value)

    def version(self, value: Any) -> int:
        if value is None:
            raise self.fail("version", "is required (a positive integer)")
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**53:
            raise self.fail(
                "version",
                f"{value!r} must be a positive integer: the serving repository orders versions "
                "numerically",
            )
        return value

    def regions(self, value: Any) -> tuple[str, ...]:
        if value is None:
            raise self.fail(
                "allowed_regions", 'is required: a list of regions, or ["*"] for any region'
            )
        if not isinstance(value, list) or not value:
            raise self.fail("allowed_regions", 'expected a non-empty list such as ["ae"] or ["*"]')
        for region in value:
            if region != ANY_REGION and not (isinstance(region, str) and REGION.fullmatch(region)):
                raise self.fail("allowed_regions", f"{region!r} is not a region name")
        return tuple(dict.fromkeys(value))

    def tensors(self, data: dict[str, Any], key: str) -> tuple[TensorDecl, ...]:
        items = data.get(key)
        if not isinstance(items, list) or not items:
            raise self.fail(key, f"expected one or more [[{key}]] tables")
        decls: list[TensorDecl] = []
        for index, item in enumerate(items):
            where = f"{key}[{index}]."
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{index}]", "expected a table")
            self.known_keys(item, {"name", "datatype", "shape"}, f"{key}[{index}]")
            name = self.string(item, "name", where, required=True)
            datatype = self.string(item, "datatype", where, required=True)
            if datatype not in _DATATYPES:
                raise self.fail(
                    f"{where}datatype", f"{datatype!r}; expected one of {', '.join(_DATATYPES)}"
                )
            shape = item.get("shape")
            if (
                not isinstance(shape, list)
                or not 1 <= len(shape) <= _MAX_DIMS
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0)
                    for d in shape
                )
            ):
                raise self.fail(
                    f"{where}shape", f"expected 1..{_MAX_DIMS} dimensions, each > 0 or -1"
                )
            if name in {d.name for d in decls}:
                raise self.fail(f"{where}name", f"{name!r} is declared twice")
            decls.append(TensorDecl(name, datatype, tuple(shape)))
        return tuple(decls)

    def variants(self, items: Any) -> tuple[Variant, ...]:
        if not isinstance(items, list) or not items:
            raise self.fail("variants", "expected one or more [[variants]] tables")
        variants: list[Variant] = []
        for index, item in enumerate(items):
            where = f"variants[{index}]."
            if not isinstance(item, dict):
                raise self.fail(f"variants[{index}]", "expected a table")
            self.known_keys(
                item, {"name", "runtime", "precision", "files", "atol", "rtol"}, where[:-1]
            )
            name = self.string(item, "name", where, required=True)
            if not VARIANT_NAME.fullmatch(name):
                raise self.fail(f"{where}name", f"{name!r} must match {VARIANT_NAME.pattern}")
            if name in {v.name for v in variants}:
                raise self.fail(f"{where}name", f"{name!r} is used by two variants")
            runtime = self.string(item, "runtime", where, required=True)
            if runtime not in RUNTIMES:
                raise self.fail(f"{where}runtime", f"{runtime!r}; expected one of {RUNTIMES}")
            precision = self.string(item, "precision", where, required=True)
            if precision not in PRECISIONS:
                raise self.fail(f"{where}precision", f"{precision!r}; expected one of {PRECISIONS}")
            files = self.files(item.get("files"), f"{where}files", runtime)
            variant = Variant(
                name,
                runtime,
                precision,
                files,
                self.number(item, "atol", where),
                self.number(item, "rtol", where),
            )
            try:
                variant.serving_names()
            except ValueError as exc:
                raise self.fail(f"{where}files", str(exc)) from None
            variants.append(variant)
        return tuple(variants)

    def files(self, value: Any, where: str, runtime: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= _MAX_FILES:
            raise self.fail(where, f"expected a list of 1..{_MAX_FILES} file paths")
        files = tuple(self.path(f, where) for f in value)
        if len(set(files)) != len(files):
            raise self.fail(where, "lists a file twice")
        first = PurePosixPath(files[0])
        if first.suffix.lower() not in _MODEL_SUFFIXES[runtime]:
            raise self.fail(
                where,
                f"the first file {files[0]!r} is what {runtime} opens; it must end in "
                f"{' or '.join(_MODEL_SUFFIXES[runtime])}",
            )
        if first.suffix.lower() == ".xml":
            weights = str(first.with_suffix(".bin"))
            if weights not in files:
                raise self.fail(where, f"an OpenVINO IR needs its weights {weights!r} listed too")
        return files

    def path(self, value: Any, where: str) -> str:
        path = check_relative_path(value, f"{self.source}: {where}")
        if path in (SIGNATURE_FILE, MANIFEST_FILE):
            raise self.fail(where, f"{path!r} is reserved for the package itself")
        return path

    def serving(
        self,
        table: Any,
        inputs: tuple[TensorDecl, ...],
        outputs: tuple[TensorDecl, ...],
        owned: dict[str, str],
    ) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail("serving", "expected a [serving] table")
        chosen_here = {"runtime", "device", "threads", "variant", "hint", "precision"}
        for key in table:
            if key in chosen_here:
                raise self.fail(
                    f"serving.{key}",
                    "how to run the model is chosen on each node by accelerator selection, "
                    "among the package's variants; a package cannot set it",
                )
        self.known_keys(table, serving_settings.PUBLISHER_KEYS, "serving")
        values = {}
        for key, value in table.items():
            try:
                values[key] = serving_settings.check_value(key, value)
            except ValueError as exc:
                raise self.fail(f"serving.{key}", str(exc)) from None
        try:
            serving_settings.check_combination(values)
        except ValueError as exc:
            raise self.fail("serving", str(exc)) from None
        if values.get("max_batch_size", 0) > 0:
            for decl in (*inputs, *outputs):
                if decl.shape[0] != -1:
                    raise self.fail(
                        "serving.max_batch_size",
                        f"batching needs a dynamic first dimension (-1), but {decl.name} has "
                        f"shape {list(decl.shape)}",
                    )
        declared_inputs, declared_outputs = {d.name for d in inputs}, {d.name for d in outputs}
        for name in values.get("input_formats", {}):
            if name not in declared_inputs:
                raise self.fail(f"serving.input_formats.{name}", "not a declared input")
        for output, file in values.get("labels", {}).items():
            where = f"serving.labels.{output}"
            if output not in declared_outputs:
                raise self.fail(where, "not a declared output")
            path = self.path(file, where)
            if path in owned:
                owner = owned[path]
                owner = owner if owner == "golden vectors" else f"variant {owner!r}"
                raise self.fail(where, f"{path!r} is also a file of {owner}")
            values["labels"][output] = path
        return values

    def golden(self, items: Any) -> tuple[GoldenSet, ...]:
        if not isinstance(items, list) or not items:
            raise self.fail(
                "golden",
                "expected one or more [[golden]] tables: a node self-tests every package on "
                "its golden vectors before serving it",
            )
        sets: list[GoldenSet] = []
        for index, item in enumerate(items):
            where = f"golden[{index}]."
            if not isinstance(item, dict):
                raise self.fail(f"golden[{index}]", "expected a table")
            self.known_keys(item, {"file", "atol", "rtol"}, where[:-1])
            file = self.path(item.get("file"), f"{where}file")
            if not file.endswith(".npz"):
                raise self.fail(f"{where}file", f"{file!r} must be a .npz file")
            atol = self.number(item, "atol", where)
            rtol = self.number(item, "rtol", where)
            sets.append(
                GoldenSet(file, 1e-4 if atol is None else atol, 1e-3 if rtol is None else rtol)
            )
        return tuple(sets)
