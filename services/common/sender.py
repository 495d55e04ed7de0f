"""The sending side of a node: encodes its current modules (cached until it adopts new ones), pushes
them along a ``Send`` step (directly, or to the first relay of a D2D route), and records every hop
it sent or relayed in its round's report and its metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import grpc

from hffm.config import HFFMConfig
from hffm.ids import role_of, stats_task
from hffm.methods import JOIN_REF, SYNC, Send
from hffm.modules import EncodedModule, ModuleError, ModuleSet, digest_of, encode_modules
from hffm.results import Transfer
from hffm.wire import ModuleHeader, PushHeader, push_id_for
from services.common import faults
from services.common.bulk import BulkPush
from services.common.client import RETRYABLE, Channels, push_requests, trailed_push, wait_unless
from services.common.metrics import Metrics, link_label
from services.common.rounds import RoundRegistry, RoundState

log = logging.getLogger("hffm.sender")


class Sender:
    def __init__(
        self,
        node_id: str,
        role: str,
        cfg: HFFMConfig,
        modules: Callable[[], ModuleSet],
        channels: Channels,
        rounds: RoundRegistry,
        metrics: Metrics,
        metadata: tuple[tuple[str, str], ...] | None = None,
        sign: Callable[[PushHeader], PushHeader] = lambda h: h,
        served: Callable[[ModuleSet], ModuleSet] | None = None,
        reference: Callable[[], ModuleSet | None] | None = None,
    ) -> None:
        self.node_id, self.role, self.cfg = node_id, role, cfg
        self.served = served  # what the node serves when it relays (a sync); None: what it holds
        # what it sends a joiner to compute its statistics under (JOIN_REF); None, or None returned: what it holds
        self.reference = reference
        self._modules = modules  # the node's current modules, read when encoding
        self.channels = channels
        self.rounds = rounds
        self.metrics = metrics
        self.metadata = metadata  # names this node on plaintext links (None with TLS: the certificate does)
        self.sign = sign  # signs a push header end to end (security on)
        self._lock = threading.Lock()
        self._encoded: dict[str, EncodedModule] = {}
        self._digests: dict[str, Future] = {}  # wire.digests=trailer: a module's digest, being computed
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{node_id}-send")
        self._trailed = False  # logged once, the first time a push's digests follow its chunks
        self._digester = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{node_id}-digest")

    def invalidate(self) -> None:
        """The node adopted new modules: encodings made before are stale."""
        with self._lock:
            self._encoded.clear()
            self._digests.clear()

    def encoded(self, names: tuple[str, ...]) -> list[EncodedModule]:
        """The modules' encodings, cached until the node adopts new modules (an edge's broadcast to
        its devices encodes each module once); missing ones are encoded in parallel."""
        with self._lock:
            current = self._modules()
            missing = [n for n in names if n not in self._encoded]
            for n in missing:
                if n not in current:
                    raise ModuleError("FAILED_PRECONDITION", "missing_module", f"{self.node_id} holds no {n}")
            wire = self.cfg.wire
            later = wire.digests == "trailer"  # digested on another thread, while the first push streams
            by_dtype: dict[str, list[str]] = {}
            for n in missing:  # feature statistics (calibration) go as fp32: in fp16 sums of squares lose the variance
                by_dtype.setdefault("fp32" if stats_task(n) else wire.dtype, []).append(n)
            fresh: list[EncodedModule] = []
            for dtype, group in by_dtype.items():
                enc = encode_modules([current[n] for n in group], dtype, digest_alg=wire.digest, digest=not later)
                self._encoded.update(zip(group, enc, strict=True))
                fresh += enc
            for em in fresh if later else ():
                self._digests[em.name] = self._digester.submit(digest_of, em.segments, em.digest_alg)
            for n in names:  # digests computed since: kept with their encodings (later pushes carry them first)
                fut = self._digests.get(n)
                if not self._encoded[n].digest and fut is not None and fut.done() and fut.exception() is None:
                    self._encoded[n] = replace(self._encoded[n], digest=fut.result())
            return [self._encoded[n] for n in names]

    def _digests_of(self, encoded: list[EncodedModule]) -> list[bytes]:
        """The encodings' digests, waiting for those still being computed (``wire.digests: trailer``)."""
        with self._lock:
            futs = [self._digests.get(em.name) for em in encoded]
        out = []
        for em, fut in zip(encoded, futs, strict=True):
            out.append(em.digest or (fut.result() if fut is not None else digest_of(em.segments, em.digest_alg)))
        return out

    def send_all(self, state: RoundState, sends: list[Send]) -> None:
        """Consecutive sends go out concurrently; returns when every one is acknowledged."""
        for f in [self.pool.submit(self.send, state, s) for s in sends]:
            f.result()

    def send(self, state: RoundState, s: Send) -> None:
        ref = self.reference() if s.tag == JOIN_REF and self.reference is not None else None
        if (s.tag == SYNC and self.served is not None) or ref is not None:
            with self._lock:
                held = ref if ref is not None else self._modules()
                if missing := [n for n in s.modules if n not in held]:
                    raise ModuleError("FAILED_PRECONDITION", "missing_module", f"{self.node_id} holds no {missing}")
                mods = {n: held[n] for n in s.modules}
                if ref is None:  # a relay: what the node serves (config adversary)
                    mods = self.served(mods)  # type: ignore[misc]
            wire = self.cfg.wire
            encoded = encode_modules([mods[n] for n in s.modules], wire.dtype, digest_alg=wire.digest)
        else:
            encoded = self.encoded(s.modules)
        first_hop = s.route[0] if s.route else s.to
        header = PushHeader(
            push_id=push_id_for(self.node_id, s.to, state.round, s.tag, state.attempt),
            sender=self.node_id,
            receiver=s.to,
            round=state.round,
            tag=s.tag,
            link=s.link,
            modules=tuple(ModuleHeader.of(em) for em in encoded),
            route=s.route[1:],
            attempt=state.attempt,
        )
        if self._push(state, s, header, first_hop, encoded):
            self.record(header, first_hop)

    def _push(self, state: RoundState, s: Send, header: PushHeader, first_hop: str, encoded) -> bool:
        """Push until acknowledged (True), retrying transient failures (the same push id: the receiver
        counts it once) while the receiver may be restarting; False when the coordinator left the
        receiver out of the round meanwhile (the send is skipped and reported as undelivered). A later
        attempt replacing this one cancels the push (``RoundAborted``)."""
        deadline = time.monotonic() + self.cfg.runtime.rpc_timeout_s
        delay = 0.2

        def mid_push() -> None:
            faults.hit(self.node_id, f"send.{s.tag}", state.round)

        while True:
            if s.to in state.lost:
                with self.rounds.lock:
                    state.report.undelivered.append(s.to)
                return False
            # asked each try: a bulk endpoint that failed is asked again (a receiver restarted elsewhere)
            push = self.channels.push(state.peers[first_hop], first_hop, self.metadata)
            wire = self.cfg.wire
            chunk = wire.bulk_chunk_bytes if isinstance(push, BulkPush) else wire.chunk_bytes
            if all(em.digest for em in encoded):
                requests = push_requests(self.sign(header), encoded, chunk, mid_push)
            else:  # some digest is still being computed: it follows the chunks
                if not self._trailed:
                    self._trailed = True
                    log.info("%s: digests follow the chunks (wire.digests: trailer)", self.node_id)
                requests = trailed_push(header, encoded, chunk, lambda: self._digests_of(encoded), self.sign, mid_push)
            fut = push.future(
                requests,
                timeout=max(1.0, deadline - time.monotonic()),
                metadata=self.metadata,
            )
            if not wait_unless(fut, lambda: state.aborted.is_set() or s.to in state.lost):
                state.raise_if_aborted()
                continue  # the receiver was left out: recorded above
            err = fut.exception()
            if err is None:
                return True
            if not isinstance(err, grpc.RpcError):
                raise err
            if err.code() not in RETRYABLE or time.monotonic() + delay >= deadline:
                code = err.code().name if err.code() is not None else "UNAVAILABLE"
                raise ModuleError(code, "push_failed", f"push to {s.to}/{s.tag}: {err.details()}") from None
            state.aborted.wait(delay)  # the receiver or a relay may be restarting, or about to be left out
            delay = min(delay * 2, 2.0)

    def record(self, header: PushHeader, receiver: str) -> None:
        """One hop of ``header``'s push, from this node to ``receiver`` (sent or relayed)."""
        link = link_label(header.link, self.role)
        for m in header.modules:
            self.metrics.bytes_sent.labels(
                node=self.node_id, link=link, peer_tier=role_of(receiver), module=m.name
            ).inc(m.size_bytes)
        state = self.rounds.get(header.round)
        if state is None:
            return
        with self.rounds.lock:
            state.report.sent.extend(
                Transfer(
                    sender=self.node_id,
                    receiver=receiver,
                    module=m.name,
                    link=header.link,
                    bytes=m.size_bytes,
                    tag=header.tag,
                    origin=header.sender,
                    destination=header.receiver,
                )
                for m in header.modules
            )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
