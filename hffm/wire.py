"""Chunked module streams, independent of gRPC.

A push is a header (who sends which modules, for which round and collect step) followed by the
modules' bytes in chunks of at most ``chunk_bytes`` (1 MiB), module by module, offsets contiguous.
``chunks`` produces that sequence; ``PushAssembler`` consumes it and refuses anything truncated,
out of order, oversized or not matching its digest, before any state is touched.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from hffm.modules import (
    ArrivalCheck,
    EncodedModule,
    Module,
    ModuleError,
    ModuleSpec,
    decode_module,
    digest_size,
    expected_size_bound,
)

MAX_CHUNK_BYTES = 4 << 20  # the largest chunk any transport carries (wire.bulk_chunk_bytes)
CHUNK_BYTES = 1 << 20  # a chunk over gRPC (wire.chunk_bytes)


@dataclass(frozen=True)
class ModuleHeader:
    name: str
    version: int
    num_samples: float
    size_bytes: int
    digest: bytes
    dtype: str
    digest_alg: str

    @classmethod
    def of(cls, em: EncodedModule) -> ModuleHeader:
        return cls(em.name, em.version, em.num_samples, em.size_bytes, em.digest, em.dtype, em.digest_alg)


@dataclass(frozen=True)
class PushHeader:
    push_id: str
    sender: str
    receiver: str
    round: int
    tag: str
    link: str
    modules: tuple[ModuleHeader, ...]
    route: tuple[str, ...] = field(default=())  # hops still to go after the receiver (D2D relay)
    attempt: int = 0  # the round's attempt (a round re-run after an abort is a new attempt)
    signature: bytes = b""  # the sender's signature over signed_bytes() (with security on)
    sender_cert: bytes = b""  # the sender's certificate (PEM): the receiver checks it against the CA

    def signed_bytes(self) -> bytes:
        """What the sender signs: everything a relay must not change (all but ``route``, which shrinks
        hop by hop, and the signature itself), in one canonical encoding."""
        doc = {
            "push_id": self.push_id,
            "sender": self.sender,
            "receiver": self.receiver,
            "round": self.round,
            "attempt": self.attempt,
            "tag": self.tag,
            "link": self.link,
            "modules": [
                [m.name, m.version, repr(float(m.num_samples)), m.size_bytes, m.digest_alg, m.digest.hex(), m.dtype]
                for m in self.modules
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push_id_for(sender: str, receiver: str, round_: int, tag: str, attempt: int = 0) -> str:
    """Deterministic id: a client's retry of the same push carries the same id."""
    return f"{sender}>{receiver}@{round_}.{attempt}/{tag}"


def chunk_pieces(
    encoded: Sequence[EncodedModule], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[int, int, tuple[memoryview, ...]]]:
    """(module_index, offset, pieces) for every chunk of every module, in order: a chunk is
    ``chunk_bytes`` of its module (the last one less), given as views of the module's segments
    (no copy); the consumer writes them into one message."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")
    for i, em in enumerate(encoded):
        if em.size_bytes == 0:
            yield i, 0, ()
            continue
        off, pieces, have = 0, [], 0
        for seg in em.segments:
            pos = 0
            while pos < len(seg):
                take = min(len(seg) - pos, chunk_bytes - have)
                pieces.append(seg[pos : pos + take])
                pos += take
                have += take
                if have == chunk_bytes:
                    yield i, off, tuple(pieces)
                    off, pieces, have = off + have, [], 0
        if have:
            yield i, off, tuple(pieces)


def chunks(encoded: Sequence[EncodedModule], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, memoryview]]:
    """(module_index, offset, bytes) for every chunk of every module, in order: ``chunk_pieces``
    with each chunk's pieces joined (a view when the chunk lies in one segment, else a copy)."""
    for i, off, pieces in chunk_pieces(encoded, chunk_bytes):
        yield i, off, pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


def _bytearray_unfilled() -> Callable[[int], bytearray]:
    """``n -> bytearray`` without zeroing it first (CPython's ``PyByteArray_FromStringAndSize(NULL, n)``):
    a receive buffer is written whole, chunk by chunk, before anything reads it, and zeroing 38 MB cost
    the receiver 4-5 ms per push. ``bytearray`` elsewhere."""
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # not CPython
        return bytearray
    make.restype, make.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    return lambda n: make(None, n)


# A receive buffer's bytes are read only up to where chunks wrote them (the arrival checks), and only a
# push whose every byte came (``finish``) is decoded: what the allocation held before is never read.
_unfilled = _bytearray_unfilled()


