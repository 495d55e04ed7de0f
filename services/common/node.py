"""The runtime every node shares: its modules, its inbox, and the execution of its round steps.

A tier is a ``NodeRuntime`` subclass that adds what only it does (devices train and evaluate; edges
forward registrations; the cloud coordinates). The gRPC servicers at the bottom translate requests
into calls on the runtime and ``ModuleError``s into gRPC statuses; they hold no logic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import torch

from hffm.aggregation import LabelReference
from hffm.calibration import REFERENCE_PREFIX, Claim, claims_from, claims_tensors, reference_from, reference_tensors
from hffm.config import HFFMConfig
from hffm.ids import CLOUD, is_head, stats_task
from hffm.inbox import Inbox, RoundAborted
from hffm.methods import JOIN_REF, Collect, Send, Step
from hffm.modules import Module, ModuleError, ModuleSet, ModuleSpec, save_modules
from hffm.persist import LABEL_REFERENCE, MISLABELLED, NodeState, Persistor, valid_flags
from hffm.pki import Identity
from hffm.results import NodeReport
from services.common.client import Channels
from services.common.convert import report_to_pb, step_from_pb
from services.common.executor import StepExecutor
from services.common.metrics import Metrics
from services.common.receiver import Receiver
from services.common.rounds import RoundRegistry, RoundState
from services.common.security import Security, Unauthenticated
from services.common.sender import Sender
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.node")


@dataclass
class RoundEnd:
    """A round end as a node starts a round from it: its modules, the senders its label checks had found
    mislabelled by then (Inbox.mislabelled) and what each sender's statistics had claimed (Inbox.claims)."""

    modules: ModuleSet
    flags: dict[str, float] = field(default_factory=dict)
    claims: dict[str, dict[str, Claim]] = field(default_factory=dict)
    label_reference: LabelReference | None = None  # what its last label check judged by (Inbox.label_reference)
    federation: dict[str, Claim] = field(default_factory=dict)  # the cloud's (NodeRuntime.federation)

    def copy(self) -> RoundEnd:
        return RoundEnd(
            dict(self.modules), dict(self.flags), dict(self.claims), self.label_reference, dict(self.federation)
        )

    @classmethod
    def read(
        cls, key: tuple[int, int], modules: ModuleSet, extra: Mapping, tensors: Mapping[str, torch.Tensor]
    ) -> RoundEnd:
        """A saved round end read back (ValueError naming it for anything damaged)."""
        where = f"round end {key}"
        ref = {k: v for k, v in tensors.items() if k.startswith(f"{REFERENCE_PREFIX}/")}
        claims = claims_from({k: v for k, v in tensors.items() if k not in ref}, where)
        federation = claims.pop(FEDERATION, {})
        return cls(
            modules,
            valid_flags(extra.get(MISLABELLED, {}), key),
            claims,
            reference_from(ref, extra.get(LABEL_REFERENCE), where),
            federation,
        )


# the federation's claims are saved beside the senders' under a name no node can have
FEDERATION = "@federation"

__all__ = ["NodeRuntime", "RoundState"]


