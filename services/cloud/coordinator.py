"""The cloud's coordinator: membership, the round loop, progress and results.

Control plane: the coordinator sends every node its steps for a round (AssignRound, to all nodes
first so every inbox is open before any module moves), then runs them (AwaitRound, in parallel)
and collects their reports. Data plane: modules move only as the method's plan says (device->edge,
edge->cloud, ...), never through the coordinator.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from hffm.adversary import adversaries
from hffm.aggregation import server_step
from hffm.calibration import calibrate_heads, claims_of, claims_tensors, from_module
from hffm.config import HFFMConfig
from hffm.costmodel import CostModel, Hop
from hffm.ids import CLOUD, head_name, joining_edge, role_of, stats_name, stats_task
from hffm.inbox import NOT_EXAMINED
from hffm.methods import Collect, RoundContext, RoundPlan, Send
from hffm.modules import ModuleError, ModuleSet
from hffm.persist import MISLABELLED, NodeState, Persistor, rng_states, set_rng_states
from hffm.pki import Identity, PKIError
from hffm.planner import PlannedRound, Planner
from hffm.results import NodeReport, RoundRecord, atomic_write_bytes, round_record, strict_json
from hffm.specialists import switch_proof
from hffm.topology import Topology, arrived
from hffm.wire import PushHeader
from services.cloud.dispatcher import Assignment, Dispatcher
from services.cloud.membership import Membership, Registration, RegistrationTimeout
from services.cloud.progress import ProgressEvent, ProgressFeed
from services.cloud.results_writer import ResultsWriter
from services.cloud.specialists import SpecialistBoard
from services.common import faults
from services.common.convert import header_from_pb, progress_to_pb, registration_from_pb
from services.common.metrics import link_label
from services.common.node import NodeRuntime, RoundState, abort_for, authorize
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.coordinator")


class CloudNode(NodeRuntime):
    role = "cloud"

    def server_step(self, aggregate: ModuleSet) -> ModuleSet:
        """global + ``aggregation.server_lr`` x (aggregate - global), from the modules it holds
        (hffm.aggregation.server_step; 1: the aggregate itself). Feature statistics (calibration) are sums:
        taken as aggregated."""
        stats = {n: m for n, m in aggregate.items() if stats_task(n)}
        rest = {n: m for n, m in aggregate.items() if n not in stats}
        return {**server_step(self.modules, rest, self.cfg.aggregation.server_lr), **stats}

    def calibrate(self, state: RoundState, tasks: tuple[str, ...]) -> None:
        """Each task's head trained on virtual features drawn from the statistics it collected (CCVR,
        hffm/calibration.py); the adapters stay as aggregated."""
        missing = [t for t in tasks if stats_name(t) not in self.modules or head_name(t) not in self.modules]
        if missing:
            raise ModuleError(
                "FAILED_PRECONDITION", "missing_module", f"cloud holds no statistics or head of {missing}"
            )
        stats = {t: from_module(self.modules[stats_name(t)]) for t in tasks}
        heads, losses = calibrate_heads(self.modules, stats, self.cfg, state.round)
        self.federation = {**self.federation, **claims_of(stats)}  # what a served head is held to (specialists)
        log.info(
            "round %d: heads calibrated (virtual loss %s)", state.round, {t: round(v, 3) for t, v in losses.items()}
        )
        self.adopt(heads)


class AttemptFailed(RuntimeError):
    """A round's attempt cannot complete (a node it needs was lost); ``lost``: the nodes found gone."""

    def __init__(self, message: str, lost: set[str]) -> None:
        super().__init__(message)
        self.lost = lost