def digests_follow(header: PushHeader) -> bool:
    """Whether the push's digests follow its chunks (in a trailer): every module digest is empty. A sender
    computes them while the chunks stream instead of before the first byte (``wire.digests: trailer``)."""
    return bool(header.modules) and all(not m.digest for m in header.modules)


def _check_digest(m: ModuleHeader, digest: bytes, empty_ok: bool) -> None:
    try:
        want = digest_size(m.digest_alg)
    except ModuleError as err:  # an unknown algorithm: INVALID_ARGUMENT, naming the module
        raise ModuleError(err.code, err.reason, f"module {m.name}: {err}") from None
    if len(digest) != want and not (empty_ok and not digest):
        raise ModuleError(
            "INVALID_ARGUMENT",
            "bad_digest",
            f"module {m.name}: digest is {len(digest)} B, {m.digest_alg} digests are {want} B",
        )


ALLOCATE_AHEAD = 8 << 20  # receive buffers made ahead of the chunk being checked (``PushAssembler``)


class PushAssembler:
    """Reassembles and verifies one push. Feed ``add_chunk`` in stream order, then ``finish``."""

    def __init__(
        self, header: PushHeader, spec: ModuleSpec, max_chunk_bytes: int = MAX_CHUNK_BYTES, owned: bool = False
    ) -> None:
        """``owned``: the modules ``finish`` returns are the caller's alone (nothing else will read them,
        a trace included), so an aggregator may fold them in place (``Module.owned``)."""
        if not header.modules:
            raise ModuleError("INVALID_ARGUMENT", "empty_push", "push carries no modules")
        names = [m.name for m in header.modules]
        if len(set(names)) != len(names):
            raise ModuleError("INVALID_ARGUMENT", "duplicate_module", "push names a module twice")
        for m in header.modules:
            if m.name not in spec:
                raise ModuleError("INVALID_ARGUMENT", "unknown_module", f"unknown module name {m.name!r}")
            bound = expected_size_bound(spec[m.name])
            if not 0 < m.size_bytes <= bound:
                raise ModuleError(
                    "INVALID_ARGUMENT",
                    "bad_size",
                    f"module {m.name}: declared size {m.size_bytes} B outside (0, {bound}]",
                )
            _check_digest(m, m.digest, empty_ok=digests_follow(header))
        self.header = header
        self.spec = spec
        self.max_chunk_bytes = max_chunk_bytes
        self.owned = owned
        self._bufs: list[bytearray | None] = [None] * len(header.modules)
        # digest and finiteness of each module, updated as its chunks arrive, while each chunk is in
        # cache (the hashers release the GIL on large updates: hashing overlaps with receiving the next chunk)
        self._checks = [ArrivalCheck(m.dtype, m.size_bytes, m.digest_alg) for m in header.modules]
        self._index = 0
        self._offset = 0
        self.bytes_received = 0
        self._alloc = threading.Lock()  # ``place`` runs on a transport's reader thread
        self._allocate_ahead(0)

    def complete(self, digests: Sequence[bytes], signature: bytes) -> PushHeader:
        """A push whose digests follow its chunks (``digests_follow``): the header with the trailer's
        ``digests`` and ``signature`` in, which ``finish`` then checks the blobs against (and the caller
        the signature). INVALID_ARGUMENT when the digests do not fit the header's modules."""
        if not digests_follow(self.header):
            raise ModuleError("INVALID_ARGUMENT", "unexpected_trailer", "a trailer, after a header with its digests")
        if len(digests) != len(self.header.modules):
            raise ModuleError(
                "INVALID_ARGUMENT",
                "bad_digest",
                f"the trailer carries {len(digests)} digests for {len(self.header.modules)} modules",
            )
        for m, d in zip(self.header.modules, digests, strict=True):
            _check_digest(m, d, empty_ok=False)
        mods = tuple(replace(m, digest=bytes(d)) for m, d in zip(self.header.modules, digests, strict=True))
        self.header = replace(self.header, modules=mods, signature=bytes(signature))
        return self.header

    def _buffer(self, i: int) -> bytearray:
        buf = self._bufs[i]
        if buf is None:
            with self._alloc:
                buf = self._bufs[i]
                if buf is None:
                    buf = self._bufs[i] = _unfilled(self.header.modules[i].size_bytes)
        return buf

    def _allocate_ahead(self, i: int) -> None:
        """The receive buffers of module ``i`` and of those after it up to ``ALLOCATE_AHEAD`` bytes, made
        on the calling thread (the handler's): a transport reading ahead then finds its places made.
        Buffers made on a short-lived reader thread come from that thread's malloc arena, which gives
        their pages back when they are freed: every push would fault them in afresh (measured: a fifth
        of the receiver's CPU)."""
        ahead = 0
        while i < len(self._bufs) and ahead < ALLOCATE_AHEAD:
            ahead += len(self._buffer(i))
            i += 1

    def _check_size(self, n: int) -> None:
        if n > self.max_chunk_bytes:
            raise ModuleError("INVALID_ARGUMENT", "chunk_too_large", f"chunk of {n} B exceeds {self.max_chunk_bytes} B")

    @staticmethod
    def _check_fits(mh: ModuleHeader, offset: int, n: int) -> None:
        if offset + n > mh.size_bytes:
            raise ModuleError(
                "INVALID_ARGUMENT", "overflow", f"module {mh.name}: chunk runs past declared size {mh.size_bytes} B"
            )

    def place(self, module_index: int, offset: int, n: int) -> memoryview:
        """Where a chunk of ``n`` bytes at ``offset`` of module ``module_index`` goes in its receive buffer,
        for a transport that reads the bytes there itself; the chunk is then given to ``add_chunk`` with
        ``placed=True``, in stream order as any chunk, which checks it without copying it. Only the bounds
        are checked here (a transport may read ahead of ``add_chunk``): the order is ``add_chunk``'s, and
        a chunk it finds out of order fails the push, so a region written twice never passes."""
        self._check_size(n)
        if not 0 <= module_index < len(self.header.modules):
            raise ModuleError(
                "INVALID_ARGUMENT", "out_of_order", f"chunk for module {module_index} of a push of {len(self._bufs)}"
            )
        self._check_fits(self.header.modules[module_index], offset, n)
        return memoryview(self._buffer(module_index))[offset : offset + n]

    def add_chunk(self, module_index: int, offset: int, data: bytes | memoryview, placed: bool = False) -> None:
        """The next chunk, in stream order; ``placed``: its bytes are already in place (``place``)."""
        n = len(data)
        self._check_size(n)
        # Advance to the next module when the current one is complete.
        if (
            self._index < len(self.header.modules)
            and self._offset == self.header.modules[self._index].size_bytes
            and module_index == self._index + 1
        ):
            self._index += 1
            self._offset = 0
        if module_index != self._index or offset != self._offset:
            raise ModuleError(
                "INVALID_ARGUMENT",
                "out_of_order",
                f"out-of-order chunk: got module {module_index} offset {offset}, "
                f"expected module {self._index} offset {self._offset}",
            )
        mh = self.header.modules[self._index]
        self._check_fits(mh, offset, n)
        if offset == 0:
            self._allocate_ahead(self._index + 1)
        buf = self._buffer(self._index)
        if not placed:
            buf[offset : offset + n] = data
        elif not (isinstance(data, memoryview) and data.obj is buf):
            raise ModuleError("INTERNAL", "not_placed", f"module {mh.name}: a chunk marked placed is not in its buffer")
        self._checks[self._index].update(buf, offset + n)
        self._offset += n
        self.bytes_received += n

    def finish(self) -> list[Module]:
        """Verify completeness and decode every module (raises ModuleError; nothing is kept)."""
        if digests_follow(self.header):
            raise ModuleError("INVALID_ARGUMENT", "truncated", "truncated stream: no trailer with the push's digests")
        for i, mh in enumerate(self.header.modules):
            buf = self._bufs[i]
            got = len(buf) if buf is not None else 0
            complete = i < self._index or (i == self._index and self._offset == mh.size_bytes)
            if buf is None or not complete:
                have = self._offset if i == self._index else (0 if i > self._index else got)
                raise ModuleError(
                    "INVALID_ARGUMENT",
                    "truncated",
                    f"truncated stream: module {mh.name} got {have} of {mh.size_bytes} B",
                )
        out = []
        for i, mh in enumerate(self.header.modules):
            buf = self._bufs[i]
            assert buf is not None
            out.append(
                decode_module(
                    buf,
                    name=mh.name,
                    version=mh.version,
                    num_samples=mh.num_samples,
                    dtype=mh.dtype,
                    digest=mh.digest,
                    digest_alg=mh.digest_alg,
                    spec=self.spec,
                    computed_digest=self._checks[i].digest(),
                    finite=self._checks[i].finite,
                )
            )
            out[-1].owned = self.owned
            self._bufs[i] = None  # release as we go: the module's tensors are the only reference left
        return out
