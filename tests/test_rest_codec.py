"""Every KServe datatype through the REST codec, JSON and binary, both directions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.serving import rest_codec
from agent.serving.errors import InvalidInput
from agent.serving.tensors import InferenceResponse, Tensor

SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 1, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 2, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 3, 2**63 - 1]], np.int64),
    "UINT8": np.array([[0, 1, 255]], np.uint8),
    "UINT16": np.array([[0, 2, 65535]], np.uint16),
    "UINT32": np.array([[0, 3, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 4, 2**64 - 1]], np.uint64),
    "FP16": np.array([[0.5, -1.25, 65504.0]], np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38]], np.float32),
    "FP64": np.array([[0.1, -2.5, 1e308]], np.float64),
    "BYTES": np.array([[b"a", "naïve".encode(), b""]], dtype=object),
}


def _json_request(datatype: str, array: np.ndarray) -> bytes:
    data = [b.decode() for b in array.ravel()] if datatype == "BYTES" else array.tolist()
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": list(array.shape), "data": data}]}
    ).encode()


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_json_request_round_trip(datatype):
    array = SAMPLES[datatype]
    req = rest_codec.decode_request(_json_request(datatype, array), None, "m", None)
    (t,) = req.inputs
    assert t.datatype == datatype and t.shape == array.shape
    assert t.data.tolist() == array.tolist()
    if datatype != "BYTES":
        assert t.data.dtype == array.dtype


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_binary_request_round_trip(datatype):
    array = SAMPLES[datatype]
    raw = rest_codec.encode_raw(datatype, array)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    req = rest_codec.decode_request(header + raw, str(len(header)), "m", None)
    assert req.inputs[0].data.tolist() == array.tolist()


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_response_round_trip(datatype, binary):
    array = SAMPLES[datatype]
    out = Tensor("y", datatype, array.shape, array, {"binary_data": binary})
    body, n = rest_codec.encode_response(InferenceResponse("m", "1", [out], id="7"), {})
    header = json.loads(body[:n] if n else body)
    assert header["id"] == "7" and header["model_version"] == "1"
    (o,) = header["outputs"]
    if binary:
        assert n is not None and "data" not in o
        got = rest_codec.decode_raw("y", datatype, tuple(o["shape"]), body[n:])
        assert got.tolist() == array.tolist()
    else:
        assert n is None
        want = [b.decode() for b in array.ravel()] if datatype == "BYTES" else array.ravel()
        assert o["data"] == list(want) if datatype == "BYTES" else np.allclose(o["data"], want)


def test_non_utf8_bytes_output_goes_binary():
    array = np.array([b"\xff\xfe"], dtype=object)
    out = Tensor("y", "BYTES", (1,), array)
    body, n = rest_codec.encode_response(InferenceResponse("m", "1", [out]), {})
    assert n is not None
    assert rest_codec.decode_raw("y", "BYTES", (1,), body[n:]).tolist() == [b"\xff\xfe"]


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("INT8", [300], "out of range"),
        ("UINT8", [-1], "out of range"),
        ("INT32", [1.5], "not valid INT32"),
        ("BOOL", [1], "not valid BOOL"),
        ("BYTES", [1], "strings"),
        ("FP32", [[1, [2]]], "ragged"),
    ],
)
def test_json_values_that_do_not_fit_are_refused(datatype, data, needle):
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": data}]}
    ).encode()
    with pytest.raises(InvalidInput, match=needle):
        rest_codec.decode_request(body, None, "m", None)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\x05\x00\x00\x00ab", "runs past"),
        (b"\x01\x00", "ends before element"),
        (b"\x01\x00\x00\x00a\x00", "after the last element"),
    ],
)
def test_malformed_binary_bytes_elements(raw, needle):
    with pytest.raises(InvalidInput, match=needle):
        rest_codec.decode_raw("x", "BYTES", (1,), raw)
