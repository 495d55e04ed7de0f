"""The coordinator's planning, apart from any network: from this round's membership (the nodes that
are members and reachable) to a validated plan, with cluster heads and D2D paths, evaluation steps
and every collect's weight caps. Pure: no torch, no gRPC (the D2D path weights ask the cost model
for module sizes, which builds the modules once, lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hffm.circulation import Circulation
from hffm.config import HFFMConfig
from hffm.costmodel import CostModel
from hffm.geometry import path, path_latency
from hffm.ids import CLOUD, task_of
from hffm.methods import RoundContext, RoundPlan, evaluates
from hffm.recovery import StartPlan, StateKey, critical, pin_syncs, plan_starts, plan_takers, with_syncs
from hffm.topology import Topology, arrived, final


@dataclass(frozen=True)
class PlannedRound:
    plan: RoundPlan
    topo: Topology  # the members taking part (unreachable ones left out)
    ctx: RoundContext  # cluster heads and D2D paths (empty without D2D)
    left_out: tuple[str, ...]  # members that do not take part, sorted
    starts: StartPlan = StartPlan({}, {})  # the round end each node starts from, or its sync source
    critical: frozenset[str] = frozenset()  # nodes the round cannot lose midway (hffm.recovery.critical)
    arrivals: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> tasks it takes up this round


class Planner:
    def __init__(self, cfg: HFFMConfig, costs: CostModel) -> None:
        self.cfg = cfg
        self.costs = costs
        # the configured method, or per-module rules over it (circulation.rules); either way a rule's or a
        # tier's aggregation rule (aggregation.tiers) is written into each collect step
        modules = final(costs.topo, cfg).modules_for(CLOUD)  # every module the run will have
        self.method: Circulation = Circulation.from_config(cfg, modules)
        self._modules = modules

    def _task_modules(self, task: str) -> list[str]:
        return [m for m in self._modules if task_of(m) == task]

    def plan(
        self,
        round_: int,
        members: Topology,
        down: set[str] | frozenset[str] = frozenset(),
        samples: Mapping[str, Mapping[str, int]] | None = None,
        held: Mapping[str, StateKey] | None = None,
        cloud_rounds_done: list[int] | None = None,
        accuracy: Mapping[str, Mapping[str, float | None]] | None = None,
        specialists: Mapping[str, list[str]] | None = None,
        flagged: set[str] | frozenset[str] = frozenset(),
        pins: Mapping[tuple[str, str], bytes] | None = None,
    ) -> PlannedRound:
        """The plan of ``round_`` over ``members`` minus the nodes in ``down`` (an edge takes its cluster
        with it). ``samples`` (device -> task -> registered training samples) bound the weights senders
        may claim; ``held`` (node -> the round end it holds) decides who starts with a sync, served per
        circulation.relay; ``accuracy`` (node -> task -> its latest global accuracy, as it reported it)
        passes over holders that score far below the best. ``specialists`` (task -> its specialists; None:
        specialists are off) restrict relays of a task's modules to them, each pinned to the digests of
        the version examined (``pins``: (node, module) -> digest); a ``flagged`` node serves none."""
        topo = members.without(set(down))
        gone = set(members.node_ids()) - set(topo.node_ids())
        arrivals = self.cfg.circulation.arrivals
        before = topo.with_tasks(arrived(arrivals, round_ - 1))  # who held what at the end of the last round
        topo = topo.with_tasks(arrived(arrivals, round_))  # tasks taken up by now (circulation.arrivals)
        new = {d: tuple(t for t in ts if t not in before.device_map[d].tasks)
               for d, ts in arrived(arrivals, round_).items() if d in topo.device_map}  # fmt: skip
        new = {d: ts for d, ts in new.items() if ts}
        held_before = {t for d in before.devices for t in d.tasks}
        takers = {d: tuple(t for t in ts if t in held_before) for d, ts in new.items()}
        takers = {d: ts for d, ts in takers.items() if ts}  # relayed; the rest introduce their task
        ctx = self.costs.d2d_context(topo, round_, gone) if self.method.uses_d2d else RoundContext()
        plan = self.method.plan(round_, topo, ctx)
        cal, quorum = self.cfg.calibration, self.method.aggregation.quorum
        if cal.enabled and self.method.cloud_round(round_):
            plan = plan.with_calibration(topo, quorum, cal.label_t)
        if cal.enabled and cal.opening and round_ == 1:  # statistics before the first training push
            plan = plan.with_calibration(topo, quorum, cal.label_t, opening=True)
        if not evaluates(round_, self.cfg.rounds, self.cfg.train.eval_every):
            plan = plan.without_evaluation()
        absent = frozenset(set(self.costs.topo.device_map) - set(topo.device_map))  # down, or left

        def graph(edge: str):
            return self.costs.d2d_graph(edge, exclude=absent & {d.id for d in self.costs.topo.cluster(edge)})

        def route(edge: str, src: str, dst: str) -> list[str]:
            return path(graph(edge), src, dst)

        def cost(edge: str, p: list[str]) -> float:
            return path_latency(graph(edge), p)

        def score(node: str, tasks: tuple[str, ...]) -> float | None:
            vals = [(accuracy or {}).get(node, {}).get(t) for t in tasks]
            return None if not vals or None in vals else sum(vals) / len(vals)

        def unflagged(node: str, _tasks: tuple[str, ...]) -> bool:
            return node not in flagged

        def specialist(node: str, tasks: tuple[str, ...]) -> bool:
            return node not in flagged and all(node in (specialists or {}).get(t, ()) for t in tasks)

        starts = StartPlan({n: (0, 0) for n in topo.node_ids()}, {})
        if held is not None:
            circ = self.cfg.circulation
            starts = plan_starts(
                self.method,
                topo,
                held,
                cloud_rounds_done or [],
                ctx,
                route,
                cost,
                circ.relay,
                score,
                circ.relay_tolerance,
                unflagged if flagged else None,
            )
        if takers:
            serve = specialist if specialists is not None else unflagged if flagged else None
            starts = plan_takers(self.method, topo, before, takers, starts, route, cost, self._task_modules, serve)
        if starts.sync:
            plan = with_syncs(plan, starts, topo, self.method.collect, self.method.circulating)
            if pins:  # a specialist relays the version the cloud examined, nothing else
                plan = pin_syncs(plan, starts, pins)
        if cal.opening and cal.head_check is not None and round_ > 1 and starts.sync:
            # statistics first for the devices that start synced (joiners, lost state) too: before they train
            # after an edge round the edges' adapters moved on from those their label checks of the last phase (the
            # last cloud round's, or round 1's opening phase) judged by: a joiner's statistics are computed under
            # those, which its edge sends it first
            after_edge = cal.label_t is not None and not self.method.cloud_round(round_ - 1)
            ref = self.method.circulating if after_edge else None
            plan = plan.with_join_statistics(topo, starts.sync, quorum, cal.label_t, ref)
        if samples is not None:
            plan = plan.with_weight_caps(samples, topo, self.cfg.aggregation.claim_bound)
        plan.validate()
        left_out = tuple(sorted(gone))
        return PlannedRound(plan, topo, ctx, left_out, starts, frozenset(critical(plan)), new)
