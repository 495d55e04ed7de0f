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

from hffm.config import HFFMConfig
from hffm.costmodel import CostModel, Hop
from hffm.ids import role_of
from hffm.methods import Collect, RoundContext, RoundPlan, Send
from hffm.pki import Identity
from hffm.planner import PlannedRound, Planner
from hffm.results import NodeReport, round_record
from hffm.topology import Topology
from services.cloud.dispatcher import Assignment, Dispatcher
from services.cloud.membership import Membership, Registration
from services.cloud.progress import ProgressEvent, ProgressFeed
from services.cloud.results_writer import ResultsWriter
from services.common.convert import progress_to_pb, registration_from_pb
from services.common.metrics import link_label
from services.common.node import NodeRuntime, abort_for, authorize
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.coordinator")


class CloudNode(NodeRuntime):
    role = "cloud"


class Coordinator:
    """The round loop over its parts: membership (who is in, where, with how many samples), the
    planner (pure: plans from membership), the dispatcher (assign and await over gRPC), the progress
    feed and the results writer."""

    def __init__(self, cfg: HFFMConfig, topo: Topology, node: CloudNode, out_dir: Path) -> None:
        self.cfg, self.node, self.out_dir = cfg, node, out_dir
        self.progress = ProgressFeed()
        self.members = Membership(topo, node.address, on_change=self._registered)
        self.costs = CostModel(cfg, topo)
        self.planner = Planner(cfg, self.costs)
        self.method = self.planner.method
        self.dispatcher = Dispatcher(cfg, node, self.members)
        self.results = ResultsWriter(cfg, out_dir, node.metrics)
        self.done = threading.Event()
        self.ok = False

    @property
    def topo(self) -> Topology:
        return self.members.topo

    # ---- membership and progress ------------------------------------------------------------
    def register(self, reg: Registration) -> tuple[int, int]:
        """(registered, expected) after ``reg``; ``ValueError`` names what is wrong."""
        return self.members.register(reg), self.members.expected

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
        """This round's plan over the members that answer a health check (devices that do not sit the
        round out: their cluster and paths are recomputed without them)."""
        down = self.dispatcher.probe([d.id for d in self.topo.devices])
        if down:
            log.warning("round %d: unreachable devices left out: %s", round_, sorted(down))
        return self.planner.plan(round_, self.topo, down, self.members.samples)

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
            if self.method.uses_d2d and topo.role(nid) == "device":  # relays reach any cluster peer
                peers.update(d.id for d in topo.cluster(topo.device_map[nid].edge) if d.id != nid)
            peer_addresses = {p: self.members.address(p) for p in sorted(peers)}
            tasks[nid] = Assignment(plan.round, attempt, self.method.name, tuple(steps), peer_addresses)
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
        cost["profile"] = self.costs.cost.profile
        if self.costs.cost.profile == "paper":  # the seed code's per-round composition
            cost["latency_s"], cost["energy_j"] = self.costs.paper_round(self.method.name, self.cfg.e_agg, ctx.heads)
        cost["heads"] = dict(ctx.heads)
        return cost

    def run_round(self, r: int, pool: ThreadPoolExecutor, attempt: int = 0) -> None:
        t0 = time.perf_counter()
        planned = self.plan_round(r)
        nodes = planned.topo.node_ids()
        self.dispatcher.assign_all(self.tasks_for(planned, attempt), pool)
        reports = self.dispatcher.await_all(nodes, r, attempt, pool)
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
        rec.modeled = self.model_round(planned.plan, planned.ctx, reports)
        self.results.add(rec)
        self.results.write(self.members.snapshot(), complete=False)
        self.progress.publish(
            ProgressEvent(
                phase="round",
                round=r,
                rounds=self.cfg.rounds,
                registered=self.members.expected,
                expected=self.members.expected,
                results_json=json.dumps(rec.to_dict()),
            )
        )
        log.info("round %d done in %.2fs: %s", r, wall, json.dumps(rec.accuracy))

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.members.wait_for_all(self.cfg.runtime.register_timeout_s)
            expected = self.members.expected
            self.progress.publish(
                ProgressEvent(
                    phase="round",
                    round=0,
                    rounds=self.cfg.rounds,
                    registered=expected,
                    expected=expected,
                    message="all nodes registered",
                )
            )
            time.sleep(self.cfg.runtime.start_delay_s)
            with ThreadPoolExecutor(max_workers=min(64, len(self.topo.node_ids()))) as pool:
                for r in range(1, self.cfg.rounds + 1):
                    self.run_round(r, pool)
            self.results.finish(self.node.modules, self.members.snapshot())
            self.ok = True
            self.progress.publish(
                ProgressEvent(
                    phase="done",
                    round=self.cfg.rounds,
                    rounds=self.cfg.rounds,
                    message=str(self.out_dir / "results.json"),
                )
            )
        except Exception as err:  # noqa: BLE001
            log.exception("run failed")
            self.progress.publish(ProgressEvent(phase="failed", message=f"{type(err).__name__}: {err}"))
        finally:
            self.results.write(self.members.snapshot(), complete=self.ok)
            self.shutdown_nodes()
            self.done.set()

    def shutdown_nodes(self) -> None:
        self.dispatcher.shutdown_nodes()


def may_register(caller: Identity, info: pb.NodeInfo, topo: Topology) -> bool:
    """A node registers only itself; an edge forwards the registrations of its own devices."""
    if caller.id == info.id and caller.role == info.role:
        return True
    dev = topo.device_map.get(info.id)
    return caller.role == "edge" and info.role == "device" and dev is not None and dev.edge == caller.id


class CloudRegistry(pb_grpc.RegistryServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def Register(self, request, context):  # noqa: N802
        try:
            authorize(self.coord.node, context, "Register", lambda i: may_register(i, request, self.coord.topo))
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

    def Watch(self, request, context):  # noqa: N802
        try:  # the run's results go to the operator (the launcher) and the coordinator alone
            authorize(self.coord.node, context, "Watch", lambda i: i.role in ("operator", "cloud"))
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        yield from self.coord.watch(context)
