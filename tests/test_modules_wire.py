"""Serialization round trips, digests, chunking and the checks a receiver makes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save

from hffm.modules import Module, ModuleError, decode_module, digest_of, encode_module, spec_of
from hffm.wire import CHUNK_BYTES, MAX_CHUNK_BYTES, ModuleHeader, PushAssembler, PushHeader, chunks
from tests.conftest import make_module

SHAPES = {"a.down.weight": (256, 768), "a.down.bias": (256,), "a.up.weight": (768, 256)}


def _decode(em, spec, **kw):
    args = dict(
        name=em.name, version=em.version, num_samples=em.num_samples, dtype=em.dtype, digest=em.digest, spec=spec
    )
    args.update(kw)
    return decode_module(em.data, **args)


def _decode_blob(blob, spec, name="adapter.0", dtype="fp32", **kw):
    """``decode_module`` of a raw blob sent with its true digest, version 1 and weight 1."""
    args = dict(name=name, version=1, num_samples=1.0, dtype=dtype, digest=digest_of(blob), spec=spec)
    args.update(kw)
    return decode_module(blob, **args)


def test_fp32_round_trip_is_exact():
    m = make_module("adapter.0", SHAPES, version=3, num_samples=17)
    em = encode_module(m)
    assert em.digest == digest_of(em.data) and em.digest_alg == "blake3"
    back = _decode(em, spec_of({m.name: m.tensors}))
    assert back.version == 3 and back.num_samples == 17
    for k in SHAPES:
        assert torch.equal(back.tensors[k], m.tensors[k])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_the_wire_measured(dtype):
    m = make_module("adapter.0", SHAPES)
    em32, em16 = encode_module(m, "fp32"), encode_module(m, dtype)
    numel = m.numel()
    # measured, not assumed: payload ~ numel * bytes/elem plus a small header
    assert numel * 4 <= em32.size_bytes < numel * 4 + 2048
    assert numel * 2 <= em16.size_bytes < numel * 2 + 2048
    back = _decode(em16, spec_of({m.name: m.tensors}))
    assert back.tensors["a.down.weight"].dtype == torch.float32
    assert torch.allclose(back.tensors["a.down.weight"], m.tensors["a.down.weight"], rtol=1e-2, atol=1e-2)


def test_digest_mismatch_rejected():
    m = make_module("adapter.0", SHAPES)
    em = encode_module(m)
    with pytest.raises(ModuleError) as e:
        _decode(em, spec_of({m.name: m.tensors}), digest=digest_of(b"x"))
    assert e.value.code == "DATA_LOSS"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda t: {**t, "a.down.bias": torch.zeros(255)}, "shape_mismatch"),
        (lambda t: {k: v for k, v in t.items() if k != "a.up.weight"}, "shape_mismatch"),
        (lambda t: {**t, "a.down.bias": torch.full((256,), float("nan"))}, "non_finite"),
        (lambda t: {**t, "a.down.bias": torch.full((256,), float("inf"))}, "non_finite"),
        (lambda t: {**t, "a.down.bias": torch.zeros(256, dtype=torch.float64)}, "dtype_mismatch"),
    ],
)
def test_bad_tensors_rejected(mutate, reason):
    m = make_module("adapter.0", SHAPES)
    spec = spec_of({m.name: m.tensors})
    data = st_save({k: v.contiguous() for k, v in mutate(m.tensors).items()})
    with pytest.raises(ModuleError) as e:
        _decode_blob(data, spec, name=m.name)
    assert e.value.reason == reason and e.value.code == "INVALID_ARGUMENT"


def test_unknown_module_and_garbage_rejected():
    m = make_module("adapter.0", SHAPES)
    spec = spec_of({m.name: m.tensors})
    em = encode_module(m)
    with pytest.raises(ModuleError, match="unknown module"):
        _decode(em, spec, name="adapter.99")
    junk = b"\x00" * 64
    with pytest.raises(ModuleError, match="safetensors"):
        _decode_blob(junk, spec)


def _push(mods, wire="fp32"):
    ems = [encode_module(m, wire) for m in mods]
    h = PushHeader("p1", "device-0-0", "edge-0", 1, "aggregate", "device_edge", tuple(ModuleHeader.of(e) for e in ems))
    return h, ems


def test_chunks_are_at_most_one_mib_and_reassemble():
    mods = [make_module("adapter.0", SHAPES, seed=1), make_module("adapter.1", SHAPES, seed=2)]
    spec = spec_of({"adapter.0": mods[0].tensors, "adapter.1": mods[1].tensors})
    h, ems = _push(mods)
    pieces = list(chunks(ems))
    assert all(len(d) <= CHUNK_BYTES for _, _, d in pieces)
    assert len(pieces) > 2  # a 1.5 MB module does not fit one chunk
    asm = PushAssembler(h, spec)
    for i, off, data in pieces:
        asm.add_chunk(i, off, bytes(data))
    out = asm.finish()
    assert [m.name for m in out] == ["adapter.0", "adapter.1"]
    assert torch.equal(out[1].tensors["a.up.weight"], mods[1].tensors["a.up.weight"])
    assert asm.bytes_received == sum(e.size_bytes for e in ems)


def test_truncated_and_out_of_order_streams_rejected():
    mods = [make_module("adapter.0", SHAPES, seed=1), make_module("adapter.1", SHAPES, seed=2)]
    spec = spec_of({m.name: m.tensors for m in mods})
    h, ems = _push(mods)
    pieces = list(chunks(ems))
    asm = PushAssembler(h, spec)
    for i, off, data in pieces[:-1]:
        asm.add_chunk(i, off, bytes(data))
    with pytest.raises(ModuleError, match="truncated"):
        asm.finish()
    asm = PushAssembler(h, spec)
    asm.add_chunk(*pieces[0][:2], bytes(pieces[0][2]))
    with pytest.raises(ModuleError, match="out-of-order"):
        asm.add_chunk(pieces[2][0], pieces[2][1], bytes(pieces[2][2]))
    asm = PushAssembler(h, spec)
    with pytest.raises(ModuleError, match="out-of-order"):
        asm.add_chunk(1, 0, b"x")


def test_chunks_read_into_their_place_are_checked_without_a_copy_and_in_order():
    """``place`` hands a transport the chunk's region of its module's receive buffer; ``add_chunk(...,
    placed=True)`` then checks it in stream order without copying. Bounds are ``place``'s to refuse; a
    region placed out of order (twice, or ahead) fails at ``add_chunk``, so it never passes."""
    mods = [make_module("adapter.0", SHAPES, seed=1), make_module("adapter.1", SHAPES, seed=2)]
    spec = spec_of({m.name: m.tensors for m in mods})
    h, ems = _push(mods)
    pieces = list(chunks(ems, 4096))
    asm = PushAssembler(h, spec, 4096)
    for n, (i, off, data) in enumerate(pieces):
        if n % 3 == 0:  # some chunks the ordinary way: both kinds mix in one push
            asm.add_chunk(i, off, bytes(data))
            continue
        place = asm.place(i, off, len(data))
        place[:] = data
        asm.add_chunk(i, off, place, placed=True)
        assert place.obj is asm._bufs[i]  # the module's own buffer: nothing was copied
    out = asm.finish()
    assert all(torch.equal(out[k].tensors[t], mods[k].tensors[t]) for k in (0, 1) for t in SHAPES)

    asm = PushAssembler(h, spec, 4096)
    with pytest.raises(ModuleError, match="exceeds 4096"):
        asm.place(0, 0, 4097)
    with pytest.raises(ModuleError, match="runs past"):
        asm.place(0, ems[0].size_bytes - 10, 11)
    with pytest.raises(ModuleError, match="module 2 of a push of 2"):
        asm.place(2, 0, 1)
    i, off, data = pieces[0]
    asm.place(i, off, len(data))[:] = data
    asm.add_chunk(i, off, asm.place(i, off, len(data)), placed=True)
    again = asm.place(i, off, len(data))  # the same region again: placed, but out of order
    again[:] = b"\xff" * len(data)
    with pytest.raises(ModuleError, match="out-of-order"):
        asm.add_chunk(i, off, again, placed=True)
    with pytest.raises(ModuleError, match="not in its buffer"):  # a transport's bug, not the sender's
        PushAssembler(h, spec, 4096).add_chunk(0, 0, memoryview(bytearray(16)), placed=True)


def test_declared_size_is_bounded_by_the_spec():
    m = make_module("adapter.0", SHAPES)
    spec = spec_of({m.name: m.tensors})
    h, _ = _push([m])
    big = PushHeader(
        h.push_id,
        h.sender,
        h.receiver,
        h.round,
        h.tag,
        h.link,
        (ModuleHeader("adapter.0", 1, 1.0, 10**12, h.modules[0].digest, "fp32", "blake3"),),
    )
    with pytest.raises(ModuleError, match="declared size"):
        PushAssembler(big, spec)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    from hffm.modules import all_finite

    big = torch.full((1000,), 3e38)  # every value finite, their sum is not
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(100)
        t[37] = bad
        assert not all_finite(t)
    mixed = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite(mixed)


def test_incremental_digest_matches_and_still_rejects():
    m = make_module("adapter.0", SHAPES)
    spec = spec_of({m.name: m.tensors})
    h, ems = _push([m])
    asm = PushAssembler(h, spec)
    pieces = list(chunks(ems, 4096))
    for i, off, data in pieces:
        asm.add_chunk(i, off, bytes(data))
    assert asm._checks[0].digest() == digest_of(ems[0].data)
    assert asm._checks[0].finite is True  # decided on arrival: decode does not check again
    assert torch.equal(asm.finish()[0].tensors["a.up.weight"], m.tensors["a.up.weight"])
    # a flipped byte in transit is caught by the incremental digest
    asm = PushAssembler(h, spec)
    for i, off, data in pieces:
        b = bytearray(data)
        if off == 8192:
            b[100] ^= 0xFF
        asm.add_chunk(i, off, bytes(b))
    with pytest.raises(ModuleError) as e:
        asm.finish()
    assert e.value.code == "DATA_LOSS"


# -- the wire codec against the safetensors library ---------------------------------------------


def _blob(header: dict, data: bytes, pad: int = 0) -> bytes:
    import json
    import struct

    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_encoding_is_safetensors_the_library_reads(dtype):
    from safetensors import safe_open  # noqa: F401 - the library is the reference
    from safetensors.torch import load as st_load

    m = make_module("adapter.0", SHAPES, version=4, num_samples=9)
    em = encode_module(m, dtype)
    back = st_load(bytes(em.data))
    wire = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert set(back) == set(SHAPES)
    for k, t in m.tensors.items():
        assert back[k].dtype == wire and torch.equal(back[k], t.to(wire))


@pytest.mark.parametrize("wire", [torch.float32, torch.float16, torch.bfloat16])
def test_library_blobs_decode_the_same(wire):
    from safetensors.torch import load as st_load

    m = make_module("adapter.0", SHAPES)
    blob = st_save({k: v.to(wire) for k, v in m.tensors.items()}, metadata={"name": "adapter.0"})
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[wire]
    got = _decode_blob(blob, spec_of({m.name: m.tensors}), dtype=name)
    ref = st_load(blob)
    for k in SHAPES:
        assert torch.equal(got.tensors[k], ref[k].to(torch.float32))


def test_decoded_tensors_are_views_of_the_received_buffer():
    """The zero-copy decode (a speed-up kept under test): fp32 tensors alias the buffer they came in."""
    import ctypes

    m = make_module("adapter.0", SHAPES)
    em = encode_module(m)
    buf = bytearray(em.data)
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    back = _decode_blob(buf, spec_of({m.name: m.tensors}))
    for t in back.tensors.values():
        assert start <= t.data_ptr() < start + len(buf)
    # an immutable input is copied first: the tensors never alias bytes the caller may reuse
    back2 = _decode(em, spec_of({m.name: m.tensors}))
    imm = ctypes.cast(ctypes.c_char_p(bytes(em.data)), ctypes.c_void_p).value
    assert all(not (imm <= t.data_ptr() < imm + em.size_bytes) for t in back2.tensors.values())


def test_a_header_seen_before_is_checked_against_each_spec_and_its_data_decoded_anew():
    """Layouts are memoised by header bytes: a second blob with the same header decodes its own values,
    a spec that differs still refuses it, a blob with the same header but other size is refused, and a
    malformed header is refused every time (errors are not remembered as layouts)."""
    m1 = make_module("adapter.0", SHAPES, seed=1)
    m2 = make_module("adapter.0", SHAPES, seed=2)
    e1, e2 = encode_module(m1), encode_module(m2)
    assert bytes(e1.segments[0]) == bytes(e2.segments[0]) and e1.data != e2.data  # one header, two payloads
    spec = spec_of({m1.name: m1.tensors})
    for m, e in ((m1, e1), (m2, e2), (m1, e1)):
        back = _decode(e, spec)
        assert all(torch.equal(back.tensors[k], m.tensors[k]) for k in SHAPES)
    other = {"adapter.0": {**spec["adapter.0"], "a.down.bias": (255,)}}
    with pytest.raises(ModuleError, match=r"a.down.bias has shape \(256,\), expected \(255,\)"):
        _decode(e1, other)
    longer = bytearray(e1.data) + bytes(4)
    with pytest.raises(ModuleError, match="cover"):
        _decode_blob(longer, spec)
    bad = bytearray(e1.data)
    bad[9] = ord("[")  # the header's JSON broken: refused, and refused again
    for _ in range(2):
        with pytest.raises(ModuleError, match="not a safetensors blob"):
            _decode_blob(bad, spec)


def test_views_are_made_when_first_read_and_fedavg_folds_without_them():
    """A decoded module's tensors are built on first read (``numel`` and ``shapes`` do not need them);
    FedAvg folding decoded uploads by their flat regions gives the mean of the original tensors and
    leaves the uploads' views unmade; reading them then gives the received values."""
    from hffm.aggregation import FedAvg

    mods = [make_module("adapter.0", SHAPES, seed=s, num_samples=n) for s, n in ((1, 10), (2, 30), (3, 60))]
    spec = spec_of({"adapter.0": mods[0].tensors})
    dec = [_decode(encode_module(m), spec) for m in mods]
    assert all(d.numel() == mods[0].numel() and d.shapes() == spec["adapter.0"] for d in dec)
    agg = FedAvg()
    for i, d in enumerate(dec):
        agg.add(f"d{i}", [d])
    out = agg.result(1)["adapter.0"]
    assert all("_tensors" in d.__dict__ and not isinstance(d.__dict__["_tensors"], dict) for d in dec)
    for k in SHAPES:
        want = sum(m.tensors[k].double() * m.num_samples for m in mods) / 100
        assert torch.allclose(out.tensors[k].double(), want, atol=1e-6)
        assert all(torch.equal(d.tensors[k], m.tensors[k]) for d, m in zip(dec, mods, strict=True))
    assert all(isinstance(d.__dict__["_tensors"], dict) for d in dec)


