"""The control plane's TUF repository, its publisher trust data and the artifact endpoint."""

from __future__ import annotations

import json
import ssl
import stat
import urllib.request
from datetime import timedelta

import pytest
import urllib3
from tuf.api.metadata import Metadata, Root

from agent.update.config import UpdateLimits
from agent.update.journal import Journal
from agent.update.transport import Transport
from agent.update.trust import TrustedRepository, pin_root
from controlplane.model_store import ModelStore, PushRefused
from controlplane.publishers import PublisherRegistry
from controlplane.tuf_repository import NewTarget, TufRepository, TufRepositoryError, utc_now
from provisioning.publishers import PublisherList, PublisherTrustError
from provisioning.tls import client_context
from tests.fleet import Fleet, new_publisher_key


class Clock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self):
        return self.now


@pytest.fixture
def repo(tmp_path) -> TufRepository:
    return TufRepository.create(tmp_path / "tuf", tmp_path / "offline")


@pytest.fixture(scope="module")
def fleet(sample_repo, tmp_path_factory):
    with Fleet.create(tmp_path_factory.mktemp("tuf-fleet"), sample_repo) as fleet:
        fleet.publish(1)
        yield fleet


def test_init_puts_threshold_root_keys_offline(repo, tmp_path):
    root = repo.root()
    role = root.signed.roles[Root.type]
    assert (len(role.keyids), role.threshold) == (3, 2)
    root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    offline = sorted((tmp_path / "offline").glob("root-*.pem"))
    assert len(offline) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in offline)
    assert not list(repo.directory.rglob("root-*.pem"))  # never inside the repository
    for online in ("targets", "snapshot", "timestamp"):
        assert repo.root().signed.roles[online].threshold == 1
        assert stat.S_IMODE((repo.keys_dir / f"{online}.pem").stat().st_mode) == 0o600
    assert repo.root().signed.consistent_snapshot
    with pytest.raises(TufRepositoryError, match="already holds a TUF repository"):
        TufRepository.create(repo.directory, tmp_path / "offline2")


def test_targets_are_content_addressed_and_immutable(repo, tmp_path):
    blob = tmp_path / "a.tar"
    blob.write_bytes(b"variant bytes")
    before = repo.timestamp().signed.version
    version = repo.add_targets([NewTarget("cnn/1/onnx.tar", blob, {"model": "cnn"})])
    info = repo.targets().signed.targets["cnn/1/onnx.tar"]
    assert (version, info.length, info.custom) == (2, 13, {"model": "cnn"})
    assert repo.timestamp().signed.version == before + 1
    url = f"cnn/1/{info.hashes['sha256']}.onnx.tar"
    assert repo.target_file(url).read_bytes() == b"variant bytes"
    assert repo.target_file("cnn/1/onnx.tar") is None
    repo.add_targets([NewTarget("cnn/1/onnx.tar", blob)])  # same bytes: fine
    blob.write_bytes(b"other bytes")
    with pytest.raises(TufRepositoryError, match="already published with other content"):
        repo.add_targets([NewTarget("cnn/1/onnx.tar", blob)])


def test_metadata_is_re_signed_before_it_expires(tmp_path):
    clock = Clock()
    repo = TufRepository.create(tmp_path / "tuf", tmp_path / "offline", clock=clock)
    assert repo.refresh() == []
    expiry = repo.timestamp().signed.expires
    clock.now += timedelta(hours=1, minutes=1)  # past half of the two-hour lifetime
    assert repo.refresh_due()
    assert repo.refresh() == ["timestamp"]
    assert repo.timestamp().signed.expires > expiry
    clock.now += timedelta(days=4)
    assert repo.refresh() == ["snapshot", "timestamp"]
    clock.now += timedelta(days=16)
    assert repo.refresh() == ["targets", "snapshot", "timestamp"]
    assert repo.targets().signed.version == 2
    assert not repo.refresh_due()


def test_publisher_list_needs_the_root_threshold(repo, tmp_path):
    registry = PublisherRegistry(repo)
    key = new_publisher_key(tmp_path / "vision.key").public_key()
    signers = repo.root_signers(tmp_path / "offline")
    publisher = registry.register("vision", key, ["cnn", "detector-*"], signers)
    listing = registry.current()
    assert listing.by_key(publisher.key_id).may_sign("detector-v2")
    assert not listing.by_key(publisher.key_id).may_sign("speech")
    root = repo.root().signed

    one_key = listing.sign(signers[:1])
    with pytest.raises(PublisherTrustError, match="signed by 1/2 keys"):
        PublisherList.verify(one_key, root)
    online = repo._online_signer("targets")  # a stolen online key cannot add a publisher
    with pytest.raises(PublisherTrustError, match="not signed by the TUF root keys"):
        PublisherList.verify(listing.sign([online]), root)
    document = json.loads(registry.path.read_bytes())
    document["signed"]["publishers"][0]["models"].append("*")
    with pytest.raises(PublisherTrustError, match="not signed by the TUF root keys"):
        PublisherList.verify(json.dumps(document).encode(), root)
    for hostile in (b"[" * 50_000 + b"]" * 50_000, b'{"signed": ' * 5000, b"\xff", b"null"):
        with pytest.raises(PublisherTrustError, match="malformed publisher list"):
            PublisherList.verify(hostile, root)
    for where in (document["signed"], document["signed"]["publishers"][0]):
        where["note"] = 0.5  # canonical JSON has no floats
        with pytest.raises(PublisherTrustError, match="canonical JSON cannot encode"):
            PublisherList.verify(json.dumps(document).encode(), root)
        del where["note"]

    (tmp_path / "one-key").mkdir()
    copied = tmp_path / "one-key" / "root-1.pem"
    copied.write_bytes((tmp_path / "offline" / "root-1.pem").read_bytes())
    copied.chmod(0o600)
    with pytest.raises(TufRepositoryError, match="holds 1 of this repository's root keys"):
        repo.root_signers(tmp_path / "one-key")


