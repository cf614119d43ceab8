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
