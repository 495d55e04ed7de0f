"""The coordinator's reach into the nodes: health probes, round assignments, awaiting every node's
round at once, and the final shutdown. Talks gRPC; decides nothing (the planner did)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hffm.config import HFFMConfig
from hffm.ids import CLOUD
from hffm.methods import Step
from hffm.modules import ModuleError
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
    base: tuple[int, int] | None = None  # the round end it starts from (None: a sync replaces its state)

    def to_pb(self) -> pb.RoundTask:
        return pb.RoundTask(
            round=self.round,
            attempt=self.attempt,
            method=self.method,
            steps=[step_to_pb(s) for s in self.steps],
            peers=self.peers,
            has_base=self.base is not None,
            base_round=self.base[0] if self.base else 0,
            base_attempt=self.base[1] if self.base else 0,
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
        """Nodes that do not answer a health check in time (unreachable at the start of a round). One
        whose check ran out of time (slow, not refused: a loaded host, a first TLS handshake) is asked
        once more with ``faults.slow_probe_timeout_s`` before it counts as down."""

        def check(n: str, timeout_s: float) -> grpc.StatusCode | None:  # None: serving
            try:
                stub = health_pb2_grpc.HealthStub(self._channel(n))
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
                return None if resp.status == health_pb2.HealthCheckResponse.SERVING else grpc.StatusCode.UNAVAILABLE
            except grpc.RpcError as err:
                return err.code()

        def sweep(names: list[str], timeout_s: float) -> dict[str, grpc.StatusCode]:
            if not names:
                return {}
            with ThreadPoolExecutor(max_workers=min(32, len(names))) as pool:
                codes = pool.map(lambda n: check(n, timeout_s), names)
                return {n: c for n, c in zip(names, codes, strict=True) if c is not None}

        failed = sweep(nodes, self.cfg.d2d.probe_timeout_s)
        slow = [n for n, c in failed.items() if c == grpc.StatusCode.DEADLINE_EXCEEDED]
        again = sweep(slow, max(self.cfg.faults.slow_probe_timeout_s, self.cfg.d2d.probe_timeout_s))
        down = {n: c for n, c in failed.items() if n not in slow} | again
        if down:
            log.info("health checks failed: %s", ", ".join(f"{n} ({c.name})" for n, c in sorted(down.items())))
        return set(down)

    def assign(self, node: str, a: Assignment) -> None:
        task = a.to_pb()
        if node == CLOUD:  # the coordinator's own node: through the same conversion a servicer makes
            steps = [step_from_pb(s) for s in task.steps]
            self.node.assign(task.round, task.method, steps, dict(task.peers), task.attempt, a.base)
            return
        stub = self._stub(node)
        with_retries(
            lambda: stub.AssignRound(task, timeout=self.cfg.runtime.rpc_timeout_s, metadata=self.meta),
            attempts=5,
            what=f"assign {node}",
        )

    def assign_all(self, tasks: dict[str, Assignment], pool: ThreadPoolExecutor) -> dict[str, Exception]:
        """Assign every node its part; the nodes that refused or could not be reached, with why."""

        def one(n: str) -> Exception | None:
            try:
                self.assign(n, tasks[n])
                return None
            except (grpc.RpcError, ModuleError) as err:
                return err

        return {n: e for n, e in zip(tasks, pool.map(one, list(tasks)), strict=True) if e is not None}

    def await_all(
        self,
        nodes: list[str],
        round_: int,
        attempt: int,
        pool: ThreadPoolExecutor,
        on_failure: Callable[[str, BaseException], None],
        on_report: Callable[[NodeReport], Iterable[str]] = lambda _r: (),
    ) -> dict[str, NodeReport]:
        """Start and await every node's round at once. A node runs its steps only once asked, and its
        steps wait on other nodes', so every call must be in flight together: they are gRPC futures (no
        thread held per node). Reports are handled as they come: ``on_report`` names nodes the round
        no longer waits for (left out by a collector's deadline); a failed node goes to ``on_failure``,
        which raises to abort the attempt (the calls still open are cancelled) or returns to go on
        without it. A transient failure of a node that still answers is retried once (idempotent)."""
        timeout = self.cfg.runtime.round_timeout_s + 30
        req = pb.AwaitRequest(round=round_, attempt=attempt)
        done: queue.Queue = queue.Queue()
        futures: dict[str, Any] = {}

        def start(n: str) -> None:
            if n == CLOUD:  # the coordinator's own node
                fut = pool.submit(self.node.await_round, round_, self.cfg.runtime.round_timeout_s, attempt)
            else:
                fut = self._stub(n).AwaitRound.future(req, timeout=timeout, metadata=self.meta)
            futures[n] = fut
            fut.add_done_callback(lambda f, n=n: done.put((n, f)))

        for n in nodes:
            start(n)
        retried: set[str] = set()
        pending = set(nodes)
        reports: dict[str, NodeReport] = {}
        try:
            while pending:
                n, fut = done.get()
                if n not in pending or fut is not futures[n]:
                    continue
                try:
                    res = fut.result()
                    reports[n] = res if n == CLOUD else report_from_pb(res)
                except Exception as err:  # noqa: BLE001 - judged by the coordinator
                    code = err.code() if isinstance(err, grpc.RpcError) else None
                    if code in RETRYABLE and n not in retried and n != CLOUD and not self.probe([n]):
                        log.warning("await %s: %s; retrying", n, code.name if code else err)
                        retried.add(n)
                        start(n)
                        continue
                    pending.discard(n)
                    on_failure(n, err)
                    continue
                pending.discard(n)
                for gone in on_report(reports[n]):
                    if gone in pending:
                        pending.discard(gone)
                        futures[gone].cancel()
        finally:
            for n in pending:
                futures[n].cancel()
        return reports

    def leave_out(self, round_: int, attempt: int, lost: str, reason: str, tell: list[str]) -> None:
        """Tell ``tell`` (the nodes that collect from or send to ``lost``) to go on without it."""
        req = pb.LeaveOutRequest(round=round_, attempt=attempt, node=lost, reason=reason)
        for n in tell:
            if n == CLOUD:
                self.node.leave_out(round_, attempt, lost, reason)
                continue
            try:
                # a short deadline: a stalled node must not hold up the round (its own failure comes apart)
                self._stub(n).LeaveOut(req, timeout=max(5.0, self.cfg.d2d.probe_timeout_s), metadata=self.meta)
            except grpc.RpcError as err:  # that node's own failure is judged on its own
                log.warning("leave-out of %s at %s failed: %s", lost, n, err.code().name)

    def shutdown_at(self, node: str, address: str) -> None:
        """Shut down ``node`` at ``address`` (a device that left: no longer in the address book)."""
        try:
            stub = pb_grpc.RoundControlStub(self.node.channels.get(address, node))
            stub.Shutdown(pb.Empty(), timeout=5, metadata=self.meta)
        except grpc.RpcError as err:
            log.warning("shutdown of %s (it left) failed: %s", node, err.code().name)

    def shutdown_nodes(self) -> None:
        for nid in self.members.snapshot():
            if nid == CLOUD:
                continue
            try:
                self._stub(nid).Shutdown(pb.Empty(), timeout=5, metadata=self.meta)
            except grpc.RpcError as err:
                log.warning("shutdown of %s failed: %s", nid, err.code().name)