def test_push_checks_the_publisher(fleet, tmp_path):
    stranger = tmp_path / "stranger.key"
    new_publisher_key(stranger)
    with pytest.raises(PushRefused, match="belongs to no registered publisher"):
        ModelStore(fleet.repository).push(fleet.package(7, key=stranger))
    audio = tmp_path / "audio.key"
    fleet.register_publisher("audio", ["speech-*"], audio)
    with pytest.raises(PushRefused, match="registered for speech-\\*, not for model 'mlp'"):
        ModelStore(fleet.repository).push(fleet.package(7, key=audio))
    published = ModelStore(fleet.repository).push(fleet.package(7))
    assert [p.target for p in published] == ["mlp/7/onnx-fp32.tar", "mlp/7/openvino-fp32.tar"]
    assert (
        published[0].custom["publisher"]
        == fleet.repository.targets().signed.targets["mlp/7/onnx-fp32.tar"].custom["publisher"]
    )


def _device_pool(fleet) -> urllib3.PoolManager:
    tls = fleet.tls_dir
    context = client_context(
        ca_file=tls / "ca.pem", cert_file=tls / "device.pem", key_file=tls / "device.key"
    )
    return urllib3.PoolManager(ssl_context=context, retries=False)


def test_artifact_endpoint_serves_metadata_and_ranges_over_mtls(fleet):
    pool = _device_pool(fleet)
    base = fleet.server.url + "/v1/tuf"
    timestamp = pool.request("GET", f"{base}/metadata/timestamp.json")
    assert timestamp.status == 200
    assert timestamp.headers["Cache-Control"] == "no-store"
    assert pool.request("GET", f"{base}/metadata/1.root.json").status == 200
    assert pool.request("GET", f"{base}/metadata/../keys/targets.pem").status == 404
    assert pool.request("GET", f"{base}/metadata/targets.pem").status == 404

    info = fleet.repository.targets().signed.targets["mlp/1/onnx-fp32.tar"]
    url = f"{base}/targets/mlp/1/{info.hashes['sha256']}.onnx-fp32.tar"
    whole = pool.request("GET", url).data
    assert len(whole) == info.length
    part = pool.request("GET", url, headers={"Range": "bytes=1000-"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 1000-{info.length - 1}/{info.length}"
    assert part.data == whole[1000:]
    assert pool.request("GET", f"{base}/targets/mlp/1/{'0' * 64}.onnx-fp32.tar").status == 404


def test_metadata_names_no_file_can_have_are_not_found(fleet):
    pool = _device_pool(fleet)
    base = fleet.server.url + "/v1/tuf/metadata"
    for name in ("9" * 300 + ".root.json", "1.root.json\n"):  # ENAMETOOLONG; `$` before \n
        assert fleet.repository.metadata_file(name) is None
    assert pool.request("GET", f"{base}/{'9' * 300}.root.json").status == 404


def test_artifact_endpoint_requires_a_device_certificate(fleet):
    context = client_context(ca_file=fleet.tls_dir / "ca.pem")  # trusts the server, no cert
    with pytest.raises((ssl.SSLError, urllib3.exceptions.HTTPError, OSError)):
        urllib.request.urlopen(
            f"{fleet.server.url}/v1/tuf/metadata/timestamp.json", context=context, timeout=10
        ).read()


def test_timestamp_is_re_signed_when_fetched_late(fleet):
    repository = fleet.repository
    version = repository.timestamp().signed.version
    real_clock = repository.clock
    repository.clock = lambda: real_clock() + timedelta(hours=3)  # the refresher slept
    try:
        data = (
            _device_pool(fleet)
            .request("GET", f"{fleet.server.url}/v1/tuf/metadata/timestamp.json")
            .data
        )
    finally:
        repository.clock = real_clock
    assert Metadata.from_bytes(data).signed.version == version + 1


def test_ngclient_over_mtls_finds_variants_and_publishers(fleet, tmp_path):
    tls = fleet.tls_dir
    pin_root(tmp_path / "tuf", fleet.repository.metadata_dir.joinpath("1.root.json").read_bytes())
    transport = Transport(
        client_context(
            ca_file=tls / "ca.pem", cert_file=tls / "device.pem", key_file=tls / "device.key"
        ),
        UpdateLimits(),
    )
    trust = TrustedRepository(
        tmp_path / "tuf", fleet.server.url, transport, Journal(tmp_path / "a.db")
    )
    trust.refresh()
    variants = trust.variants("mlp", 1)
    assert sorted(variants) == ["onnx-fp32", "openvino-fp32"]
    assert variants["onnx-fp32"].custom["runtime"] == "onnxruntime"
    assert trust.publishers().by_name("vision").may_sign("mlp")
