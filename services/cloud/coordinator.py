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
from google.protobuf.json_format import MessageToDict

from hffm.config import HFFMConfig
from hffm.costmodel import CostModel, Hop
from hffm.methods import Collect, RoundContext, RoundPlan, Send, evaluates, make_method
from hffm.modules import save_modules
from hffm.results import round_record, write_results
from hffm.topology import CLOUD, Topology
from services.common.client import RETRYABLE, with_retries
from services.common.convert import step_to_pb
from services.common.metrics import link_label, role_of
from services.common.node import NodeRuntime
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.coordinator")


class CloudNode(NodeRuntime):
    role = "cloud"


class Coordinator:
    def __init__(self, cfg: HFFMConfig, topo: Topology, node: CloudNode, out_dir: Path) -> None:
        self.cfg, self.topo, self.node, self.out_dir = cfg, topo, node, out_dir
        self.method = make_method(cfg.method, cfg.e_agg)
        self.costs = CostModel(cfg, topo)
        self.addresses: dict[str, str] = {CLOUD: node.address}
        self.expected = len(topo.node_ids())
        self.rounds: list[dict[str, Any]] = []
        self.events: list[pb.Progress] = []
        self._cv = threading.Condition()
        self.done = threading.Event()
        self.ok = False

    # ---- membership ------------------------------------------------------------------------
    def register(self, info: pb.NodeInfo) -> pb.RegisterAck:
        try:
            role = self.topo.role(info.id)
        except KeyError:
            raise ValueError(f"{info.id!r} is not a node of this topology") from None
        if role != info.role:
            raise ValueError(f"{info.id} is a {role}, registered as {info.role!r}")
        if role == "device" and info.edge != self.topo.device_map[info.id].edge:
            raise ValueError(f"{info.id} belongs to {self.topo.device_map[info.id].edge}, not {info.edge!r}")
        if not info.address:
            raise ValueError(f"{info.id}: address is required")
        with self._cv:
            self.addresses[info.id] = info.address  # a restarted node re-registers with its new address
            n = len(self.addresses)
            self._publish_locked(
                pb.Progress(
                    phase="waiting",
                    registered=n,
                    expected=self.expected,
                    rounds=self.cfg.rounds,
                    message=f"{info.id} registered",
                )
            )
            self._cv.notify_all()
        log.info("registered %s at %s (%d/%d)", info.id, info.address, n, self.expected)
        return pb.RegisterAck(registered=n, expected=self.expected)

    # ---- progress ----------------------------------------------------------------------------
    def _publish_locked(self, ev: pb.Progress) -> None:
        self.events.append(ev)
        self._cv.notify_all()

    def publish(self, ev: pb.Progress) -> None:
        with self._cv:
            self._publish_locked(ev)

    def watch(self, context: grpc.ServicerContext):
        i = 0
        while context.is_active():
            with self._cv:
                while i >= len(self.events) and context.is_active():
                    self._cv.wait(0.5)
                batch = self.events[i:]
                i = len(self.events)
            for ev in batch:
                yield ev
                if ev.phase in ("done", "failed"):
                    return

    # ---- the run -----------------------------------------------------------------------------
    def _stub(self, node: str) -> pb_grpc.RoundControlStub:
        return pb_grpc.RoundControlStub(self.node.channels.get(self.addresses[node]))

    def _assign(self, node: str, task: pb.RoundTask) -> None:
        if node == CLOUD:
            from services.common.convert import step_from_pb

            self.node.assign(task.round, task.method, [step_from_pb(s) for s in task.steps], dict(task.peers))
            return
        stub = self._stub(node)
        with_retries(
            lambda: stub.AssignRound(task, timeout=self.cfg.runtime.rpc_timeout_s), attempts=5, what=f"assign {node}"
        )

    def await_all(self, nodes: list[str], round_: int, pool: ThreadPoolExecutor) -> list[pb.RoundReport]:
        """Start and await every node's round at once. A node runs its steps only once asked, and
        its steps wait on other nodes', so every call must be in flight together: they are gRPC
        futures (no thread held per node), retried once each on a transient failure."""
        timeout = self.cfg.runtime.round_timeout_s + 30
        req = pb.AwaitRequest(round=round_)
        own = pool.submit(self.node.await_round, round_, self.cfg.runtime.round_timeout_s) if CLOUD in nodes else None
        futures = {n: self._stub(n).AwaitRound.future(req, timeout=timeout) for n in nodes if n != CLOUD}
        reports = {}
        for n, fut in futures.items():
            try:
                reports[n] = fut.result()
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                log.warning("await %s: %s; retrying", n, err.code().name)  # AwaitRound is idempotent
                reports[n] = self._stub(n).AwaitRound(req, timeout=timeout)
        if own is not None:
            reports[CLOUD] = own.result()
        return [reports[n] for n in nodes]

    def wait_for_members(self) -> None:
        deadline = time.monotonic() + self.cfg.runtime.register_timeout_s
        with self._cv:
            while len(self.addresses) < self.expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(self.topo.node_ids()) - set(self.addresses))
                    raise TimeoutError(
                        f"nodes not registered after {self.cfg.runtime.register_timeout_s:.0f}s: {missing}"
                    )
                self._cv.wait(min(left, 1.0))

    def probe(self, nodes: list[str]) -> set[str]:
        """Devices that do not answer a health check in time (unreachable at the start of a round)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def dead(n: str) -> bool:
            try:
                stub = health_pb2_grpc.HealthStub(self.node.channels.get(self.addresses[n]))
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.cfg.d2d.probe_timeout_s)
                return resp.status != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return True

        with ThreadPoolExecutor(max_workers=min(32, max(1, len(nodes)))) as pool:
            return {n for n, d in zip(nodes, pool.map(dead, nodes), strict=True) if d}

    def plan_round(self, round_: int) -> tuple[RoundPlan, Topology, RoundContext]:
        """This round's topology (unreachable devices left out), cluster heads, paths and plan."""
        down = self.probe([d.id for d in self.topo.devices])
        if down:
            log.warning("round %d: unreachable devices left out: %s", round_, sorted(down))
        topo = self.topo.without(down)
        ctx = self.costs.d2d_context(topo, round_, down) if self.method.uses_d2d else RoundContext()
        plan = self.method.plan(round_, topo, ctx)
        if not evaluates(round_, self.cfg.rounds, self.cfg.train.eval_every):
            plan = plan.without_evaluation()
        plan.validate()
        return plan, topo, ctx

    def tasks_for(self, plan: RoundPlan, topo: Topology) -> dict[str, pb.RoundTask]:
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
            tasks[nid] = pb.RoundTask(
                round=plan.round,
                method=self.method.name,
                steps=[step_to_pb(s) for s in steps],
                peers={p: self.addresses[p] for p in sorted(peers)},
            )
        return tasks

    def model_round(self, plan: RoundPlan, ctx: RoundContext, reports: list[dict[str, Any]]) -> dict[str, Any]:
        hops = sorted(  # a canonical order: float sums must not depend on which send finished first
            Hop(
                t["sender"],
                t["receiver"],
                t["link"],
                t["module"],
                int(t["bytes"]),
                t["tag"],
                t.get("origin") or t["sender"],
                t.get("destination") or t["receiver"],
            )
            for r in reports
            for t in r.get("sent", [])
        )
        samples = {r["node"]: int(r.get("train_samples", 0)) for r in reports if int(r.get("train_samples", 0))}
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

    def run(self) -> None:
        try:
            self.wait_for_members()
            self.publish(
                pb.Progress(
                    phase="round",
                    round=0,
                    rounds=self.cfg.rounds,
                    registered=self.expected,
                    expected=self.expected,
                    message="all nodes registered",
                )
            )
            time.sleep(self.cfg.runtime.start_delay_s)
            nodes = self.topo.node_ids()
            with ThreadPoolExecutor(max_workers=min(64, len(nodes))) as pool:
                for r in range(1, self.cfg.rounds + 1):
                    t0 = time.perf_counter()
                    plan, topo, ctx = self.plan_round(r)
                    nodes = topo.node_ids()
                    tasks = self.tasks_for(plan, topo)
                    list(pool.map(lambda n, t=tasks: self._assign(n, t[n]), nodes))
                    reports = self.await_all(nodes, r, pool)
                    wall = time.perf_counter() - t0
                    dicts = [
                        MessageToDict(x, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                        for x in reports
                    ]
                    rec = round_record(self.method.name, r, self.cfg.e_agg, self.method.cloud_round(r), dicts, wall)
                    rec["modeled"] = self.model_round(plan, ctx, dicts)
                    rec["left_out"] = sorted(set(self.topo.node_ids()) - set(nodes))
                    self._observe_round(rec)
                    self.rounds.append(rec)
                    self._write()
                    self.publish(
                        pb.Progress(
                            phase="round",
                            round=r,
                            rounds=self.cfg.rounds,
                            registered=self.expected,
                            expected=self.expected,
                            results_json=json.dumps(rec),
                        )
                    )
                    log.info("round %d done in %.2fs: %s", r, wall, json.dumps(rec["accuracy"]))
            save_modules(self.node.modules, str(self.out_dir / "global_modules.safetensors"))
            self.ok = True
            self.publish(
                pb.Progress(
                    phase="done",
                    round=self.cfg.rounds,
                    rounds=self.cfg.rounds,
                    message=str(self.out_dir / "results.json"),
                )
            )
        except Exception as err:  # noqa: BLE001
            log.exception("run failed")
            self.publish(pb.Progress(phase="failed", message=f"{type(err).__name__}: {err}"))
        finally:
            self._write()
            self.shutdown_nodes()
            self.done.set()

    def _observe_round(self, rec: dict[str, Any]) -> None:
        m, method = self.node.metrics, self.method.name
        m.round_modeled_latency.labels(method=method).set(rec["modeled"]["latency_s"])
        m.round_modeled_energy.labels(method=method).set(rec["modeled"]["energy_j"])
        m.round_wall.labels(method=method).set(rec["wall_s"])
        for task, splits in rec["accuracy"].items():
            for split, v in splits.items():
                if v is not None:
                    m.round_accuracy.labels(method=method, task=task, split=split).set(v)
        m.rounds_done.labels(method=method).inc()

    def _write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_results(
            self.out_dir / "results.json",
            self.cfg.model_dump(mode="json"),
            self.rounds,
            nodes=dict(sorted(self.addresses.items())),
            complete=self.ok,
        )

    def shutdown_nodes(self) -> None:
        for nid, addr in list(self.addresses.items()):
            if nid == CLOUD:
                continue
            try:
                pb_grpc.RoundControlStub(self.node.channels.get(addr)).Shutdown(pb.Empty(), timeout=5)
            except grpc.RpcError as err:
                log.warning("shutdown of %s failed: %s", nid, err.code().name)


class CloudRegistry(pb_grpc.RegistryServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def Register(self, request, context):  # noqa: N802
        try:
            return self.coord.register(request)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def Watch(self, request, context):  # noqa: N802
        yield from self.coord.watch(context)
