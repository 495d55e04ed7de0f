"""The coordinator's planning, apart from any network: from this round's membership (the nodes that
are members and reachable) to a validated plan, with cluster heads and D2D paths, evaluation steps
and every collect's weight caps. Pure: no torch, no gRPC (the D2D path weights ask the cost model
for module sizes, which builds the modules once, lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hffm.config import AggregationConfig, HFFMConfig
from hffm.costmodel import CostModel
from hffm.methods import AggregationSpec, Method, Quorum, RoundContext, RoundPlan, evaluates, make_method
from hffm.topology import Topology


def aggregation_spec(cfg: AggregationConfig) -> AggregationSpec:
    q = cfg.quorum
    return AggregationSpec(
        cfg.rule, tuple(sorted(cfg.params.items())), Quorum(q.min_senders, q.min_fraction, q.deadline_s)
    )


@dataclass(frozen=True)
class PlannedRound:
    plan: RoundPlan
    topo: Topology  # the members taking part (unreachable ones left out)
    ctx: RoundContext  # cluster heads and D2D paths (empty without D2D)
    left_out: tuple[str, ...]  # members that do not take part, sorted


class Planner:
    def __init__(self, cfg: HFFMConfig, costs: CostModel) -> None:
        self.cfg = cfg
        self.costs = costs
        self.method: Method = make_method(cfg.method, cfg.e_agg, aggregation_spec(cfg.aggregation))

    def plan(
        self,
        round_: int,
        members: Topology,
        down: set[str] | frozenset[str] = frozenset(),
        samples: Mapping[str, Mapping[str, int]] | None = None,
    ) -> PlannedRound:
        """The plan of ``round_`` over ``members`` minus the devices in ``down``. ``samples``
        (device -> task -> registered training samples) bound the weights senders may claim."""
        topo = members.without(set(down))
        ctx = self.costs.d2d_context(topo, round_, set(down)) if self.method.uses_d2d else RoundContext()
        plan = self.method.plan(round_, topo, ctx)
        if not evaluates(round_, self.cfg.rounds, self.cfg.train.eval_every):
            plan = plan.without_evaluation()
        if samples is not None:
            plan = plan.with_weight_caps(samples, topo)
        plan.validate()
        left_out = tuple(sorted(set(members.node_ids()) - set(topo.node_ids())))
        return PlannedRound(plan, topo, ctx, left_out)
