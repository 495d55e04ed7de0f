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
from hffm.methods import Collect, Send, make_method
from hffm.modules import save_modules
from hffm.results import round_record, write_results
from hffm.topology import CLOUD, Topology
from services.common.client import with_retries
from services.common.convert import step_to_pb
from services.common.node import NodeRuntime
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.coordinator")


class CloudNode(NodeRuntime):
    role = "cloud"


class Coordinator:
    def __init__(self, cfg: HFFMConfig, topo: Topology, node: CloudNode, out_dir: Path) -> None:
        self.cfg, self.topo, self.node, self.out_dir = cfg, topo, node, out_dir
        self.method = make_method(cfg.method, cfg.e_agg)
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

    def _await(self, node: str, round_: int) -> pb.RoundReport:
        if node == CLOUD:
            return self.node.await_round(round_, self.cfg.runtime.round_timeout_s)
        stub = self._stub(node)
        return with_retries(
            lambda: stub.AwaitRound(pb.AwaitRequest(round=round_), timeout=self.cfg.runtime.round_timeout_s + 30),
            attempts=3,
            what=f"await {node}",
        )

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

    def tasks_for(self, round_: int) -> dict[str, pb.RoundTask]:
        plan = self.method.plan(round_, self.topo)
        plan.validate()
        tasks = {}
        for nid in self.topo.node_ids():
            steps = plan.steps.get(nid, [])
            peers = set()
            for s in steps:
                if isinstance(s, Send):
                    peers.add(s.to)
                    peers.update(s.route)
                elif isinstance(s, Collect):
                    peers.update(s.senders)
            tasks[nid] = pb.RoundTask(
                round=round_,
                method=self.method.name,
                steps=[step_to_pb(s) for s in steps],
                peers={p: self.addresses[p] for p in sorted(peers)},
            )
        return tasks

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
            nodes = self.topo.node_ids()
            with ThreadPoolExecutor(max_workers=min(64, len(nodes))) as pool:
                for r in range(1, self.cfg.rounds + 1):
                    t0 = time.perf_counter()
                    tasks = self.tasks_for(r)
                    list(pool.map(lambda n, t=tasks: self._assign(n, t[n]), nodes))
                    reports = list(pool.map(lambda n, r=r: self._await(n, r), nodes))
                    wall = time.perf_counter() - t0
                    rec = round_record(
                        self.method.name,
                        r,
                        self.cfg.e_agg,
                        self.method.cloud_round(r),
                        [
                            MessageToDict(
                                x, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                            )
                            for x in reports
                        ],
                        wall,
                    )
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
