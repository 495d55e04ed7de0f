"""The coordinator's reach into the nodes: health probes, round assignments, awaiting every node's
round at once, and the final shutdown. Talks gRPC; decides nothing (the planner did)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hffm.config import HFFMConfig
from hffm.ids import CLOUD
from hffm.methods import Step
from hffm.results import NodeReport
from services.cloud.membership import Membership
from services.common.client import RETRYABLE, with_retries
from services.common.convert import report_from_pb, step_from_pb, step_to_pb
from services.common.node import NodeRuntime
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.dispatcher")


@dataclass(frozen=True)
class Assignment:
    """One node's part of a round: its steps and the addresses of every node it may talk to."""

    round: int
    attempt: int
    method: str
    steps: tuple[Step, ...]
    peers: dict[str, str]

    def to_pb(self) -> pb.RoundTask:
        return pb.RoundTask(
            round=self.round,
            attempt=self.attempt,
            method=self.method,
            steps=[step_to_pb(s) for s in self.steps],
            peers=self.peers,
        )


class Dispatcher:
    def __init__(self, cfg: HFFMConfig, node: NodeRuntime, members: Membership) -> None:
        self.cfg, self.node, self.members = cfg, node, members
        self.meta = node.security.call_metadata()  # plaintext: names the cloud (TLS: its certificate does)

    def _channel(self, node: str):
        return self.node.channels.get(self.members.address(node), node)

    def _stub(self, node: str) -> pb_grpc.RoundControlStub:
        return pb_grpc.RoundControlStub(self._channel(node))

    def probe(self, nodes: list[str]) -> set[str]:
        """Nodes that do not answer a health check in time (unreachable at the start of a round)."""

        def dead(n: str) -> bool:
            try:
                stub = health_pb2_grpc.HealthStub(self._channel(n))
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.cfg.d2d.probe_timeout_s)
                return resp.status != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return True

        with ThreadPoolExecutor(max_workers=min(32, max(1, len(nodes)))) as pool:
            return {n for n, d in zip(nodes, pool.map(dead, nodes), strict=True) if d}

    def assign(self, node: str, a: Assignment) -> None:
        task = a.to_pb()
        if node == CLOUD:  # the coordinator's own node: through the same conversion a servicer makes
            steps = [step_from_pb(s) for s in task.steps]
            self.node.assign(task.round, task.method, steps, dict(task.peers), task.attempt)
            return
        stub = self._stub(node)
        with_retries(
            lambda: stub.AssignRound(task, timeout=self.cfg.runtime.rpc_timeout_s, metadata=self.meta),
            attempts=5,
            what=f"assign {node}",
        )

    def assign_all(self, tasks: dict[str, Assignment], pool: ThreadPoolExecutor) -> None:
        list(pool.map(lambda n: self.assign(n, tasks[n]), list(tasks)))

    def await_all(self, nodes: list[str], round_: int, attempt: int, pool: ThreadPoolExecutor) -> list[NodeReport]:
        """Start and await every node's round at once. A node runs its steps only once asked, and
        its steps wait on other nodes', so every call must be in flight together: they are gRPC
        futures (no thread held per node), retried once each on a transient failure."""
        timeout = self.cfg.runtime.round_timeout_s + 30
        req = pb.AwaitRequest(round=round_, attempt=attempt)
        own = (
            pool.submit(self.node.await_round, round_, self.cfg.runtime.round_timeout_s, attempt)
            if CLOUD in nodes
            else None
        )
        futures = {
            n: self._stub(n).AwaitRound.future(req, timeout=timeout, metadata=self.meta) for n in nodes if n != CLOUD
        }
        reports: dict[str, NodeReport] = {}
        for n, fut in futures.items():
            try:
                reports[n] = report_from_pb(fut.result())
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                log.warning("await %s: %s; retrying", n, err.code().name)  # AwaitRound is idempotent
                reports[n] = report_from_pb(self._stub(n).AwaitRound(req, timeout=timeout, metadata=self.meta))
        if own is not None:
            reports[CLOUD] = own.result()
        return [reports[n] for n in nodes]

    def shutdown_nodes(self) -> None:
        for nid in self.members.snapshot():
            if nid == CLOUD:
                continue
            try:
                self._stub(nid).Shutdown(pb.Empty(), timeout=5, metadata=self.meta)
            except grpc.RpcError as err:
                log.warning("shutdown of %s failed: %s", nid, err.code().name)
