"""Per-module circulation (the paper's Section V-A): each module its own depth, period and path.

A ``Circulation`` is a ``Method`` built from rules (config ``circulation.rules``, matched in order
against module names, the first match winning) and a fallback for the modules no rule matches: the
configured ``method`` with ``e_agg``. Each of the five methods is one rule over every module:

| method        | path   | depth | every | cloud_every |
|---------------|--------|-------|-------|-------------|
| star          | star   | cloud | 1     | 1           |
| hfm           | direct | cloud | 1     | e_agg       |
| edge-only     | direct | edge  | 1     | —           |
| hfm-d2d       | d2d    | cloud | 1     | e_agg       |
| edge-only-d2d | d2d    | head  | 1     | —           |

A round's plan: every device trains all of its modules (``Train`` first) and evaluates them last; in
between, each rule whose period falls on the round contributes the steps of its path and depth for its
own modules only (``Method.select``), its collect tags marked ``@i`` (rule ``i``) so that two rules'
pushes to one node never meet in one collect. A personal module never leaves its device.

The steps of the rules are merged into one list per node by *phase*: a step's phase is the length of
the longest chain of steps it waits on (its node's earlier steps, and for a collect every send that
feeds it). Each node runs its steps in phase order, so every step at phase p waits only on steps of
lower phases, which by induction all finish: merging schedules cannot deadlock. With one rule the
order is the method's own (phases grow along each node's list), so every preset's plan is the method's
plan, step for step (tests/golden/presets.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from hffm.config import AggregationConfig, CirculationConfig, CirculationRule, HFFMConfig
from hffm.ids import CLOUD
from hffm.methods import (
    REGISTRY,
    AggregationSpec,
    Collect,
    Evaluate,
    Method,
    Quorum,
    RoundContext,
    RoundPlan,
    Send,
    Step,
    Train,
)
from hffm.topology import Topology

# (path, depth) -> the method that moves modules that way; and back
BASES: dict[tuple[str, str], str] = {
    ("star", "cloud"): "star",
    ("direct", "cloud"): "hfm",
    ("direct", "edge"): "edge-only",
    ("d2d", "cloud"): "hfm-d2d",
    ("d2d", "head"): "edge-only-d2d",
}
PRESETS: dict[str, tuple[str, str]] = {m: pd for pd, m in BASES.items()}

Rules = Mapping[str, tuple[str, tuple[tuple[str, float], ...]]]  # tier -> (rule, sorted params)

# Non-uniform policies worth comparing (hffm table1's extra rows, hffm sweep's grid): name -> (the
# fallback method, e_agg, rules as in config)
NAMED_POLICIES: dict[str, tuple[str, int, list[dict[str, Any]]]] = {
    "uniform": ("hfm-d2d", 2, []),
    "uniform, E_agg=4": ("hfm-d2d", 4, []),
    "heads personal": ("hfm-d2d", 2, [{"modules": "head.*", "depth": "personal"}]),
    "heads in the cluster": ("hfm-d2d", 2, [{"modules": "head.*", "depth": "head", "path": "d2d"}]),
    "adapters to the cloud every 4": (
        "hfm-d2d",
        2,
        [{"modules": "adapter.*", "depth": "cloud", "path": "d2d", "cloud_every": 4}],
    ),
    "adapters to the cloud every 8": (
        "hfm-d2d",
        2,
        [{"modules": "adapter.*", "depth": "cloud", "path": "d2d", "cloud_every": 8}],
    ),
    "adapters in the cluster every 2": (
        "hfm-d2d",
        2,
        [{"modules": "adapter.*", "depth": "cloud", "path": "d2d", "every": 2, "cloud_every": 4}],
    ),
    "heads via the edge": ("hfm-d2d", 2, [{"modules": "head.*", "depth": "cloud", "path": "direct"}]),
}


def aggregation_spec(cfg: AggregationConfig) -> AggregationSpec:
    q = cfg.quorum
    return AggregationSpec(
        cfg.rule, tuple(sorted(cfg.params.items())), Quorum(q.min_senders, q.min_fraction, q.deadline_s)
    )


def with_policy(cfg: HFFMConfig, method: str, e_agg: int, rules: list[dict[str, Any]]) -> HFFMConfig:
    """``cfg`` with its method, e_agg and circulation rules replaced (the rules validated as at load)."""
    circulation = CirculationConfig(rules=[CirculationRule(**r) for r in rules])
    return cfg.model_copy(update={"method": method, "e_agg": e_agg, "circulation": circulation})


def pareto(points: Mapping[str, tuple[float, ...]]) -> list[str]:
    """The names whose point no other point dominates (every coordinate minimised: negate accuracy), in
    the order given."""

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return [n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n)]


@dataclass(frozen=True)
class Flow:
    """One rule, resolved: the modules it matches circulate along ``path`` up to ``depth``."""

    index: int  # its place in circulation.rules; -1: the fallback (the configured method)
    pattern: str
    depth: str
    path: str
    every: int
    cloud_every: int
    rule: str | None = None
    params: tuple[tuple[str, float], ...] = ()

    @property
    def suffix(self) -> str:
        return "" if self.index < 0 else f"@{self.index}"

    def describe(self) -> str:
        if self.depth == "personal":
            return f"{self.pattern}: personal"
        cloud = f", cloud every {self.cloud_every}" if self.depth == "cloud" else ""
        return f"{self.pattern}: {self.path} to {self.depth}, every {self.every}{cloud}"


def preset_flow(method: str, e_agg: int) -> Flow:
    path, depth = PRESETS[method]
    return Flow(-1, "*", depth, path, 1, 1 if path == "star" else e_agg)


def flows(rules: list[CirculationRule], method: str, e_agg: int) -> list[Flow]:
    out = []
    for i, r in enumerate(rules):
        # unset: star every round it aggregates; otherwise e_agg, rounded up to a multiple of every
        cloud_every = r.cloud_every or (r.every if r.path == "star" else r.every * -(-e_agg // r.every))
        out.append(Flow(i, r.modules, r.depth, r.path, r.every, cloud_every, r.rule, tuple(sorted(r.params.items()))))
    return [*out, preset_flow(method, e_agg)]


class Circulation(Method):
    """A plan per round from per-module rules (module docstring). ``name`` is the fallback method's."""

    def __init__(
        self,
        flows_: list[Flow],
        modules: list[str],
        method: str,
        aggregation: AggregationSpec | None = None,
        tier_rules: Rules | None = None,
    ) -> None:
        fallback = flows_[-1]
        cloud = [f.cloud_every for f in flows_ if f.depth == "cloud"]
        super().__init__(max(cloud, default=fallback.cloud_every), aggregation)
        self.name = method
        self.tier_rules = dict(tier_rules or {})
        self.assigned = {m: next(f for f in flows_ if fnmatchcase(m, f.pattern)) for m in modules}
        unused = [f for f in flows_[:-1] if f not in self.assigned.values()]
        if unused:
            f = unused[0]
            raise ValueError(
                f"circulation.rules.{f.index}.modules: {f.pattern!r} matches no module left by the rules "
                f"before it (modules: {', '.join(modules)})"
            )
        self.flows = [f for f in flows_ if f in self.assigned.values()]
        self.uses_d2d = any(f.path == "d2d" for f in self.flows if f.depth != "personal")

    @classmethod
    def from_config(cls, cfg: HFFMConfig, modules: list[str]) -> Circulation:
        return cls(
            flows(cfg.circulation.rules, cfg.method, cfg.e_agg),
            modules,
            cfg.method,
            aggregation_spec(cfg.aggregation),
            cfg.aggregation.tier_rules(),
        )

    # ---- what moves when ---------------------------------------------------------------------
    def circulating(self, topo: Topology, node: str) -> tuple[str, ...]:
        """The modules of ``node`` that ever leave a device (a sync carries these; personal ones stay)."""
        return tuple(m for m in topo.modules_for(node) if self.assigned[m].depth != "personal")

    def active(self, round_: int) -> list[Flow]:
        return [f for f in self.flows if f.depth != "personal" and round_ % f.every == 0]

    def cloud_round(self, round_: int) -> bool:
        return any(f.depth == "cloud" and round_ % f.cloud_every == 0 for f in self.active(round_))

    def _method(self, f: Flow) -> Method:
        spec = self.aggregation if f.rule is None else replace(self.aggregation, rule=f.rule, params=f.params)
        only_one = len(self.flows) == 1
        select = None if only_one else (lambda m, f=f: self.assigned.get(m) == f)
        return REGISTRY[BASES[(f.path, f.depth)]](e_agg=f.cloud_every, aggregation=spec, select=select, suffix=f.suffix)

    # ---- the plan -----------------------------------------------------------------------------
    def plan(self, round_: int, topo: Topology, ctx: RoundContext | None = None) -> RoundPlan:
        parts = []
        for f in self.active(round_):
            part = self._method(f).plan(round_, topo, ctx)
            if f.rule is None and self.tier_rules:  # a rule's own aggregation rule beats its tier's
                part = part.with_tier_rules(self.tier_rules, topo)
            parts.append(part)
        plan = merge(round_, parts, [d.id for d in topo.devices])
        plan.validate()
        return plan


