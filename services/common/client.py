"""Client side of module pushes and control calls: channel cache, chunked streaming, retries.

Every link (device->edge, edge->cloud, device->cloud, device->device) pushes through ``push_callable``
with ``push_requests`` (the node's ``Sender`` retries and cancels); the link kind is only a header
field. A retried push carries the same push id, so the receiver counts it once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import grpc

from hffm.modules import EncodedModule
from hffm.wire import PushHeader, chunk_pieces
from services.common.bulk import BulkPush
from services.common.chunkwire import MAX_MESSAGE_BYTES, ChunkMessage, chunk_parts, serialize_push_request
from services.common.convert import header_to_pb
from services.common.security import Security
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.client")

PUSH_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ModuleExchange'].full_name}/Push"

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # a peer that restarted is dialled again within 2 s (gRPC's default backoff grows to 120 s).
    # Not grpc.min_reconnect_backoff_ms: C-core takes it as the *connect timeout* (MIN_CONNECT_TIMEOUT,
    # 20 s by default); at 200 ms a TLS handshake on a loaded host never finished and the channel failed
    # UNAVAILABLE "timed out before receiving SETTINGS frame" (grpc/grpc#33423)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
T = TypeVar("T")


class Channels:
    """One channel per peer. With TLS (``security``) a channel presents one node's certificate and
    verifies the peer is ``target``: it belongs to that node alone. Plaintext channels are one per
    address and may be shared by every node of a process (callers name themselves per call)."""

    def __init__(self, security: Security | None = None, bulk: bool = False) -> None:
        self.security = security
        self.bulk = bulk  # wire.transport: bulk (pushes over the bulk transport where the receiver serves it)
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._bulk: dict[tuple[str, str], BulkPush | None] = {}
        self._resolving: dict[tuple[str, str], threading.Lock] = {}

    @property
    def tls(self) -> bool:
        return self.security is not None and self.security.enabled

    def get(self, address: str, target: str) -> grpc.Channel:
        key = (address, target if self.tls else "")
        with self._lock:
            ch = self._channels.get(key)
            if ch is None:
                if self.tls:
                    assert self.security is not None
                    ch = self.security.channel(address, target, CHANNEL_OPTIONS)
                else:
                    ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[key] = ch
            return ch

    def push(self, address: str, target: str, metadata: tuple[tuple[str, str], ...] | None = None):
        """``ModuleExchange.Push`` to ``target`` at ``address``, as a gRPC multi-callable; with ``bulk``,
        the bulk transport's equivalent (``BulkPush``: the same ``future(requests, timeout=, metadata=)``)
        once the receiver named its bulk endpoint over gRPC (``BulkEndpoint``, asked once per receiver
        with ``metadata``). A receiver without one (port 0, an older node) or not answering yet is pushed
        to over gRPC, and so is the next push after a bulk push that got no answer (a listener gone,
        restarted elsewhere or full): the one after asks the endpoint again."""
        channel = self.get(address, target)
        if not self.bulk:
            return push_callable(channel)
        key = (address, target if self.tls else "")
        with self._lock:
            resolving = self._resolving.setdefault(key, threading.Lock())
        with resolving:  # one question per receiver at a time: the others take its answer
            with self._lock:
                known = key in self._bulk
                bp = self._bulk.get(key)
            if bp is not None and bp.broken:  # it got no answer: this push goes over gRPC, the next asks again
                bp.close()
                with self._lock:
                    self._bulk.pop(key, None)
                return push_callable(channel)
            if not known:
                try:
                    stub = pb_grpc.ModuleExchangeStub(channel)
                    port = stub.BulkEndpoint(pb.Empty(), timeout=10, metadata=metadata).port
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        return push_callable(channel)  # not up yet: gRPC now, asked again next time
                    port = 0
                tls = self.security.bulk_client_context() if self.tls and self.security is not None else None
                host = address.rsplit(":", 1)[0].strip("[]")
                bp = BulkPush(host, port, tls, server_hostname=target) if port else None
                log.info("pushes to %s at %s: %s", target, address, f"bulk, port {port}" if port else "gRPC")
                with self._lock:
                    self._bulk[key] = bp
        return bp or push_callable(channel)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            bulk = [b for b in self._bulk.values() if b is not None]
            self._bulk.clear()
        for b in bulk:
            b.close()


def push_requests(
    header: PushHeader,
    encoded: Sequence[EncodedModule],
    chunk_bytes: int,
    mid_stream: Callable[[], None] | None = None,
    trailer: Callable[[], pb.PushTrailer] | None = None,
) -> Iterator[pb.PushRequest | ChunkMessage]:
    """The header, then every chunk as a message in protobuf's wire format, its data still the encoded
    blobs' pieces (``chunkwire.ChunkMessage``: gRPC's serializer joins them, the bulk transport sends
    them as they are); then ``trailer()``'s, when given (``trailed_push``). ``mid_stream`` (a failpoint)
    is called once with the push incomplete on the wire whatever its size: before the second chunk is
    yielded, or before the only one (the receiver then holds the header alone). Called after the first
    of one chunk, the push could already be whole at the receiver (the chunk flushed before the call)."""
    yield pb.PushRequest(header=header_to_pb(header))
    chunks = iter(chunk_pieces(encoded, chunk_bytes))
    this, n = next(chunks, None), 0
    while this is not None:
        following = next(chunks, None)
        if mid_stream is not None and (n == 1 or (n == 0 and following is None)):
            mid_stream()
        yield chunk_parts(*this)
        this, n = following, n + 1
    if trailer is not None:
        yield pb.PushRequest(trailer=trailer())


def trailed_push(
    header: PushHeader,
    encoded: Sequence[EncodedModule],
    chunk_bytes: int,
    digests: Callable[[], list[bytes]],
    sign: Callable[[PushHeader], PushHeader],
    mid_stream: Callable[[], None] | None = None,
) -> Iterator[pb.PushRequest | ChunkMessage]:
    """A push whose digests follow its chunks (``wire.digests: trailer``): the header signed with every
    digest empty, the chunks while the digests are computed elsewhere, then a trailer with ``digests()``
    (the modules' digests, in order; it waits for them) and the signature over the whole header."""
    empty = replace(header, modules=tuple(replace(m, digest=b"") for m in header.modules))

    def trailer() -> pb.PushTrailer:
        ds = digests()
        mods = tuple(replace(m, digest=d) for m, d in zip(header.modules, ds, strict=True))
        return pb.PushTrailer(digests=ds, signature=sign(replace(header, modules=mods)).signature)

    return push_requests(sign(empty), encoded, chunk_bytes, mid_stream, trailer)


def push_callable(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """``ModuleExchange.Push`` on ``channel``, taking protobuf requests or serialized chunk messages."""
    return channel.stream_unary(
        PUSH_METHOD, request_serializer=serialize_push_request, response_deserializer=pb.PushAck.FromString
    )


def wait_unless(fut: grpc.Future, stop: Callable[[], bool], poll_s: float = 0.25) -> bool:
    """Wait for ``fut`` (a call's future), cancelling it as soon as ``stop()`` turns true (the round's
    attempt was replaced, the receiver left out); False when it was cancelled so."""
    while not fut.done():
        if stop():
            fut.cancel()
            return not fut.cancelled()
        try:
            fut.exception(timeout=poll_s)
        except grpc.FutureTimeoutError:
            pass
    return True


def with_retries(fn: Callable[[], T], *, attempts: int, what: str, backoff_s: float = 0.2) -> T:
    """Call ``fn``; retry transient gRPC failures with exponential backoff."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code not in RETRYABLE or attempt == attempts:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError(f"unreachable: {what}")
