"""HTTP/2 header blocks for http2.py: HPACK both ways, and what a request's headers must be.

Decoding is `hpack`'s (the python-hyper implementation), behind a cache per connection: a
client repeats the same block for every call while its HPACK table does not change, so only
the first is decoded (hpack takes 14 µs for an all-indexed block of eight headers, the cache
lookup well under one); only what fits HEADER_CACHE_BYTES per connection is kept. Encoding
uses no dynamic table at all (static indexes and literals, no Huffman): the server's few
response header lists are encoded once and kept, and a client can shrink its table to nothing
without affecting us. `request_headers` applies RFC 9113's
rules for a request (pseudo-headers, lower-case names, no connection-specific fields).
"""

from __future__ import annotations

import hpack
from hpack.table import HeaderTable

MAX_DECODED_HEADERS = 64 * 1024  # what a header block may inflate to (HPACK bombs)
HEADER_CACHE_SIZE = 64  # header blocks remembered per connection
# ... and their bytes, encoded and decoded: a call's block is a few hundred, and hundreds of
# idle connections must not each keep 64 blocks of up to MAX_DECODED_HEADERS
HEADER_CACHE_BYTES = 16 * 1024
ENCODED_CACHE_SIZE = 256  # response header lists kept encoded

Headers = list[tuple[bytes, bytes]]


class HeaderBlockError(Exception):
    """A header block that cannot be decoded, or inflates beyond MAX_DECODED_HEADERS."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC = HeaderTable.STATIC_TABLE
_STATIC_FIELD = {entry: i for i, entry in reversed(list(enumerate(_STATIC, 1)))}
_STATIC_NAME = {name: i for i, (name, _) in reversed(list(enumerate(_STATIC, 1)))}
_encoded: dict[tuple, bytes] = {}


def encode_headers(headers: Headers) -> bytes:
    """An HPACK header block that uses no dynamic table: static indexes and literals without
    indexing, no Huffman. Our responses repeat a few header lists, so those are kept encoded.
    """
    key = tuple(headers)
    block = _encoded.get(key)
    if block is not None:
        return block
    out = bytearray()
    for name, value in headers:
        index = _STATIC_FIELD.get((name, value))
        if index:
            out += _hpack_int(index, 7, 0x80)
            continue
        name_index = _STATIC_NAME.get(name, 0)
        out += _hpack_int(name_index, 4, 0x00)
        if not name_index:
            out += _hpack_int(len(name), 7, 0x00) + name
        out += _hpack_int(len(value), 7, 0x00) + value
    block = bytes(out)
    if len(_encoded) < ENCODED_CACHE_SIZE:
        _encoded[key] = block
    return block


class HeaderBlock:
    """A decoded header block: its fields, their RFC 9113 size, and (worked out once, as a
    cached block may stand for many requests) the request headers they make, or what makes
    them malformed. The headers dict is shared by every request with this block: read-only."""

    __slots__ = ("_request", "fields", "size")

    def __init__(self, fields: tuple[tuple[bytes, bytes], ...]):
        self.fields = fields
        self.size = sum(len(n) + len(v) + 32 for n, v in fields)
        self._request: dict[bytes, bytes] | str | None = None

    def request_headers(self) -> dict[bytes, bytes] | str:
        if self._request is None:
            self._request = request_headers(self.fields)
        return self._request


class HeaderDecoder:
    """hpack's decoder behind a cache of whole blocks.

    A block decodes to the same headers as long as the decoder's dynamic table is the same; a
    client repeats its blocks (all references to the table) from the second call on. A block
    that changes the table clears the cache.
    """

    def __init__(self):
        self._decoder = hpack.Decoder(max_header_list_size=MAX_DECODED_HEADERS)
        self._table = self._decoder.header_table
        self._cache: dict[bytes, HeaderBlock] = {}
        self.cached_bytes = 0  # of the blocks in the cache, encoded and decoded

    def decode(self, block: bytes) -> HeaderBlock:
        """The block's headers; HeaderBlockError if it is broken or inflates too far."""
        hit = self._cache.get(block)
        if hit is not None:
            return hit
        entries = self._table.dynamic_entries
        first, count, maxsize = entries[0] if entries else None, len(entries), self._table.maxsize
        try:
            fields = tuple((bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True))
        except hpack.OversizedHeaderListError:
            message = f"a header block inflates beyond {MAX_DECODED_HEADERS} bytes"
            raise HeaderBlockError(message, too_large=True) from None
        except hpack.HPACKError as exc:
            raise HeaderBlockError(f"bad header block: {exc}") from None
        result = HeaderBlock(fields)
        changed = (
            len(entries) != count
            or (entries[0] if entries else None) is not first
            or self._table.maxsize != maxsize
        )
        if changed:
            self._cache.clear()
            self.cached_bytes = 0
            return result
        cost = len(block) + result.size
        if len(self._cache) < HEADER_CACHE_SIZE and self.cached_bytes + cost <= HEADER_CACHE_BYTES:
            self._cache[block] = result
            self.cached_bytes += cost
        return result


_PSEUDO_REQUEST = frozenset((b":method", b":scheme", b":path", b":authority"))
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_BAD_NAME_BYTES = frozenset(b"\x00\r\n :") | frozenset(range(0x41, 0x5B))  # and upper case
_BAD_VALUE_BYTES = frozenset(b"\x00\r\n")
_WHITESPACE = (b" ", b"\t")  # not at either end of a value (RFC 9113 8.2.1)


def request_headers(fields) -> dict[bytes, bytes] | str:
    """A request's header fields as a dict, or what makes them malformed (RFC 9113 8.2, 8.3)."""
    headers: dict[bytes, bytes] = {}
    regular = False
    for name, value in fields:
        if not _BAD_VALUE_BYTES.isdisjoint(value):
            return f"header {name!r} has a NUL, CR or LF in its value"
        if value[:1] in _WHITESPACE or value[-1:] in _WHITESPACE:
            return f"header {name!r} has a value that starts or ends with whitespace"
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name!r} after a regular header"
            if name not in _PSEUDO_REQUEST:
                return f"{name!r} is not a request pseudo-header"
            if name in headers:
                return f"pseudo-header {name!r} repeated"
            headers[name] = value
            continue
        regular = True
        if not name or not _BAD_NAME_BYTES.isdisjoint(name):
            return f"header name {name!r} is empty or has upper case or forbidden characters"
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header {name!r} is not allowed in HTTP/2"
        if name == b"te" and value != b"trailers":
            return "te may only be 'trailers'"
        previous = headers.get(name)
        headers[name] = value if previous is None else previous + b", " + value
    for required in (b":method", b":scheme", b":path"):
        if not headers.get(required):
            return f"pseudo-header {required.decode()} is missing or empty"
    return headers
