"""grpc_codec.parse_request: ModelInferRequest parsed with its tensors left where they arrived.

It must agree with protobuf on every message (same fields, same raw contents, in order) while
copying no tensor of a message from SCAN_BYTES on, and turn what protobuf rejects into
protobuf's own DecodeError. Smaller messages go to protobuf whole; both paths are tested.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from agent.serving import grpc_codec
from agent.serving.errors import InvalidInput
from agent.serving.grpc_codec import decode_request, parse_request
from protocol import inference_pb2 as pb


@pytest.fixture(params=["scan", "whole"])
def path(request, monkeypatch):
    """Run the test through the top-level scan, and through protobuf's parse of the whole."""
    monkeypatch.setattr(grpc_codec, "SCAN_BYTES", 0 if request.param == "scan" else 1 << 30)
    return request.param


def random_request(rng: random.Random) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=f"m{rng.randrange(100)}", id="x" * rng.randrange(300))
    if rng.random() < 0.5:
        msg.model_version = str(rng.randrange(1, 9))
    msg.parameters["priority"].int64_param = rng.randrange(1 << 40)
    msg.parameters["flag"].bool_param = rng.random() < 0.5
    for i in range(rng.randrange(1, 4)):
        t = msg.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, rng.randrange(1, 300)])
        t.parameters["note"].string_param = "ü" * rng.randrange(5)
        msg.raw_input_contents.append(rng.randbytes(4 * t.shape[1]))
    for i in range(rng.randrange(3)):
        msg.outputs.add(name=f"out{i}").parameters["binary_data"].bool_param = True
    return msg


def interleaved(msg: pb.ModelInferRequest) -> bytes:
    """The same message with its raw contents written before, between and after other fields
    (protobuf allows any field order; protobuf's own writer puts them last)."""
    parts = []
    for field, value in msg.ListFields():
        if field.name == "raw_input_contents":
            continue
        single = pb.ModelInferRequest()
        if field.message_type is not None:  # repeated messages and maps
            getattr(single, field.name).MergeFrom(value)
        else:
            setattr(single, field.name, value)
        parts.append(single.SerializeToString())
    raws = [pb.ModelInferRequest(raw_input_contents=[r]).SerializeToString()
            for r in msg.raw_input_contents]  # fmt: skip
    out = raws[:1] + parts[:1] + raws[1:2] + parts[1:] + raws[2:]
    return b"".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_protobuf(seed, path):
    rng = random.Random(seed)
    original = random_request(rng)
    for data in (original.SerializeToString(), interleaved(original)):
        body = bytearray(b"\0" * 5 + data)  # as the gRPC layer holds it: after the prefix
        msg, raw = parse_request(memoryview(body)[5:])
        assert [bytes(r) for r in raw] == list(original.raw_input_contents)
        if path == "scan":
            assert not msg.raw_input_contents
        msg.ClearField("raw_input_contents")
        msg.raw_input_contents.extend(bytes(r) for r in raw)
        assert msg == original


def test_tensors_of_large_messages_are_not_copied():
    values = np.arange(grpc_codec.SCAN_BYTES // 4, dtype=np.float32)  # just over SCAN_BYTES
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[1, len(values)])
    msg.raw_input_contents.append(values.tobytes())
    body = bytearray(msg.SerializeToString())
    assert len(body) >= grpc_codec.SCAN_BYTES
    parsed, raw = parse_request(body)
    tensor = decode_request(parsed, raw).inputs[0].data
    np.testing.assert_array_equal(tensor, values.reshape(1, -1))
    assert np.shares_memory(tensor, np.frombuffer(body, dtype=np.uint8))


def test_unknown_fields_survive(path):
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"abcd"])
    unknown = bytes([0x98, 0x06, 0x2A])  # field 99, varint 42
    parsed, raw = parse_request(unknown + msg.SerializeToString())
    assert parsed.model_name == "m" and [bytes(r) for r in raw] == [b"abcd"]
    assert unknown in parsed.SerializeToString()


HOSTILE = {
    "truncated-raw": b"\x3a\x10abc",  # raw_input_contents announcing 16 bytes, 3 there
    "no-length": b"\x0a",  # model_name without its length
    "endless-varint": b"\x08" + b"\xff" * 11,
    "group": b"\x0b\x0c",  # wire type 3/4: protobuf keeps it as an unknown field
    "bad-wire-type": b"\x0f",
    "short-fixed32": b"\x0d\x01\x02",
    "not-utf8": b"\x0a\x02\xff\xfe",  # model_name that is not UTF-8
    "raw-as-varint": b"\x38\x05",  # field 7 with the wrong wire type
    "nested-groups": b"\x0b\x13\x08\x01\x14\x0c\x3a\x01x",  # groups, then a tensor
    "raw-as-group": b"\x3b\x3c",  # field 7 as a group
    "end-group-alone": b"\x0c",
    "mismatched-end-group": b"\x0b\x14",
    "unterminated-group": b"\x0b\x08\x01",
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bytes_get_protobufs_verdict(data, path):
    try:
        expected = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_request(data)
        return
    msg, raw = parse_request(data)
    msg.ClearField("raw_input_contents")
    msg.raw_input_contents.extend(bytes(r) for r in raw)
    assert msg == expected


_PIECES = [
    b"\x0b", b"\x0c", b"\x13", b"\x14", b"\x3b", b"\x3c", b"\xa3\x06", b"\xa4\x06",  # groups
    b"\x0a\x02ab", b"\x3a\x03xyz", b"\x2a\x00", b"\x08\x96\x01", b"\x0d\x01\x02\x03\x04",
    b"\x09" + bytes(8), b"\x0f", b"\x0e", b"\xff", b"\x80", b"\x00",
]  # fmt: skip


def test_the_scan_refuses_only_what_protobuf_refuses():
    # the scan's verdict on a broken wire is final (protobuf never sees a message it has not
    # bounded), so it must be protobuf's on any mix of fields, groups and broken bits
    rng = random.Random(7)
    for _ in range(3000):
        data = b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(1, 8)))
        try:
            expected = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            expected = None
        try:
            msg, raw = grpc_codec._split_field(memoryview(data), 7)
        except ValueError:
            assert expected is None, data
            continue
        if expected is not None:
            parsed = pb.ModelInferRequest.FromString(msg)
            parsed.raw_input_contents.extend(bytes(r) for r in raw)
            assert parsed == expected, data


