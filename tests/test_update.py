"""The update lifecycle on a node, against a real control-plane endpoint (mutual TLS), a real
TUF repository and a real serving agent: the tamper matrix, resumption, the lifecycle of
versions (previous kept, older collected, downgrade) and the health watch's rollback.

Every tampered update must be refused with its reason, leave no files behind, and leave the
previous version serving: `assert_refused` checks all of that.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import itertools
import json
import re
import tarfile
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from aiohttp import web
from tuf.api.metadata import MetaFile, Snapshot, TargetFile, Timestamp

from agent.samples import sample_input
from agent.serving.config import ModelConfig
from agent.serving.server import ServeOptions
from agent.update import (
    ACTIVE,
    FAILED,
    REFUSED,
    ROLLED_BACK,
    DesiredState,
    DesiredStateError,
    HealthPolicy,
)
from agent.update.choice import Choice, prepare_serving
from agent.update.health import HealthWatch, parse_sample
from agent.update.journal import Journal
from agent.update.lifecycle import Lifecycle
from controlplane.model_store import ModelStore
from provisioning.package import Manifest, Package
from provisioning.signing import key_id, load_public_key, sign_package
from runtimes import load
from tests.conftest import ServerThread
from tests.fleet import Fleet, new_publisher_key
from tests.packages import write_package


@dataclass
class World:
    fleet: Fleet
    node: object
    agent: ServerThread
    versions: itertools.count = field(default_factory=lambda: itertools.count(2))

    def next_version(self) -> int:
        return next(self.versions)

    def apply(self, model: str, version: int, health: HealthPolicy | None = None, **kw):
        (outcome,) = self.fleet.apply(self.node, {model: version}, health, **kw)
        return outcome


@pytest.fixture(scope="module")
def world(sample_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    with Fleet.create(root / "fleet", sample_repo) as fleet:
        fleet.publish(1)
        models = root / "node" / "models"
        models.mkdir(parents=True)
        with ServerThread(ServeOptions(models, "127.0.0.1:0", None, None)) as agent:
            node = fleet.node(root / "node", agent_url=f"http://{agent.http_url}")
            world = World(fleet, node, agent)
            assert world.apply("mlp", 1).state == ACTIVE
            yield world


@pytest.fixture(autouse=True)
def clean_server(world):
    world.fleet.server.tamper = None
    yield
    world.fleet.server.tamper = None


def infer(agent: ServerThread, model: str = "mlp") -> tuple[int, str]:
    """(HTTP status, model_version) of one real inference request."""
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    )
    connection = http.client.HTTPConnection("127.0.0.1", agent.server.http_port, timeout=30)
    try:
        connection.request(
            "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        reply = json.loads(response.read() or b"{}")
    finally:
        connection.close()
    return response.status, reply.get("model_version", "")


def served_versions(world: World, model: str) -> list[int]:
    directory = world.node.models_dir / model
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def assert_no_leftovers(world: World) -> None:
    layout = world.node.layout
    for scratch in (layout.downloads, layout.jobs, layout.staging, layout.trash):
        assert not scratch.exists() or list(scratch.iterdir()) == [], scratch


def assert_refused(world: World, outcome, step: str, reason: str) -> None:
    assert outcome.state == FAILED, outcome
    assert outcome.reason.startswith(f"{step}: "), outcome.reason
    assert reason in outcome.reason, outcome.reason
    assert infer(world.agent) == (200, "1")  # the previous version still serving
    assert served_versions(world, "mlp") == [1]
    assert_no_leftovers(world)
    journal = Journal(world.node.settings.database)
    assert journal.job(outcome.job_id).reason == outcome.reason
    assert journal.role("mlp", "active").version == 1


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- the tamper matrix --------------------------------------------------------------------


def test_bit_flip_in_a_model_file_published_by_the_control_plane(world):
    """TUF signs the flipped file (compromised control plane): the publisher's key refuses."""
    version = world.next_version()
    package = world.fleet.package(version)
    flip_bit(package / "model.onnx")
    world.fleet.publish_unchecked(package)
    assert_refused(
        world, world.apply("mlp", version), "signature", "Signature mismatch: model.onnx"
    )


def test_bit_flip_in_transit(world):
    version = world.next_version()
    world.fleet.publish(version)

    async def flip(request: web.Request):
        if "/targets/mlp/" not in request.path:
            return None
        blob = world.fleet.repository.target_file(request.path.split("/targets/", 1)[1])
        data = bytearray(blob.read_bytes())
        data[100] ^= 0x80
        return web.Response(body=bytes(data))

    world.fleet.server.tamper = flip
    assert_refused(
        world, world.apply("mlp", version), "verify", "does not match the signed TUF metadata"
    )


