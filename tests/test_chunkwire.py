"""Chunk messages written and read without protobuf objects are exactly protobuf's."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from services.common.chunkwire import RawChunk, chunk_message, parse_push_request, serialize_push_request
from services.rpc import pb

CASES = [(0, 0, b""), (0, 0, b"x"), (1, 0, b"ab"), (0, 5, b"abc"), (3, 1 << 20, bytes(range(256)) * 4096)]
rng = random.Random(7)
CASES += [
    (rng.randrange(1 << 32), rng.randrange(1 << 64), rng.randbytes(rng.choice([1, 127, 128, 16383, 16384, 70000])))
    for _ in range(40)
]


@pytest.mark.parametrize("index, offset, data", CASES)
def test_chunk_message_is_what_protobuf_writes_and_reads_back(index, offset, data):
    ref = pb.PushRequest(chunk=pb.Chunk(module_index=index, offset=offset, data=data)).SerializeToString()
    mine = chunk_message(index, offset, memoryview(data))
    assert mine == ref
    got = parse_push_request(mine)
    assert isinstance(got, RawChunk)
    assert (got.module_index, got.offset, bytes(got.data)) == (index, offset, data)
    assert serialize_push_request(got) == ref  # a relay passes the bytes on unchanged


def test_view_is_not_a_copy():
    msg = chunk_message(2, 9, b"y" * 1000)
    got = parse_push_request(msg)
    assert got.data.obj is msg


def _noncanonical():
    inner_rev = b"\x10\x05" + b"\x08\x02" + b"\x1a\x01z"  # fields out of order
    dup = b"\x08\x01\x08\x02\x1a\x01z"  # a field twice: the last wins
    unknown = b"\x08\x01\x1a\x01z\x20\x07"  # an unknown field 4 after data
    long_varint = b"\x08\x81\x80\x00" + b"\x1a\x01z"  # index 1 as a padded (non-minimal) varint
    return [b"\x12" + bytes([len(x)]) + x for x in (inner_rev, dup, unknown)] + [
        b"\x12" + bytes([len(long_varint)]) + long_varint
    ]


@pytest.mark.parametrize("msg", _noncanonical())
def test_anything_else_is_read_by_protobuf(msg):
    got = parse_push_request(msg)
    ref = pb.PushRequest.FromString(msg)
    if isinstance(got, RawChunk):  # accepted by the fast path only when it means the same
        assert (got.module_index, got.offset, bytes(got.data)) == (
            ref.chunk.module_index,
            ref.chunk.offset,
            ref.chunk.data,
        )
    else:
        assert got == ref


def test_headers_and_garbage_go_to_protobuf():
    h = pb.PushRequest(header=pb.PushHeader(push_id="p", sender="a", receiver="b", round=1))
    assert parse_push_request(h.SerializeToString()) == h
    with pytest.raises(DecodeError):
        parse_push_request(b"\x12\x05\x1a\x09abc")  # data runs past the message
    with pytest.raises(DecodeError):
        parse_push_request(b"\x12\xff")  # truncated length


@pytest.mark.parametrize("index, offset, data", CASES)
def test_a_chunk_messages_parts_are_the_message_and_its_prefix_names_the_chunk(index, offset, data):
    """``chunk_parts`` joined is protobuf's message; its prefix (every byte before the data: what the
    bulk transport sends first) reads back as the chunk's index, offset and data length."""
    from services.common.chunkwire import chunk_parts, parse_chunk_prefix

    ref = pb.PushRequest(chunk=pb.Chunk(module_index=index, offset=offset, data=data)).SerializeToString()
    half = len(data) // 2
    parts = chunk_parts(index, offset, [memoryview(data)[:half], memoryview(data)[half:]])
    assert bytes(parts) == ref == serialize_push_request(parts)
    if data:
        assert ref[: len(parts.prefix)] == parts.prefix
        assert parse_chunk_prefix(parts.prefix) == (index, offset, len(data))
        assert parse_chunk_prefix(parts.prefix[:-1]) is None  # a prefix cut short
        assert parse_chunk_prefix(ref[: len(parts.prefix) + 1]) is None  # one data byte too many
    else:
        assert parts.pieces == () and parse_chunk_prefix(parts.prefix) is None  # no data: sent whole


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\x12", b"\xff" * 8, b"\x12\x06\x08\x01\x1a\x01", b"\x12\x05\x1a\x02", b"\x12\x03\x10\x05\x1a\x01"],
)
def test_anything_but_a_chunk_prefix_is_refused_as_one(prefix):
    """Garbage, a message with no data field, a data length that does not end the message, fields after
    the data's length: none of them is a prefix the receiver would read data after."""
    from services.common.chunkwire import parse_chunk_prefix

    assert parse_chunk_prefix(prefix) is None
