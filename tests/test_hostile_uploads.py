"""Uploads shaped to make the gRPC front end hold far more memory, or spend far more time, than
the bytes a client sends: memory stays proportional to what arrived, and a decoded request keeps
nothing of its message but its tensors.

The HTTP/2 cases play a client at the frame level against a Connection, as test_http2.py does;
the gRPC codec cases decode hand-built messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.serving import grpc_codec, http2
from agent.serving.errors import InvalidInput
from protocol import inference_pb2 as pb
from tests import test_http2
from tests.test_http2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    REQUEST,
    Client,
    frame,
    settle,
)

client = test_http2.client  # the same frame-level client, as a fixture here too


def start(c: Client, first: bytes) -> http2.Request:
    stream = c.stream
    c.stream += 2
    c.send(
        frame(HEADERS, END_HEADERS, stream, c.encoder.encode(REQUEST))
        + frame(DATA, 0, stream, first)
    )
    return c.connection.requests[stream]


async def test_a_few_bytes_announcing_a_small_body_get_no_buffer_of_its_size(client):
    # 8 bytes announce 60,000: a zero-filled buffer of that size would be 7,500 times them
    body = (60_000).to_bytes(4, "big") + bytes(i % 251 for i in range(59_996))
    request = start(client, body[:8])
    assert request.buffer is None and len(request.pending) == 8
    stream = request.stream_id
    sent = 8
    while sent < 7_000:  # under an eighth of the body: still only what came
        client.send(frame(DATA, 0, stream, body[sent : sent + 1000]))
        sent += 1000
        assert request.buffer is None and len(request.pending) == sent
    client.send(frame(DATA, 0, stream, body[sent : sent + 1000]))  # an eighth is in
    assert request.buffer is not None and len(request.buffer) == 60_000 and request.pending is None
    client.send(frame(DATA, END_STREAM, stream, body[sent + 1000 :]))
    await settle()
    assert client.responses()[stream]["body"] == body


async def test_small_bodies_announced_in_whole_get_their_buffer_at_once(client):
    body = (300).to_bytes(4, "big") + bytes(296)
    request = start(client, body[:100])
    assert request.buffer is not None and len(request.buffer) == 300


async def test_bytes_past_the_announced_size_collect_in_one_array(client):
    # announced 8, then 2,000 frames of 2 bytes: one growing array, not an object per frame
    request = start(client, (8).to_bytes(4, "big") + bytes(4))
    stream = request.stream_id
    for _ in range(2000):
        client.send(frame(DATA, 0, stream, b"ab"))
    assert request.buffer is None
    assert isinstance(request.pending, bytearray) and len(request.pending) == 8 + 4000
    client.send(frame(DATA, END_STREAM, stream, b""))
    await settle()
    assert client.responses()[stream]["body"] == (8).to_bytes(4, "big") + bytes(4) + b"ab" * 2000


def _mlp_request(**fields) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="mlp", **fields)
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    msg.raw_input_contents.append(np.arange(64, dtype=np.float32).tobytes())
    return msg


def test_a_request_of_millions_of_tiny_fields_is_refused_before_protobuf_sees_it():
    # 16 KiB of (field 15, varint 0) pairs: 8,192 fields, each would be a scan step and a view
    message = _mlp_request().SerializeToString() + b"\x78\x00" * 8192
    with pytest.raises(InvalidInput, match=f"more than {grpc_codec.MAX_FIELDS} fields"):
        grpc_codec.decode_message(message)
    # the same as `inputs {}` entries, which protobuf would make an object each of
    message = _mlp_request().SerializeToString() + b"\x2a\x00" * 8192
    with pytest.raises(InvalidInput, match="fields"):
        grpc_codec.decode_message(message)


def test_a_padded_message_leaves_its_tensors_and_not_its_padding_to_the_queue():
    # an unknown field of 1 MiB (a gzip'd message inflates to this from 1 KiB)
    padding = b"\x7a" + b"\x80\x80\x40" + bytes(1 << 20)  # field 15, length 2^20
    message = bytearray(_mlp_request().SerializeToString() + padding)
    decoded = grpc_codec.decode_message(message)
    data = decoded.inputs[0].data
    assert np.array_equal(data.ravel(), np.arange(64, dtype=np.float32))
    assert not np.shares_memory(data, np.frombuffer(message, np.uint8))


def test_an_ordinary_message_keeps_its_tensors_in_place():
    message = bytearray(_mlp_request().SerializeToString())
    decoded = grpc_codec.decode_message(message)
    assert np.shares_memory(decoded.inputs[0].data, np.frombuffer(message, np.uint8))


def test_the_scan_keeps_other_fields_whole_around_the_tensors():
    msg = _mlp_request(id="req-7")
    msg.parameters["priority"].int64_param = 3
    for i in range(100):
        msg.parameters[f"p{i}"].string_param = "x"
    interleaved = (
        pb.ModelInferRequest(raw_input_contents=[bytes(8)]).SerializeToString()
        + msg.SerializeToString()
    )
    rest, raw = grpc_codec._split_field(memoryview(interleaved), 7)
    assert [bytes(r) for r in raw] == [bytes(8), bytes(msg.raw_input_contents[0])]
    expected = pb.ModelInferRequest()
    expected.CopyFrom(msg)
    del expected.raw_input_contents[:]
    assert pb.ModelInferRequest.FromString(rest) == expected


def test_a_group_does_not_open_the_way_past_the_field_cap():
    # a group (wire type 3) first once made the scan give up and hand protobuf the whole message
    group = b"\xa3\x06\xa4\x06"  # field 100: start, end
    message = group + _mlp_request().SerializeToString() + b"\x2a\x00" * 8192
    for tail in (b"", b"\x0f"):  # and a wire broken at its end, past the cap
        with pytest.raises(InvalidInput, match=f"more than {grpc_codec.MAX_FIELDS} fields"):
            grpc_codec.decode_message(message + tail)
        with pytest.raises(InvalidInput, match=f"more than {grpc_codec.MAX_FIELDS} fields"):
            grpc_codec.parse_request(message + tail)
    nested = b"\xa3\x06" + b"\x78\x00" * 8192 + b"\xa4\x06"  # the fields inside count too
    with pytest.raises(InvalidInput, match="fields"):
        grpc_codec.decode_message(_mlp_request().SerializeToString() + nested)


def test_the_model_of_a_refused_request_is_read_without_protobuf(monkeypatch):
    # ModelInfer counts a refusal against the model named: reading the name must not parse
    # the millions of fields the request was refused for
    def whole_parse(data):
        raise AssertionError("protobuf parsed the whole refused message")

    monkeypatch.setattr(pb.ModelInferRequest, "FromString", whole_parse)
    named = pb.ModelInferRequest(model_name="mlp", model_version="2").SerializeToString()
    assert grpc_codec.model_of(named + b"\x2a\x00" * 100_000) == ("mlp", "2")
    late = b"\x2a\x00" * grpc_codec.MAX_FIELDS + named  # past the fields it reads: not seen
    assert grpc_codec.model_of(late) == ("", None)
    assert grpc_codec.model_of(b"\x0a\x05ml") == ("", None)  # broken: no name
