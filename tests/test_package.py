"""The package format: manifest validation, publisher signatures (also with the upstream
model_signing CLI), and safe extraction of package archives."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from provisioning.archive import ArchiveError, ArchiveLimits, pack, safe_extract
from provisioning.package import Manifest, ManifestError, Package
from provisioning.signing import (
    SignatureError,
    key_id,
    load_public_key,
    sign_package,
    signature_key_id,
    verify_package,
)
from tests.fleet import new_publisher_key
from tests.packages import write_package

# `edgefleet`, as its console script runs it.
EDGEFLEET = [
    sys.executable,
    "-c",
    "import sys; from controlplane.cli import main; sys.exit(main())",
]
# The upstream CLI, as its console script runs it.
MODEL_SIGNING_CLI = [sys.executable, "-m", "model_signing", "--log-level", "ERROR"]

GOOD = """\
name = "cnn"
version = 2
min_agent_version = "0.1.0"
allowed_regions = ["ae", "eu"]

[[inputs]]
name = "input"
datatype = "FP32"
shape = [1, 3, 224, 224]

[[outputs]]
name = "output"
datatype = "FP32"
shape = [1, 1000]

[[variants]]
name = "onnx-fp32"
runtime = "onnxruntime"
precision = "fp32"
files = ["model.onnx"]

[[variants]]
name = "openvino-int8"
runtime = "openvino"
precision = "int8"
files = ["ir/model.xml", "ir/model.bin"]
atol = 0.05

