"""Modules: the unit of exchange, and their safetensors encoding.

A ``Module`` is a named set of fp32 tensors (one Double-Adapter or one task head) with the round
that produced it (``version``) and the number of samples behind it (its FedAvg weight). On the wire
a module is one safetensors blob (never pickle) in the configured wire dtype, identified by a digest
of its bytes (``DIGESTS``: BLAKE3 by default, SHA-256 accepted; the algorithm's name travels with the
digest, so the format stays open). ``decode_module`` checks everything a receiver must check before
the module may touch any state: digest, header/metadata agreement, tensor names, shapes, dtype,
finiteness.

The wire codec writes and reads the safetensors format itself (8-byte little-endian header length,
JSON header, tensor bytes), because the library's in-memory API copies every tensor twice each way
(``docs/performance.md``): ``encode_module`` makes no copy of fp32 tensors (the blob is the header
followed by views of the tensors' own storage; module tensors are never changed in place, so the
views stay valid) and casts fp16/bf16 once into one buffer; the digest is computed once per encoding.
``decode_module`` returns tensors that are views of the received buffer (``torch.frombuffer``), after
the same format checks the library makes (header bounds, dtypes, offsets covering the data exactly,
no overlap); checked header layouts are memoised by header bytes, and the views are made when
``Module.tensors`` is first read (an aggregator folding ``Module.flat`` never reads them). Tests check
both directions against the safetensors library; ``save_modules`` writes files with the same encoder,
``load_modules`` reads them with the library.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import blake3
import torch

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class ModuleError(ValueError):
    """A module (or a push of modules) is rejected. ``code`` maps to a gRPC status code name,
    ``reason`` is a short bounded label (metrics)."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


# Module digests: name -> (new hasher, digest size). BLAKE3 is the default (one core hashes ~4x faster
# than SHA-256: 6.7 against 1.7 GB/s here); SHA-256 is accepted from senders configured for it.
DIGESTS = {
    "blake3": (blake3.blake3, 32),
    "sha256": (hashlib.sha256, 32),
}
DEFAULT_DIGEST = "blake3"


def _digest(alg: str) -> tuple:
    """``DIGESTS[alg]``; ModuleError (INVALID_ARGUMENT) for an algorithm we do not know."""
    if alg not in DIGESTS:
        known = sorted(DIGESTS)
        raise ModuleError("INVALID_ARGUMENT", "bad_digest", f"unknown digest algorithm {alg!r} (know {known})")
    return DIGESTS[alg]


def digest_size(alg: str) -> int:
    """Bytes in an ``alg`` digest; ModuleError for an unknown algorithm."""
    return _digest(alg)[1]


def new_hasher(alg: str):
    """An incremental hasher (``update``/``digest``) of ``alg``; ModuleError for an unknown one."""
    return _digest(alg)[0]()


def digest_of(data, alg: str = DEFAULT_DIGEST) -> bytes:
    """The ``alg`` digest of one bytes-like object or of a sequence of them (concatenated)."""
    h = new_hasher(alg)
    for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        h.update(piece)
    return h.digest()


class _Views(NamedTuple):
    """A decoded module's tensors before anyone asked for them: the names, element counts and shapes
    of its views of ``flat``, in offset order."""

    flat: torch.Tensor
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]

    def build(self) -> dict[str, torch.Tensor]:
        parts = self.flat.split_with_sizes(self.sizes)  # one call: the 1-D pieces
        return {k: p if len(s) == 1 else p.view(s) for k, p, s in zip(self.keys, parts, self.shapes, strict=True)}