T = torch.arange(6, dtype=torch.float32).numpy().tobytes()  # 24 B: a (2, 3) fp32 tensor


@pytest.mark.parametrize(
    "blob, why",
    [
        (b"\x05\x00", "shorter"),
        (b"\xff" * 8 + b"{}", "runs past"),
        (_blob({}, b"")[:8] + b"not json", "not JSON"),
        (_blob({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, T)[:-1], "cover"),
        (_blob({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, T[:20]), "do not hold"),
        (_blob({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}, T + b"0000"), "gap"),
        (
            _blob(
                {
                    "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                    "y": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]},
                },
                T,
            ),
            "gap or overlap",
        ),
        (_blob({"x": {"dtype": "Q7", "shape": [2, 3], "data_offsets": [0, 24]}}, T), "unknown dtype"),
        (_blob({"x": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}, T), "non-negative"),
        (_blob({"x": {"dtype": "F32", "shape": [2, 3]}}, T), "exactly"),
        (_blob([1, 2], b""), "object"),
        (_blob({"__metadata__": {"a": 1}}, b""), "strings"),
        (len(b"[" * 50_000).to_bytes(8, "little") + b"[" * 50_000, "nested too deeply"),  # no RecursionError
    ],
)
def test_malformed_safetensors_rejected_like_the_library(blob, why):
    from safetensors.torch import load as st_load

    from hffm.modules import parse_safetensors

    with pytest.raises(ValueError, match=why):
        parse_safetensors(blob)
    with pytest.raises(Exception):  # noqa: B017 - the library refuses every one of them too
        st_load(blob)
    with pytest.raises(ModuleError) as e:
        _decode_blob(blob, {"m": {"x": (2, 3)}}, name="m")
    assert e.value.reason == "bad_encoding"


def test_parallel_encoding_gives_the_same_blobs():
    from hffm.modules import encode_modules

    big = {"w": (1024, 640), "b": (640,)}
    mods = [make_module(f"adapter.{i}", big, seed=i) for i in range(4)]
    par = encode_modules(mods, "fp32", workers=4)
    ser = [encode_module(m, "fp32") for m in mods]
    assert [e.name for e in par] == [m.name for m in mods]
    assert [(bytes(a.data), a.digest) for a in par] == [(bytes(b.data), b.digest) for b in ser]


def _assemble(h, ems, spec, piece_sizes):
    """Feed each module's blob in pieces of the given sizes (cycled), as a sender with odd chunks would."""
    asm = PushAssembler(h, spec)
    for i, em in enumerate(ems):
        off, k = 0, 0
        while off < em.size_bytes:
            n = piece_sizes[k % len(piece_sizes)]
            asm.add_chunk(i, off, bytes(em.data[off : off + n]))
            off, k = off + n, k + 1
    return asm


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pieces", [[4096], [4095], [1, 7, 3, 1000], [CHUNK_BYTES], [MAX_CHUNK_BYTES]])
def test_finiteness_checked_on_arrival_whatever_the_chunking(wire, pieces):
    """A NaN or Inf anywhere (a value split across chunks included) is caught by the check made as the
    bytes arrive, and the push is rejected naming the tensor; clean pushes decode to the same values."""
    m = make_module("adapter.0", SHAPES)
    spec = spec_of({m.name: m.tensors})
    h, ems = _push([m], wire)
    asm = _assemble(h, ems, spec, pieces)
    assert asm._checks[0].finite is True
    assert asm._checks[0].digest() == ems[0].digest
    back = asm.finish()[0]
    assert torch.equal(back.tensors["a.up.weight"], _decode(ems[0], spec).tensors["a.up.weight"])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for key, pos in (("a.down.bias", 0), ("a.up.weight", 1023), ("a.up.weight", -1)):
            t = {k: v.clone() for k, v in m.tensors.items()}
            t[key].view(-1)[pos] = bad
            h2, ems2 = _push([Module("adapter.0", t, 1, 1.0)], wire)
            asm = _assemble(h2, ems2, spec, pieces)
            assert asm._checks[0].finite is False
            with pytest.raises(ModuleError, match=f"tensor {key} has NaN or Inf") as e:
                asm.finish()
            assert e.value.reason == "non_finite"


def test_finiteness_left_to_decode_when_the_data_region_is_unaligned():
    """A valid blob from another writer whose data does not start on a 4-byte boundary: the arrival check
    cannot view it as floats, says so (None), and decode_module checks it itself."""
    import json
    import struct

    from hffm.modules import ArrivalCheck

    vals = torch.tensor([1.0, float("nan"), 3.0])
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    hdr += b" " * ((5 - len(hdr)) % 8)  # 8 + len(hdr) = 5 (mod 8): misaligned
    blob = bytearray(struct.pack("<Q", len(hdr)) + hdr + vals.numpy().tobytes())
    assert (8 + len(hdr)) % 4
    chk = ArrivalCheck("fp32", len(blob))
    chk.update(blob, len(blob))
    assert chk.finite is None and chk.digest() == digest_of(blob)
    with pytest.raises(ModuleError, match="NaN or Inf"):
        _decode_blob(blob, {"m": {"x": (3,)}}, name="m", computed_digest=chk.digest(), finite=chk.finite)


def test_fp32_encoding_is_the_tensors_own_storage():
    """The zero-copy encode (a speed-up kept under test): an fp32 blob is the header followed by views of
    the module's tensors, no copy of their bytes; the blob is still exactly what the library writes."""
    from safetensors.torch import load as st_load

    m = make_module("adapter.0", SHAPES)
    em = encode_module(m)
    ptrs = {np_ptr(seg) for seg in em.segments[1:]}
    assert ptrs == {t.data_ptr() for t in m.tensors.values()}
    back = st_load(em.data)
    assert all(torch.equal(back[k], m.tensors[k]) for k in SHAPES)
    # fp16 is a cast: one buffer of its own, the tensors untouched
    em16 = encode_module(m, "fp16")
    assert len(em16.segments) == 2 and np_ptr(em16.segments[1]) not in ptrs


def np_ptr(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


@pytest.mark.parametrize("chunk", [1024, 4096, 100_000, CHUNK_BYTES, MAX_CHUNK_BYTES])
def test_chunk_pieces_cut_the_segments_into_full_chunks(chunk):
    """Chunks span segment (tensor) boundaries: every chunk but a module's last is exactly ``chunk``
    bytes, offsets are contiguous, and the pieces concatenated are the blob."""
    from hffm.wire import chunk_pieces

    mods = [make_module("adapter.0", SHAPES), make_module("head.x", {"w": (3, 5), "b": (3,)}, seed=2)]
    ems = [encode_module(m) for m in mods]
    got: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}
    for i, off, pieces in chunk_pieces(ems, chunk):
        got[i].append((off, b"".join(pieces)))
    for i, em in enumerate(ems):
        offs = [o for o, _ in got[i]]
        sizes = [len(b) for _, b in got[i]]
        assert offs == list(range(0, em.size_bytes, chunk))
        assert all(n == chunk for n in sizes[:-1]) and 0 < sizes[-1] <= chunk
        assert b"".join(b for _, b in got[i]) == em.data
    assert [(i, o, bytes(d)) for i, o, d in chunks(ems, chunk)] == [(i, o, b) for i in (0, 1) for o, b in got[i]]
