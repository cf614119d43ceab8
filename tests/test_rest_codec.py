"""Every KServe datatype through the REST codec, JSON and binary, both directions."""

from __future__ import annotations

import json
import tracemalloc
import warnings

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


JSON_INPUT = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}


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
        (["FP32"], [1.0], "unknown datatype"),  # found by test_mutated_requests.py (was a 500)
        ({"FP32": 1}, [1.0], "unknown datatype"),
    ],
)
def test_json_values_that_do_not_fit_are_refused(datatype, data, needle):
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": data}]}
    ).encode()
    with pytest.raises(InvalidInput, match=needle):
        rest_codec.decode_request(body, None, "m", None)


@pytest.mark.parametrize(
    ("datatype", "value", "expected"),
    [
        ("FP32", 3.4e38, 3.4e38),
        ("FP32", -(2**63), -(2**63)),
        ("FP16", -65504, -65504),
        ("FP64", 1e308, 1e308),
        ("FP32", 1e39, np.inf),  # beyond the type's range: +-inf, as an IEEE cast rounds
        ("FP32", -3.5e38, -np.inf),
        ("FP16", 70000, np.inf),
    ],
)
def test_json_floats_round_as_ieee_casts_do(datatype, value, expected):
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [value]}]}
    ).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warning, whichever filters are on
        (tensor,) = rest_codec.decode_request(body, None, "m", None).inputs
    assert tensor.data.dtype == np.dtype(datatype.lower().replace("fp", "float"))
    assert tensor.data[0] == np.array(expected, tensor.data.dtype)


@pytest.mark.parametrize(
    ("raw", "count", "needle"),
    [
        (b"\x05\x00\x00\x00ab", 1, "runs past"),
        (b"\x01\x00", 1, "2 bytes of BYTES data cannot hold 1 elements"),
        (b"\x01\x00\x00\x00a\x00\x00\x00", 2, "ends before element 1"),
        (b"\x01\x00\x00\x00a\x00", 1, "after the last element"),
    ],
)
def test_malformed_binary_bytes_elements(raw, count, needle):
    with pytest.raises(InvalidInput, match=needle):
        rest_codec.decode_raw("x", "BYTES", (count,), raw)


def test_a_bytes_shape_its_data_cannot_hold_is_refused_before_any_array_is_made():
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [10**7],
                                     "parameters": {"binary_data_size": 0}}]}).encode()  # fmt: skip
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="0 bytes of BYTES data cannot hold 10000000"):
            rest_codec.decode_request(header, str(len(header)), "m", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # not the 80 MB of an object array of 10**7


@pytest.mark.parametrize("value", ["false", "no", [1], 1, None])
def test_binary_output_flags_must_be_booleans(value):
    output = {"name": "y", "parameters": {"binary_data": value}}
    request = {"inputs": [JSON_INPUT], "outputs": [output]}
    if value is None:  # absent, as JSON null is
        assert rest_codec.decode_request(json.dumps(request).encode(), None, "m", None)
        return
    with pytest.raises(InvalidInput, match=r"parameter 'binary_data' of output 'y' must be true"):
        rest_codec.decode_request(json.dumps(request).encode(), None, "m", None)
    request = {"inputs": [JSON_INPUT], "parameters": {"binary_data_output": value}}
    with pytest.raises(InvalidInput, match=r"parameter 'binary_data_output' of the request"):
        rest_codec.decode_request(json.dumps(request).encode(), None, "m", None)


def test_an_empty_outputs_list_is_every_output():
    request = {"inputs": [JSON_INPUT], "outputs": []}
    assert rest_codec.decode_request(json.dumps(request).encode(), None, "m", None).outputs is None


@pytest.mark.parametrize("length", ["1_0", " 10", "+10", "\u0661\u0660", "9" * 5000])
def test_the_header_length_is_ascii_digits(length):
    with pytest.raises(InvalidInput, match="must be an integer"):
        rest_codec.decode_request(b"{}" * 10, length, "m", None)


# --- the binary extension's remembered headers ------------------------------------------------


def _binary_header(**extra) -> bytes:
    inputs = [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}},
        {"name": "b", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
    ]
    doc = {"inputs": inputs, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    return json.dumps({**doc, **extra}).encode()


def _decode_binary(header: bytes, binary: bytes):
    return rest_codec.decode_request(header + binary, str(len(header)), "m", "2")


@pytest.fixture
def layouts(monkeypatch):
    monkeypatch.setattr(rest_codec, "_LAYOUTS", {})
    return rest_codec._LAYOUTS


def test_a_repeated_header_decodes_each_requests_own_data(layouts):
    header = _binary_header(parameters={"binary_data_output": True})
    for i in range(3):
        a = np.arange(4, dtype=np.float32).reshape(1, 4) + i
        b = np.array([i, -i], np.int64)
        req = _decode_binary(header, a.tobytes() + b.tobytes())
        assert len(layouts) == 1  # remembered after the first, used by the others
        assert (req.model_name, req.model_version, req.id) == ("m", "2", None)
        assert [(t.name, t.datatype, t.shape) for t in req.inputs] == [
            ("a", "FP32", (1, 4)),
            ("b", "INT64", (2,)),
        ]
        np.testing.assert_array_equal(req.inputs[0].data, a)
        np.testing.assert_array_equal(req.inputs[1].data, b)
        assert [(o.name, o.parameters) for o in req.outputs] == [("y", {"binary_data": True})]
        assert req.parameters == {"binary_data_output": True}


@pytest.mark.parametrize(
    "binary, needle",
    [
        (bytes(31), "runs past the end of the binary data"),
        (bytes(33), "1 bytes beyond what the inputs declare"),
        (b"", "runs past the end"),
    ],
    ids=["short", "long", "none"],
)
def test_a_remembered_header_still_checks_the_binary_data(layouts, binary, needle):
    header = _binary_header()
    _decode_binary(header, bytes(32))
    assert layouts
    with pytest.raises(InvalidInput, match=needle):
        _decode_binary(header, binary)


def test_what_is_not_remembered(layouts):
    _decode_binary(_binary_header(id="request-7"), bytes(32))  # ids are per request
    big = _binary_header(parameters={"pad": "x" * rest_codec.MAX_LAYOUT_BYTES})
    _decode_binary(big, bytes(32))
    mixed = json.dumps(
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.5]}]}
    ).encode()
    rest_codec.decode_request(mixed, str(len(mixed)), "m", None)  # JSON data, no binary
    with pytest.raises(InvalidInput):
        _decode_binary(b'{"inputs": []}', b"")  # refused: nothing to remember
    assert not layouts


def test_remembered_headers_are_bounded(layouts):
    for i in range(rest_codec.MAX_LAYOUTS * 3):
        _decode_binary(_binary_header(parameters={"n": i}), bytes(32))
        assert len(layouts) <= rest_codec.MAX_LAYOUTS
