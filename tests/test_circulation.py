"""Per-module circulation (hffm/circulation.py): the five methods as presets, step for step what they
planned before policies existed (tests/golden/presets.json, recorded from the methods' own code); rules
checked at load; schedules merged without deadlock; and a mixed policy over real gRPC moving exactly the
modules, links and hops its plan says."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hffm.circulation import Circulation, flows, phases
from hffm.config import ConfigError, load_config
from hffm.costmodel import CostModel
from hffm.ids import CLOUD
from hffm.methods import AggregationSpec, Collect, Evaluate, Quorum, Send, Train
from hffm.planner import Planner
from hffm.topology import Topology

GOLDEN = Path(__file__).parent / "golden" / "presets.json"


def _describe(plan) -> dict:
    out = {}
    for n, ss in sorted(plan.steps.items()):
        steps = []
        for s in ss:
            if isinstance(s, Train | Evaluate):
                steps.append([type(s).__name__])
                continue
            d = asdict(s)
            for later in ("own", "pinned", "weight_bounds"):  # fields added later (policies, specialists, claim bounds)
                if d.get(later) == ():
                    del d[later]
            steps.append([type(s).__name__, d])
        out[n] = steps
    return json.loads(json.dumps(out, default=list))


def test_every_method_is_a_preset_planning_what_it_planned_before():
    """Each method as a one-rule policy plans rounds 1-4 exactly as the method's own code did (recorded
    before policies existed): the same sends (so the same bytes and hops), collects and order."""
    rec = json.loads(GOLDEN.read_text())
    cfg = load_config(
        None,
        ["topology.edges=3", "topology.devices_per_edge=3", "topology.tasks_per_device=1", "model.num_layers=2"]
        + ["d2d.head_policy=central"],
    )
    topo = Topology.from_config(cfg, 2).without({"device-2-0", "device-2-1", "device-2-2"})  # edge-2: no devices
    costs = CostModel(cfg, topo)
    spec = AggregationSpec(quorum=Quorum(min_fraction=0.5))
    assert len(rec["plans"]) == 20
    for key, want in rec["plans"].items():
        name, r = key.split("/")
        m = Circulation(flows([], name, 2), topo.modules_for(CLOUD), name, spec)
        ctx = costs.d2d_context(topo, int(r)) if m.uses_d2d else None
        assert _describe(m.plan(int(r), topo, ctx)) == want, key


@pytest.mark.parametrize(
    "rule, field",
    [
        ("{modules: 'head.*', depth: edge, path: star}", "path: star"),
        ("{modules: 'head.*', depth: edge, path: d2d}", "with path d2d"),
        ("{modules: 'head.*', depth: head, path: direct}", "path must be d2d"),
        ("{modules: 'head.*', depth: cloud, every: 2, cloud_every: 3}", "multiple of every"),
        ("{modules: 'head.*', depth: moon}", "unknown depth"),
        ("{modules: 'head.*', params: {beta: 0.1}}", "params: set without rule"),
        ("{modules: 'head.*', rule: trimmed_mean, params: {beta: 0.9}}", "beta"),
    ],
)
def test_a_bad_rule_is_refused_naming_it(rule, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"circulation.rules=[{rule}]"])
    assert "circulation.rules.0" in str(err.value) and field in str(err.value)


def test_a_rule_matching_no_module_is_refused():
    cfg = load_config(None, ["model.num_layers=2", "circulation.rules=[{modules: 'head.*'}, {modules: 'head.art'}]"])
    topo = Topology.from_config(cfg, 2)
    with pytest.raises(ValueError, match=r"circulation.rules.1.modules: 'head.art' matches no module"):
        Planner(cfg, CostModel(cfg, topo))


MIXED = [
    "method=hfm-d2d",
    "e_agg=2",
    "model.num_layers=2",
    "topology.edges=2",
    "topology.devices_per_edge=3",
    "topology.tasks_per_device=1",
    # heads: device <-> edge every round, to the cloud every 4th; adapter.1 personal; adapter.0 the
    # fallback: hfm-d2d (to the cluster head every round, the cloud every e_agg = 2)
    "circulation.rules=[{modules: 'head.*', depth: cloud, path: direct, cloud_every: 4}, "
    "{modules: adapter.1, depth: personal}]",
]


def test_a_mixed_policy_plans_each_module_its_own_way():
    cfg = load_config(None, MIXED)
    topo = Topology.from_config(cfg, 2)
    planner = Planner(cfg, CostModel(cfg, topo))
    assert planner.method.uses_d2d and [planner.method.cloud_round(r) for r in (1, 2, 3, 4)] == [0, 1, 0, 1]
    for r in (1, 2, 3, 4):
        plan = planner.plan(r, topo).plan
        sends = [(n, s) for n, s in plan.transfers()]
        assert all("adapter.1" not in s.modules for _, s in sends)  # personal: never leaves its device
        heads = [(n, s) for n, s in sends if any(m.startswith("head.") for m in s.modules)]
        assert all(s.tag.endswith("@0") and s.link != "d2d" for _, s in heads)
        assert all(s.modules == ("adapter.0",) for _, s in sends if not s.tag.endswith("@0"))
        up = {s.link for n, s in heads if n.startswith("edge") and s.to == CLOUD}
        assert up == ({"edge_cloud"} if r == 4 else set())
        for n in (d.id for d in topo.devices):  # every device trains first and evaluates last
            assert isinstance(plan.steps[n][0], Train) and isinstance(plan.steps[n][-1], Evaluate)
        ph = phases({n: [s for s in ss if not isinstance(s, Train | Evaluate)] for n, ss in plan.steps.items()})
        assert all(p == sorted(p) for p in ph.values())  # every node runs its steps in phase order


def test_a_plan_whose_waits_form_a_cycle_is_refused():
    a = [Collect("x", ("b",), "d2d"), Send("b", "d2d", "y", ("adapter.0",))]
    b = [Collect("y", ("a",), "d2d"), Send("a", "d2d", "x", ("adapter.0",))]
    with pytest.raises(ValueError, match="cycle"):
        phases({"a": a, "b": b})


# the mixed policy over every module kind: per-task prompts kept personal, the image-side adapter only in
# its cluster (D2D head), the text-side adapter as the fallback (hfm-d2d)
KINDS = [
    *MIXED[:-1],
    "model.prompt_tokens=2",
    "model.modality_adapters=true",
    "circulation.rules=[{modules: 'head.*', depth: cloud, path: direct, cloud_every: 4}, "
    "{modules: adapter.1, depth: personal}, {modules: 'prompt.*', depth: personal}, "
    "{modules: modality.image, depth: head, path: d2d}]",
]


def test_a_mixed_policy_over_grpc_moves_exactly_what_its_plan_says(tmp_path):
    """The mixed policy, over every module kind, as real processes, 4 rounds: per round, the bytes on
    every (link, module) are the plan's sends of that module on that link times the module's size, every
    push (hop) the plan's, the personal modules never on the wire; at the end each device's personal
    adapter and prompt its own, the image-side adapter one per cluster, the text-side one everywhere."""
    from services.launcher import run

    sets = [*KINDS, "rounds=4", "runtime.devices_per_process=6", "data.train_per_task=120"]
    sets += [f"runtime.trace_dir={tmp_path / 'trace'}"]
    cfg = load_config(None, sets)
    res = run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=300)
    assert res["complete"] and len(res["rounds"]) == 4
    topo = Topology.from_config(cfg, 2)
    assert topo.prompts and topo.modality
    planner = Planner(cfg, CostModel(cfg, topo))
    size: dict[str, set[float]] = {}
    for rec in res["rounds"]:
        plan = planner.plan(rec["round"], topo).plan
        want = Counter()
        hops = Counter()
        for n, s in plan.transfers():
            path = [n, *s.route, s.to]
            for a, b in zip(path, path[1:], strict=False):
                hops[(a, b, s.tag, s.link)] += 1
                for m in s.modules:
                    want[(s.link, m)] += 1
        got = Counter((h["sender"], h["receiver"], h["tag"], h["link"]) for h in rec["hops"])
        assert got == hops, rec["round"]
        by = rec["bytes_by_link_module"]
        assert {(link, m) for link, ms in by.items() for m in ms} == set(want), rec["round"]
        for (link, m), k in want.items():
            size.setdefault(m, set()).add(by[link][m] / k)
        assert rec["cloud_aggregation"] == (rec["round"] % 2 == 0)
    assert all(len(v) == 1 for v in size.values()), size  # one size per module: counts match exactly
    assert not {"adapter.1", "prompt.art", "prompt.gqa"} & set(size)
    assert {"adapter.0", "head.art", "head.gqa", "modality.image", "modality.text"} <= set(size)
    # the round-4 ends each device saved: adapter.0 came back from the cloud (round 4 is a cloud round
    # for it and for the heads), so it is one tensor everywhere; adapter.1 never left: six different ones
    from hffm.modules import load_modules

    ends = {
        d.id: load_modules(str(tmp_path / "run" / "state" / d.id / "round-4-attempt-0" / "modules.safetensors"))
        for d in topo.devices
    }
    flat = {n: {m: torch.cat([t.reshape(-1) for _, t in sorted(x.tensors.items())]) for m, x in ms.items()}
            for n, ms in ends.items()}  # fmt: skip
    first = flat["device-0-0"]
    assert all(torch.equal(f["adapter.0"], first["adapter.0"]) for f in flat.values())
    personal = [f["adapter.1"] for f in flat.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(personal) for b in personal[i + 1 :])
    holders = [f["head.art"] for n, f in flat.items() if "art" in topo.device_map[n].tasks]
    assert len(holders) == 3 and all(torch.equal(h, holders[0]) for h in holders)
    assert all(torch.equal(f["modality.text"], first["modality.text"]) for f in flat.values())
    prompts = [f["prompt.art"] for n, f in flat.items() if "art" in topo.device_map[n].tasks]
    assert len(prompts) == 3 and all(not torch.equal(a, b) for i, a in enumerate(prompts) for b in prompts[i + 1 :])
    for e in topo.edges:  # the image-side adapter: one per cluster, never through an edge
        image = [flat[d.id]["modality.image"] for d in topo.cluster(e)]
        assert all(torch.equal(x, image[0]) for x in image)
    assert not torch.equal(flat["device-0-0"]["modality.image"], flat["device-1-0"]["modality.image"])
    assert all("modality.image" not in rec["bytes_by_link_module"].get("edge_cloud", {}) for rec in res["rounds"])


def test_the_pareto_front_keeps_what_nothing_beats_everywhere():
    from hffm.circulation import pareto

    pts = {"a": (1.0, 5.0, -0.5), "b": (2.0, 6.0, -0.5), "c": (3.0, 1.0, -0.4), "d": (1.0, 5.0, -0.5)}
    assert pareto(pts) == ["a", "c", "d"]  # b is beaten by a everywhere; a and d tie (neither dominates)


def test_table1_charges_the_policies_hop_by_hop():
    """Corrected profile, paper-size modules: each policy row is its plans charged round by round. Heads
    kept personal cost the head transfers only; adapters to the cloud every 4 rounds instead of 2 cost
    less than uniform hfm-d2d, and E_agg = 4 for everything costs what that costs plus the heads' saving."""
    from hffm.circulation import NAMED_POLICIES, with_policy
    from hffm.config import PAPER_MODEL
    from hffm.table1 import POLICY_ROWS, build_rows, modeled_cost

    cfg = load_config("configs/paper.yaml", ["cost.profile=corrected", "topology.edges=3", *PAPER_MODEL])
    rows = build_rows(cfg, rounds=4)
    assert [r.policy for r in rows[7:]] == list(POLICY_ROWS) and all(r.paper_energy_j is None for r in rows[7:])
    uniform = next(r for r in rows if (r.method, r.e_agg, r.policy) == ("hfm-d2d", 2, ""))
    by = {r.policy: r for r in rows[7:]}
    assert by["adapters to the cloud every 4"].energy_j < 0.7 * uniform.energy_j
    parts: dict[str, dict[str, float]] = {}
    for name in ("uniform", "heads personal", "uniform, E_agg=4", "adapters to the cloud every 4"):
        parts[name] = {}
        modeled_cost(with_policy(cfg, *NAMED_POLICIES[name]), 4, parts[name])
    assert not any(m.startswith("head.") for m in parts["heads personal"])
    assert all(parts["heads personal"][m] == pytest.approx(e) for m, e in parts["uniform"].items() if "adapter" in m)
    for m, e in parts["adapters to the cloud every 4"].items():  # adapters as E_agg=4, heads as E_agg=2
        ref = parts["uniform, E_agg=4" if m.startswith("adapter.") else "uniform"][m]
        assert e == pytest.approx(ref), m
    with pytest.raises(ValueError, match="corrected"):
        paper = load_config("configs/paper.yaml", ["cost.profile=paper"])
        modeled_cost(with_policy(paper, *NAMED_POLICIES["heads personal"]), 8)


def test_hffm_sweep_quick_writes_its_table_and_front_and_reuses_its_runs(tmp_path):
    from typer.testing import CliRunner

    from hffm_cli.main import app

    args = ["sweep", "--quick", "--out", str(tmp_path), "--policy", "uniform", "--policy", "heads personal"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert list(res["policies"]) == ["uniform", "heads personal"] and res["pareto"]
    u, h = res["policies"]["uniform"], res["policies"]["heads personal"]
    assert h["energy_j_by_kind"]["head."] == 0 < u["energy_j_by_kind"]["head."]
    assert 0 <= h["accuracy"] <= 1 and h["bytes_sent"] < u["bytes_sent"]  # the heads never left the devices
    assert u["energy_vs_baseline"] == 1.0 and "met" in res["goal"]
    assert "| heads personal |" in (tmp_path / "sweep.md").read_text() and (tmp_path / "sweep.png").stat().st_size
    kept = (tmp_path / "uniform-s0.json").stat().st_mtime_ns
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "kept from" in r.output and (tmp_path / "uniform-s0.json").stat().st_mtime_ns == kept
    bad = CliRunner().invoke(app, ["sweep", "--policy", "nope"])
    assert bad.exit_code == 2 and "--policy" in bad.output