def test_package_re_signed_by_an_unknown_key(world, tmp_path):
    version = world.next_version()
    mallory = tmp_path / "mallory.key"
    new_publisher_key(mallory)
    world.fleet.publish_unchecked(world.fleet.package(version, key=mallory))
    assert_refused(
        world, world.apply("mlp", version), "signature", "belongs to no registered publisher"
    )


def test_valid_signature_by_a_publisher_not_allowed_for_the_model(world, tmp_path):
    version = world.next_version()
    audio = tmp_path / "audio.key"
    world.fleet.register_publisher("audio", ["speech-*"], audio)
    package = world.fleet.package(version, key=audio)
    world.fleet.publish_unchecked(package, claim=key_id(load_public_key(audio.with_suffix(".pub"))))
    assert_refused(
        world,
        world.apply("mlp", version),
        "signature",
        "publisher 'audio' is registered for speech-*, not for model 'mlp'",
    )


def _forged_snapshot(world: World, targets_version: int) -> dict[str, bytes]:
    """What holders of the online keys could serve: a new snapshot naming an old targets."""
    repository = world.fleet.repository
    snapshot = repository.snapshot()
    snapshot.signed.version += 1
    old = repository.metadata_dir / f"{targets_version}.targets.json"
    snapshot.signed.meta["targets.json"] = MetaFile(
        targets_version,
        len(old.read_bytes()),
        {"sha256": hashlib.sha256(old.read_bytes()).hexdigest()},
    )
    snapshot.signatures.clear()
    snapshot.sign(repository._online_signer(Snapshot.type))
    snapshot_bytes = snapshot.to_bytes()
    timestamp = repository.timestamp()
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(
        snapshot.signed.version,
        len(snapshot_bytes),
        {"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
    )
    timestamp.signatures.clear()
    timestamp.sign(repository._online_signer(Timestamp.type))
    return {
        "timestamp.json": timestamp.to_bytes(),
        f"{snapshot.signed.version}.snapshot.json": snapshot_bytes,
    }


def _serve_metadata(world: World, files: dict[str, bytes]) -> None:
    async def swap(request: web.Request):
        name = request.path.rsplit("/", 1)[-1]
        if "/metadata/" in request.path and name in files:
            return web.Response(body=files[name], content_type="application/json")
        return None

    world.fleet.server.tamper = swap


def test_tuf_targets_rolled_back_to_an_older_version(world):
    version = world.next_version()
    world.fleet.publish(version)
    current = world.fleet.repository.snapshot().signed.meta["targets.json"].version
    _serve_metadata(world, _forged_snapshot(world, targets_version=current - 2))
    try:
        assert_refused(world, world.apply("mlp", version), "verify", "BadVersionNumberError")
    finally:
        world.fleet.server.tamper = None
        # The node kept the forged (validly signed) timestamp: move past its version.
        world.fleet.repository.refresh(force=True)
        world.fleet.repository.refresh(force=True)


def test_replayed_old_metadata_is_a_rollback(world):
    repository = world.fleet.repository
    old_timestamp = (repository.metadata_dir / "timestamp.json").read_bytes()
    world.fleet.publish(1, name="demo-replay")
    assert world.apply("demo-replay", 1).state == ACTIVE  # the node sees newer metadata
    version = world.next_version()
    world.fleet.publish(version)
    _serve_metadata(world, {"timestamp.json": old_timestamp})
    assert_refused(world, world.apply("mlp", version), "verify", "must be >= ")


def test_expired_timestamp_freeze(world):
    """A repository (or mirror) that stopped re-signing: its timestamp has expired."""
    repository = world.fleet.repository
    version = world.next_version()
    real_clock = repository.clock
    repository.clock = lambda: real_clock() - timedelta(hours=3)
    try:
        world.fleet.publish(version)  # signed as if three hours ago: expired an hour ago
        assert_refused(world, world.apply("mlp", version), "verify", "timestamp.json is expired")
    finally:
        repository.clock = real_clock
        repository.refresh(force=True)


@pytest.mark.parametrize("swapped", ["targets", "snapshot"])
def test_snapshot_and_targets_mix_and_match(world, swapped):
    repository = world.fleet.repository
    version = world.next_version()
    world.fleet.publish(version)
    if swapped == "targets":
        current = repository.snapshot().signed.meta["targets.json"].version
    else:
        current = repository.timestamp().signed.snapshot_meta.version
    older = repository.metadata_dir / f"{current - 1}.{swapped}.json"
    _serve_metadata(world, {f"{current}.{swapped}.json": older.read_bytes()})
    assert_refused(world, world.apply("mlp", version), "verify", "TUF metadata refused")


def test_target_longer_than_declared(world):
    version = world.next_version()
    world.fleet.publish(version)

    async def endless(request: web.Request):
        if "/targets/mlp/" not in request.path:
            return None
        response = web.StreamResponse()
        await response.prepare(request)
        # "Endless" for a 90 KB target: a thousand times too long, or until the node hangs up.
        for _ in range(1500):
            if request.transport is None or request.transport.is_closing():
                break
            await response.write(b"\0" * 65536)
        return response

    world.fleet.server.tamper = endless
    assert_refused(world, world.apply("mlp", version), "verify", "more than the")


def _evil_tar(path: Path, member: tarfile.TarInfo) -> Path:
    manifest = tarfile.TarInfo("edgefleet.toml")
    manifest.size = 1
    with tarfile.open(path, "w") as tar:
        tar.addfile(manifest, io.BytesIO(b"#"))
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../../../../etc/cron.d/evil"), "has an absolute path, '..'"),
        (_member("/etc/cron.d/evil"), "has an absolute path, '..'"),
        (_member("model.onnx", tarfile.SYMTYPE, "/etc/shadow"), "is a symbolic link"),
        (_member("model.onnx", tarfile.CHRTYPE), "is a device node"),
    ],
    ids=["dot-dot", "absolute", "symlink", "device"],
)
def test_malicious_archive(world, tmp_path, member, reason):
    version = world.next_version()
    archive = _evil_tar(tmp_path / "evil.tar", member)
    world.fleet.publish_archive("mlp", version, "onnx-fp32", archive)
    assert_refused(world, world.apply("mlp", version), "unpack", reason)
    assert not Path("/etc/cron.d/evil").exists()


