"""Publishing and installing what a hostile or careless party hands over: a package directory
that changes while it is pushed, names that end in a newline, golden files that declare more
than they hold, and a publisher list that canonical JSON cannot encode.

Each must be refused with one clear reason (PushRefused on the control plane, a FAILED job on
the node), never published half-checked and never a crash."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from numpy.lib import format as npformat

from agent.update import FAILED, DesiredState, DesiredStateError
from controlplane import model_store
from controlplane.model_store import ModelStore, PushRefused
from controlplane.publishers import PublisherRegistry
from controlplane.tuf_repository import NewTarget, TufRepositoryError
from provisioning.archive import safe_extract
from provisioning.publishers import TARGET_PATH
from provisioning.signing import sign_package
from tests.fleet import Fleet, new_publisher_key

TERABYTES = (2**40, 64)  # 256 TiB of float32, declared in a header of a few dozen bytes


@pytest.fixture(scope="module")
def fleet(sample_repo, tmp_path_factory):
    with Fleet.create(tmp_path_factory.mktemp("hostile-fleet"), sample_repo) as fleet:
        yield fleet


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy member that declares `shape` but holds almost nothing."""
    header = io.BytesIO()
    npformat.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + b"\0" * 64


def write_golden(package: Path, input_shape: tuple[int, ...]) -> None:
    with zipfile.ZipFile(package / "golden.npz", "w") as archive:
        archive.writestr("input/input.npy", npy_header(input_shape))
        archive.writestr("output/output.npy", npy_header((1, 10)))


# --- model push: what is published is what was verified -----------------------------------------


def test_push_publishes_the_bytes_it_verified(fleet, tmp_path, monkeypatch):
    package = fleet.package(11)
    signed = {name: (package / name).read_bytes() for name in ("model.onnx", "openvino/model.onnx")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes(b"NOT THE SIGNED MODEL EITHER")
    verify = model_store.authenticate_package

    def then_a_writer_changes_the_package(*args, **kwargs):
        result = verify(*args, **kwargs)
        (package / "model.onnx").write_bytes(b"NOT THE SIGNED MODEL")
        shutil.rmtree(package / "openvino")
        (package / "openvino").symlink_to(elsewhere)
        return result

    monkeypatch.setattr(model_store, "authenticate_package", then_a_writer_changes_the_package)
    published = ModelStore(fleet.repository).push(package)
    compared = []
    for variant in published:
        unpacked = tmp_path / variant.custom["variant"]
        safe_extract(fleet.repository.blobs_dir / variant.sha256, unpacked)
        for name, data in signed.items():
            if (unpacked / name).exists():
                assert (unpacked / name).read_bytes() == data, f"{name} published unsigned"
                compared.append(name)
    assert sorted(compared) == sorted(signed)


def test_push_refuses_a_fifo_beside_the_package(fleet):
    package = fleet.package(12)
    os.mkfifo(package / "pipe")
    with pytest.raises(PushRefused, match="pipe is a special file; packages hold plain files"):
        ModelStore(fleet.repository).push(package)
    assert "mlp/12/onnx-fp32.tar" not in fleet.repository.targets().signed.targets


# --- names ending in a newline ------------------------------------------------------------


def test_desired_state_refuses_a_model_name_ending_in_a_newline():
    with pytest.raises(DesiredStateError, match="is not a model name"):
        DesiredState.from_dict({"models": [{"name": "mlp\n", "version": 1}]})


@pytest.mark.parametrize(("name", "models"), [("vision\n", ["mlp"]), ("vision", ["mlp\n"])])
def test_registry_refuses_names_ending_in_a_newline(fleet, tmp_path, name, models):
    key = new_publisher_key(tmp_path / "newline.key").public_key()
    signers = fleet.repository.root_signers(fleet.offline_keys)
    with pytest.raises(TufRepositoryError):
        PublisherRegistry(fleet.repository).register(name, key, models, signers)


# --- golden files that declare more than they hold -----------------------------------------


def test_push_refuses_a_golden_header_declaring_terabytes(fleet):
    package = fleet.package(13)
    write_golden(package, TERABYTES)
    sign_package(package, fleet.publisher_key)
    with pytest.raises(PushRefused, match="over the cap of 256 MiB per golden file"):
        ModelStore(fleet.repository).push(package)


def test_node_fails_the_job_on_a_golden_header_declaring_terabytes(fleet, tmp_path):
    package = fleet.package(14, variants=("onnx-fp32",))
    write_golden(package, TERABYTES)
    sign_package(package, fleet.publisher_key)
    fleet.publish_unchecked(package)  # a compromised control plane skips push's checks
    (outcome,) = fleet.apply(fleet.node(tmp_path / "node"), {"mlp": 14})
    assert outcome.state == FAILED, outcome
    assert outcome.reason.startswith("signature: "), outcome.reason
    assert "over the cap of 256 MiB per golden file" in outcome.reason


# --- a publisher list canonical JSON cannot encode ----------------------------------------


def test_node_fails_the_job_on_a_publisher_list_holding_a_float(sample_repo, tmp_path):
    with Fleet.create(tmp_path / "fleet", sample_repo) as fleet:
        fleet.publish(1)
        document = json.loads(
            (fleet.repository.directory / "trust" / "publishers.json").read_text()
        )
        document["signed"]["note"] = 0.5  # what the online targets key alone could publish
        hostile = tmp_path / "publishers.json"
        hostile.write_text(json.dumps(document))
        fleet.repository.add_targets([NewTarget(TARGET_PATH, hostile)], replace=True)
        (outcome,) = fleet.apply(fleet.node(tmp_path / "node"), {"mlp": 1})
    assert outcome.state == FAILED, outcome
    assert "malformed publisher list" in outcome.reason
