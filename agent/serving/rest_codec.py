"""KServe v2 REST wire format <-> protocol-neutral tensors.

Covers JSON tensors and the binary tensor data extension: a request body may be a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensor bytes, in input order, for every
input whose `parameters.binary_data_size` is set. Outputs go back in binary when the output asks
for `binary_data` or the request sets `binary_data_output`.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings

import numpy as np
import orjson

from agent.serving.errors import InvalidInput
from agent.serving.model import check_shape
from agent.serving.tensors import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from runtimes.datatypes import DATATYPES, to_numpy, to_numpy_le

HEADER_LENGTH = "Inference-Header-Content-Length"

# Which JSON number kinds (numpy dtype.kind after parsing) each datatype accepts.
_ACCEPTED_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_INT_KINDS = "iu"
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_RAW_DTYPES = {name: to_numpy_le(name) for name in DATATYPES if name != "BYTES"}
_NUMPY_DTYPES = {name: to_numpy(name) for name in DATATYPES}
# A JSON number beyond FP16's or FP32's range becomes +-inf, as IEEE casts go (see _from_json);
# a client's value is not something for the agent's log to warn about.
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning, __name__)


def decode_request(
    body: bytes | memoryview,
    header_length: str | None,
    model_name: str,
    model_version: str | None,
) -> InferenceRequest:
    if header_length is None:
        return _decode(_load(body), b"", model_name, model_version)
    # ASCII digits, and few: int() also takes "1_0", " 10" and other scripts' digits, and
    # refuses more than 4300 digits with a ValueError
    if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 20:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    binary = memoryview(body)[n:]
    header = bytes(body[:n])
    layout = _LAYOUTS.get(header)
    if layout is not None:
        return layout.request(binary, model_name, model_version)
    request = _decode(_load(header), binary, model_name, model_version)
    if n <= MAX_LAYOUT_BYTES and request.id is None:
        layout = _Layout.of(request)
        if layout is not None:
            if len(_LAYOUTS) >= MAX_LAYOUTS:
                _LAYOUTS.clear()  # start over: the headers in use now come back at once
            _LAYOUTS[header] = layout
    return request


# The binary extension's JSON header describes the tensors, not their data, so a client sends
# the same header bytes again and again (tritonclient does, for same-shaped inputs). What a
# header decoded to is remembered: the next request with it only slices its binary data.
# Bounded in count and size; a header with a request id is not kept (ids are per request).
MAX_LAYOUTS = 256
MAX_LAYOUT_BYTES = 4096


class _Layout:
    """A decoded header whose every input is binary. Its dicts and lists are shared by the
    requests made from it, which only read them."""

    __slots__ = ("id", "inputs", "outputs", "parameters")

    def __init__(self, inputs: list[tuple], outputs, request_id, parameters: dict):
        self.inputs = inputs  # (name, datatype, shape, parameters, binary_data_size) each
        self.outputs = outputs
        self.id = request_id
        self.parameters = parameters

    @classmethod
    def of(cls, request: InferenceRequest) -> _Layout | None:
        inputs = []
        for t in request.inputs:
            size = t.parameters.get("binary_data_size")
            if size is None:
                return None  # JSON data: nothing to reuse
            inputs.append((t.name, t.datatype, t.shape, t.parameters, size))
        return cls(inputs, request.outputs, request.id, request.parameters)

    def request(
        self, binary: memoryview, model_name: str, model_version: str | None
    ) -> InferenceRequest:
        inputs, offset = [], 0
        for name, datatype, shape, params, size in self.inputs:
            chunk = _binary_chunk(name, binary, offset, size)
            array = decode_raw(name, datatype, shape, chunk)
            inputs.append(Tensor(name, datatype, shape, array, params))
            offset += size
        _check_binary_end(binary, offset)
        return InferenceRequest(
            model_name, model_version, inputs, self.id, self.outputs, self.parameters
        )


_LAYOUTS: dict[bytes, _Layout] = {}


def _load(body: bytes | memoryview) -> dict:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        doc = _load_non_finite(body, exc)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def _load_non_finite(body: bytes | memoryview, error: orjson.JSONDecodeError) -> dict:
    """What orjson refused, read again as Triton reads JSON: with the NaN, Infinity and
    -Infinity tokens that tritonclient (Python's json) writes for non-finite floats."""
    try:
        doc = json.loads(bytes(body))
        orjson.dumps(doc)  # what orjson refused for other reasons (lone surrogates) stays refused
    except (ValueError, RecursionError, orjson.JSONEncodeError):
        raise InvalidInput(f"request body is not valid JSON: {error}") from None
    return doc


def _decode(
    doc: dict, binary: memoryview | bytes, model_name: str, model_version: str | None
) -> InferenceRequest:
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = doc.get("parameters")
    parameters = {} if parameters is None else _parameters(doc, "request")
    if parameters:
        _check_bool(parameters, "binary_data_output", "the request")
    offset = 0
    inputs = []
    for raw in raw_inputs:
        tensor, offset = _decode_input(raw, binary, offset)
        inputs.append(tensor)
    _check_binary_end(binary, offset)
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise InvalidInput("'outputs' must be a list")
    if raw_outputs:  # an empty list asks for every output, as Triton reads it
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidInput("each requested output must be an object with a 'name'")
            params = _parameters(raw, raw["name"])
            if params:
                _check_bool(params, "binary_data", f"output {raw['name']!r}")
            outputs.append(RequestedOutput(raw["name"], params))
    return InferenceRequest(model_name, model_version, inputs, request_id, outputs, parameters)


def _binary_chunk(name: str, binary: memoryview | bytes, offset: int, size: int):
    if offset + size > len(binary):
        raise InvalidInput(
            f"input {name!r}: binary_data_size {size} runs past the end of the binary data "
            f"({len(binary) - offset} bytes left)"
        )
    return binary[offset : offset + size]


def _check_binary_end(binary: memoryview | bytes, offset: int) -> None:
    if offset != len(binary):
        raise InvalidInput(
            f"binary data has {len(binary) - offset} bytes beyond what the inputs declare"
        )


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"'parameters' of {where} must be an object")
    return params


