"""Fault scenarios as data: what to break, when, and what the run must then show.

A scenario file (YAML; ``tests/scenarios/``)::

    description: a device dies while it trains in round 2 and restarts a second later
    set: [method=hfm, rounds=4, aggregation.quorum.min_fraction=0.5]   # config overrides
    faults:
      - {node: device-1-1, at: train, round: 2, action: kill, restart_after_s: 1}
    expect:
      lost: {2: [device-1-1]}     # round -> nodes left out midway (results.json `lost`)
      aborted: [2]                # rounds that needed a re-run (results.json `aborted`)
      synced: {3: [device-1-1]}   # round -> nodes that started with a sync
      sat_out: {3: [edge-1]}      # round -> members that sat the round out (`left_out`)
      excluded: {3: {aggregate: [device-1-0]}}  # round -> collect tag -> senders counted, not folded (scores)
      counted: {3: {join-stats: [device-1-1]}}  # round -> collect tag -> senders counted there (every node's)
      scored: {3: {join-stats: [device-1-1]}}   # round -> collect tag -> senders with a score there (a check ran)

``node`` is a node id, or ``@head:<edge>`` / ``@relay:<edge>`` for the cluster head, or the first
relay on a D2D route, that the planner picks in that round (D2D methods), so a scenario keeps hitting
the role it names whatever the geometry draws. ``at`` is a failpoint (services/common/faults.py):
``train``, ``send.<tag>``, ``relay``, ``collect.<tag>``, ``collected.<tag>``, ``round_end``. ``action``:
``kill`` (SIGKILL) or ``stop`` (SIGSTOP, continued after ``stop_s``). ``restart_after_s``: when the
launcher starts a killed process again (null: never). Every expectation is checked exactly for the
rounds it names; whatever the run, it must complete and pass ``hffm.audit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from hffm.config import HFFMConfig, load_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fault(_Strict):
    node: str
    at: str
    round: int = Field(ge=1)
    action: Literal["kill", "stop"] = "kill"
    restart_after_s: float | None = Field(1.0, ge=0)
    stop_s: float = Field(10.0, ge=0)


class Expect(_Strict):
    lost: dict[int, list[str]] = {}
    aborted: list[int] = []
    synced: dict[int, list[str]] = {}
    sat_out: dict[int, list[str]] = {}
    excluded: dict[int, dict[str, list[str]]] = {}
    counted: dict[int, dict[str, list[str]]] = {}
    scored: dict[int, dict[str, list[str]]] = {}


class Scenario(_Strict):
    description: str
    set: list[str] = []
    faults: list[Fault]
    expect: Expect = Expect()
    name: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        p = Path(path)
        doc = yaml.safe_load(p.read_text()) or {}
        return cls.model_validate({**doc, "name": doc.get("name") or p.stem})

    def config(self, extra: list[str] | None = None) -> HFFMConfig:
        """The run's config: ``extra`` (a harness's sizes), then the scenario's overrides, one device per
        process (a fault hits one node)."""
        return load_config(None, [*(extra or []), *self.set, "runtime.devices_per_process=1"])


def resolve_node(fault: Fault, cfg: HFFMConfig) -> str:
    """The node id a fault names (``@head:<edge>``, ``@relay:<edge>``: as the planner picks them)."""
    if not fault.node.startswith("@"):
        return fault.node
    from hffm.costmodel import CostModel
    from hffm.model import backbone_dims
    from hffm.planner import Planner
    from hffm.topology import Topology

    role, _, edge = fault.node[1:].partition(":")
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    planned = Planner(cfg, CostModel(cfg, topo)).plan(fault.round, topo)
    if role == "head" and edge in planned.ctx.heads:
        return planned.ctx.heads[edge]
    if role == "relay":
        for _n, s in sorted(planned.plan.transfers(), key=lambda t: (t[0], t[1].to, t[1].tag)):
            relays = [x for x in s.route if topo.device_map[x].edge == edge]
            if relays:
                return relays[0]
    raise ValueError(f"{fault.node}: no such node in round {fault.round} ({cfg.method})")


def failpoints(scenario: Scenario, cfg: HFFMConfig) -> tuple[list[str], dict[str, float | None], dict[str, float]]:
    """(failpoints, restart delays by process, stop times by process) for the launcher's FaultPlan."""
    points, restart, stop = [], {}, {}
    for f in scenario.faults:
        node = resolve_node(f, cfg)
        points.append(f"{node}:{f.at}:{f.round}:{f.action}")
        restart[node] = f.restart_after_s
        stop[node] = f.stop_s
    return points, restart, stop


def check_expectations(scenario: Scenario, results: dict) -> list[str]:
    """What in ``results`` differs from the scenario's expectations (empty: all met)."""
    rounds = {r["round"]: r for r in results["rounds"]}
    problems = []
    e = scenario.expect
    for r, nodes in e.lost.items():
        got = sorted(rounds.get(r, {}).get("lost", {}))
        if got != sorted(nodes):
            problems.append(f"round {r}: lost {got}, expected {sorted(nodes)}")
    for r in e.aborted:
        if not rounds.get(r, {}).get("aborted"):
            problems.append(f"round {r}: no attempt was aborted")
    for r, nodes in e.synced.items():
        got = sorted(rounds.get(r, {}).get("synced", {}))
        if got != sorted(nodes):
            problems.append(f"round {r}: synced {got}, expected {sorted(nodes)}")
    for r, nodes in e.sat_out.items():
        got = sorted(rounds.get(r, {}).get("left_out", []))
        if got != sorted(nodes):
            problems.append(f"round {r}: sat out {got}, expected {sorted(nodes)}")
    for r, by_tag in e.excluded.items():
        for tag, nodes in by_tag.items():
            aggs = [a for a in rounds.get(r, {}).get("aggregates", []) if a["tag"] == tag]
            left = {s["sender"] for a in aggs for s in a["scores"] if s["excluded"] and s["sender"] in a["counted"]}
            got = sorted(left)
            if got != sorted(nodes):
                problems.append(f"round {r}: {tag} excluded {got}, expected {sorted(nodes)}")
    for r, by_tag in e.counted.items():
        for tag, nodes in by_tag.items():
            aggs = [a for a in rounds.get(r, {}).get("aggregates", []) if a["tag"] == tag]
            got = sorted({s for a in aggs for s in a["counted"]})
            if got != sorted(nodes):
                problems.append(f"round {r}: {tag} counted {got}, expected {sorted(nodes)}")
    for r, by_tag in e.scored.items():
        for tag, nodes in by_tag.items():
            aggs = [a for a in rounds.get(r, {}).get("aggregates", []) if a["tag"] == tag]
            got = sorted({s["sender"] for a in aggs for s in a["scores"]})
            if got != sorted(nodes):
                problems.append(f"round {r}: {tag} scored {got}, expected {sorted(nodes)}")
    return problems
