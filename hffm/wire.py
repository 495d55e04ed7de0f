"""Chunked module streams, independent of gRPC.

A push is a header (who sends which modules, for which round and collect step) followed by the
modules' bytes in chunks of at most ``chunk_bytes`` (1 MiB), module by module, offsets contiguous.
``chunks`` produces that sequence; ``PushAssembler`` consumes it and refuses anything truncated,
out of order, oversized or not matching its digest, before any state is touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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

MAX_CHUNK_BYTES = 1 << 20


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
    encoded: Sequence[EncodedModule], chunk_bytes: int = MAX_CHUNK_BYTES
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


def chunks(
    encoded: Sequence[EncodedModule], chunk_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[tuple[int, int, memoryview]]:
    """(module_index, offset, bytes) for every chunk of every module, in order: ``chunk_pieces``
    with each chunk's pieces joined (a view when the chunk lies in one segment, else a copy)."""
    for i, off, pieces in chunk_pieces(encoded, chunk_bytes):
        yield i, off, pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


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
            try:
                want = digest_size(m.digest_alg)
            except ModuleError as err:  # an unknown algorithm: INVALID_ARGUMENT, naming the module
                raise ModuleError(err.code, err.reason, f"module {m.name}: {err}") from None
            if len(m.digest) != want:
                raise ModuleError(
                    "INVALID_ARGUMENT",
                    "bad_digest",
                    f"module {m.name}: digest is {len(m.digest)} B, {m.digest_alg} digests are {want} B",
                )
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

    def add_chunk(self, module_index: int, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if n > self.max_chunk_bytes:
            raise ModuleError("INVALID_ARGUMENT", "chunk_too_large", f"chunk of {n} B exceeds {self.max_chunk_bytes} B")
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
        if offset + n > mh.size_bytes:
            raise ModuleError(
                "INVALID_ARGUMENT", "overflow", f"module {mh.name}: chunk runs past declared size {mh.size_bytes} B"
            )
        buf = self._bufs[self._index]
        if buf is None:
            buf = self._bufs[self._index] = bytearray(mh.size_bytes)
        buf[offset : offset + n] = data
        self._checks[self._index].update(buf, offset + n)
        self._offset += n
        self.bytes_received += n

    def finish(self) -> list[Module]:
        """Verify completeness and decode every module (raises ModuleError; nothing is kept)."""
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