BOMB_BYTES = 400 * 2**20  # what the sparse member claims to unpack to: under every size cap


def _sparse_tar(path: Path, kind: str) -> Path:
    """A tar of one member that holds 512 bytes of data and unpacks to BOMB_BYTES."""
    hole = BOMB_BYTES - 512
    info = tarfile.TarInfo("model.onnx")
    info.size = 512
    if kind == "pax":  # PAX sparse format 0.1: the map is a header record
        info.pax_headers = {
            "GNU.sparse.map": f"{hole},512",
            "GNU.sparse.realsize": str(BOMB_BYTES),
            "GNU.sparse.name": "model.onnx",
        }
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(b"x" * 512))
        return path
    # An old GNU sparse header ('S'): tarfile writes none, so patch the map into a GNU header.
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % hole  # first map entry: offset, then number of bytes
    header[398:410] = b"%011o\0" % 512
    header[482] = 0  # no extended map headers follow
    header[483:495] = b"%011o\0" % BOMB_BYTES  # the real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    path.write_bytes(bytes(header) + b"x" * 512 + b"\0" * 1024)
    return path


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_sparse_member_is_refused_before_it_unpacks(world, tmp_path, kind):
    """2 KiB of archive that would write 400 MiB of zeros: a decompression bomb in a plain tar."""
    version = world.next_version()
    archive = _sparse_tar(tmp_path / "sparse.tar", kind)
    with tarfile.open(archive) as tar:  # what tarfile itself would unpack
        assert tar.getmember("model.onnx").size == BOMB_BYTES
    world.fleet.publish_archive("mlp", version, "onnx-fp32", archive)
    assert_refused(world, world.apply("mlp", version), "unpack", "'model.onnx' is a sparse file")


def test_archive_that_ends_inside_a_member_fails_the_job(world, tmp_path):
    """The header says 100000 bytes, the archive holds 1000: a one-line reason, not a crash."""
    version = world.next_version()
    info = tarfile.TarInfo("model.onnx")
    info.size = 100_000
    archive = tmp_path / "truncated.tar"
    archive.write_bytes(info.tobuf(format=tarfile.PAX_FORMAT) + b"x" * 1000)
    world.fleet.publish_archive("mlp", version, "onnx-fp32", archive)
    outcome = world.apply("mlp", version)
    assert_refused(world, outcome, "unpack", "'model.onnx' is truncated")
    assert "\n" not in outcome.reason