# codes of an AwaitRound whose node went away (died, restarted, or stalled past the call's deadline)
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class Coordinator:
    """The round loop over its parts: membership (who is in, where, with how many samples), the
    planner (pure: plans from membership), the dispatcher (assign and await over gRPC), the progress
    feed and the results writer."""

    def __init__(self, cfg: HFFMConfig, topo: Topology, node: CloudNode, out_dir: Path) -> None:
        self.cfg, self.node, self.out_dir = cfg, node, out_dir
        self.progress = ProgressFeed()
        self.costs = CostModel(cfg, topo)
        self.members = Membership(
            topo,
            node.address,
            on_change=self._registered,
            on_states=self._holds,
            joins=cfg.topology.joins,
            max_joins=cfg.topology.max_joins,
            later=arrived(cfg.circulation.arrivals),
            locate=self.costs.locate,
        )
        self.planner = Planner(cfg, self.costs)
        self.method = self.planner.method
        self.dispatcher = Dispatcher(cfg, node, self.members)
        self.board = SpecialistBoard(cfg, node, self.members)  # specialists (Section V-C), when enabled
        self.results = ResultsWriter(
            cfg,
            out_dir,
            node.metrics,
            adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins),
        )
        self.persistor = Persistor.in_root(cfg.checkpoint.dir or out_dir / "state", CLOUD, cfg.checkpoint.keep)
        # node -> the round end it holds, as far as the coordinator knows (hffm/recovery.py)
        self.held: dict[str, tuple[int, int]] = {n: (0, 0) for n in topo.node_ids()}
        self._held_lock = threading.Lock()
        self.first_round = self.resume()  # before the server starts: registrations then update what it loaded
        self.missing: set[str] = set()  # members lost or unreachable lately (faults.rejoin_wait_s)
        self._running: PlannedRound | None = None  # the attempt now running
        self._departed: list[str] = []  # devices that left before the round being planned
        self.done = threading.Event()
        self.ok = False

    @property
    def topo(self) -> Topology:
        return self.members.topo

    # ---- membership and progress ------------------------------------------------------------
    def register(self, reg: Registration) -> tuple[int, int]:
        """(registered, expected) after ``reg``; ``ValueError`` names what is wrong."""
        return self.members.register(reg), self.members.expected

    def leave(self, device: str, reason: str, evict: bool = False) -> int:
        """``device`` leaves (Membership.leave; ``evict``: the operator removes it for good): the last round
        planned with it, running or about to run, is its last (returned; 0: none); the next round's
        planning shuts it down."""
        return self.members.leave(device, reason, evict)

    def report_switch(self, header: PushHeader, caller: str) -> str:
        """A taker's proof that a specialist relayed something other than what the cloud examined: the
        push header it refused, signed by the sender (``specialists.switch_proof`` says what it proves).
        The sender is flagged on it; ``ModuleError`` (state unchanged) when it proves nothing."""
        if not self.cfg.specialists.enabled:
            raise ModuleError("FAILED_PRECONDITION", "no_specialists", "specialists are off: nothing is pinned")
        if not self.node.security.enabled:
            raise ModuleError("FAILED_PRECONDITION", "no_signatures", "security is off: a header proves nothing")
        try:
            self.node.security.verify_header(header)
        except PKIError as err:
            raise ModuleError("PERMISSION_DENIED", "bad_signature", f"not signed by {header.sender}: {err}") from None
        if header.sender in self.board.flagged:
            return header.sender  # proven already (another taker, or the same report again)
        running = self._running
        module = switch_proof(header, caller, running.plan.round if running else None, self.board.pins)
        self.board.flag(
            header.sender,
            f"round {header.round}: relayed {module} other than the version examined "
            f"(its signed push header, reported by {caller})",
        )
        return header.sender

    def _release_departed(self, gone: dict[str, str]) -> list[str]:
        """Shut down the devices that left since the last round (``gone``: device -> address; their last
        round is over)."""
        for n, address in sorted(gone.items()):
            self.dispatcher.shutdown_at(n, address)
        return sorted(gone)

    def _registered(self, message: str) -> None:
        self.progress.publish(
            ProgressEvent(
                phase="waiting",
                registered=len(self.members.addresses),
                expected=self.members.expected,
                rounds=self.cfg.rounds,
                message=message,
            )
        )

    def watch(self, context: grpc.ServicerContext):
        for ev in self.progress.watch(context.is_active):
            yield progress_to_pb(ev)

    # ---- a round -----------------------------------------------------------------------------
    def plan_round(self, round_: int) -> PlannedRound:
        """This round's plan over the members that answer a health check (a device that does not sits
        the round out: its cluster and paths are recomputed without it; an edge that does not takes its
        cluster with it), starting every node from the round end it holds or with a sync."""
        if self.missing and self.cfg.faults.rejoin_wait_s > 0:
            self._await_members(self.missing, self.cfg.faults.rejoin_wait_s)
        # one view for the whole round, taken at one instant: a device joining or leaving meanwhile changes
        # the next round (a Leave between the table and the samples planned it with no samples to claim)
        gone, topo, samples, positions = self.members.plan_view(round_)
        departed = self._release_departed(gone)
        if departed:
            log.info("round %d: left since the last round: %s", round_, departed)
            self._departed += departed
        joined = self.costs.admit(topo, positions)  # positions and links of devices admitted since the last round
        if joined:
            log.info("round %d: joined since the last round: %s", round_, joined)
        down = self.dispatcher.probe([n for n in topo.node_ids() if n != CLOUD])
        if down:
            log.warning("round %d: unreachable nodes sit it out: %s", round_, sorted(down))
        self.missing = set(down)
        cloud_rounds = [x.round for x in self.results.rounds if x.cloud_aggregation]
        scored = [x.node_accuracy for x in self.results.rounds if x.node_accuracy]
        accuracy = {
            n: {t: s.get("global") for t, s in tasks.items()} for n, tasks in (scored[-1] if scored else {}).items()
        }
        on = self.cfg.specialists.enabled
        return self.planner.plan(
            round_,
            topo,
            down,
            samples,
            self.held,
            cloud_rounds,
            accuracy,
            self.board.roles if on else None,
            frozenset(self.board.flagged),
            self.board.pins if on else None,
        )

    def tasks_for(self, planned: PlannedRound, attempt: int = 0) -> dict[str, Assignment]:
        """Every taking-part node's assignment: its steps and the address of every node it may talk to."""
        plan, topo = planned.plan, planned.topo
        tasks = {}
        for nid in topo.node_ids():
            steps = plan.steps.get(nid, [])
            peers = set()
            for s in steps:
                if isinstance(s, Send):
                    peers.add(s.to)
                    peers.update(s.route)
                elif isinstance(s, Collect):
                    peers.update(s.senders)
                    if s.pinned:  # a taker of a specialist's relay: a mismatch is reported to the cloud
                        peers.add(CLOUD)
            if self.method.uses_d2d and topo.role(nid) == "device":  # relays reach any cluster peer
                peers.update(d.id for d in topo.cluster(topo.device_map[nid].edge) if d.id != nid)
            peer_addresses = {p: self.members.address(p) for p in sorted(peers)}
            tasks[nid] = Assignment(
                plan.round, attempt, self.method.name, tuple(steps), peer_addresses, planned.starts.base.get(nid)
            )
        return tasks

    def model_round(self, plan: RoundPlan, ctx: RoundContext, reports: list[NodeReport]) -> dict[str, Any]:
        hops = sorted(  # a canonical order: float sums must not depend on which send finished first
            Hop(
                t.sender,
                t.receiver,
                t.link,
                t.module,
                t.bytes,
                t.tag,
                t.origin or t.sender,
                t.destination or t.receiver,
            )
            for r in reports
            for t in r.sent
        )
        samples = {r.node: r.train_samples for r in reports if r.train_samples}
        rc = self.costs.round_cost(plan, hops, samples)
        m = self.node.metrics
        for h, t, e in rc.hop_costs:
            link = link_label(h.link, role_of(h.sender))
            m.modeled_latency.labels(node=h.sender, link=link, module=h.module).inc(t)
            m.modeled_energy.labels(node=h.sender, link=link, module=h.module).inc(e)
        by_tier_link: dict[str, float] = {}
        for h, _t, e in rc.hop_costs:
            key = f"{role_of(h.sender)}/{link_label(h.link, role_of(h.sender))}"
            by_tier_link[key] = by_tier_link.get(key, 0.0) + e
        for dev, (_t, e) in rc.compute.items():
            m.modeled_energy.labels(node=dev, link="compute", module="").inc(e)
            by_tier_link["device/compute"] = by_tier_link.get("device/compute", 0.0) + e
        for edge, head in ctx.heads.items():
            m.set_head(edge, head)
        cost = rc.as_dict()
        cost["by_tier_link"] = dict(sorted(by_tier_link.items()))
        # the same maps under names that carry their unit; the short names stay for earlier readers
        for short in ("by_module", "by_node", "by_tier_link"):
            cost[f"energy_j_{short}"] = cost[short]
        cost["profile"] = self.costs.cost.profile
        # what the transfers were charged on: the bytes really sent, or cost.module_bytes_override per push
        override = self.costs.cost.module_bytes_override
        cost["bytes_basis"] = f"override:{override}" if override else "sent"
        if self.costs.cost.profile == "paper" and not self.cfg.circulation.rules:  # the seed code's composition
            cost["latency_s"], cost["energy_j"] = self.costs.paper_round(self.method.name, self.cfg.e_agg, ctx.heads)
        cost["heads"] = dict(ctx.heads)
        return cost

    def run_round(self, r: int, pool: ThreadPoolExecutor) -> None:
        """Round ``r`` to completion: attempts until one completes (a lost critical node aborts one;
        the next is planned over whoever answers, with syncs for nodes that missed state), at most
        ``faults.max_attempts``; then the round's record and the checkpoint."""
        attempt = self._first_attempt(r)
        aborted: list[dict[str, Any]] = []
        self._departed = []
        while True:
            self._write_intent(r, attempt)
            try:
                rec = self.run_attempt(r, attempt, pool)
                break
            except AttemptFailed as err:
                self.missing |= err.lost
                aborted.append({"attempt": attempt, "reason": str(err), "lost": sorted(err.lost)})
                log.warning("round %d attempt %d aborted: %s", r, attempt, err)
                self.node.metrics.attempts_aborted.inc()
                if len(aborted) >= self.cfg.faults.max_attempts:
                    raise RuntimeError(f"round {r}: {len(aborted)} attempts failed; the last: {err}") from None
                attempt += 1
                time.sleep(self.cfg.faults.retry_delay_s)
        rec.aborted = aborted
        sc = self.cfg.specialists
        if sc.enabled and r % sc.every == 0 and r < self.cfg.rounds and self._running is not None:
            rec.specialists = self.board.review(r, self._running.topo, pool, frozenset(self.missing))
        self.results.add(rec)
        self.results.write(self.members.snapshot(), complete=False)
        self.checkpoint(r, attempt)
        faults.hit(CLOUD, "round_end", r)
        self.progress.publish(
            ProgressEvent(
                phase="round",
                round=r,
                rounds=self.cfg.rounds,
                registered=self.members.expected,
                expected=self.members.expected,
                results_json=json.dumps(strict_json(rec.to_dict()), allow_nan=False),
            )
        )
        log.info("round %d done in %.2fs: %s", r, rec.wall_s, json.dumps(rec.accuracy))

    def run_attempt(self, r: int, attempt: int, pool: ThreadPoolExecutor) -> RoundRecord:
        t0 = time.perf_counter()
        planned = self.plan_round(r)
        self._running = planned
        nodes = planned.topo.node_ids()
        tasks = self.tasks_for(planned, attempt)
        failed = self.dispatcher.assign_all(tasks, pool)
        if failed:
            with self._held_lock:
                for n, err in failed.items():  # it lost the round end it was to start from: sync it next
                    if isinstance(err, grpc.RpcError) and "no_base_state" in (err.details() or ""):
                        self.held.pop(n, None)
            why = "; ".join(f"{n}: {_describe(e)}" for n, e in sorted(failed.items()))
            raise AttemptFailed(f"assignment failed: {why}", set(failed))
        lost: dict[str, str] = {}

        def tell(x: str) -> list[str]:  # the nodes whose steps name x
            out = []
            for n in nodes:
                for st in planned.plan.steps.get(n, []):
                    if (isinstance(st, Collect) and x in st.senders) or (
                        isinstance(st, Send) and x in (st.to, *st.route)
                    ):
                        out.append(n)
                        break
            return out

        def leave_out(x: str, reason: str) -> None:
            lost[x] = reason
            self.missing.add(x)
            log.warning("round %d attempt %d: %s left out (%s)", r, attempt, x, reason)
            self.node.metrics.nodes_lost.labels(node=x).inc()
            self.dispatcher.leave_out(r, attempt, x, reason, tell(x))

        def on_failure(n: str, err: BaseException) -> None:
            if n in lost:
                return
            if n == CLOUD:
                raise AttemptFailed(f"the cloud's own steps failed: {_describe(err)}", set())
            # a bait and switch: with signatures the taker's proof flags the sender (ReportSwitch), never a
            # refusal the sender relays (the taker's word); without them the federation trusts that word
            if self.cfg.specialists.enabled and not self.node.security.enabled and NOT_EXAMINED in _describe(err):
                self.board.flag(n, f"round {r}: relayed a version other than the one examined")
            dead = self.dispatcher.probe([x for x in nodes if x != CLOUD and x not in lost])
            if isinstance(err, grpc.RpcError) and err.code() in GONE:
                dead.add(n)  # its call broke: it died (and may already be back, without this round)
            if n in planned.critical or dead & planned.critical:
                why = f"{n} failed ({_describe(err)})" + (f"; not answering: {sorted(dead)}" if dead else "")
                raise AttemptFailed(why, dead)
            for x in sorted(dead | {n}):
                leave_out(x, _describe(err) if x == n else "not answering")

        def on_report(rep: NodeReport) -> list[str]:
            late = sorted({x for a in rep.aggregates for x in a.left_out} - set(lost))
            for x in late:
                if x in planned.critical:
                    raise AttemptFailed(f"{rep.node} went on without {x}, which the round needs", {x})
                leave_out(x, f"missed the deadline of {rep.node}")
            return late

        by_node = self.dispatcher.await_all(nodes, r, attempt, pool, on_failure, on_report)
        reports = [by_node[n] for n in nodes if n in by_node]
        with self._held_lock:  # what each node completing the round now holds
            for n in by_node:
                self.held[n] = (r, attempt)
        wall = time.perf_counter() - t0
        rec = round_record(
            self.method.name,
            r,
            self.cfg.e_agg,
            self.method.cloud_round(r),
            reports,
            wall,
            attempt,
            list(planned.left_out),
        )
        rec.departed = list(self._departed)
        rec.arrivals = {d: list(ts) for d, ts in sorted(planned.arrivals.items())}
        rec.lost = dict(sorted(lost.items()))
        rec.synced = {n: src.source for n, src in sorted(planned.starts.sync.items())}
        rec.modeled = self.model_round(planned.plan, planned.ctx, reports)
        return rec

    # ---- durable state -----------------------------------------------------------------------
    def checkpoint(self, r: int, attempt: int) -> None:
        """The coordinator's state at the end of round ``r``: the cloud's modules, the results so far,
        the members, what every node holds, the senders its label checks flagged and what their statistics
        claimed (the head check's), RNG states (atomic: docs/reliability.md)."""
        self.persistor.save(
            NodeState(
                CLOUD,
                r,
                self.node.modules,
                rng_states(),
                {
                    "rounds": [x.to_dict() for x in self.results.rounds],
                    "members": self.members.to_json(),
                    "held": {n: list(k) for n, k in sorted(self.held.items())},
                    "specialists": self.board.to_json(),
                    MISLABELLED: dict(self.node.inbox.mislabelled),
                },
                attempt,
                claims_tensors(self.node.inbox.claims),
            )
        )
        self.node.metrics.round_end_saved(CLOUD, self.persistor.last_written)

    def resume(self) -> int:
        """Continue from the newest checkpoint, if any: returns the first round to run (1 without one)."""
        saved = self.persistor.load()
        if saved is None:
            return 1
        extra = saved.extra
        self.results.rounds = [RoundRecord.from_dict(d) for d in extra.get("rounds", [])]
        self.members.restore(extra.get("members", {}))
        self.board.restore(extra.get("specialists", {}))
        self.held = {n: (int(k[0]), int(k[1])) for n, k in extra.get("held", {}).items()}
        self.node.hold((saved.round, saved.attempt), saved.modules, extra, saved.tensors)
        set_rng_states(saved.rng)
        log.warning("resuming after round %d (attempt %d) from %s", saved.round, saved.attempt, self.persistor.dir)
        return saved.round + 1

    def _intent_path(self) -> Path:
        return self.persistor.dir / "attempt.json"

    def _write_intent(self, r: int, attempt: int) -> None:
        """Written before an attempt's first assignment: a restarted coordinator numbers its attempt of
        the same round above every one the nodes may still be running."""
        self.persistor.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._intent_path(), json.dumps({"round": r, "attempt": attempt}).encode())

    def _first_attempt(self, r: int) -> int:
        try:
            doc = json.loads(self._intent_path().read_text())
        except (OSError, ValueError):
            return 0
        return int(doc["attempt"]) + 1 if int(doc.get("round", -1)) == r else 0

    def _holds(self, node: str, states: set[tuple[int, int]]) -> None:
        """A node registered (again: it restarted) holding ``states``: a round end it no longer holds is
        forgotten, so it starts its next round with a sync."""
        with self._held_lock:
            if node in self.held and self.held[node] not in states:
                log.warning("%s holds %s, not round end %s: it will be synced", node, sorted(states), self.held[node])
                del self.held[node]

    def _await_members(self, nodes: list[str] | set[str], timeout_s: float) -> None:
        """Wait up to ``timeout_s`` until ``nodes`` answer (restarted nodes come back)."""
        deadline = time.monotonic() + timeout_s
        while True:
            down = self.dispatcher.probe(sorted(set(nodes) - {CLOUD}))
            if not down or time.monotonic() > deadline:
                if down:
                    log.warning("going on without %s (not answering after %.0fs)", sorted(down), timeout_s)
                return
            time.sleep(0.5)

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            first = self.first_round
            self.members.wait_for_all(self.cfg.runtime.register_timeout_s)  # a resumed one knows them
            if first > 1:
                self._await_members(self.topo.node_ids(), self.cfg.faults.resume_wait_s)
            expected = self.members.expected
            self.progress.publish(
                ProgressEvent(
                    phase="round",
                    round=first - 1,
                    rounds=self.cfg.rounds,
                    registered=expected,
                    expected=expected,
                    message="all nodes registered" if first == 1 else f"resumed after round {first - 1}",
                )
            )
            if first == 1:
                time.sleep(self.cfg.runtime.start_delay_s)
            with ThreadPoolExecutor(max_workers=min(64, len(self.topo.node_ids()))) as pool:
                for r in range(first, self.cfg.rounds + 1):
                    self.run_round(r, pool)
            self.results.finish(self.node.modules)
            # complete before anyone hears it is: whoever follows the run may read the file at "done"
            self.results.write(self.members.snapshot(), complete=True)
            self.ok = True
            self.progress.publish(
                ProgressEvent(
                    phase="done",
                    round=self.cfg.rounds,
                    rounds=self.cfg.rounds,
                    message=str(self.out_dir / "results.json"),
                )
            )
        except RegistrationTimeout as err:  # an operator's mismatch, not a bug: one line, no stack trace
            log.error("run failed: %s", err)
            self.progress.publish(ProgressEvent(phase="failed", message=str(err)))
        except Exception as err:  # noqa: BLE001
            log.exception("run failed")
            self.progress.publish(ProgressEvent(phase="failed", message=f"{type(err).__name__}: {err}"))
        finally:
            if not self.ok:  # a complete run's results were written before "done"
                self.results.write(self.members.snapshot(), complete=False)
            self.shutdown_nodes()
            self.done.set()

    def shutdown_nodes(self) -> None:
        self.dispatcher.shutdown_nodes()