def _check_bool(params: dict, name: str, where: str) -> None:
    """A parameter read as a flag must be one: "false" or [1] would be true (Triton refuses
    them too)."""
    value = params.get(name)
    if value is not None and type(value) is not bool:
        raise InvalidInput(f"parameter {name!r} of {where} must be true or false, got {value!r}")


def _decode_input(raw, binary: memoryview | bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise InvalidInput("each input must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("each input needs a 'name' string")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join(sorted(DATATYPES))}"
        )
    shape = check_shape(name, raw.get("shape"))
    count = math.prod(shape)
    params = raw.get("parameters")
    params = {} if params is None else _parameters(raw, name)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
        chunk = _binary_chunk(name, binary, offset, size)
        array = decode_raw(name, datatype, shape, chunk)
        return Tensor(name, datatype, shape, array, params), offset + size
    if "data" not in raw:
        raise InvalidInput(f"input {name!r} has no 'data' and no binary_data_size")
    array = _from_json(name, datatype, raw["data"], count).reshape(shape)
    return Tensor(name, datatype, shape, array, params), offset


def decode_raw(name: str, datatype: str, shape: tuple[int, ...], chunk) -> np.ndarray:
    """Raw little-endian tensor bytes (BYTES: 4-byte length prefix per element) -> array."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes_elements(name, bytes(chunk), count).reshape(shape)
    dtype = _RAW_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(chunk)} bytes of data for shape {list(shape)} {datatype}; "
            f"expected {expected}"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _decode_bytes_elements(name: str, data: bytes, count: int) -> np.ndarray:
    # each element has at least its length prefix: a shape the data cannot hold is refused
    # before an array is made for it
    if 4 * count > len(data):
        raise InvalidInput(
            f"input {name!r}: {len(data)} bytes of BYTES data cannot hold {count} elements "
            "(each has a 4-byte length)"
        )
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise InvalidInput(f"input {name!r}: BYTES data ends before element {i}")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise InvalidInput(f"input {name!r}: BYTES element {i} runs past the data")
        out[i] = data[pos : pos + length]
        pos += length
    if pos != len(data):
        raise InvalidInput(f"input {name!r}: {len(data) - pos} bytes after the last element")
    return out


def _from_json(name: str, datatype: str, data, count: int) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(name, data)
        if len(flat) != count:
            raise InvalidInput(f"input {name!r}: {len(flat)} elements for a shape of {count}")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidInput(f"input {name!r}: BYTES data must be strings")
            out[i] = item.encode()
        return out
    try:
        parsed = np.array(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: data is ragged or not numeric") from None
    if parsed.size != count:
        raise InvalidInput(
            f"input {name!r}: {parsed.size} data elements but the shape holds {count}"
        )
    dtype = _NUMPY_DTYPES[datatype]
    if count == 0:
        return np.empty(0, dtype=dtype)
    kinds = _ACCEPTED_KINDS.get(datatype, _INT_KINDS)
    if parsed.dtype.kind not in kinds:
        if kinds == _INT_KINDS and parsed.dtype.kind in "fO":
            return _big_ints(name, datatype, data, dtype)
        raise InvalidInput(f"input {name!r}: data is not valid {datatype} (got {parsed.dtype})")
    if datatype not in _ACCEPTED_KINDS:  # integer types: refuse values that would wrap
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
    # FP16/FP32 from JSON numbers round as an IEEE cast does: beyond the type's range, to +-inf
    # (numpy's warning about it is silenced below). Refusing them instead cost ~2 µs of the
    # event loop's ~29 per JSON call, on every call, for a mistake no other server checks.
    return parsed.astype(dtype, copy=False)  # the caller gives it the request's shape


def _big_ints(name: str, datatype: str, data: list, dtype: np.dtype) -> np.ndarray:
    """Integers numpy would not infer exactly (e.g. UINT64 above 2**63 parse as float64)."""
    flat = _flatten(name, data)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidInput(f"input {name!r}: data is not valid {datatype}")
    try:
        return np.array(flat, dtype=dtype)
    except OverflowError:
        raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}") from None


def _flatten(name: str, data: list) -> list:
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 32:
                    raise InvalidInput(f"input {name!r}: data nested too deeply")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def encode_response(
    response: InferenceResponse, request_parameters: dict
) -> tuple[bytes, int | None]:
    """JSON body, or JSON header + binary sections; returns (body, header length or None)."""
    binary_default = bool(request_parameters.get("binary_data_output", False))
    chunks: list[bytes] = []
    outputs = []
    for t in response.outputs:
        out = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        want_binary = t.parameters.get("binary_data", binary_default)
        payload = None if want_binary else _to_json(t)
        if payload is None:
            raw = encode_raw(t.datatype, t.data)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = payload
        outputs.append(out)
    doc = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    doc["outputs"] = outputs
    header = _dumps(doc)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _dumps(doc) -> bytes:
    try:
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:  # a dtype orjson cannot take as-is: plain Python lists
        body = orjson.dumps(_as_lists(doc))
    if b"null" in body:
        # orjson writes NaN and +-Infinity as null; Triton writes NaN, Infinity and -Infinity,
        # which tritonclient (Python's json) reads back exactly. Slower, and rare (a name with
        # "null" in it takes this path too, to the same result).
        return json.dumps(_as_lists(doc), separators=(",", ":")).encode()
    return body


def _as_lists(doc):
    for out in doc["outputs"]:
        if isinstance(out.get("data"), np.ndarray):
            out["data"] = out["data"].tolist()
    return doc


def _to_json(t: Tensor):
    """Flat JSON data, or None when it cannot be JSON (non-UTF-8 BYTES) and must go binary."""
    if t.datatype != "BYTES":
        return np.ascontiguousarray(t.data).ravel()
    try:
        return [b.decode() if isinstance(b, bytes) else str(b) for b in t.data.ravel()]
    except UnicodeDecodeError:
        return None


def encode_raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            b = item if isinstance(item, bytes) else str(item).encode()  # str: runtime text
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    if _LITTLE_ENDIAN_HOST and array.dtype.isnative:
        return array.tobytes()  # C order, whatever the array's strides
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