[[golden]]
file = "golden.npz"
"""


@pytest.fixture(scope="module")
def publisher(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("publisher")
    new_publisher_key(directory / "publisher.key")
    return directory / "publisher.key", directory / "publisher.pub"


@pytest.fixture
def package(sample_repo, tmp_path) -> Path:
    return write_package(tmp_path / "pkg", sample_repo, version=3)


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_parses_every_field():
    manifest = Manifest.parse(GOOD)
    assert (manifest.name, manifest.version) == ("cnn", 2)
    assert manifest.allows_region("ae") and not manifest.allows_region("us")
    assert manifest.accepts_agent("0.1.0") and not manifest.accepts_agent("0.0.9")
    ir = manifest.variant("openvino-int8")
    assert (ir.runtime, ir.precision, ir.model_file, ir.atol) == (
        "openvino",
        "int8",
        "ir/model.xml",
        0.05,
    )
    assert manifest.files_for(["openvino-int8"]) == (
        "edgefleet.toml",
        "golden.npz",
        "ir/model.xml",
        "ir/model.bin",
    )
    assert manifest.golden[0].atol == 1e-4  # default tolerance


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("version = 2", 'version = "2.1"'), "version: '2.1' must be a positive integer"),
        (("version = 2", "version = 0"), "must be a positive integer"),
        (('name = "cnn"', 'name = "../cnn"'), "name: '../cnn' must match"),
        (('allowed_regions = ["ae", "eu"]', "allowed_regions = []"), "allowed_regions"),
        (('allowed_regions = ["ae", "eu"]\n', ""), "allowed_regions: is required"),
        (('min_agent_version = "0.1.0"', 'min_agent_version = "latest"'), "min_agent_version"),
        (('runtime = "onnxruntime"', 'runtime = "tensorrt"'), "variants[0].runtime: 'tensorrt'"),
        (('precision = "fp32"', 'precision = "fp8"'), "variants[0].precision"),
        (('files = ["model.onnx"]', 'files = ["../model.onnx"]'), "plain relative path"),
        (('files = ["model.onnx"]', 'files = ["/etc/passwd"]'), "plain relative path"),
        (('files = ["model.onnx"]', 'files = ["model.tflite"]'), "must end in .onnx"),
        (('files = ["model.onnx"]', 'files = ["model.sig"]'), "reserved"),
        (('"ir/model.xml", "ir/model.bin"', '"ir/model.xml"'), "weights 'ir/model.bin'"),
        (('files = ["model.onnx"]', 'files = ["ir/model.bin"]'), "must end in .onnx"),
        # a node lays each variant out in one version directory, beside its own model.toml
        (
            ('files = ["model.onnx"]', 'files = ["model.onnx", "model.toml"]'),
            "variants[0].files: model.toml would be model.toml in a node's version directory, "
            "which clashes with the node's serving settings",
        ),
        (
            ('files = ["model.onnx"]', 'files = ["net/a.onnx", "net/model.onnx"]'),
            "net/model.onnx would be model.onnx in a node's version directory, which clashes "
            "with net/a.onnx",
        ),
        (
            ('files = ["model.onnx"]', 'files = ["net/a.onnx", "net/x/y", "net/x"]'),
            "net/x would be x in a node's version directory, which clashes with net/x/y",
        ),
        (
            ('files = ["model.onnx"]', 'files = ["net/a.onnx", "lib/ops.so"]'),
            "lib/ops.so is outside the directory of net/a.onnx",
        ),
        (('datatype = "FP32"', 'datatype = "FLOAT"'), "inputs[0].datatype: 'FLOAT'"),
        (("shape = [1, 1000]", "shape = [0, 1000]"), "outputs[0].shape"),
        (('file = "golden.npz"', 'file = "golden.json"'), "must be a .npz file"),
        (('[[golden]]\nfile = "golden.npz"\n', ""), "golden: expected one or more"),
        (('name = "cnn"', 'name = "cnn"\nlicense = "MIT"'), "unknown key(s) license"),
        (("atol = 0.05", "atol = -1"), "variants[1].atol"),
        (("atol = 0.05", "tolerance = 1"), "unknown key(s) tolerance"),
        # `$` alone matches before a trailing newline: names must not end in one
        (('name = "cnn"', 'name = "cnn\\n"'), "name: 'cnn\\n' must match"),
        (('name = "onnx-fp32"', 'name = "onnx-fp32\\n"'), "variants[0].name: 'onnx-fp32\\n'"),
        (('allowed_regions = ["ae",', 'allowed_regions = ["ae\\n",'), "'ae\\n' is not a region"),
        (('min_agent_version = "0.1.0"', 'min_agent_version = "0.1.0\\n"'), "min_agent_version"),
        # nested past tomllib's recursion: an unsigned package must not crash the update
        (("atol = 0.05", "atol = " + "[" * 100_000 + "]" * 100_000), "not valid TOML"),
    ],
)
def test_manifest_refuses_with_a_clear_error(change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ManifestError) as caught:
        Manifest.parse(GOOD.replace(old, new, 1), source="cnn/edgefleet.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("cnn/edgefleet.toml: ")


SERVING = """
[serving]
max_queue_size = 64
timeout_ms = 2000
instances = 2
idle_spin = true
labels = { output = "meta/imagenet.txt" }
input_formats = { input = "NCHW" }
"""


def test_manifest_reads_serving_settings_and_ships_label_files():
    manifest = Manifest.parse(GOOD + SERVING)
    assert manifest.serving == {
        "max_queue_size": 64,
        "timeout_ms": 2000,
        "instances": 2,
        "idle_spin": True,
        "labels": {"output": "meta/imagenet.txt"},
        "input_formats": {"input": "NCHW"},
    }
    # label files go with every variant, as the golden vectors do
    assert "meta/imagenet.txt" in manifest.files_for(["onnx-fp32"])
    assert "meta/imagenet.txt" in manifest.files_for(["openvino-int8"])
    assert Manifest.parse(GOOD).serving == {}


BATCHABLE = GOOD.replace("shape = [1, 3, 224, 224]", "shape = [-1, 3, 224, 224]").replace(
    "shape = [1, 1000]", "shape = [-1, 1000]"
)


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ("threads = 2", "serving.threads: how to run the model is chosen on each node"),
        ('runtime = "openvino"', "serving.runtime: how to run the model is chosen"),
        ('device = "NPU"', "serving.device"),
        ("batch = 4", "serving: unknown key(s) batch"),
        ("max_batch_size = -1", "serving.max_batch_size: max_batch_size must be an integer"),
        ("max_batch_size = 99999", "must be an integer in [0, 4096]"),
        ("max_batch_size = true", "must be an integer"),
        ("preferred_batch_sizes = [4]", "need max_batch_size > 0"),
        ("max_batch_size = 4\npreferred_batch_sizes = [8]", "exceeds max_batch_size"),
        ("preferred_batch_sizes = [0]", "list of positive integers"),
        ('idle_spin = "yes"', "serving.idle_spin: idle_spin must be true or false"),
        ('labels = { nope = "l.txt" }', "serving.labels.nope: not a declared output"),
        ('labels = { output = "../l.txt" }', "plain relative path"),
        ('labels = { output = "/etc/passwd" }', "plain relative path"),
        ('labels = { output = "model.onnx" }', "is also a file of variant 'onnx-fp32'"),
        ('labels = { output = "golden.npz" }', "is also a file of golden vectors"),
        ('labels = { output = "model.sig" }', "reserved"),
        ("labels = { output = 7 }", "must map each output to a file name"),
        ('labels = "l.txt"', "labels must be a table"),
        ('input_formats = { x = "NCHW" }', "serving.input_formats.x: not a declared input"),
        ('input_formats = { input = "CHW" }', "NCHW or NHWC"),
    ],
)
def test_manifest_refuses_bad_serving_settings(serving, message):
    with pytest.raises(ManifestError) as caught:
        Manifest.parse(BATCHABLE + f"\n[serving]\n{serving}\n", source="cnn/edgefleet.toml")
    assert message in str(caught.value)


def test_manifest_refuses_batching_without_a_dynamic_batch_dimension():
    Manifest.parse(BATCHABLE + "\n[serving]\nmax_batch_size = 8\n")
    with pytest.raises(ManifestError, match=r"serving.max_batch_size: batching needs a dynamic"):
        Manifest.parse(GOOD + "\n[serving]\nmax_batch_size = 8\n")
    with pytest.raises(ManifestError, match="expected a \\[serving\\] table"):
        Manifest.parse("serving = 3\n" + GOOD)


def test_package_load_needs_the_label_files(package):
    manifest = package / "edgefleet.toml"
    manifest.write_text(manifest.read_text() + '\n[serving]\nlabels = { output = "l.txt" }\n')
    with pytest.raises(ManifestError, match=r"l\.txt is listed in edgefleet\.toml but is not"):
        Package.load(package)
    (package / "l.txt").write_text("a\nb\n")
    assert Package.load(package).manifest.serving["labels"] == {"output": "l.txt"}


def test_manifest_refuses_a_file_in_two_variants():
    doubled = GOOD.replace('files = ["ir/model.xml", "ir/model.bin"]', 'files = ["model.onnx"]')
    with pytest.raises(ManifestError, match="also belongs to variant 'onnx-fp32'"):
        Manifest.parse(doubled)


def test_package_load_checks_files_and_golden_arrays(package):
    loaded = Package.load(package)
    vectors = loaded.all_golden()[0]
    assert vectors.inputs["input"].shape == (1, 64)
    (package / "openvino" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=re.escape("openvino/model.onnx is listed")):
        Package.load(package)
    assert Package.load(package, variants=["onnx-fp32"]).manifest.name == "mlp"
    np.savez(package / "golden.npz", **{"input/input": np.zeros((1, 63), np.float32)})
    with pytest.raises(
        ManifestError, match=r"input/input has shape \[1, 63\], declared \[-1, 64\]"
    ):
        Package.load(package, variants=["onnx-fp32"])
    np.savez(package / "golden.npz", **{"input/input": np.zeros((1, 64), np.float32)})
    with pytest.raises(ManifestError, match=r"output arrays \[\] do not match"):
        Package.load(package, variants=["onnx-fp32"])
    np.savez(
        package / "golden.npz",
        **{"input/input": np.zeros((1, 64), np.float64), "output/output": np.zeros((1, 10))},
    )
    with pytest.raises(ManifestError, match="input/input is float64, declared FP32"):
        Package.load(package, variants=["onnx-fp32"])


def _npy(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy member that declares `shape` but holds almost nothing."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + b"\0" * 64


@pytest.mark.parametrize(
    ("members", "message"),
    [
        # 256 TiB declared in a 622-byte file: refused from the header, before any allocation
        (
            {"input/input.npy": _npy((2**40, 64)), "output/output.npy": _npy((1, 10))},
            "'input/input.npy' takes its arrays to 281474976710656 bytes, over the cap of "
            "256 MiB per golden file",
        ),
        # each array under the cap, together over it
        (
            {"input/input.npy": _npy((2**20, 64)), "output/output.npy": _npy((2**20, 10))},
            "'output/output.npy' takes its arrays to 310378496 bytes, over the cap of 256 MiB",
        ),
        ({"input/input.npy": _npy((1, 64), "|O")}, "holds Python objects"),
        ({"input/input.npy": _npy((1, 64)), "notes.txt": b"x"}, "'notes.txt' is not a .npy"),
        ({"input/input.npy": b"\x93NUMPY\x01"}, "not a readable .npz file"),
        ({"input/input.npy": _npy((1, 64))[:-80]}, "not a readable .npz file"),
    ],
    ids=["terabytes", "over-in-all", "objects", "not-npy", "bad-header", "truncated"],
)
def test_golden_files_are_checked_before_their_arrays_are_loaded(package, members, message):
    with zipfile.ZipFile(package / "golden.npz", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ManifestError, match=re.escape(message)):
        Package.load(package)


def test_a_golden_file_that_is_no_zip_is_a_manifest_error(package):
    (package / "golden.npz").write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    with pytest.raises(ManifestError, match=re.escape("golden.npz: not a readable .npz")):
        Package.load(package)


# --- signatures ---------------------------------------------------------------------------------


def test_sign_and_verify(package, publisher):
    private, public = publisher
    sign_package(package, private)
    key = load_public_key(public)
    assert signature_key_id(package) == key_id(key)
    signed = verify_package(package, key)
    assert set(signed.files) == {
        "edgefleet.toml",
        "golden.npz",
        "model.onnx",
        "openvino/model.onnx",
    }


def test_verify_accepts_a_subset_of_variants_but_nothing_unsigned(package, publisher):
    private, public = publisher
    sign_package(package, private)
    key = load_public_key(public)
    shutil.rmtree(package / "openvino")  # a node that downloaded only the ONNX variant
    needed = Manifest.load(package / "edgefleet.toml").files_for(["onnx-fp32"])
    assert "model.onnx" in verify_package(package, key, required=needed).files
    with pytest.raises(SignatureError, match="signed files missing"):
        verify_package(package, key)  # complete package demanded
    (package / ".git").mkdir()
    (package / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert verify_package(package, key, required=needed, strict=False)  # a working directory
    with pytest.raises(SignatureError, match=re.escape("not covered by the signature: .git/HEAD")):
        verify_package(package, key, required=needed)  # what a node unpacked: nothing unsigned
    shutil.rmtree(package / ".git")
    (package / "extra.onnx").write_bytes(b"not signed")
    with pytest.raises(SignatureError, match=re.escape("not covered by the signature: extra.onnx")):
        verify_package(package, key, required=needed)


@pytest.mark.parametrize(
    "content",
    [b"[" * 50_000 + b"]" * 50_000, b"\xff\xfe", b"{}", b'{"verificationMaterial": []}', b""],
)
def test_a_hostile_signature_file_is_refused(package, publisher, content):
    private, public = publisher
    sign_package(package, private)
    (package / "model.sig").write_bytes(content)
    with pytest.raises(SignatureError, match="not a model-signing key signature"):
        signature_key_id(package)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_package(package, load_public_key(public))


def test_bit_flip_and_foreign_key_are_refused(package, publisher, tmp_path):
    private, public = publisher
    sign_package(package, private)
    data = bytearray((package / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (package / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=re.escape("Signature mismatch: model.onnx changed")):
        verify_package(package, load_public_key(public))
    other = new_publisher_key(tmp_path / "other.key").public_key()
    with pytest.raises(SignatureError, match="does not verify with key"):
        verify_package(package, other)


def test_upstream_cli_and_edgefleet_verify_each_other(package, publisher):
    private, public = publisher
    run = MODEL_SIGNING_CLI
    signature = package / "model.sig"
    subprocess.run(
        [
            *run,
            "sign",
            "key",
            str(package),
            "--signature",
            str(signature),
            "--private_key",
            str(private),
        ],
        check=True,
        capture_output=True,
    )
    assert verify_package(package, load_public_key(public)).key_id == key_id(
        load_public_key(public)
    )
    signature.unlink()
    sign_package(package, private)
    result = subprocess.run(
        [
            *run,
            "verify",
            "key",
            str(package),
            "--signature",
            str(signature),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


def test_edgefleet_cli_sign_and_verify(package, publisher):
    private, public = publisher
    edgefleet = [*EDGEFLEET, "model"]
    signed = subprocess.run(
        [*edgefleet, "sign", str(package), "--key", str(private)], capture_output=True, text=True
    )
    assert signed.returncode == 0, signed.stderr
    assert "signed mlp@3 (2 variant(s))" in signed.stdout
    verified = subprocess.run(
        [*edgefleet, "verify", str(package), "--pubkey", str(public)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and "OK: mlp@3, 4 files" in verified.stdout
    (package / "golden.npz").write_bytes((package / "golden.npz").read_bytes() + b"\0")
    refused = subprocess.run(
        [*edgefleet, "verify", str(package), "--pubkey", str(public)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert "edgefleet: error: verification failed" in refused.stderr
    assert "Traceback" not in refused.stderr


# --- archives ---------------------------------------------------------------------------------


def test_pack_is_deterministic_and_extracts(package, tmp_path):
    files = ["edgefleet.toml", "golden.npz", "model.onnx"]
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    pack(package, files, first)
    (package / "model.onnx").touch()  # a new mtime changes nothing
    pack(package, list(reversed(files)), second)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(safe_extract(first, tmp_path / "out")) == sorted(files)
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()


def _tar(path: Path, *members: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../escape.onnx"), "absolute path, '..'"),
        (_member("a/../../escape.onnx"), "absolute path, '..'"),
        (_member("/etc/cron.d/evil"), "absolute path, '..'"),
        (_member("model.onnx", tarfile.SYMTYPE, link="/etc/passwd"), "symbolic link"),
        (_member("model.onnx", tarfile.LNKTYPE, link="edgefleet.toml"), "hard link"),
        (_member("dev/sda", tarfile.BLKTYPE), "device node"),
        (_member("null", tarfile.CHRTYPE), "device node"),
        (_member("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_safe_extract_refuses_dangerous_members(tmp_path, member, message):
    archive = _tar(tmp_path / "evil.tar", _member("edgefleet.toml"), member)
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.onnx").exists()
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_safe_extract_enforces_its_caps(tmp_path):
    limits = ArchiveLimits(max_members=3, max_member_bytes=10, max_total_bytes=15)
    many = _tar(tmp_path / "many.tar", *(_member(f"f{i}") for i in range(4)))
    with pytest.raises(ArchiveError, match="more than 3 members"):
        safe_extract(many, tmp_path / "a", limits)
    big = _tar(tmp_path / "big.tar", _member("big", size=11), data=b"y" * 11)
    with pytest.raises(ArchiveError, match="over the cap of 10 bytes"):
        safe_extract(big, tmp_path / "b", limits)
    total = _tar(tmp_path / "total.tar", _member("a", size=8), _member("b", size=8), data=b"z" * 8)
    with pytest.raises(ArchiveError, match="more than 15 bytes"):
        safe_extract(total, tmp_path / "c", limits)
    twice = _tar(tmp_path / "twice.tar", _member("same"), _member("same"))
    with pytest.raises(ArchiveError, match="appears twice"):
        safe_extract(twice, tmp_path / "d", limits)
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(ArchiveError, match="not a readable tar"):
        safe_extract(tmp_path / "gz.tar", tmp_path / "e", limits)