def may_register(caller: Identity, info: pb.NodeInfo, topo: Topology, joins: bool = False) -> bool:
    """A node registers only itself; an edge forwards the registrations of its own devices (with
    ``topology.joins``, also of a device outside the table whose id names that edge: the edge checked its
    certificate; the membership then checks the rest)."""
    if caller.id == info.id and caller.role == info.role:
        return True
    if caller.role != "edge" or info.role != "device":
        return False
    dev = topo.device_map.get(info.id)
    if dev is not None:
        return dev.edge == caller.id
    return joins and info.edge == caller.id == joining_edge(info.id)


def may_leave(caller: Identity, device: str, topo: Topology) -> bool:
    """A device leaves by itself, or its edge forwards its leave (the edge checked its certificate)."""
    if caller.role == "device":
        return caller.id == device
    dev = topo.device_map.get(device)
    return caller.role == "edge" and dev is not None and dev.edge == caller.id


class CloudRegistry(pb_grpc.RegistryServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def Leave(self, request, context):  # noqa: N802
        try:
            authorize(self.coord.node, context, "Leave", lambda i: may_leave(i, request.id, self.coord.topo))
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        try:
            return pb.LeaveAck(round=self.coord.leave(request.id, request.reason[:200]))
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except ValueError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def Register(self, request, context):  # noqa: N802
        try:
            joins = self.coord.cfg.topology.joins
            authorize(self.coord.node, context, "Register", lambda i: may_register(i, request, self.coord.topo, joins))
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        try:
            registered, expected = self.coord.register(registration_from_pb(request))
            return pb.RegisterAck(registered=registered, expected=expected)
        except PermissionError as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self._lock = threading.Lock()
        self._watchers = 0

    def Evict(self, request, context):  # noqa: N802
        try:  # the operator alone (its certificate): a device never evicts another, nor does an edge
            authorize(self.coord.node, context, "Evict", lambda i: i.role == "operator")
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        try:
            return pb.LeaveAck(round=self.coord.leave(request.id, f"evicted: {request.reason[:200]}", evict=True))
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except ValueError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def ReportSwitch(self, request, context):  # noqa: N802
        try:  # a device that took a specialist's relay, about a push addressed to it
            ident = authorize(self.coord.node, context, "ReportSwitch", lambda i: i.role == "device")
            self.coord.report_switch(header_from_pb(request), ident.id)
            return pb.Empty()
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def Watch(self, request, context):  # noqa: N802
        try:  # the run's results go to the operator (the launcher) and the coordinator alone
            authorize(self.coord.node, context, "Watch", lambda i: i.role in ("operator", "cloud"))
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        with self._lock:  # each watcher holds a server thread: a cap keeps some for the round's calls
            if self._watchers >= self.coord.cfg.limits.max_watchers:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._watchers} progress streams already (limits.max_watchers)",
                )
            self._watchers += 1
        try:
            yield from self.coord.watch(context)
        finally:
            with self._lock:
                self._watchers -= 1
