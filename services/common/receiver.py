"""The receiving side of a node: a push stream in, checked against the node's inbox, reassembled and
verified (``PushAssembler``), folded into its collect step; or, on a D2D route through this device,
streamed on to the next hop without decoding (relaying). Every rejection is a ``ModuleError`` and is
counted by reason; nothing changes before every check passed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc

from hffm.calibration import check_stats
from hffm.config import HFFMConfig
from hffm.ids import CLOUD, D2D, role_of, stats_task, trace_prefix
from hffm.inbox import Inbox
from hffm.modules import ModuleError, ModuleSet, ModuleSpec
from hffm.pki import PKIError
from hffm.wire import PushAssembler, PushHeader, digests_follow
from services.common import faults
from services.common.chunkwire import RawChunk
from services.common.client import Channels, wait_unless
from services.common.convert import header_from_pb, header_to_pb
from services.common.limits import Admission, TimedStream
from services.common.metrics import Metrics, link_label
from services.common.rounds import RoundRegistry
from services.common.security import Security
from services.common.sender import Sender
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.receiver")


class Receiver:
    def __init__(
        self,
        node_id: str,
        cfg: HFFMConfig,
        spec: ModuleSpec,
        inbox: Inbox,
        rounds: RoundRegistry,
        sender: Sender,
        channels: Channels,
        metrics: Metrics,
        trace: Callable[[str, ModuleSet], None],
        relays: bool,
        security: Security,
    ) -> None:
        self.admission = Admission(node_id, cfg.limits, metrics)
        self.node_id, self.cfg, self.spec = node_id, cfg, spec
        self.inbox, self.rounds, self.sender, self.channels = inbox, rounds, sender, channels
        self.metrics = metrics
        self.trace = trace
        self.relays = relays  # devices relay D2D pushes for their cluster peers
        self.security = security

    def receive(self, requests: Iterator[pb.PushRequest], caller: str | None) -> pb.PushAck:
        """One push stream, within the node's limits: a slot for the caller's stream, deadlines on its
        header and each chunk, and (once the header says how much) the bytes it will assemble."""
        lim = self.cfg.limits
        timed = TimedStream(requests, lim.header_timeout_s, lim.chunk_timeout_s, f"push from {caller}")
        try:
            with self.admission.stream(caller or ""):
                return self._receive(timed, caller)
        except ModuleError as err:
            self.metrics.modules_rejected.labels(node=self.node_id, reason=err.reason).inc()
            raise
        finally:
            timed.close()

    def _receive(self, requests: Iterator[pb.PushRequest], caller: str | None) -> pb.PushAck:
        first = next(requests, None)
        if first is None or isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
            raise ModuleError("INVALID_ARGUMENT", "no_header", "a push must start with its header")
        header = header_from_pb(first.header)
        if self.relays and header.link == D2D and (header.receiver != self.node_id or header.route):
            return self._relay(header, requests, caller)
        follow = digests_follow(header)  # the digests come in a trailer, after the chunks
        try:
            duplicate = self.inbox.precheck(header, caller)
        except ModuleError as err:
            if err.reason == "not_examined":
                self._report_switch(header, first.header)
            raise
        self._verify(header)  # with digests to follow: the header as sent, its digests empty (who, what, where)
        declared = sum(max(0, m.size_bytes) for m in header.modules)
        with self.admission.bytes(declared, f"push {header.push_id}"):
            # without a trace to write them, the decoded modules are the aggregator's alone (folded in place)
            owned = not self.cfg.runtime.trace_dir
            largest = max(self.cfg.wire.chunk_bytes, self.cfg.wire.bulk_chunk_bytes)
            assembler = PushAssembler(header, self.spec, largest, owned=owned)
            placing = isinstance(requests, TimedStream) and requests.place_into(assembler.place)
            trailer = None
            try:
                for req in requests:
                    if trailer is not None:
                        raise ModuleError("INVALID_ARGUMENT", "out_of_order", "a message after the push's trailer")
                    if isinstance(req, RawChunk):
                        assembler.add_chunk(req.module_index, req.offset, req.data, req.placed)
                    elif (kind := req.WhichOneof("kind")) == "chunk":
                        assembler.add_chunk(req.chunk.module_index, req.chunk.offset, req.chunk.data)
                    elif kind == "trailer":
                        trailer = req.trailer
                        continue
                    else:
                        raise ModuleError("INVALID_ARGUMENT", "out_of_order", "a second header inside one push")
                    if follow and assembler.bytes_received == declared and isinstance(requests, TimedStream):
                        requests.awaiting = "its trailer after its last chunk"  # what a stall here names
            finally:
                if placing:
                    requests.place_into(None)
            if trailer is not None:  # every digest and the signature over them: the push as signed
                header = assembler.complete(list(trailer.digests), bytes(trailer.signature))
                self._verify(header)
            modules = assembler.finish()
        for m in modules:
            if stats_task(m.name) is not None:  # feature statistics (calibration): values a sum can hold
                check_stats(m)
        if not duplicate:
            try:
                duplicate = self.inbox.accept(header, modules, caller)
            except ModuleError as err:
                if follow and err.reason == "not_examined":  # known only now: the digests came last
                    self._report_switch(header, header_to_pb(header))
                raise
            if not duplicate:
                self._count_received(header)
                for m in modules:
                    self.metrics.modules_received.labels(node=self.node_id, module=m.name).inc()
                prefix = trace_prefix(header.round, header.attempt)
                self.trace(f"{prefix}-{header.tag}-from-{header.sender}", {m.name: m for m in modules})
        return pb.PushAck(
            duplicate=duplicate, bytes_received=assembler.bytes_received, modules=[m.name for m in header.modules]
        )

    def _verify(self, header: PushHeader) -> None:
        try:
            self.security.verify_header(header)
        except PKIError as err:
            raise ModuleError("PERMISSION_DENIED", "bad_signature", str(err)) from None

    def _report_switch(self, header: PushHeader, signed: pb.PushHeader) -> None:
        """A specialist's relay that is not the version the cloud examined: send the cloud the sender's
        signed header (its proof; Coordinator.ReportSwitch) before the refusal goes back (at most 10 s: a
        stalled cloud does not hold the push). Only a header whose signature holds is reported; without
        security there is no proof to send."""
        state = self.rounds.get(header.round)
        cloud = state.peers.get(CLOUD) if state is not None else None
        if not self.security.enabled or cloud is None:
            return
        try:
            self.security.verify_header(header)
        except PKIError as err:
            log.warning("%s: a relay refused as not examined, not signed by %s: %s", self.node_id, header.sender, err)
            return
        try:
            pb_grpc.CoordinatorStub(self.channels.get(cloud, CLOUD)).ReportSwitch(
                signed, timeout=min(10.0, self.cfg.runtime.rpc_timeout_s), metadata=self.sender.metadata
            )
            log.warning("%s: reported %s's relay of round %d", self.node_id, header.sender, header.round)
        except grpc.RpcError as err:
            log.warning("%s: the cloud took no report of %s's relay: %s", self.node_id, header.sender, err.details())

    def _count_received(self, header: PushHeader) -> None:
        link = link_label(header.link, role_of(header.sender))
        tier = role_of(header.sender) if header.link != D2D else "device"
        for m in header.modules:
            self.metrics.bytes_received.labels(node=self.node_id, link=link, peer_tier=tier, module=m.name).inc(
                m.size_bytes
            )

    def _relay(self, header: PushHeader, requests: Iterator[pb.PushRequest], caller: str | None) -> pb.PushAck:
        """Stream a push on to its next hop without decoding it (D2D relaying)."""
        state = self.rounds.get(header.round)
        if state is None or header.round != self.rounds.current or header.attempt != state.attempt:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "wrong_round",
                f"relay for round {header.round}, {self.node_id} is in {self.rounds.current}",
            )
        if not caller or caller not in state.peers:
            raise ModuleError("PERMISSION_DENIED", "unregistered_caller", f"caller {caller!r} is not a peer this round")
        if header.sender not in state.peers:
            raise ModuleError("PERMISSION_DENIED", "unregistered_sender", f"sender {header.sender!r} is not registered")
        nxt = header.route[0] if header.route else header.receiver
        if nxt not in state.peers:
            raise ModuleError("FAILED_PRECONDITION", "no_route", f"{self.node_id} has no address for next hop {nxt!r}")
        onward = replace(header, route=header.route[1:])

        def stream() -> Iterator[pb.PushRequest | RawChunk]:
            yield pb.PushRequest(header=header_to_pb(onward))
            yield from requests  # chunks go on as they arrive, as the bytes they came in

        faults.hit(self.node_id, "relay", header.round)
        push = self.channels.push(state.peers[nxt], nxt, self.sender.metadata)
        fut = push.future(stream(), timeout=self.cfg.runtime.rpc_timeout_s, metadata=self.sender.metadata)
        if not wait_unless(fut, state.aborted.is_set):  # a later attempt replacing this one ends the relay
            raise ModuleError("ABORTED", "relay_aborted", f"relay {self.node_id} -> {nxt}: attempt replaced")
        try:
            ack = fut.result()
        except grpc.RpcError as err:
            code = err.code().name if err.code() is not None else "UNAVAILABLE"
            raise ModuleError(code, "relay_failed", f"relay {self.node_id} -> {nxt}: {err.details()}") from None
        self._count_received(header)
        self.sender.record(header, nxt)
        return ack
