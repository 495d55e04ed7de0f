"""Chunk messages of a push, encoded and parsed without a protobuf object in between.

A push moves its bytes as ``PushRequest{chunk: Chunk{module_index, offset, data}}`` messages of up to
1 MiB. Building a protobuf object per chunk costs two copies of the data on the sender (into the
message, then into its serialization) and two on the receiver (out of the serialization, then out of
the message's field), and the profile showed those copies as a large share of a push
(``docs/performance.md``). So chunk messages are written here in protobuf's wire format directly,
one copy, byte for byte what ``SerializeToString`` writes; and read as a view of the received bytes,
no copy. Field numbers come from the generated descriptors: ``proto/hffm.proto`` stays the contract.

Anything but a chunk message in that canonical form (a header, unknown or repeated fields, a
malformed message) goes to the full protobuf parser, so every message is read as protobuf reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from services.rpc import pb

MAX_MESSAGE_BYTES = 8 << 20  # the largest push message either transport takes (gRPC's message limits in hffm)
_F_CHUNK = pb.PushRequest.DESCRIPTOR.fields_by_name["chunk"].number
_F_INDEX = pb.Chunk.DESCRIPTOR.fields_by_name["module_index"].number
_F_OFFSET = pb.Chunk.DESCRIPTOR.fields_by_name["offset"].number
_F_DATA = pb.Chunk.DESCRIPTOR.fields_by_name["data"].number
_LEN, _VARINT = 2, 0  # protobuf wire types
_TAG_CHUNK = (_F_CHUNK << 3) | _LEN
_TAG_INDEX = (_F_INDEX << 3) | _VARINT
_TAG_OFFSET = (_F_OFFSET << 3) | _VARINT
_TAG_DATA = (_F_DATA << 3) | _LEN
assert max(_TAG_CHUNK, _TAG_INDEX, _TAG_OFFSET, _TAG_DATA) < 0x80  # one-byte tags below


class RawChunk(NamedTuple):
    """A chunk read without copying: ``data`` is a view of ``raw``, the message as received; or, when
    ``placed``, a view of the receiver's own module buffer that the bulk transport read the chunk's
    bytes straight into (``raw`` is then empty: the message was never whole in memory)."""

    module_index: int
    offset: int
    data: memoryview
    raw: bytes | bytearray  # bytearray: a bulk transport frame (services.common.bulk)
    placed: bool = False


class ChunkMessage(NamedTuple):
    """A chunk message not yet joined: ``prefix`` (every byte before the data: the message's tag and
    length, the chunk's index and offset, the data field's tag and length) and the data's ``pieces``.
    gRPC's serializer joins them (``bytes(msg)``: the one copy a chunk's bytes make on the sender); the
    bulk transport hands prefix and pieces to ``sendmsg`` as they are, and the receiver reads the prefix
    first to know where the data goes."""

    prefix: bytes
    pieces: tuple[bytes | memoryview, ...]

    def __bytes__(self) -> bytes:
        return b"".join((self.prefix, *self.pieces))


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def chunk_parts(
    module_index: int, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]
) -> ChunkMessage:
    """``PushRequest{chunk: Chunk{module_index, offset, data}}`` as protobuf writes it (proto3: zero-valued
    fields left out), its data left in the pieces given (``wire.chunk_pieces``)."""
    pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else tuple(data)
    head = bytearray()
    if module_index:
        head += bytes((_TAG_INDEX,)) + _varint(module_index)
    if offset:
        head += bytes((_TAG_OFFSET,)) + _varint(offset)
    n = sum(len(p) for p in pieces)
    if n:
        head += bytes((_TAG_DATA,)) + _varint(n)
    return ChunkMessage(b"".join((bytes((_TAG_CHUNK,)), _varint(len(head) + n), head)), pieces if n else ())


def chunk_message(module_index: int, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> bytes:
    """The serialized chunk message (``chunk_parts`` joined)."""
    return bytes(chunk_parts(module_index, offset, data))


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    v = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos
        shift += 7
    return None


def _chunk_head(buf: bytes | bytearray | memoryview, end: int) -> tuple[int, int, int, int, int] | None:
    """(module_index, offset, data start, data length, message end) of a chunk message in the form
    ``chunk_parts`` writes whose first ``end`` bytes are in ``buf``, read up to the start of its data;
    None for anything else. Without a data field the data is empty and starts at the message's end."""
    if end < 2 or buf[0] != _TAG_CHUNK:
        return None
    r = _read_varint(buf, 1, end)
    if r is None:
        return None
    pos = r[1]
    msg_end = pos + r[0]
    index = offset = 0
    last = 0  # fields in increasing order, each at most once (what protobuf writes)
    while pos < min(end, msg_end):
        tag = buf[pos]
        pos += 1
        if tag == _TAG_INDEX and last < 1:
            r = _read_varint(buf, pos, min(end, msg_end))
            if r is None or r[0] >= 1 << 32:
                return None
            index, pos, last = r[0], r[1], 1
        elif tag == _TAG_OFFSET and last < 2:
            r = _read_varint(buf, pos, min(end, msg_end))
            if r is None:
                return None
            offset, pos, last = r[0], r[1], 2
        elif tag == _TAG_DATA and last < 3:
            r = _read_varint(buf, pos, min(end, msg_end))
            if r is None or r[1] + r[0] != msg_end:  # data is the last field and ends the message
                return None
            return index, offset, r[1], r[0], msg_end
        else:
            return None
    return (index, offset, pos, 0, msg_end) if pos == msg_end else None


def _fast_chunk(buf: bytes) -> RawChunk | None:
    """The chunk in ``buf`` if it is in the form ``chunk_message`` writes, else None."""
    head = _chunk_head(buf, len(buf))
    if head is None or head[4] != len(buf):
        return None
    index, offset, start, n, end = head
    return RawChunk(index, offset, memoryview(buf)[start:end] if n else memoryview(b""), buf)


def parse_chunk_prefix(prefix: bytes | bytearray) -> tuple[int, int, int] | None:
    """(module_index, offset, data length) when ``prefix`` is exactly a chunk message's bytes before its
    data (``ChunkMessage.prefix`` of a chunk with data), else None."""
    head = _chunk_head(prefix, len(prefix))
    if head is None or head[2] != len(prefix) or head[3] == 0:
        return None
    return head[0], head[1], head[3]


def parse_push_request(buf: bytes | bytearray) -> RawChunk | pb.PushRequest:
    """The server's request deserializer for ``Push`` (and the bulk transport's frames): chunks as views,
    everything else via protobuf."""
    return _fast_chunk(buf) or pb.PushRequest.FromString(buf if isinstance(buf, bytes) else bytes(buf))


def serialize_push_request(req: bytes | ChunkMessage | RawChunk | pb.PushRequest) -> bytes:
    """The client's request serializer for ``Push``: chunk messages are joined (or already bytes)."""
    if isinstance(req, bytes):
        return req
    if isinstance(req, ChunkMessage):
        return bytes(req)
    if isinstance(req, RawChunk):  # a relay passes chunks on as they came (bytes: gRPC's serializer contract)
        if req.placed:  # never whole: written again (relays place nothing; kept for completeness)
            return chunk_message(req.module_index, req.offset, req.data)
        return req.raw if isinstance(req.raw, bytes) else bytes(req.raw)
    return req.SerializeToString()