# --- decode_message: what a request's non-tensor bytes decode to is remembered ---------------


@pytest.fixture
def layouts(monkeypatch):
    """An empty store of remembered layouts, for this test only."""
    store: dict = {}
    monkeypatch.setattr(grpc_codec, "_LAYOUTS", store)
    return store


def mlp_request(rng: random.Random, rows: int = 1, **fields) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp", **fields)
    msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    msg.raw_input_contents.append(rng.randbytes(rows * 64 * 4))
    return msg


def slow_decode(data: bytes):
    """The request as decoded without anything remembered."""
    return decode_request(*parse_request(data))


def same_request(a, b) -> None:
    assert (a.model_name, a.model_version, a.id) == (b.model_name, b.model_version, b.id)
    assert (a.outputs, a.parameters) == (b.outputs, b.parameters)
    assert len(a.inputs) == len(b.inputs)
    for x, y in zip(a.inputs, b.inputs, strict=True):
        assert (x.name, x.datatype, x.shape, x.parameters) == (
            y.name,
            y.datatype,
            y.shape,
            y.parameters,
        )
        assert x.data.dtype == y.data.dtype
        np.testing.assert_array_equal(x.data, y.data)


@pytest.mark.parametrize("seed", range(20))
def test_repeated_layouts_decode_each_requests_own_tensors(seed, layouts):
    rng = random.Random(seed)
    original = random_request(rng)
    original.ClearField("id")
    # deterministic: protobuf may write a map's entries in another order each time, which is
    # another layout to remember (correctly decoded all the same)
    first = original.SerializeToString(deterministic=True)
    same_request(grpc_codec.decode_message(first), slow_decode(first))
    assert len(layouts) == 1
    for _ in range(3):  # the same layout, other tensor bytes: each decodes to its own data
        again = pb.ModelInferRequest()
        again.CopyFrom(original)
        for i, raw in enumerate(again.raw_input_contents):
            again.raw_input_contents[i] = rng.randbytes(len(raw))
        data = again.SerializeToString(deterministic=True)
        decoded = grpc_codec.decode_message(data)
        same_request(decoded, slow_decode(data))
        assert np.shares_memory(decoded.inputs[0].data, np.frombuffer(data, np.uint8))
    assert len(layouts) == 1


def test_a_remembered_layout_still_checks_the_tensor_sizes(layouts):
    rng = random.Random(1)
    good = mlp_request(rng)
    grpc_codec.decode_message(good.SerializeToString())
    assert len(layouts) == 1
    for size in (0, 255, 257, 4096):  # short, one byte off either way, long
        bad = mlp_request(rng)
        bad.raw_input_contents[0] = b"\0" * size
        with pytest.raises(InvalidInput, match=f"input 'input': {size} bytes of data"):
            grpc_codec.decode_message(bad.SerializeToString())
    # one raw entry too many or none: the same message as without a layout remembered
    for raw in ([rng.randbytes(256)] * 2, []):
        bad = mlp_request(rng)
        bad.ClearField("raw_input_contents")
        bad.raw_input_contents.extend(raw)
        data = bad.SerializeToString()
        with pytest.raises(InvalidInput) as remembered:
            grpc_codec.decode_message(data)
        with pytest.raises(InvalidInput) as fresh:
            slow_decode(data)
        assert str(remembered.value) == str(fresh.value)
    assert len(layouts) == 1


def test_what_is_not_remembered(layouts):
    rng = random.Random(2)
    with_id = mlp_request(rng, id="req-1")  # ids are per request
    typed = pb.ModelInferRequest(model_name="mlp")  # typed contents: the data is in the layout
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend(
        [1.0, 2.0]
    )
    oversized = mlp_request(rng)  # non-tensor bytes past MAX_LAYOUT_BYTES
    oversized.parameters["note"].string_param = "x" * grpc_codec.MAX_LAYOUT_BYTES
    for msg in (with_id, typed, oversized):
        data = msg.SerializeToString()
        same_request(grpc_codec.decode_message(data), slow_decode(data))
    refused = mlp_request(rng, model_version="1")
    refused.inputs[0].datatype = "FP33"
    with pytest.raises(InvalidInput, match="unknown datatype 'FP33'"):
        grpc_codec.decode_message(refused.SerializeToString())
    assert layouts == {}


def test_remembering_is_bounded(layouts, monkeypatch):
    monkeypatch.setattr(grpc_codec, "MAX_LAYOUTS", 8)
    rng = random.Random(3)
    for rows in range(1, 20):  # each shape is another layout
        grpc_codec.decode_message(mlp_request(rng, rows=rows).SerializeToString())
        assert 1 <= len(layouts) <= 8


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bytes_decode_to_protobufs_verdict(data, layouts):
    try:
        expected = slow_decode(data)
    except (DecodeError, InvalidInput) as exc:
        with pytest.raises(type(exc)):
            grpc_codec.decode_message(data)
    else:
        same_request(grpc_codec.decode_message(data), expected)
    assert layouts == {}
