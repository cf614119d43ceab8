"""KServe v2 gRPC messages <-> protocol-neutral tensors.

A ModelInferRequest carries each input's data either in `raw_input_contents` (one little-endian
byte string per input, in input order; what tritonclient sends) or in the input's typed
`contents` field that matches its datatype (see protocol/inference.proto). Both decode to numpy
arrays without per-element Python work for numeric types: raw bytes are viewed in place with
np.frombuffer (the same decoder as the REST binary extension), typed fields are converted by
numpy in one call.

Responses always carry outputs in `raw_output_contents`: it is the compact encoding, and the one
tritonclient reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from agent.serving.errors import InvalidInput
from agent.serving.model import check_shape
from agent.serving.rest_codec import decode_raw, encode_raw
from agent.serving.tensors import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from protocol import inference_pb2 as pb
from runtimes.datatypes import DATATYPES, to_numpy

# The typed contents field of each datatype, and the numpy type its values arrive in.
# FP16 has no typed field in the protocol: it travels as raw contents only.
_TYPED_FIELDS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
# Datatypes narrower than their wire field: values outside their range would silently wrap.
_NARROW = frozenset({"INT8", "INT16", "UINT8", "UINT16"})

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


# --- requests -------------------------------------------------------------------------------


# Below this size parse_request leaves a message to protobuf whole: copying its tensors costs
# less than scanning its fields in Python (1.1 against 2.4 µs for the sample MLP's 300 bytes).
# decode_message, the server's path, scans every message: the scan gives it the key of the
# request's remembered layout, which saves more than the scan costs.
SCAN_BYTES = 16 << 10
MAX_FIELDS = 4096  # top-level fields of a request (model, inputs, parameters, ... each one)
# Past this many bytes of fields other than the raw tensors, decoded tensors are copied out of
# the message rather than viewed in it: a queued request must not keep, say, a gzip'd message
# inflated to 64 MiB of padding alive for the sake of its 256-byte tensor.
DETACH_BYTES = 64 << 10
_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_MODEL_NAME_KEY = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["model_name"].number << 3 | 2
_MODEL_VERSION_KEY = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["model_version"].number << 3 | 2


def parse_request(data: bytes | bytearray | memoryview) -> tuple[pb.ModelInferRequest, list]:
    """Parse a serialized ModelInferRequest, leaving its raw_input_contents in `data`.

    Returns (the message, one entry per raw_input_contents, in order). Protobuf would copy
    each tensor twice (into the message, then out of it); from SCAN_BYTES on, only the small
    rest of the message is parsed and the entries are zero-copy views of `data`, where the
    tensors arrived. A wire the top-level scan finds broken is DecodeError, as protobuf would
    find it: protobuf never sees a message the scan has not bounded (MAX_FIELDS).
    """
    view = memoryview(data)
    if len(view) < SCAN_BYTES:
        msg = pb.ModelInferRequest.FromString(view)
        return msg, list(msg.raw_input_contents)
    try:
        rest, raw = _split_field(view, _RAW_INPUT_CONTENTS)
    except ValueError as exc:
        raise _broken(exc) from None
    msg = pb.ModelInferRequest.FromString(rest)
    return msg, raw


def decode_message(data: bytes | bytearray | memoryview) -> InferenceRequest:
    """A serialized ModelInferRequest, parsed, validated and decoded: DecodeError for what
    protobuf cannot parse, InvalidInput naming what is wrong with the rest.

    Everything but the tensors' bytes (model, input names, datatypes, shapes, outputs asked
    for) repeats from one call to the next, byte for byte: clients send same-shaped inputs to
    the same model. So what those bytes decode to is remembered, as for the REST binary
    extension's headers: a request that repeats them is only sliced into its raw contents,
    whose sizes are still checked (3.1 against 6.8 µs for the sample MLP). Bounded in count
    and size; a request with an id is not remembered (ids are per request).
    """
    try:
        rest, raw = _split_field(memoryview(data), _RAW_INPUT_CONTENTS)
    except ValueError as exc:
        raise _broken(exc) from None
    layout = _LAYOUTS.get(rest)
    if layout is not None and len(raw) == len(layout.inputs):
        return layout.request(raw)
    request = decode_request(pb.ModelInferRequest.FromString(rest), raw or None)
    if raw and len(rest) > DETACH_BYTES:
        for tensor in request.inputs:
            tensor.data = tensor.data.copy()
    if raw and request.id is None and len(rest) <= MAX_LAYOUT_BYTES:
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()  # start over: the layouts in use now come back at once
        _LAYOUTS[rest] = _Layout(request)
    return request


def model_of(data: bytes | bytearray | memoryview) -> tuple[str, str | None]:
    """The model (name, version) a serialized request names, for counting its rejection.

    Read from its first MAX_FIELDS top-level fields, not parsed whole: the request may have
    been refused for its millions of fields, which protobuf would make an object each of."""
    view = memoryview(data)
    found = {_MODEL_NAME_KEY: b"", _MODEL_VERSION_KEY: b""}
    i = 0
    try:
        for _ in range(MAX_FIELDS):
            if i >= len(view):
                break
            key, start = _varint(view, i)
            i = _skip(view, start, key & 7)
            if key in found:  # the last one counts, as in protobuf
                found[key] = view[_varint(view, start)[1] : i]
        name, version = (bytes(found[key]).decode() for key in found)
    except (ValueError, UnicodeDecodeError):
        return "", None
    return name, version or None


MAX_LAYOUTS = 256
MAX_LAYOUT_BYTES = 4096


class _Layout:
    """A decoded request whose every input came in raw contents, less its tensors. Its lists
    and dicts are shared by the requests made from it, which only read them."""

    __slots__ = ("inputs", "model_name", "model_version", "outputs", "parameters")

    def __init__(self, request: InferenceRequest):
        self.model_name = request.model_name
        self.model_version = request.model_version
        self.inputs = [(t.name, t.datatype, t.shape, t.parameters) for t in request.inputs]
        self.outputs = request.outputs
        self.parameters = request.parameters

    def request(self, raw: list[memoryview]) -> InferenceRequest:
        inputs = []
        for (name, datatype, shape, parameters), data in zip(self.inputs, raw):  # noqa: B905
            array = decode_raw(name, datatype, shape, data)
            inputs.append(Tensor(name, datatype, shape, array, parameters))
        return InferenceRequest(
            self.model_name, self.model_version, inputs, None, self.outputs, self.parameters
        )


_LAYOUTS: dict[bytes, _Layout] = {}


def _broken(exc: ValueError) -> DecodeError:
    """What protobuf raises for the wire _split_field found broken (it would stop there too;
    handing it the message instead would have it parse what the scan has not bounded)."""
    return DecodeError(f"Error parsing message with type 'inference.ModelInferRequest': {exc}")


def _split_field(view: memoryview, number: int) -> tuple[bytes, list[memoryview]]:
    """Top-level scan: the length-delimited entries of field `number` as views, the other
    fields re-joined as bytes. ValueError for a wire that protobuf would not parse either;
    InvalidInput past MAX_FIELDS fields, those in groups counted too (a request has a handful;
    millions of tiny ones would cost the event loop seconds, and protobuf an object each)."""
    others, found = [], []
    kept = 0  # start of the run of other fields not yet in `others`
    fields = 0
    i, end = 0, len(view)
    while i < end:
        fields += 1
        if fields > MAX_FIELDS:
            raise InvalidInput(f"the request has more than {MAX_FIELDS} fields")
        start = i
        key = view[i]  # keys and lengths are one byte more often than not: no call for them
        i += 1
        if key >= 0x80:
            key, i = _varint(view, i - 1)
        wire = key & 7
        if wire == 2:
            length = view[i] if i < end else 0x80
            i += 1
            if length >= 0x80:
                length, i = _varint(view, i - 1)
            if i + length > end:
                raise ValueError("field runs past the message")
            if key >> 3 == number:
                if start > kept:
                    others.append(view[kept:start])
                found.append(view[i : i + length])
                i += length
                kept = i
                continue
            i += length
        elif wire == 0:
            _, i = _varint(view, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > end:
                raise ValueError("field runs past the message")
        elif wire == 3:  # a group (proto2's, kept as an unknown field): walked, not trusted
            i, fields = _skip_group(view, i, key >> 3, fields)
        else:
            raise ValueError(f"wire type {wire}")
    if end > kept:
        others.append(view[kept:end])
    return b"".join(others), found


def _skip_group(view: memoryview, i: int, number: int, fields: int) -> tuple[int, int]:
    """Where the group of field `number` whose fields start at `i` ends, and the count of
    fields so far with its own (nested groups too) added, up to MAX_FIELDS."""
    open_groups = [number]
    while open_groups:
        fields += 1
        if fields > MAX_FIELDS:
            raise InvalidInput(f"the request has more than {MAX_FIELDS} fields")
        key, i = _varint(view, i)
        wire = key & 7
        if wire == 3:
            open_groups.append(key >> 3)
        elif wire == 4:
            if key >> 3 != open_groups.pop():
                raise ValueError("a group ends with another field's number")
        else:
            i = _skip(view, i, wire)
    return i, fields


def _skip(view: memoryview, i: int, wire: int) -> int:
    """Where a field of wire type 0, 1, 2 or 5 whose value starts at `i` ends."""
    if wire == 0:
        return _varint(view, i)[1]
    if wire == 2:
        length, i = _varint(view, i)
        i += length
    elif wire in (1, 5):
        i += 8 if wire == 1 else 4
    else:
        raise ValueError(f"wire type {wire}")
    if i > len(view):
        raise ValueError("field runs past the message")
    return i


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(view) and shift < 64:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise ValueError("truncated or overlong varint")


def decode_request(msg: pb.ModelInferRequest, raw=None) -> InferenceRequest:
    """Validate and decode a ModelInferRequest; InvalidInput names what is wrong.

    `raw`: the raw input contents when parse_request kept them apart (default: the message's).
    """
    if not msg.model_name:
        raise InvalidInput("model_name is empty")
    if not msg.inputs:
        raise InvalidInput("request has no inputs")
    if raw is None:
        raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
            "send one entry per input, in input order"
        )
    inputs = [_decode_input(t, raw[i] if raw else None) for i, t in enumerate(msg.inputs)]
    outputs = None
    if msg.outputs:
        outputs = [RequestedOutput(o.name, parameters_to_dict(o.parameters)) for o in msg.outputs]
    return InferenceRequest(
        model_name=msg.model_name,
        model_version=msg.model_version or None,
        inputs=inputs,
        id=msg.id or None,
        outputs=outputs,
        parameters=parameters_to_dict(msg.parameters),
    )


def _decode_input(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name, datatype = t.name, t.datatype
    if not name:
        raise InvalidInput("an input has an empty name")
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join(sorted(DATATYPES))}"
        )
    shape = check_shape(name, list(t.shape))
    has_contents = t.HasField("contents")
    if raw is not None:
        if has_contents:
            raise InvalidInput(
                f"input {name!r} has typed contents but the request also has raw_input_contents; "
                "send every input one way or the other"
            )
        array = decode_raw(name, datatype, shape, raw)
    elif has_contents:
        array = decode_contents(name, datatype, shape, t.contents)
    elif math.prod(shape) == 0:
        array = np.empty(shape, dtype=to_numpy(datatype))
    else:
        raise InvalidInput(_no_data_message(name, t))
    return Tensor(name, datatype, shape, array, parameters_to_dict(t.parameters))


def decode_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    """Typed contents -> array of `datatype`, shaped; the field must match the datatype."""
    typed = _TYPED_FIELDS.get(datatype)
    if typed is None:
        raise InvalidInput(
            f"input {name!r}: {datatype} has no typed contents field in the protocol; "
            "send it in raw_input_contents"
        )
    field, wire_dtype = typed
    wrong = [f.name for f, _ in contents.ListFields() if f.name != field]
    if wrong:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} takes its data in {field}, "
            f"but {', '.join(wrong)} is set"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {len(values)} values in {field}, "
            f"but shape {list(shape)} holds {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        for i, value in enumerate(values):  # bytes elements are Python objects either way
            array[i] = value
        return array.reshape(shape)
    array = np.fromiter(values, dtype=wire_dtype, count=count)
    if datatype in _NARROW and count:
        info = np.iinfo(to_numpy(datatype))
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {name!r}: a value in {field} is outside the {datatype} range "
                f"[{info.min}, {info.max}]"
            )
        array = array.astype(to_numpy(datatype))
    return array.reshape(shape)


def _no_data_message(name: str, t: pb.ModelInferRequest.InferInputTensor) -> str:
    if "shared_memory_region" in t.parameters:
        return (
            f"input {name!r} refers to a shared memory region; this server does not support "
            "shared memory, send the data in raw_input_contents"
        )
    return f"input {name!r} has no data: set its contents or the request's raw_input_contents"


# --- responses ------------------------------------------------------------------------------


def encode_response(response: InferenceResponse) -> bytes:
    """The serialized ModelInferResponse, every output in raw_output_contents in the order of
    `outputs`.

    Written field by field: the bytes protobuf's deterministic SerializeToString gives for the
    same message (fields in number order, empty strings left out, shapes packed, map entries
    by key), without building the message first: 1.9 against 2.9-3.5 µs per MLP answer, of
    the ~30 µs a gRPC call costs the event loop. Parameters, rare in answers, are still
    serialized by protobuf.
    """
    parts: list[bytes] = []
    _text(parts, b"\x0a", response.model_name)  # 1: model_name
    _text(parts, b"\x12", response.model_version)  # 2: model_version
    _text(parts, b"\x1a", response.id)  # 3: id
    if response.parameters:  # 4: parameters, a map: protobuf writes its entries
        holder = pb.ModelInferResponse()
        dict_to_parameters(response.parameters, holder.parameters)
        parts.append(holder.SerializeToString(deterministic=True))  # entries by key
    raw = []
    for t in response.outputs:  # 5: outputs
        tensor: list[bytes] = []
        _text(tensor, b"\x0a", t.name)
        _text(tensor, b"\x12", t.datatype)
        if t.shape:  # packed repeated int64: negative numbers take ten bytes, as in protobuf
            dims = b"".join([_varint_bytes(d & _UINT64_MAX) for d in t.shape])
            tensor += (b"\x1a", _varint_bytes(len(dims)), dims)
        body = b"".join(tensor)
        parts += (b"\x2a", _varint_bytes(len(body)), body)
        raw.append(encode_raw(t.datatype, t.data))
    for data in raw:  # 6: raw_output_contents
        parts += (b"\x32", _varint_bytes(len(data)), data)
    return b"".join(parts)


_SMALL_VARINTS = [bytes([n]) for n in range(128)]


def _varint_bytes(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text(parts: list[bytes], tag: bytes, value: str | None) -> None:
    """A string field; proto3 leaves an empty one out."""
    if value:
        data = value.encode()
        parts += (tag, _varint_bytes(len(data)), data)


def encode_contents(datatype: str, array: np.ndarray) -> pb.InferTensorContents:
    """An array as typed contents (for clients and tests; the server answers in raw)."""
    typed = _TYPED_FIELDS.get(datatype)
    if typed is None:
        raise ValueError(f"{datatype} has no typed contents field; use raw contents")
    field, wire_dtype = typed
    contents = pb.InferTensorContents()
    flat = array.ravel()
    values = flat.tolist() if datatype == "BYTES" else flat.astype(wire_dtype).tolist()
    getattr(contents, field).extend(values)
    return contents


# --- parameters -----------------------------------------------------------------------------


def parameters_to_dict(params) -> dict[str, Any]:
    """A map<string, InferParameter> as plain Python values (bool, int, float, str)."""
    if not params:
        return {}
    out = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"parameter {key!r} has no value")
        out[key] = getattr(value, kind)
    return out


def dict_to_parameters(values: dict[str, Any], params) -> None:
    """Fill a map<string, InferParameter> from plain Python values."""
    for key, value in values.items():
        p = params[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if _INT64_MIN <= value <= _INT64_MAX:
                p.int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                p.uint64_param = value
            else:
                raise ValueError(f"parameter {key!r}: {value} does not fit in 64 bits")
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise TypeError(f"parameter {key!r}: {type(value).__name__} has no protobuf form")