class NodeRuntime:
    """One node: its identity, config, modules, and the parts that do the work — a round registry
    (assignments and attempts), an inbox (expected pushes and running aggregates), a sender, a
    receiver (checks, relaying) and a step executor."""

    role = "node"
    relays = False  # devices relay D2D pushes for their peers
    # edges keep the modules their label check of a phase judged by (LabelReference.modules): a device that joins
    # after an edge round computes its statistics under them for its labels to be checked on arrival
    keeps_reference = False

    def __init__(
        self,
        node_id: str,
        cfg: HFFMConfig,
        spec: ModuleSpec,
        modules: ModuleSet,
        address: str,
        metrics: Metrics | None = None,
        channels: Channels | None = None,
        security: Security | None = None,
        persistor: Persistor | None = None,
    ) -> None:
        self.node_id = node_id
        # every tier's process, however started (launcher, compose, Kubernetes): torch's intra-op pool
        # would otherwise take every core and spin between the small per-chunk reductions of a push
        torch.set_num_threads(cfg.runtime.torch_threads)
        self.security = security or Security(cfg.security, node_id)
        self.metrics = metrics or Metrics()
        self.metrics.init_node(node_id)
        self.cfg = cfg
        self.spec = spec
        self.address = address
        self.modules: ModuleSet = modules
        # Round ends ((round, attempt) -> modules) the node can start a round from: the last few in memory,
        # and on disk through the persistor (a restarted node reloads the one the coordinator names).
        self._ends: dict[tuple[int, int], RoundEnd] = {(0, 0): RoundEnd(dict(modules))}
        head_check = cfg.calibration.head_check
        self.inbox = Inbox(
            node_id, None if head_check is None else (head_check, cfg.model), statistics_first=cfg.calibration.opening
        )
        self.persistor = persistor
        # this round's reference modules for joiners (JOIN_REF; ``_refer``); what a device computes its next
        # statistics under where its collector sent them (``join_reference``)
        self._join_ref: ModuleSet | None = None
        self.stats_under: ModuleSet | None = None
        # task -> what the last calibration phase's statistics said of the whole federation (the cloud's: counts
        # and answer means; the specialists' review holds served heads to them), saved with each round end
        self.federation: dict[str, Claim] = {}
        if persistor is not None:
            self._restore()
        # plaintext channels may be shared by the nodes of a process; TLS channels carry this node's certificate
        if channels is not None and channels.tls and channels.security is not self.security:
            raise ValueError(f"{node_id}: TLS channels belong to one node")
        self.channels = channels or Channels(self.security, bulk=cfg.wire.transport == "bulk")
        self._owns_channels = channels is None
        self.stopped = threading.Event()
        self.rounds = RoundRegistry(node_id)
        self.sender = Sender(
            node_id,
            self.role,
            cfg,
            lambda: self.modules,
            self.channels,
            self.rounds,
            self.metrics,
            self.security.call_metadata(),
            self.security.sign_header,
            reference=lambda: self._join_ref,
        )
        self.receiver = Receiver(
            node_id,
            cfg,
            spec,
            self.inbox,
            self.rounds,
            self.sender,
            self.channels,
            self.metrics,
            self.trace,
            self.relays,
            self.security,
        )
        self.executor = StepExecutor(self)
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{node_id}-round")

    # ---- hooks for tiers -------------------------------------------------------------------
    def own_module_names(self) -> list[str]:
        """Modules this node contributes as its own (include_self collect steps)."""
        return list(self.modules)

    def train(self, state: RoundState) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} does not train")

    def evaluate(self, state: RoundState) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} does not evaluate")

    def feature_stats(self, state: RoundState, tasks: tuple[str, ...]) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} holds no features")

    def calibrate(self, state: RoundState, tasks: tuple[str, ...]) -> None:
        raise ModuleError("FAILED_PRECONDITION", "bad_step", f"{self.role} {self.node_id} does not calibrate")

    def served(self, modules: ModuleSet) -> ModuleSet:
        """What the node serves of ``modules`` (a relay, or a specialist's modules examined): the modules
        themselves (a fake specialist, config adversary, serves poisoned ones)."""
        return modules

    def server_step(self, aggregate: ModuleSet) -> ModuleSet:
        """What the node makes of a collect's aggregate before adopting it: the aggregate itself (the
        cloud, ``CloudNode``, steps ``aggregation.server_lr`` towards it)."""
        return aggregate

    def poison_aggregate(self, tag: str, modules: ModuleSet, round_: int) -> ModuleSet:
        """What the node adopts of the aggregate of collect step ``tag``: the aggregate itself (an
        adversarial edge, config adversary, returns a poisoned one)."""
        return modules

    def adopt(self, modules: ModuleSet) -> None:
        """Make an aggregate the node's current modules."""
        self.modules.update(modules)
        self.sender.invalidate()

    # ---- round ends: what the node holds, in memory and on disk ---------------------------------
    def _restore(self) -> None:
        """A restarted node: its newest checkpoint becomes its modules."""
        assert self.persistor is not None
        saved = self.persistor.load()
        if saved is None:
            return
        unknown = sorted(set(saved.modules) - set(self.spec))
        if saved.node != self.node_id or unknown:
            raise ValueError(f"{self.persistor.dir}: a checkpoint of {saved.node} (modules {unknown} unknown here)")
        self.hold((saved.round, saved.attempt), saved.modules, saved.extra, saved.tensors)
        log.info("%s resumed from its checkpoint of round %d attempt %d", self.node_id, saved.round, saved.attempt)

    def hold(
        self,
        key: tuple[int, int],
        modules: ModuleSet,
        extra: Mapping | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Make ``modules`` the node's current modules and round end ``key`` (a checkpoint read back),
        beside the initial modules (a fresh run starts from those); ``extra`` (its state.json's) and
        ``tensors``: the senders its label checks had flagged by then (left out again until a check clears
        them), the head check's claims (``claims_tensors``) and what its last label check judged by
        (``reference_tensors``), saved with it."""
        self.modules = {**self.modules, **modules}
        end = self._ends[key] = RoundEnd.read(key, dict(self.modules), extra or {}, tensors or {})
        self._use(end)

    def _use(self, end: RoundEnd) -> None:
        """The inbox's label-check state as of round end ``end``."""
        self.inbox.mislabelled, self.inbox.claims = dict(end.flags), dict(end.claims)
        self.federation = dict(end.federation)
        self.inbox.label_reference = end.label_reference

    def states(self) -> list[tuple[int, int]]:
        """Every round end this node can start a round from."""
        on_disk = self.persistor.available() if self.persistor is not None else []
        return sorted({*self._ends, *on_disk})

    def _end_state(self, ref: tuple[int, int]) -> RoundEnd | None:
        """A copy of round end ``ref`` (memory, else disk: kept in memory from then on, pruned with the others,
        since the assignment reads it and then the round's start), or None."""
        if ref not in self._ends:
            saved = self.persistor.load(ref) if self.persistor is not None else None
            if saved is None:
                return None
            self._ends[ref] = RoundEnd.read(
                ref, {**self._ends[(0, 0)].modules, **saved.modules}, saved.extra, saved.tensors
            )
        return self._ends[ref].copy()

    def start_round(self, state: RoundState) -> None:
        """Before a round's first step: go back to the round end it starts from, modules and label-check
        flags (an aborted attempt may have changed either; a restarted node may hold a later one)."""
        self.stats_under = None
        if state.base is not None:
            end = self._end_state(state.base)
            if end is None:
                raise ModuleError("FAILED_PRECONDITION", "no_base_state", f"{self.node_id} lost round end {state.base}")
            self.modules = end.modules
            self._use(end)
            self.sender.invalidate()
        self._refer(state)

    def _refer(self, state: RoundState) -> None:
        """The round's sends of a label reference's modules to joiners (``JOIN_REF``): those its label reference
        kept where they cover every module asked for, else (none kept, as after a restart from an older round
        end without them) the node's own; its inbox is told which, before anything is sent."""
        sends = [s for s in state.steps if isinstance(s, Send) and s.tag == JOIN_REF]
        ref = self.inbox.label_reference
        wanted = {m for s in sends for m in s.modules}
        kept, under = None, None
        if sends and ref is not None and ref.modules is not None and wanted <= set(ref.modules):
            kept, under = ref.modules, ref.round
        self._join_ref = kept
        if sends:
            self.inbox.refer([s.to for s in sends], under)

    def keep_reference(self) -> None:
        """A label check judged a calibration phase's statistics just now (its collect of the calibrated heads, or
        in star of the statistics, set ``Inbox.label_reference``): an edge (``keeps_reference``) keeps with it the
        modules those statistics were computed under, which it holds now: every one but the heads (calibrated by
        the phase) and the statistics; only where joiners send statistics to be checked against them."""
        cal = self.cfg.calibration
        joiners = cal.opening and cal.head_check is not None  # only then do joiners send statistics (join-stats)
        ref = self.inbox.label_reference
        if self.keeps_reference and joiners and ref is not None and ref.modules is None:
            kept = {n: Module(n, {k: v.clone() for k, v in m.tensors.items()}, ref.round, 1.0)
                    for n, m in self.modules.items() if not is_head(n) and stats_task(n) is None}  # fmt: skip
            self.inbox.label_reference = replace(ref, modules=kept)

    def join_reference(self, modules: ModuleSet) -> None:
        """A joiner's collector sent the modules to compute its next statistics under (``JOIN_REF``): held for
        that step alone, never adopted (it trains from its sync)."""
        self.stats_under = dict(modules)

    def end_round(self, state: RoundState) -> None:
        """Every step of the round done: its end is what the node holds now (saved when it persists). Feature
        statistics (calibration) served their round: they are dropped, never saved or carried over."""
        if any(stats_task(n) for n in self.modules):
            self.modules = {n: m for n, m in self.modules.items() if stats_task(n) is None}
            self.sender.invalidate()
        key = (state.round, state.attempt)
        end = self._ends[key] = RoundEnd(
            dict(self.modules),
            dict(self.inbox.mislabelled),
            dict(self.inbox.claims),
            self.inbox.label_reference,
            dict(self.federation),
        )
        for old in sorted(k for k in self._ends if k != (0, 0))[: -self.cfg.checkpoint.keep]:
            del self._ends[old]
        if self.persistor is not None:
            extra: dict = {MISLABELLED: end.flags} if end.flags else {}
            ref_tensors, ref_meta = reference_tensors(end.label_reference)
            if ref_meta is not None:
                extra[LABEL_REFERENCE] = ref_meta
            claims = {**end.claims, FEDERATION: end.federation} if end.federation else end.claims
            tensors = {**claims_tensors(claims), **ref_tensors}
            self.persistor.save(
                NodeState(self.node_id, state.round, self.modules, extra=extra, attempt=state.attempt, tensors=tensors)
            )
            self.metrics.round_end_saved(self.node_id, self.persistor.last_written)

    # ---- round control ---------------------------------------------------------------------
    def assign(
        self,
        round_: int,
        method: str,
        steps: list[Step],
        peers: dict[str, str],
        attempt: int = 0,
        base: tuple[int, int] | None = None,
    ) -> None:
        """Install the node's steps for ``round_`` (attempt ``attempt``) starting from round end ``base``
        (None: what it holds; its first step is then a sync) and open its inbox (validates first)."""
        self.rounds.validate(steps, peers, self.spec, bool(self.modules))
        if base is not None and base not in self._ends and base not in self.states():
            raise ModuleError(
                "FAILED_PRECONDITION",
                "no_base_state",
                f"{self.node_id} holds no state of round {base[0]} attempt {base[1]} (it has {self.states()})",
            )
        state = RoundState(round_, method, steps, dict(peers), attempt, base)
        # what the attempt starts from, modules and label-check flags: its collects score against those
        # modules and leave those senders out (start_round makes them the node's own before the first step)
        end = self._end_state(base) if base is not None else None
        reference, flags, claims = (
            (end.modules, end.flags, end.claims) if end is not None else (self.modules, None, None)
        )
        with self.rounds.lock:
            if not self.rounds.install(state):
                return
            self.metrics.round.labels(node=self.node_id).set(round_)
            collects = [s for s in steps if isinstance(s, Collect)]
            self.inbox.open_round(
                round_, collects, set(peers), attempt, reference=reference, mislabelled=flags, claims=claims
            )
            if end is not None:
                self.inbox.label_reference = end.label_reference

    def leave_out(self, round_: int, attempt: int, node: str, reason: str) -> None:
        """The coordinator's verdict: ``node`` is lost for this attempt (collects stop waiting for it,
        sends to it are skipped)."""
        with self.rounds.lock:
            state = self.rounds.get(round_)
            if state is None or state.attempt != attempt:
                return
            state.lost.add(node)
        tags = self.inbox.leave_out(round_, attempt, node, reason)
        log.warning("%s: %s left out of round %d (%s); collects %s", self.node_id, node, round_, reason, tags)

    def await_round(self, round_: int, timeout_s: float, attempt: int = 0) -> NodeReport:
        with self.rounds.lock:
            state = self.rounds.get(round_)
            if state is None or state.attempt != attempt:
                raise ModuleError(
                    "FAILED_PRECONDITION", "no_round", f"round {round_} attempt {attempt} was not assigned"
                )
            if state.future is None:
                state.future = self._runner.submit(self.executor.run, state)
        return state.future.result(timeout=timeout_s)

    # ---- receiving -------------------------------------------------------------------------
    def receive(self, requests: Iterator[pb.PushRequest], caller: str | None) -> pb.PushAck:
        return self.receiver.receive(requests, caller)

    def trace(self, what: str, modules: ModuleSet) -> None:
        if self.cfg.runtime.trace_dir and modules:
            d = Path(self.cfg.runtime.trace_dir) / self.node_id
            d.mkdir(parents=True, exist_ok=True)
            save_modules(modules, str(d / f"{what}.safetensors"))

    def shutdown(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.rounds.abort_all()  # a round still running (a failed run) ends now, not at its timeout
        self.inbox.abort_waits()
        self.sender.close()
        self._runner.shutdown(wait=False, cancel_futures=True)
        if self._owns_channels:
            self.channels.close()


# ---- servicers: translate, do not think -------------------------------------------------------
def abort_for(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, Unauthenticated):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
    if isinstance(err, ModuleError):
        context.abort(getattr(grpc.StatusCode, err.code), str(err))
    if isinstance(err, RoundAborted):
        context.abort(grpc.StatusCode.ABORTED, str(err))
    if isinstance(err, TimeoutError):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err) or "timed out")
    if isinstance(err, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


def authorize(
    node: NodeRuntime, context: grpc.ServicerContext, rpc: str, allowed: Callable[[Identity], bool]
) -> Identity:
    """The caller's identity if ``allowed`` says it may make this call; otherwise a ``ModuleError``
    (UNAUTHENTICATED without an identity, PERMISSION_DENIED for anyone else), counted by reason."""
    try:
        ident = node.security.peer(context)
    except Unauthenticated:
        node.metrics.denied.labels(node=node.node_id, rpc=rpc, reason="bad_identity").inc()
        raise
    if ident is None:
        node.metrics.denied.labels(node=node.node_id, rpc=rpc, reason="no_identity").inc()
        raise ModuleError("UNAUTHENTICATED", "no_identity", f"{rpc}: the caller presented no identity")
    if not allowed(ident):
        node.metrics.denied.labels(node=node.node_id, rpc=rpc, reason="not_allowed").inc()
        raise ModuleError("PERMISSION_DENIED", "not_allowed", f"{ident.role} {ident.id} may not call {rpc}")
    return ident


def from_coordinator(ident: Identity) -> bool:
    return ident.role == "cloud" and ident.id == CLOUD


class ModuleExchangeServicer(pb_grpc.ModuleExchangeServicer):
    def __init__(self, node: NodeRuntime) -> None:
        self.node = node
        self.bulk_port = 0  # the node's bulk listener (NodeServer starts it with wire.transport: bulk)

    def BulkEndpoint(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "BulkEndpoint", lambda i: i.role in ("cloud", "edge", "device"))
            return pb.BulkEndpointInfo(port=self.bulk_port)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def Push(self, request_iterator, context):  # noqa: N802
        try:
            caller = authorize(self.node, context, "Push", lambda i: i.role in ("cloud", "edge", "device"))
            return self.node.receive(request_iterator, caller.id)
        except grpc.RpcError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes a status
            abort_for(context, err)


class RoundControlServicer(pb_grpc.RoundControlServicer):
    def __init__(self, node: NodeRuntime) -> None:
        self.node = node

    def AssignRound(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "AssignRound", from_coordinator)
            steps = [step_from_pb(s) for s in request.steps]
            base = (request.base_round, request.base_attempt) if request.has_base else None
            self.node.assign(request.round, request.method, steps, dict(request.peers), request.attempt, base)
            return pb.AssignAck()
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def AwaitRound(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "AwaitRound", from_coordinator)
            report = self.node.await_round(request.round, self.node.cfg.runtime.round_timeout_s, request.attempt)
            return report_to_pb(report)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def LeaveOut(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "LeaveOut", from_coordinator)
            self.node.leave_out(request.round, request.attempt, request.node, request.reason or "lost")
            return pb.Empty()
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def Shutdown(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "Shutdown", from_coordinator)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        self.node.shutdown()
        return pb.Empty()