def _tar(path: Path, *members: tuple[str, bytes | None]) -> Path:
    """A tar of (name, data) members; data None makes a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_directory_and_file_of_one_name_in_one_archive_fail_the_job(world, tmp_path):
    version = world.next_version()
    archive = _tar(tmp_path / "collision.tar", ("model.onnx", None), ("model.onnx", b"x"))
    world.fleet.publish_archive("mlp", version, "onnx-fp32", archive)
    outcome = world.apply("mlp", version)
    assert_refused(world, outcome, "unpack", "'model.onnx' collides with a directory")


@pytest.mark.parametrize("order", ["file-first", "directory-first"])
def test_file_in_one_variant_and_directory_in_another_fail_the_job(world, tmp_path, order):
    """Variants unpack in name order: 'onnx-a' first, then 'onnx-b'."""
    version = world.next_version()
    members = [("shared", b"x"), ("shared/model.onnx", b"x")]
    if order == "directory-first":
        members.reverse()
    for variant, member in zip(("onnx-a", "onnx-b"), members, strict=True):
        archive = _tar(tmp_path / f"{variant}.tar", member)
        world.fleet.publish_archive("mlp", version, variant, archive)
    outcome = world.apply("mlp", version)
    assert_refused(world, outcome, "unpack", "collides with a file or directory of another variant")


def _publish_forged_target(world: World, path: str, archive: Path, **fields) -> None:
    """Sign target metadata with the control plane's online keys alone (no publisher key):
    `fields` replace the length, hashes or variant a real publication would give."""
    repository = world.fleet.repository
    custom = {"variant": fields.get("variant", "onnx-fp32"), "runtime": "onnxruntime"}
    with repository.locked():
        digest, length = repository.store_blob(archive)
        targets = repository.targets()
        targets.signed.targets[path] = TargetFile(
            fields.get("length", length),
            fields.get("hashes", {"sha256": digest}),
            path,
            {"custom": custom},
        )
        repository._publish_targets(targets)

    async def serve_archive(request: web.Request):  # whatever URL the node builds from it
        return web.Response(body=archive.read_bytes()) if "/targets/mlp/" in request.path else None

    world.fleet.server.tamper = serve_archive


@pytest.mark.parametrize(
    "forged", ["path-in-sha256", "path-in-variant", "sha512-only", "uppercase-sha256", "length"]
)
def test_target_metadata_that_would_become_a_path_is_refused(world, tmp_path, forged):
    """The TUF key alone must not reach files: hash and variant name files on the node."""
    version = world.next_version()
    archive = _evil_tar(tmp_path / "evil.tar", _member("dropped.txt"))
    victim = tmp_path / "victim" / "backup.tar"  # not the node's to delete
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    variant, fields, reason = "onnx-fp32", {}, "is not 64 lowercase hex digits"
    if forged == "path-in-sha256":
        fields["hashes"] = {"sha256": "../" * 24 + str(victim.with_suffix("")).lstrip("/")}
    elif forged == "path-in-variant":
        variant = "../" * 24 + str(tmp_path / "escaped").lstrip("/")
        fields["variant"], reason = variant, "is not a variant name"
    elif forged == "sha512-only":
        fields["hashes"] = {"sha512": hashlib.sha512(archive.read_bytes()).hexdigest()}
        reason = "gives no sha256 hash"
    elif forged == "uppercase-sha256":
        fields["hashes"] = {"sha256": digest.upper()}
    else:
        fields["length"], reason = True, "is not a whole number of bytes"
    _publish_forged_target(world, f"mlp/{version}/{variant}.tar", archive, **fields)
    assert_refused(world, world.apply("mlp", version), "verify", reason)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("stored", ["sha512-only", "path-in-sha256"])
def test_unusable_target_in_the_journal_fails_that_job_only(world, tmp_path, stored):
    """A journal written before targets were checked may hold any target: its job fails, and
    recovery and the other updates go on instead of failing on every run."""
    victim = tmp_path / "backup.tar"
    victim.write_bytes(b"precious")
    if stored == "sha512-only":
        hashes = {"sha512": "ab" * 64}
    else:
        hashes = {"sha256": "../" * 24 + str(victim.with_suffix("")).lstrip("/")}
    name = f"demo-{stored}"
    info = {"length": 10, "hashes": hashes, "custom": {}}
    journal = Journal(world.node.settings.database)
    target = {"path": f"{name}/2/onnx-fp32.tar", "variant": "onnx-fp32", "info": info}
    stale = journal.start(name, 2, 1, [target])
    world.fleet.publish(1, name=name)
    assert world.apply(name, 1).state == ACTIVE
    assert journal.job(stale.id).state == FAILED
    assert journal.job(stale.id).reason.startswith("verify: ")
    assert victim.read_bytes() == b"precious"
    assert_no_leftovers(world)


def test_failing_golden_vectors(world):
    version = world.next_version()
    world.fleet.publish(version, golden_offset=1.0)  # signed, published, but wrong outputs
    assert_refused(world, world.apply("mlp", version), "select", "differs from the reference")


def test_package_for_another_region(world):
    version = world.next_version()
    world.fleet.publish(version, regions=("eu",))
    assert_refused(
        world, world.apply("mlp", version), "signature", "not in this node's region 'ae'"
    )


def test_package_for_a_newer_agent(world):
    version = world.next_version()
    world.fleet.publish(version, min_agent_version="99.0")
    assert_refused(world, world.apply("mlp", version), "signature", "needs agent 99.0 or newer")


def test_target_swapped_for_another_version(world):
    """TUF-valid target whose signed manifest is another version: a replay of old content."""
    version = world.next_version()
    old = world.fleet.repository.targets().signed.targets["mlp/1/onnx-fp32.tar"]
    blob = world.fleet.repository.blobs_dir / old.hashes["sha256"]
    world.fleet.publish_archive("mlp", version, "onnx-fp32", blob)
    assert_refused(world, world.apply("mlp", version), "signature", "the signed manifest is mlp@1")


# --- resumption and the lifecycle of versions -----------------------------------------------


def test_truncated_download_resumes_with_range(world):
    fleet = world.fleet
    fleet.publish(1, name="demo-resume")
    cut = {}

    async def truncate_first(request: web.Request):
        if "/targets/demo-resume/" not in request.path or cut:
            return None
        blob = fleet.repository.target_file(request.path.split("/targets/", 1)[1])
        data = blob.read_bytes()
        cut["at"] = len(data) // 3
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: cut["at"]])
        request.transport.close()  # the link drops mid-transfer
        return response

    fleet.server.tamper = truncate_first
    fleet.server.requests.clear()
    outcome = world.apply("demo-resume", 1)
    assert outcome.state == ACTIVE, outcome
    ranges = [r.range for r in fleet.server.requests if "/targets/demo-resume/" in r.path]
    # The second request continues from what reached the disk (whole chunks before the cut).
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut["at"]
    served = world.node.models_dir / "demo-resume" / "1" / "model.onnx"
    original = fleet.packages[1] / "model.onnx"
    assert (
        hashlib.sha256(served.read_bytes()).digest()
        == hashlib.sha256(original.read_bytes()).digest()
    )
    assert infer(world.agent, "demo-resume") == (200, "1")
    assert_no_leftovers(world)


def test_previous_version_kept_older_collected_and_downgrade(world):
    fleet, name = world.fleet, "demo-life"
    for version in (1, 2, 3):
        fleet.publish(version, name=name)
    store = world.node.layout.store / name
    assert world.apply(name, 1).state == ACTIVE
    assert world.apply(name, 2).state == ACTIVE
    assert served_versions(world, name) == [1, 2]  # previous still addressable
    assert infer(world.agent, name) == (200, "2")
    assert world.apply(name, 3).state == ACTIVE
    assert served_versions(world, name) == [2, 3]  # 1 collected
    assert sorted(p.name for p in store.iterdir() if p.name.isdigit()) == ["2", "3"]
    assert world.apply(name, 3).state == "UP_TO_DATE"
    reverted = world.apply(name, 2)  # the previous version: straight from the store
    assert reverted.state == ACTIVE and reverted.reason == "reinstated from the store"
    assert "download" not in reverted.timings and "select" not in reverted.timings
    assert served_versions(world, name) == [2]  # a downgrade: the higher version must go
    assert infer(world.agent, name) == (200, "2")
    journal = Journal(world.node.settings.database)
    roles = {i.role: i.version for i in journal.installed(name)}
    assert roles == {"active": 2, "previous": 3}
    assert world.apply(name, 1).state == ACTIVE  # no longer kept: downloaded and checked again
    assert served_versions(world, name) == [1]
    assert sorted(p.name for p in store.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert_no_leftovers(world)


def test_health_watch_rolls_back_and_records_why(world):
    fleet, name = world.fleet, "demo-health"
    fleet.publish(1, name=name)
    fleet.publish(2, name=name)
    assert world.apply(name, 1).state == ACTIVE
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            infer(world.agent, name)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    # No real model answers in a nanosecond: the p95 limit is bound to be broken.
    policy = HealthPolicy(window_s=20, poll_s=0.1, max_p95_ms=1e-6, min_requests=5)
    try:
        outcome = world.apply(name, 2, health=policy)
    finally:
        stop.set()
        sender.join(10)
    assert outcome.state == ROLLED_BACK, outcome
    assert "health: p95 latency" in outcome.reason and "above the limit" in outcome.reason
    assert served_versions(world, name) == [1]
    assert infer(world.agent, name) == (200, "1")
    journal = Journal(world.node.settings.database)
    assert journal.job(outcome.job_id).state == ROLLED_BACK
    assert journal.role(name, "active").version == 1
    refused = world.apply(name, 2)
    assert refused.state == REFUSED and "was rolled back" in refused.reason
    assert world.apply(name, 2, retry_rolled_back=True).state == ACTIVE


# --- the health watch's arithmetic and the desired-state file --------------------------------


def _metrics(success: int, failures: dict[str, int], fast: int, slow: int) -> str:
    labels = 'model="m",version="2"'
    lines = [f"edgefleet_inference_request_success_total{{{labels}}} {success}"]
    lines += [
        f'edgefleet_inference_request_failure_total{{{labels},reason="{r}"}} {n}'
        for r, n in failures.items()
    ]
    for le, count in (("0.001", fast), ("0.01", fast + slow), ("+Inf", fast + slow)):
        lines.append(
            f'edgefleet_inference_request_latency_seconds_bucket{{{labels},le="{le}"}} {count}'
        )
    lines.append(f"edgefleet_inference_request_latency_seconds_count{{{labels}}} {fast + slow}")
    return "# TYPE edgefleet_inference_request_success counter\n" + "\n".join(lines) + "\n"


def test_health_watch_judges_error_rate_and_ignores_client_mistakes():
    sample = parse_sample(
        _metrics(90, {"InferenceFailed": 10, "InvalidInput": 500}, 80, 20), "m", "2"
    )
    assert (sample.success, sample.failure) == (90, 10)
    assert sample.quantile(0.5) == pytest.approx(0.001 * 50 / 80)
    readings = iter([_metrics(0, {}, 0, 0), _metrics(90, {"InferenceFailed": 10}, 95, 5)])
    clock = iter([0.0, 0.0, 1.0, 1.0, 1.0])
    watch = HealthWatch(
        HealthPolicy(window_s=5, poll_s=1, max_error_rate=0.05, min_requests=20),
        lambda: next(readings),
        clock=lambda: next(clock),
        sleep=lambda s: None,
    )
    verdict = watch.watch("m", 2)
    assert not verdict.healthy
    assert verdict.reason.startswith("error rate 10.0% above the limit of 5.0% (100 requests")
    quiet = HealthWatch(HealthPolicy(min_requests=20), lambda: "").judge(
        parse_sample("", "m", "2"), 1
    )
    assert quiet.healthy and "not enough to judge" in quiet.reason


def test_desired_state_file(tmp_path):
    path = tmp_path / "desired.toml"
    path.write_text(
        'generation = 4\n[[models]]\nname = "cnn"\nversion = 2\n'
        "[health]\nwindow_seconds = 30\nmax_p95_ms = 50\n"
    )
    desired = DesiredState.load(path)
    assert desired.generation == 4 and desired.models[0].version == 2
    assert desired.health.window_s == 30 and desired.health.max_p95_ms == 50
    for bad, message in (
        ('[[models]]\nname = "cnn"\nversion = "2"\n', "models[0].version"),
        ('[[models]]\nname = "../x"\nversion = 2\n', "is not a model name"),
        ("[health]\nwindow = 3\n", "[health] takes"),
        ("color = 1\n", "unknown key(s) color"),
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "recursion"),
    ):
        path.write_text(bad)
        with pytest.raises(DesiredStateError, match=re.escape(message)):
            DesiredState.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("generation = 9223372036854775808\n", "generation must be an integer 0 to"),
        ('[[models]]\nname = "cnn"\nversion = 9223372036854775808\n', "models[0].version"),
        ("[health]\nmax_error_rate = nan\n", "health.max_error_rate must be a finite number"),
        ("[health]\nmax_error_rate = 5\n", "health.max_error_rate is a share of requests"),
        ("[health]\nwindow_seconds = inf\n", "health.window_seconds must be a finite number"),
        ("[health]\npoll_seconds = nan\n", "health.poll_seconds must be a finite number"),
        ("[health]\npoll_seconds = 0\n", "health.poll_seconds must be more than 0"),
        ("[health]\nmax_p95_ms = nan\n", "health.max_p95_ms must be a finite number"),
        ("[health]\nmin_requests = inf\n", "health.min_requests must be a whole number"),
        ("[health]\nmin_requests = 2.5\n", "health.min_requests must be a whole number"),
    ],
)
def test_desired_state_numbers_the_journal_and_health_watch_cannot_use(tmp_path, text, message):
    path = tmp_path / "desired.toml"
    path.write_text(text)
    with pytest.raises(DesiredStateError, match=re.escape(message)):
        DesiredState.load(path)
    path.write_text(
        'generation = 9223372036854775807\n[[models]]\nname = "cnn"\n'
        "version = 9223372036854775807\n[health]\nmax_error_rate = 1\nmin_requests = 0\n"
    )
    assert DesiredState.load(path).models[0].version == 2**63 - 1


class _RefusingAgent(http.server.BaseHTTPRequestHandler):
    """Answers every reload with HTTP 500 and /metrics with no series."""

    def do_POST(self) -> None:
        self._reply(500, b'{"error": "nope"}')

    def do_GET(self) -> None:
        self._reply(200, b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_refused_reload_after_activation_leaves_the_job_active(world, tmp_path):
    """The files and the journal have switched; the agent refusing to reload fails nothing."""
    fleet, name = world.fleet, "demo-reload"
    fleet.publish(1, name=name)
    fleet.publish(2, name=name)
    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingAgent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    try:
        node = fleet.node(tmp_path / "node", agent_url=f"http://127.0.0.1:{agent.server_port}")
        (first,) = fleet.apply(node, {name: 1})
        assert first.state == ACTIVE, first
        (outcome,) = fleet.apply(node, {name: 2}, HealthPolicy(window_s=0.2, poll_s=0.05))
    finally:
        agent.shutdown()
        agent.server_close()
    assert outcome.state == ACTIVE, outcome
    journal = Journal(node.settings.database)
    assert journal.job(outcome.job_id).state == ACTIVE
    assert journal.role(name, "active").version == 2
    events = [label for label, _, _ in journal.events(outcome.job_id)]
    assert events[-2:] == ["RELOAD", "HEALTH"]  # the refusal noted, the version still watched
    assert sorted(int(p.name) for p in (node.models_dir / name).iterdir()) == [1, 2]
    with Lifecycle(node.settings) as lifecycle:  # nothing fails a job that went live
        assert not lifecycle._abandon(journal.job(outcome.job_id), "a late step failed")
    assert journal.job(outcome.job_id).state == ACTIVE


# --- serving settings from the publisher ----------------------------------------------------

CLASSES = "".join(f"class-{i}\n" for i in range(10)).encode()


def test_serving_settings_and_labels_travel_in_the_signed_package(world):
    """The manifest's [serving] table reaches the node's model.toml and its label file the
    version directory: the served model batches as published and answers classifications."""
    serving = (
        "max_batch_size = 8\nmax_queue_delay_us = 500\npreferred_batch_sizes = [4, 8]\n"
        'timeout_ms = 5000\nidle_spin = true\nlabels = { output = "meta/classes.txt" }\n'
    )
    world.fleet.publish(1, name="demo-served", serving=serving, files={"meta/classes.txt": CLASSES})
    assert world.apply("demo-served", 1).state == ACTIVE
    version_dir = world.node.models_dir / "demo-served" / "1"
    config = ModelConfig.from_file(version_dir / "model.toml")
    assert (config.max_batch_size, config.max_queue_delay_us) == (8, 500)
    assert (config.preferred_batch_sizes, config.timeout_ms) == ((4, 8), 5000)
    assert config.idle_spin and config.runtime in ("onnxruntime", "openvino")
    assert (version_dir / config.labels["output"]).read_bytes() == CLASSES

    url = f"127.0.0.1:{world.agent.server.http_port}"
    with httpclient.InferenceServerClient(url) as client:
        assert client.get_model_config("demo-served")["max_batch_size"] == 8
        rows = np.stack([sample_input("mlp")["input"][0]] * 2)
        x = httpclient.InferInput("input", [2, 64], "FP32")
        x.set_data_from_numpy(rows)
        wanted = [httpclient.InferRequestedOutput("output", class_count=3)]
        answer = client.infer("demo-served", [x], outputs=wanted).as_numpy("output")
    reference = load(version_dir / "model.onnx").infer({"input": rows})["output"]
    top = np.argsort(-reference[0])[:3]
    assert answer.shape == (2, 3)
    assert [a.decode().split(":", 1)[1] for a in answer[0]] == [f"{i}:class-{i}" for i in top]


@pytest.mark.parametrize(
    ("serving", "files", "reason"),
    [
        ('labels = { output = "classes.txt" }\n', {"classes.txt": b"\xff\xfe"}, "not UTF-8"),
        ('input_formats = { input = "NCHW" }\n', {}, "an image layout needs 3 dimensions"),
    ],
    ids=["labels-not-utf8", "image-format-on-a-vector"],
)
def test_serving_settings_that_do_not_fit_fail_the_self_test(world, serving, files, reason):
    """Settings the manifest accepts but the model cannot take are found before going live."""
    version = world.next_version()
    world.fleet.publish(version, serving=serving, files=files)
    outcome = world.apply("mlp", version)
    assert_refused(world, outcome, "self-test", reason)
    assert "serving settings do not fit the model" in outcome.reason


@pytest.mark.parametrize(
    "name",
    ['out"put', "out\\put", "out\nput", "a.b = 1", "выход", "out\x7f", "out\U0001f600"],
    ids=["quote", "backslash", "newline", "toml-syntax", "cyrillic", "del", "emoji"],
)
def test_model_toml_keeps_any_tensor_name_the_manifest_accepts(sample_repo, tmp_path, name):
    """model.toml names inputs and outputs as the manifest does, whatever their characters:
    TOML refuses JSON's surrogate-pair escapes (\\ud83d\\ude00) and a raw DEL."""
    directory = write_package(
        tmp_path / "package",
        sample_repo,
        variants=("onnx-fp32",),
        files={"classes.txt": CLASSES},
    )
    manifest_file = directory / "edgefleet.toml"
    quoted = json.dumps(name, ensure_ascii=False).replace("\x7f", "\\u007f")
    manifest_file.write_text(
        manifest_file.read_text(encoding="utf-8")
        .replace('name = "input"', f"name = {quoted}")
        .replace('name = "output"', f"name = {quoted}")
        + f'\n[serving]\nlabels = {{ {quoted} = "classes.txt" }}\n'
        f'input_formats = {{ {quoted} = "NCHW" }}\n',
        encoding="utf-8",
    )
    package = Package(directory, Manifest.load(manifest_file))  # golden names left as they are
    choice = Choice("onnx-fp32", "onnxruntime", "CPU", None)
    version_dir = prepare_serving(package, choice, tmp_path / "serving")
    config = ModelConfig.from_file(version_dir / "model.toml")
    assert config.labels == {name: "labels-0.txt"}
    assert config.input_formats == {name: "NCHW"}