def merge(round_: int, parts: list[RoundPlan], devices: list[str]) -> RoundPlan:
    """One plan from several schedules' plans: every device trains first and evaluates last; the rest of
    every node's steps in phase order (module docstring), ties broken by the part, then the step's place."""
    phased: dict[str, list[tuple[int, int, int, Step]]] = {}
    for k, part in enumerate(parts):
        body = {n: [s for s in ss if not isinstance(s, Train | Evaluate)] for n, ss in part.steps.items()}
        for n, ph in phases(body).items():
            phased.setdefault(n, []).extend((p, k, i, s) for i, (p, s) in enumerate(zip(ph, body[n], strict=True)))
    plan = RoundPlan(round_)
    for n in devices:
        plan.add(n, Train())
    for n, items in phased.items():
        plan.add(n, *(s for *_, s in sorted(items, key=lambda x: x[:3])))
    for n in devices:
        plan.add(n, Evaluate())
    return plan


def phases(steps: Mapping[str, list[Step]]) -> dict[str, list[int]]:
    """Each step's phase: 1 + the largest phase among the steps it waits on (its node's previous step;
    for a collect, every send feeding it); a send right after a send shares its phase (neither waits on
    the other). ValueError on a cycle (a plan that would deadlock)."""
    feeds: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for n, ss in steps.items():
        for i, s in enumerate(ss):
            if isinstance(s, Send):
                feeds.setdefault((s.to, s.tag), []).append((n, i))
    memo: dict[tuple[str, int], int] = {}
    busy: set[tuple[str, int]] = set()

    def phase(n: str, i: int) -> int:
        key = (n, i)
        if key in memo:
            return memo[key]
        if key in busy:
            raise ValueError(f"a cycle of waits through {n}'s step {i}: the plan would deadlock")
        busy.add(key)
        s = steps[n][i]
        if isinstance(s, Send) and i > 0 and isinstance(steps[n][i - 1], Send):
            memo[key] = phase(n, i - 1)  # consecutive sends go out together (the executor runs them at once)
            busy.discard(key)
            return memo[key]
        deps = [(n, i - 1)] if i > 0 else []
        if isinstance(s, Collect):
            deps += feeds.get((n, s.tag), [])
        memo[key] = 1 + max((phase(*d) for d in deps), default=0)
        busy.discard(key)
        return memo[key]

    return {n: [phase(n, i) for i in range(len(ss))] for n, ss in steps.items()}


def describe(method: Circulation) -> list[str]:
    """One line per rule in effect (for the run's banner)."""
    return [f.describe() for f in method.flows]


__all__ = [
    "BASES",
    "CLOUD",
    "NAMED_POLICIES",
    "PRESETS",
    "Circulation",
    "Flow",
    "aggregation_spec",
    "flows",
    "merge",
    "pareto",
    "phases",
    "preset_flow",
    "with_policy",
]
