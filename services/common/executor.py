"""Runs a node's steps for one round, in order, without knowing which method planned them: trains,
sends (consecutive sends concurrently), collects (its own modules first when the step includes them)
and adopts the aggregate, evaluates. What the node does for each kind of step is the node's."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hffm.ids import stats_task
from hffm.inbox import Aggregate
from hffm.methods import JOIN_REF, JOIN_STATS, OPENING_CALIBRATED, Calibrate, Collect, Evaluate, Send, Stats, Train
from hffm.results import AggregateRecord, NodeReport
from services.common import faults
from services.common.rounds import RoundState

if TYPE_CHECKING:
    from services.common.node import NodeRuntime


class StepExecutor:
    def __init__(self, node: NodeRuntime) -> None:
        self.node = node

    def run(self, state: RoundState) -> NodeReport:
        node = self.node
        t0 = time.perf_counter()
        steps = state.steps
        node.start_round(state)
        i = 0
        while i < len(steps):
            state.raise_if_aborted()
            s = steps[i]
            if isinstance(s, Send):
                j = i
                while j < len(steps) and isinstance(steps[j], Send):
                    j += 1
                node.sender.send_all(state, list(steps[i:j]))  # type: ignore[arg-type]
                i = j
                continue
            if isinstance(s, Train):
                node.train(state)
                node.sender.invalidate()
            elif isinstance(s, Collect):
                self._collect(state, s)
                if s.tag == OPENING_CALIBRATED:  # the round's training starts from the calibrated heads
                    self._rebase()
            elif isinstance(s, Evaluate):
                node.evaluate(state)
            elif isinstance(s, Stats):
                node.feature_stats(state, s.tasks)
            elif isinstance(s, Calibrate):
                node.calibrate(state, s.tasks)
                self._rebase()
            i += 1
        state.raise_if_aborted()
        node.end_round(state)
        state.report.wall_s = time.perf_counter() - t0
        return state.report

    def _rebase(self) -> None:
        """Heads calibrated within the round: the collects still to come score against them (``Inbox.rebase``)."""
        node = self.node
        node.inbox.rebase({n: m for n, m in node.modules.items() if stats_task(n) is None})

    def _collect(self, state: RoundState, s: Collect) -> None:
        node = self.node
        if s.include_self:
            names = node.own_module_names()
            # its statistics too, where it made them this round (a D2D cluster head's calibration phase)
            mine = set(names) | {n for n in s.own if stats_task(n) is not None and n in node.modules}
            own = {n: node.modules[n] for n in (s.own or names) if n in mine}
            node.inbox.add_own(s.tag, own)
            node.trace(f"{state.trace_prefix}-{s.tag}-own", own)
        faults.hit(node.node_id, f"collect.{s.tag}", state.round)
        judged = node.inbox.label_reference
        agg: Aggregate = node.inbox.wait(s.tag, node.cfg.runtime.round_timeout_s)
        faults.hit(node.node_id, f"collected.{s.tag}", state.round)
        node.metrics.aggregations.labels(node=node.node_id, tag=s.tag).inc()
        node.trace(f"{state.trace_prefix}-{s.tag}-aggregate", agg.modules)
        if s.tag == JOIN_REF:  # what to compute the statistics that follow under: held for them, not adopted
            node.join_reference(agg.modules)
        elif s.tag != JOIN_STATS:  # synced devices' statistics are held by the inbox (claims), not adopted
            if agg.kept is not None:  # its senders' statistics its label check kept: what it sends up next
                node.trace(f"{state.trace_prefix}-{s.tag}-kept", agg.kept)
            node.adopt(node.poison_aggregate(s.tag, node.server_step(agg.adopted), state.round))
        if node.inbox.label_reference is not judged:  # a phase's label check just ran: under what it judged
            node.keep_reference()
        if agg.left_out:  # senders that missed the deadline are not sent this round's result either
            with node.rounds.lock:
                state.lost.update(agg.left_out)
        weights = {sender: dict(w) for sender, w in agg.weights}
        state.report.aggregates.append(
            AggregateRecord(node.node_id, s.tag, agg.counted, agg.left_out, agg.scores, weights)
        )
        for sc in agg.scores:
            if sc.flagged:
                node.metrics.flagged.labels(node=node.node_id, sender=sc.sender, module=sc.module).inc()