@pytest.mark.parametrize("companion", ["labels-0.txt", "labels-0.txt/notes.txt"])
def test_label_files_take_names_no_file_of_the_variant_has(world, companion):
    """A variant's own file where the node would put a label file is neither overwritten (it
    is a hard link to the package's signed file) nor in the way (a directory)."""
    name = f"demo-companion-{companion.count('/')}"
    directory = world.fleet.package(
        1,
        name=name,
        variants=("onnx-fp32",),
        serving='labels = { output = "meta/classes.txt" }\n',
        files={"meta/classes.txt": CLASSES, companion: b"the publisher's own file\n"},
    )
    manifest = directory / "edgefleet.toml"
    text = manifest.read_text().replace('["model.onnx"]', f'["model.onnx", "{companion}"]')
    manifest.write_text(text)
    sign_package(directory, world.fleet.publisher_key)
    ModelStore(world.fleet.repository).push(directory)
    assert world.apply(name, 1).state == ACTIVE
    version_dir = world.node.models_dir / name / "1"
    assert (version_dir / companion).read_bytes() == b"the publisher's own file\n"
    config = ModelConfig.from_file(version_dir / "model.toml")
    assert (version_dir / config.labels["output"]).read_bytes() == CLASSES


def test_a_label_file_the_self_test_refuses_is_named_as_the_package_names_it(world):
    """The node renames label files (labels-0.txt, ...): its reason names the publisher's too."""
    version = world.next_version()
    serving = 'labels = { output = "meta/classes.txt" }\n'
    world.fleet.publish(version, serving=serving, files={"meta/classes.txt": b"x" * 2000})
    outcome = world.apply("mlp", version)
    assert_refused(world, outcome, "self-test", "line 1 is longer than 1024 characters")
    assert "labels-0.txt is the package's meta/classes.txt" in outcome.reason