def flat_views(flat: torch.Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` with these shapes, in sorted-key order without gaps (a module's ``flat`` layout)."""
    keys = tuple(sorted(shapes))
    dims = tuple(tuple(shapes[k]) for k in keys)
    return _Views(flat, keys, tuple(math.prod(d) for d in dims), dims).build()


class _Tensors:
    """``Module.tensors``: a plain dict, except that a decoded module builds its views of the receive
    buffer the first time they are read. An aggregator that folds ``Module.flat`` in one operation never
    reads them, and making a dozen views costs more than the fold of a small module
    (docs/performance.md)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: object, objtype: type | None = None) -> dict[str, torch.Tensor]:
        if obj is None:  # the class itself: the field has no default
            raise AttributeError(self.slot)
        v = obj.__dict__[self.slot]
        if type(v) is _Views:
            v = obj.__dict__[self.slot] = v.build()
        return v

    def __set__(self, obj: object, value: Mapping[str, torch.Tensor] | _Views) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Module:
    name: str
    tensors: dict[str, torch.Tensor] = _Tensors()  # type: ignore[assignment]
    version: int
    num_samples: float
    # When set: one contiguous fp32 tensor of which ``tensors`` are views, laid out in sorted-key order
    # without gaps (what ``decode_module`` returns). Aggregators then fold a module in one operation.
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # True only for a module decoded into a receive buffer that nothing else refers to (``PushAssembler``
    # with ``owned=True``): an aggregator may then fold it in place, using that buffer as its running
    # sum instead of allocating one. Every other module's tensors are never changed in place.
    owned: bool = field(default=False, repr=False, compare=False)

    def numel(self) -> int:
        v = self.__dict__["_tensors"]
        return sum(v.sizes) if type(v) is _Views else sum(t.numel() for t in v.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape, without building a decoded module's views."""
        v = self.__dict__["_tensors"]
        if type(v) is _Views:
            return dict(zip(v.keys, v.shapes, strict=True))
        return {k: tuple(t.shape) for k, t in v.items()}


ModuleSet = dict[str, Module]

# name -> {param name -> shape}: what a receiver accepts for each module.
ModuleSpec = dict[str, dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class EncodedModule:
    """One module's safetensors blob as a sequence of byte segments (the header, then the tensor data:
    views of the tensors' own storage for fp32, one cast buffer for fp16/bf16), never modified once
    encoded, and its digest."""

    name: str
    version: int
    num_samples: float
    dtype: str
    segments: tuple[memoryview, ...] = field(repr=False)
    digest: bytes = field(repr=False)
    digest_alg: str = DEFAULT_DIGEST

    @property
    def size_bytes(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def data(self) -> bytes:
        """The blob as one bytes object: a copy, for tests and tools (pushes stream the segments)."""
        return b"".join(self.segments)


def spec_of(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> ModuleSpec:
    return {name: {k: tuple(t.shape) for k, t in tensors.items()} for name, tensors in modules.items()}


# safetensors dtype codes of the wire dtypes; other codes are valid safetensors but never a module
ST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_ST_DTYPES = {v: k for k, v in ST_CODES.items()}
_ST_OTHER = {"F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
if sys.byteorder != "little":  # safetensors is little-endian; the codec writes and views memory as is
    raise ImportError("hffm's wire codec needs a little-endian host")


def _segments(module: Module, wire_dtype: str) -> tuple[memoryview, ...]:
    meta = {
        "name": module.name,
        "version": str(module.version),
        "num_samples": repr(float(module.num_samples)),
        "dtype": wire_dtype,
    }
    return _encode(module.tensors, WIRE_DTYPES[wire_dtype], meta)


def _encoded(
    module: Module, wire_dtype: str, segments: tuple[memoryview, ...], digest_alg: str, digest: bool = True
) -> EncodedModule:
    return EncodedModule(
        name=module.name,
        version=module.version,
        num_samples=float(module.num_samples),
        dtype=wire_dtype,
        segments=segments,
        digest=digest_of(segments, digest_alg) if digest else b"",
        digest_alg=digest_alg,
    )


def encode_module(module: Module, wire_dtype: str = "fp32", digest_alg: str = DEFAULT_DIGEST) -> EncodedModule:
    """One safetensors blob and its digest: fp32 tensors are not copied (their storage is the blob's
    data), fp16/bf16 ones are cast once into one buffer."""
    return _encoded(module, wire_dtype, _segments(module, wire_dtype), digest_alg)


def encode_modules(
    modules: list[Module],
    wire_dtype: str = "fp32",
    workers: int | None = None,
    digest_alg: str = DEFAULT_DIGEST,
    digest: bool = True,
) -> list[EncodedModule]:
    """``encode_module`` of each: the blobs are laid out on the calling thread, then digested on up to
    ``workers`` threads (default: the CPU count, at most 8), as the digest releases the GIL. Laying out
    is Python work that holds the GIL: done on the pool too, it kept the digesting threads waiting for
    the GIL (measured: no faster than one thread). Small sets (under 1 Mi elements) are digested on the
    calling thread. ``digest=False``: laid out only, the digests left empty (``digest_of`` of the
    segments computes them later, e.g. while the blobs stream: ``wire.digests: trailer``)."""
    segments = [_segments(m, wire_dtype) for m in modules]
    if not digest:
        return [_encoded(m, wire_dtype, s, digest_alg, False) for m, s in zip(modules, segments, strict=True)]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(modules) < 2 or sum(m.numel() for m in modules) < 1 << 20:
        return [_encoded(m, wire_dtype, s, digest_alg) for m, s in zip(modules, segments, strict=True)]
    with ThreadPoolExecutor(max_workers=min(workers, len(modules))) as pool:
        return list(pool.map(lambda m, s: _encoded(m, wire_dtype, s, digest_alg), modules, segments))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a view of its storage (which the view keeps alive)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _encode(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, meta: dict[str, str]) -> tuple[memoryview, ...]:
    item = dtype.itemsize
    header: dict[str, object] = {}
    off = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * item
        header[k] = {"dtype": ST_CODES[dtype], "shape": list(tensors[k].shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = meta
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # tensor data starts 8-byte aligned, as the library writes it
    head = memoryview(struct.pack("<Q", len(hjson)) + hjson)
    if dtype == torch.float32:  # no copy: the tensors' own bytes, in order (CPU, contiguous, fp32)
        views = []
        for k in sorted(tensors):
            t = tensors[k].detach()
            if t.numel():
                t = t.to("cpu", torch.float32).contiguous()
                views.append(_bytes_of(t))
        return (head, *views)
    buf = torch.empty(off, dtype=torch.uint8)  # not zero-filled: every byte is written below
    for k in sorted(tensors):
        t = tensors[k].detach()
        begin, end = header[k]["data_offsets"]  # type: ignore[index]
        if end > begin:
            buf[begin:end].view(dtype).copy_(t.reshape(-1))
    return (head, _bytes_of(buf)) if off else (head,)


def _header_length(data: bytes | bytearray | memoryview, n_all: int) -> int:
    """The JSON header's length from a blob of ``n_all`` bytes whose first 8 are in ``data``; ValueError
    when it cannot be one (past the blob, or over the library's bound)."""
    if n_all < 8 or len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > min(n_all - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} runs past the {n_all} B blob")
    return n


TensorEntry = tuple[str, tuple[int, ...], int, int]  # (safetensors dtype code, shape, begin, end)
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def _by_offsets(e: tuple[str, TensorEntry]) -> tuple[int, int]:
    return e[1][2], e[1][3]


class _Layout(NamedTuple):
    """A checked safetensors header: what ``parse_safetensors`` returns, and what decoding needs of it."""

    entries: dict[str, TensorEntry]  # never changed once made (the layouts are shared, cached)
    meta: dict[str, str]
    base: int  # where the data starts
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype | None  # the one wire dtype of every tensor, else None
    keys: tuple[str, ...]  # in offset order
    sizes: tuple[int, ...]  # element counts in offset order (when ``dtype`` is set)
    sorted: bool  # offset order is name order: the data region is the module's ``flat`` layout


def parse_safetensors(data: bytes | bytearray | memoryview) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Check a safetensors blob's structure as the library does; return ``({name: (dtype code, shape,
    begin, end)}, metadata, data start)`` with offsets relative to the data start. Raises ValueError."""
    lay = _layout(data)
    return dict(lay.entries), dict(lay.meta), lay.base


_CACHED_HEADER_BYTES = 65_536  # a module's header is ~1 KB; bigger ones are parsed every time


def _layout(data: bytes | bytearray | memoryview) -> _Layout:
    """The checked layout of a blob. A node receives the same few headers every round (the same module
    names, shapes and dtype from every sender), so layouts are memoised by header bytes and blob size:
    the JSON and its checks run once per distinct header, not once per module received."""
    n_all = len(data)
    n = _header_length(data, n_all)
    head = bytes(data[8 : 8 + n])
    if n <= _CACHED_HEADER_BYTES:
        return _cached_layout(head, n_all)
    return _parse_layout(head, n_all)


def _parse_layout(head: bytes, n_all: int) -> _Layout:
    n = len(head)
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"header is not JSON: {err}") from None
    except RecursionError:  # "[[[[..." a few thousand deep: not a safetensors header, and no stack trace
        raise ValueError("header is not a safetensors header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise ValueError("__metadata__ must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if type(info) is not dict or len(info) != 3 or not _ENTRY_KEYS.issuperset(info):
            raise ValueError(f"tensor {name}: entry must have exactly dtype, shape, data_offsets")
        code, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _ST_DTYPES and code not in _ST_OTHER:
            raise ValueError(f"tensor {name}: unknown dtype {code!r}")
        if type(shape) is not list:
            raise ValueError(f"tensor {name}: shape must be a list of non-negative integers")
        for d in shape:
            if type(d) is not int or d < 0:
                raise ValueError(f"tensor {name}: shape must be a list of non-negative integers")
        if not (type(offs) is list and len(offs) == 2 and type(offs[0]) is int and type(offs[1]) is int):
            raise ValueError(f"tensor {name}: data_offsets must be [begin, end] with 0 <= begin <= end")
        begin, end = offs
        if not 0 <= begin <= end:
            raise ValueError(f"tensor {name}: data_offsets must be [begin, end] with 0 <= begin <= end")
        entries[name] = (code, tuple(shape), begin, end)
    pos = 0
    by_offset = sorted(entries.items(), key=_by_offsets)
    for name, (code, shape, begin, end) in by_offset:
        if begin != pos:
            raise ValueError(f"tensor {name}: data starts at {begin}, expected {pos} (gap or overlap)")
        if code in _ST_DTYPES and end - begin != math.prod(shape) * _ST_DTYPES[code].itemsize:
            raise ValueError(f"tensor {name}: {end - begin} B do not hold shape {list(shape)} of {code}")
        pos = end
    if pos != n_all - 8 - n:
        raise ValueError(f"tensors cover {pos} B of the {n_all - 8 - n} B of data")
    dtypes = {_ST_DTYPES.get(code) for code, _, _, _ in entries.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    keys = tuple(k for k, _ in by_offset)
    return _Layout(
        entries=entries,
        meta=meta,
        base=8 + n,
        shapes={k: e[1] for k, e in entries.items()},
        dtype=dtype,
        keys=keys,
        sizes=tuple((e - b) // dtype.itemsize for _, (_, _, b, e) in by_offset) if dtype is not None else (),
        sorted=list(keys) == sorted(keys),
    )


_cached_layout = functools.lru_cache(maxsize=128)(_parse_layout)


def expected_size_bound(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Largest plausible encoded size of a module of these shapes (fp32 + header slack)."""
    numel = sum(math.prod(s) for s in shapes.values())
    return numel * 4 + 16_384 + 256 * len(shapes)


class ArrivalCheck:
    """What a receiver computes on a module's bytes as they arrive, each chunk once while it is still
    in cache: the digest of the blob (the header's algorithm), and whether every value of its data region is finite.

    Call ``update(buf, end)`` after bytes up to ``end`` of ``buf`` (the module's receive buffer) were
    written. ``finite`` is True/False once the whole blob went through, or None when it could not be
    decided on the way (a header length that does not fit, a data region not aligned to the wire
    dtype): ``decode_module`` then checks finiteness itself. The finiteness decided here concerns the
    bytes from the header's end to the blob's end, which ``decode_module`` accepts only if they are
    exactly the tensors' data, all in the wire dtype."""

    def __init__(self, wire_dtype: str, size: int, digest_alg: str = DEFAULT_DIGEST) -> None:
        self.hasher = new_hasher(digest_alg)
        self._dtype = WIRE_DTYPES.get(wire_dtype)
        self._size = size
        self._hashed = 0  # bytes hashed so far
        self._checked = -1  # data region checked up to here; -1: data start not known yet
        self._finite: bool | None = None if self._dtype is None else True

    def update(self, buf: bytearray, end: int) -> None:
        self.hasher.update(memoryview(buf)[self._hashed : end])
        self._hashed = end
        if self._finite is not True:  # decided (a NaN/Inf seen) or left to decode_module
            return
        item = self._dtype.itemsize
        if self._checked < 0:
            if end < 8:
                return
            try:
                base = 8 + _header_length(buf, self._size)
            except ValueError:
                base = -1  # decode_module rejects the blob
            if base < 0 or base % item:
                self._finite = None
                return
            self._checked = base
        stop = self._checked + (max(0, end - self._checked) // item) * item
        if stop > self._checked:
            t = torch.frombuffer(buf, dtype=self._dtype, count=(stop - self._checked) // item, offset=self._checked)
            if not all_finite(t):
                self._finite = False
            self._checked = stop

    @property
    def finite(self) -> bool | None:
        """True/False when the whole data region was checked on arrival, else None."""
        if self._finite is False:
            return False
        return self._finite if self._checked == self._size == self._hashed else None

    def digest(self) -> bytes:
        return self.hasher.digest()


def decode_module(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    version: int,
    num_samples: float,
    dtype: str,
    digest: bytes,
    spec: ModuleSpec,
    digest_alg: str = DEFAULT_DIGEST,
    computed_digest: bytes | None = None,
    finite: bool | None = None,
) -> Module:
    """Verify and decode one module blob received with the given header fields.

    ``computed_digest``: the ``digest_alg`` digest of ``data`` when the caller already hashed it (incrementally, as
    chunks arrived); otherwise it is computed here. ``finite``: True when the caller checked on arrival
    that every value of the data region is finite (``ArrivalCheck``); otherwise it is checked here."""
    if name not in spec:
        raise ModuleError("INVALID_ARGUMENT", "unknown_module", f"unknown module name {name!r}")
    if dtype not in WIRE_DTYPES:
        raise ModuleError("INVALID_ARGUMENT", "bad_dtype", f"module {name}: unsupported wire dtype {dtype!r}")
    got = computed_digest if computed_digest is not None else digest_of(data, digest_alg)
    if got != digest:
        raise ModuleError(
            "DATA_LOSS", "digest_mismatch", f"module {name}: {digest_alg} digest of the bytes does not match the header"
        )
    if not (math.isfinite(num_samples) and num_samples > 0):
        raise ModuleError("INVALID_ARGUMENT", "bad_weight", f"module {name}: num_samples must be > 0")
    if isinstance(data, memoryview):
        data = data.obj if isinstance(data.obj, bytearray) and len(data.obj) == len(data) else bytearray(data)
    elif not isinstance(data, bytearray):  # tensors must not alias an immutable buffer
        data = bytearray(data)
    try:
        lay = _layout(data)
    except ValueError as err:
        raise ModuleError("INVALID_ARGUMENT", "bad_encoding", f"module {name}: not a safetensors blob: {err}") from None
    want = spec[name]
    wire = WIRE_DTYPES[dtype]
    if lay.shapes != want or lay.dtype != wire:  # the common case is one dict comparison; then say why
        _layout_error(name, lay, want, wire, dtype)
    # Every tensor has the wire dtype and together they tile the data region (_parse_layout), so the
    # region is one array: one view of the buffer, one cast, one finiteness check for the module. Its
    # tensors are views of it, made when first read (``_Tensors``).
    region = _region(data, wire, lay.base)
    views = _Views(region, lay.keys, lay.sizes, tuple(lay.shapes[k] for k in lay.keys))
    if finite is not True and not all_finite(region):
        out = views.build()
        bad = next(k for k, t in out.items() if not all_finite(t))
        raise ModuleError("INVALID_ARGUMENT", "non_finite", f"module {name}: tensor {bad} has NaN or Inf")
    flat = region if lay.sorted else None
    return Module(name=name, tensors=views, version=version, num_samples=float(num_samples), flat=flat)  # type: ignore[arg-type]


def _layout_error(name: str, lay: _Layout, want: Mapping[str, tuple[int, ...]], wire: torch.dtype, dtype: str) -> None:
    """Raise the ModuleError saying how a blob's tensors differ from the spec's or from the header's
    dtype; return if they do not (a spec whose shapes are lists, a module without tensors)."""
    if set(lay.entries) != set(want):
        missing = sorted(set(want) - set(lay.entries))
        extra = sorted(set(lay.entries) - set(want))
        raise ModuleError(
            "INVALID_ARGUMENT", "shape_mismatch", f"module {name}: tensors missing {missing}, unexpected {extra}"
        )
    for key, (code, shape, _, _) in lay.entries.items():
        if shape != tuple(want[key]):
            raise ModuleError(
                "INVALID_ARGUMENT",
                "shape_mismatch",
                f"module {name}: tensor {key} has shape {shape}, expected {tuple(want[key])}",
            )
        if _ST_DTYPES.get(code) != wire:
            raise ModuleError(
                "INVALID_ARGUMENT",
                "dtype_mismatch",
                f"module {name}: tensor {key} is {_DTYPE_NAMES.get(_ST_DTYPES.get(code), code)}, header says {dtype}",
            )


def _region(buf: bytearray, dtype: torch.dtype, base: int) -> torch.Tensor:
    """The data region of a blob as fp32: a view of ``buf`` (no copy) for aligned fp32, else one cast."""
    n = (len(buf) - base) // dtype.itemsize
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    if base % dtype.itemsize == 0:
        raw = torch.frombuffer(buf, dtype=dtype, count=n, offset=base)
    else:  # a valid but unaligned blob (not one we write): copy it once
        raw = torch.frombuffer(bytearray(buf[base:]), dtype=dtype)
    return raw.to(torch.float32)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. One reduction (a sum is finite only if every element is; half types are
    summed in fp32); only when the sum is not finite — a NaN/Inf, or finite values overflowing the sum —
    the exact element-wise check decides."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def save_modules(modules: ModuleSet, path: str) -> None:
    """All modules in one safetensors file, keys ``<module>/<param>``, versions in the metadata, written
    by the wire codec's encoder: the header (keys sorted: the same modules give the same bytes), then
    the fp32 tensors' own storage, each written once into the file (the library's ``save`` made three
    copies of the whole set first: 150 ms of a 38 MB checkpoint here). ``load_modules`` reads it with
    the library."""
    segments = checkpoint_segments(modules)
    with open(path, "wb") as f:
        for seg in segments:
            f.write(seg)


def checkpoint_segments(modules: ModuleSet) -> tuple[memoryview, ...]:
    """The bytes ``save_modules`` writes, as views (the header, then each tensor's own storage): the same
    modules give the same bytes, so a digest of them names the file's content."""
    flat = {f"{n}/{k}": v for n, m in modules.items() for k, v in m.tensors.items()}
    meta = {f"{n}/version": str(m.version) for n, m in modules.items()}
    meta.update({f"{n}/num_samples": repr(float(m.num_samples)) for n, m in modules.items()})
    return _encode(flat, torch.float32, dict(sorted(meta.items())))


def load_modules(path: str) -> ModuleSet:
    from safetensors import safe_open

    out: ModuleSet = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            name, param = key.split("/", 1)
            m = out.setdefault(
                name,
                Module(name, {}, int(meta.get(f"{name}/version", 0)), float(meta.get(f"{name}/num_samples", 1))),
            )
            m.tensors[param] = f.get_tensor(key)
    return out
