"""The runtime every node shares: its modules, its inbox, and the execution of its round steps.

A tier is a ``NodeRuntime`` subclass that adds what only it does (devices train and evaluate; edges
forward registrations; the cloud coordinates). The gRPC servicers at the bottom translate requests
into calls on the runtime and ``ModuleError``s into gRPC statuses; they hold no logic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from hffm.config import HFFMConfig
from hffm.inbox import Inbox
from hffm.methods import D2D, Collect, Evaluate, Send, Step, Train
from hffm.modules import EncodedModule, ModuleError, ModuleSet, ModuleSpec, encode_modules, save_modules
from hffm.wire import ModuleHeader, PushAssembler, PushHeader, push_id_for
from services.common.chunkwire import RawChunk
from services.common.client import Channels, push_callable, push_modules
from services.common.convert import header_from_pb, header_to_pb, step_from_pb
from services.common.metrics import Metrics, link_label, role_of
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.node")


@dataclass
class RoundState:
    round: int
    method: str
    steps: list[Step]
    peers: dict[str, str]
    future: Future | None = None
    sent: list[pb.TransferRecord] = field(default_factory=list)
    metrics: list[pb.TaskMetric] = field(default_factory=list)
    train_loss: float = 0.0
    train_samples: int = 0
    train_s: float = 0.0


class NodeRuntime:
    role = "node"
    relays = False  # devices relay D2D pushes for their peers

    def __init__(
        self,
        node_id: str,
        cfg: HFFMConfig,
        spec: ModuleSpec,
        modules: ModuleSet,
        address: str,
        metrics: Metrics | None = None,
        channels: Channels | None = None,
    ) -> None:
        self.node_id = node_id
        self.metrics = metrics or Metrics()
        self.metrics.init_node(node_id)
        self.cfg = cfg
        self.spec = spec
        self.address = address
        self.modules: ModuleSet = modules
        self.inbox = Inbox(node_id)
        # one channel per peer address, shared by every node of the process when given
        self.channels = channels or Channels()
        self._owns_channels = channels is None
        self.stopped = threading.Event()
        self._lock = threading.RLock()
        self._rounds: dict[int, RoundState] = {}
        self._current: int = 0
        self._encoded: dict[str, EncodedModule] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{node_id}-send")
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{node_id}-round")

    # ---- hooks for tiers -------------------------------------------------------------------
    def own_module_names(self) -> list[str]:
        """Modules this node contributes as its own (include_self collect steps)."""
        return list(self.modules)

    def train(self, state: RoundState) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} does not train")

    def evaluate(self, state: RoundState) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} does not evaluate")

    # ---- round control ---------------------------------------------------------------------
    def assign(self, round_: int, method: str, steps: list[Step], peers: dict[str, str]) -> None:
        """Install the node's steps for ``round_`` and open its inbox (validates first)."""
        for s in steps:
            if isinstance(s, Send):
                if s.to not in peers:
                    raise ModuleError("INVALID_ARGUMENT", "bad_task", f"send to {s.to!r} but no address for it")
                unknown = [m for m in s.modules if m not in self.spec]
                if unknown:
                    raise ModuleError(
                        "INVALID_ARGUMENT", "bad_task", f"send of modules {self.node_id} lacks: {unknown}"
                    )
            if isinstance(s, Collect) and s.include_self and not self.modules:
                raise ModuleError("INVALID_ARGUMENT", "bad_task", "include_self on a node without modules")
        with self._lock:
            prev = self._rounds.get(round_)
            if prev is not None:
                if prev.steps == steps:
                    return  # a retried assignment
                raise ModuleError("ALREADY_EXISTS", "bad_task", f"round {round_} already assigned differently")
            if round_ <= self._current:
                raise ModuleError(
                    "FAILED_PRECONDITION", "bad_task", f"round {round_} is not after current round {self._current}"
                )
            self._rounds[round_] = RoundState(round_, method, steps, dict(peers))
            self._current = round_
            self.metrics.round.labels(node=self.node_id).set(round_)
            for old in [r for r in self._rounds if r < round_ - 2]:
                del self._rounds[old]
            registered = set(peers)
            self.inbox.open_round(round_, [s for s in steps if isinstance(s, Collect)], registered)

    def await_round(self, round_: int, timeout_s: float) -> pb.RoundReport:
        with self._lock:
            state = self._rounds.get(round_)
            if state is None:
                raise ModuleError("FAILED_PRECONDITION", "no_round", f"round {round_} was not assigned")
            if state.future is None:
                state.future = self._runner.submit(self._execute, state)
        return state.future.result(timeout=timeout_s)

    def _execute(self, state: RoundState) -> pb.RoundReport:
        t0 = time.perf_counter()
        steps = state.steps
        i = 0
        while i < len(steps):
            s = steps[i]
            if isinstance(s, Send):  # consecutive sends go out concurrently
                j = i
                while j < len(steps) and isinstance(steps[j], Send):
                    j += 1
                futs = [self._pool.submit(self._send, state, x) for x in steps[i:j]]
                for f in futs:
                    f.result()
                i = j
                continue
            if isinstance(s, Train):
                self.train(state)
                self._encoded.clear()
            elif isinstance(s, Collect):
                if s.include_self:
                    own = {n: self.modules[n] for n in self.own_module_names()}
                    self.inbox.add_own(s.tag, own)
                    self._trace(f"r{state.round}-{s.tag}-own", own)
                agg = self.inbox.wait(s.tag, self.cfg.runtime.round_timeout_s)
                self.metrics.aggregations.labels(node=self.node_id, tag=s.tag).inc()
                self._trace(f"r{state.round}-{s.tag}-aggregate", agg)
                self.modules.update(agg)
                self._encoded.clear()
            elif isinstance(s, Evaluate):
                self.evaluate(state)
            i += 1
        return pb.RoundReport(
            node=self.node_id,
            round=state.round,
            sent=state.sent,
            metrics=state.metrics,
            train_loss=state.train_loss,
            train_samples=state.train_samples,
            wall_s=time.perf_counter() - t0,
            train_s=state.train_s,
        )

    def _encoded_modules(self, names: tuple[str, ...]) -> list[EncodedModule]:
        """The modules' encodings, cached until the node adopts new modules (an edge's broadcast to
        its devices encodes each module once); missing ones are encoded in parallel."""
        with self._lock:
            missing = [n for n in names if n not in self._encoded]
            for n in missing:
                if n not in self.modules:
                    raise ModuleError("FAILED_PRECONDITION", "missing_module", f"{self.node_id} holds no {n}")
            mods = [self.modules[n] for n in missing]
            for n, em in zip(missing, encode_modules(mods, self.cfg.wire.dtype), strict=True):
                self._encoded[n] = em
            return [self._encoded[n] for n in names]

    def _send(self, state: RoundState, s: Send) -> None:
        encoded = self._encoded_modules(s.modules)
        first_hop = s.route[0] if s.route else s.to
        header = PushHeader(
            push_id=push_id_for(self.node_id, s.to, state.round, s.tag),
            sender=self.node_id,
            receiver=s.to,
            round=state.round,
            tag=s.tag,
            link=s.link,
            modules=tuple(ModuleHeader.of(em) for em in encoded),
            route=s.route[1:],
        )
        push_modules(
            self.channels.get(state.peers[first_hop]),
            header,
            encoded,
            chunk_bytes=self.cfg.wire.chunk_bytes,
            timeout_s=self.cfg.runtime.rpc_timeout_s,
        )
        self._record(state.round, header, self.node_id, first_hop)

    def _record(self, round_: int, header: PushHeader, sender: str, receiver: str) -> None:
        link = link_label(header.link, self.role)
        for m in header.modules:
            self.metrics.bytes_sent.labels(
                node=self.node_id, link=link, peer_tier=role_of(receiver), module=m.name
            ).inc(m.size_bytes)
        with self._lock:
            state = self._rounds.get(round_)
            if state is None:
                return
            state.sent.extend(
                pb.TransferRecord(
                    sender=sender,
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

    def _relay(self, header: PushHeader, requests: Iterator[pb.PushRequest]) -> pb.PushAck:
        """Stream a push on to its next hop without decoding it (D2D relaying)."""
        with self._lock:
            state = self._rounds.get(header.round)
        if state is None or header.round != self._current:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "wrong_round",
                f"relay for round {header.round}, {self.node_id} is in {self._current}",
            )
        if header.sender not in state.peers:
            raise ModuleError("PERMISSION_DENIED", "unregistered_sender", f"sender {header.sender!r} is not registered")
        nxt = header.route[0] if header.route else header.receiver
        if nxt not in state.peers:
            raise ModuleError("FAILED_PRECONDITION", "no_route", f"{self.node_id} has no address for next hop {nxt!r}")
        onward = replace(header, route=header.route[1:])

        def stream() -> Iterator[pb.PushRequest | RawChunk]:
            yield pb.PushRequest(header=header_to_pb(onward))
            yield from requests  # chunks go on as they arrive, as the bytes they came in

        push = push_callable(self.channels.get(state.peers[nxt]))
        try:
            ack = push(stream(), timeout=self.cfg.runtime.rpc_timeout_s, wait_for_ready=True)
        except grpc.RpcError as err:
            code = err.code().name if err.code() is not None else "UNAVAILABLE"
            raise ModuleError(code, "relay_failed", f"relay {self.node_id} -> {nxt}: {err.details()}") from None
        self._count_received(header)
        self._record(header.round, header, self.node_id, nxt)
        return ack

    # ---- receiving -------------------------------------------------------------------------
    def receive(self, requests: Iterator[pb.PushRequest]) -> pb.PushAck:
        try:
            return self._receive(requests)
        except ModuleError as err:
            self.metrics.modules_rejected.labels(node=self.node_id, reason=err.reason).inc()
            raise

    def _count_received(self, header: PushHeader) -> None:
        link = link_label(header.link, role_of(header.sender))
        tier = role_of(header.sender) if header.link != D2D else "device"
        for m in header.modules:
            self.metrics.bytes_received.labels(node=self.node_id, link=link, peer_tier=tier, module=m.name).inc(
                m.size_bytes
            )

    def _receive(self, requests: Iterator[pb.PushRequest]) -> pb.PushAck:
        first = next(requests, None)
        if first is None or isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
            raise ModuleError("INVALID_ARGUMENT", "no_header", "a push must start with its header")
        header = header_from_pb(first.header)
        if self.relays and header.link == D2D and (header.receiver != self.node_id or header.route):
            return self._relay(header, requests)
        duplicate = self.inbox.precheck(header)
        assembler = PushAssembler(header, self.spec, self.cfg.wire.chunk_bytes)
        for req in requests:
            if isinstance(req, RawChunk):
                c = req
            elif req.WhichOneof("kind") == "chunk":
                c = req.chunk
            else:
                raise ModuleError("INVALID_ARGUMENT", "out_of_order", "a second header inside one push")
            assembler.add_chunk(c.module_index, c.offset, c.data)
        modules = assembler.finish()
        if not duplicate:
            duplicate = self.inbox.accept(header, modules)
            if not duplicate:
                self._count_received(header)
                for m in modules:
                    self.metrics.modules_received.labels(node=self.node_id, module=m.name).inc()
                self._trace(f"r{header.round}-{header.tag}-from-{header.sender}", {m.name: m for m in modules})
        return pb.PushAck(
            duplicate=duplicate, bytes_received=assembler.bytes_received, modules=[m.name for m in header.modules]
        )

    def _trace(self, what: str, modules: ModuleSet) -> None:
        if self.cfg.runtime.trace_dir and modules:
            d = Path(self.cfg.runtime.trace_dir) / self.node_id
            d.mkdir(parents=True, exist_ok=True)
            save_modules(modules, str(d / f"{what}.safetensors"))

    def shutdown(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._runner.shutdown(wait=False, cancel_futures=True)
        if self._owns_channels:
            self.channels.close()


# ---- servicers: translate, do not think -------------------------------------------------------
def abort_for(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, ModuleError):
        context.abort(getattr(grpc.StatusCode, err.code), str(err))
    if isinstance(err, TimeoutError):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err) or "timed out")
    if isinstance(err, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


class ModuleExchangeServicer(pb_grpc.ModuleExchangeServicer):
    def __init__(self, node: NodeRuntime) -> None:
        self.node = node

    def Push(self, request_iterator, context):  # noqa: N802
        try:
            return self.node.receive(request_iterator)
        except grpc.RpcError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes a status
            abort_for(context, err)


class RoundControlServicer(pb_grpc.RoundControlServicer):
    def __init__(self, node: NodeRuntime) -> None:
        self.node = node

    def AssignRound(self, request, context):  # noqa: N802
        try:
            steps = [step_from_pb(s) for s in request.steps]
            self.node.assign(request.round, request.method, steps, dict(request.peers))
            return pb.AssignAck()
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def AwaitRound(self, request, context):  # noqa: N802
        try:
            return self.node.await_round(request.round, self.node.cfg.runtime.round_timeout_s)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def Shutdown(self, request, context):  # noqa: N802
        self.node.shutdown()
        return pb.Empty()
