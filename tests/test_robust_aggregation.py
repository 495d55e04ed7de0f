"""Robust aggregation rules (issue 17): each against an independent NumPy reference on small vectors,
bit-identical whatever the arrival order, per module (heads over their task's senders only), with the
peak memory they hold stated; their parameters checked at config load; and over real gRPC, an edge
whose devices push through the network aggregates with the rule and resists a scaled attacker."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from hffm.aggregation import SUBSPACE_RANK, make_aggregator, rule_parameters, structure_of, subspace_of, weighted_mean
from hffm.config import ConfigError, load_config
from hffm.modules import Module
from tests.conftest import make_module

AD = {"w": (6, 5), "b": (5,)}


def _flat(m: Module) -> np.ndarray:
    return np.concatenate([m.tensors[k].double().numpy().reshape(-1) for k in sorted(m.tensors)])


# ---- independent references (NumPy, float64, written from the papers' definitions) -------------------
def ref_median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=0)


def ref_trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    n = len(x)
    k = min(int(np.floor(beta * n)), (n - 1) // 2)
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        col = sorted(x[:, j])
        out[j] = np.mean(col[k : n - k])
    return out


def ref_krum_scores(x: np.ndarray, f: int) -> list[float]:
    n = len(x)
    k = max(min(n - f - 2, n - 1), 1)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return scores


def ref_multikrum(x: np.ndarray, w: np.ndarray, f: int, m: int) -> tuple[np.ndarray, list[int]]:
    scores = ref_krum_scores(x, f)
    keep = sorted(sorted(range(len(x)), key=lambda i: (scores[i], i))[:m])
    return (x[keep] * w[keep, None]).sum(0) / w[keep].sum(), keep


def ref_bulyan(x: np.ndarray, f: int) -> tuple[np.ndarray, list[int]]:
    n = len(x)
    theta, left, picked = max(n - 2 * f, 1), list(range(n)), []
    while len(picked) < theta:
        scores = ref_krum_scores(x[left], f) if len(left) > 1 else [0.0]
        best = min(range(len(left)), key=lambda i: (scores[i], i))
        picked.append(left.pop(best))
    sel = x[sorted(picked)]
    beta = max(theta - 2 * f, 1)
    med = np.median(sel, axis=0)
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        closest = sorted(range(len(sel)), key=lambda i: (abs(sel[i, j] - med[j]), i))[:beta]
        out[j] = np.mean(sel[closest, j])
    return out, sorted(picked)


def ref_clip(x: np.ndarray, centre: np.ndarray, c: float) -> np.ndarray:
    u = x - centre
    norms = np.linalg.norm(u, axis=1)
    return centre + u * np.minimum(1.0, c / norms)[:, None]


def _reference(rule: str, p: dict, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    if rule == "median":
        return ref_median(x)
    if rule == "trimmed_mean":
        return ref_trimmed(x, p.get("beta", 0.1))
    if rule == "krum":
        return ref_multikrum(x, w, int(p.get("f", 1)), int(p.get("m", 1)))[0]
    assert rule == "bulyan"
    return ref_bulyan(x, int(p.get("f", 1)))[0]


def _senders(n: int, attacker_scale: float = 0.0, seed: int = 0) -> list[Module]:
    """n copies of one module around a common point; with ``attacker_scale`` the last is scaled by it."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) for k, s in AD.items()}
    mods = []
    for i in range(n):
        t = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if attacker_scale and i == n - 1:
            t = {k: v * attacker_scale for k, v in t.items()}
        mods.append(Module("adapter.0", t, 1, float(3 + 2 * i)))
    return mods


def _aggregate(rule: str, params: dict, mods: list[Module], arrival=None, reference=None) -> Module:
    names = [f"d{i}" for i in range(len(mods))]
    agg = make_aggregator(rule, names, reference, params)
    for i in arrival or range(len(mods)):
        agg.add(names[i], [mods[i]])
    return agg.result(2)["adapter.0"]


CASES = [
    ("median", {}, lambda x, w: ref_median(x)),
    ("trimmed_mean", {"beta": 0.2}, lambda x, w: ref_trimmed(x, 0.2)),
    ("trimmed_mean", {"beta": 0.0}, lambda x, w: x.mean(0)),
    ("krum", {"f": 1}, lambda x, w: ref_multikrum(x, w, 1, 1)[0]),
    ("krum", {"f": 2, "m": 3}, lambda x, w: ref_multikrum(x, w, 2, 3)[0]),
    ("bulyan", {"f": 1}, lambda x, w: ref_bulyan(x, 1)[0]),
    ("bulyan", {"f": 2}, lambda x, w: ref_bulyan(x, 2)[0]),
]


@pytest.mark.parametrize("n", [4, 7, 11])
@pytest.mark.parametrize(("rule", "params", "ref"), CASES, ids=[f"{r}-{p}" for r, p, _ in CASES])
def test_rule_equals_its_reference(rule, params, ref, n):
    mods = _senders(n, attacker_scale=-8.0, seed=n)
    x = np.stack([_flat(m) for m in mods])
    w = np.array([m.num_samples for m in mods])
    got = _aggregate(rule, params, mods)
    assert np.allclose(_flat(got), ref(x, w), rtol=1e-5, atol=1e-6)
    assert got.num_samples == sum(w) and got.version == 2
    assert {k: t.shape for k, t in got.tensors.items()} == {k: torch.Size(s) for k, s in AD.items()}


@pytest.mark.parametrize(("rule", "params"), [(r, p) for r, p, _ in CASES])
def test_arrival_order_does_not_change_a_bit(rule, params):
    mods = _senders(6, attacker_scale=5.0, seed=3)
    first = _flat(_aggregate(rule, params, mods))
    for perm in itertools.islice(itertools.permutations(range(6)), 1, 720, 97):
        assert np.array_equal(_flat(_aggregate(rule, params, mods, arrival=perm)), first)


def test_krum_and_bulyan_name_whom_they_kept():
    mods = _senders(7, attacker_scale=20.0, seed=1)
    x = np.stack([_flat(m) for m in mods])
    names = [f"d{i}" for i in range(7)]
    for rule, params, keep in (
        ("krum", {"f": 1, "m": 3}, ref_multikrum(x, np.ones(7), 1, 3)[1]),
        ("bulyan", {"f": 1}, ref_bulyan(x, 1)[1]),
    ):
        agg = make_aggregator(rule, names, None, params)
        for i, m in enumerate(mods):
            agg.add(names[i], [m])
        agg.result(1)
        assert agg.selected["adapter.0"] == [names[i] for i in keep]
        assert "d6" not in agg.selected["adapter.0"]  # the scaled attacker


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "krum", "bulyan"])
def test_clip_norm_before_the_rule(rule):
    """clip_norm clips each copy's update against the node's own module (the reference) before the rule;
    without a reference, against the copies' coordinate-wise median."""
    mods = _senders(5, attacker_scale=30.0, seed=4)
    x = np.stack([_flat(m) for m in mods])
    w = np.array([m.num_samples for m in mods])
    own = make_module("adapter.0", AD, seed=99)
    params = {"f": 1} if rule in ("krum", "bulyan") else {}
    after = {
        "fedavg": lambda c: (c * w[:, None]).sum(0) / w.sum(),
        "median": ref_median,
        "trimmed_mean": lambda c: ref_trimmed(c, 0.1),
        "krum": lambda c: ref_multikrum(c, w, 1, 1)[0],
        "bulyan": lambda c: ref_bulyan(c, 1)[0],
    }[rule]
    for reference, centre in (({"adapter.0": own}, _flat(own)), (None, np.median(x, axis=0))):
        got = _aggregate(rule, {**params, "clip_norm": 0.5}, mods, reference=reference)
        want = after(ref_clip(x, centre, 0.5))
        assert np.allclose(_flat(got), want, rtol=1e-5, atol=1e-5), (rule, reference is None)


def test_a_scaled_attacker_moves_fedavg_not_the_robust_rules():
    mods = _senders(7, attacker_scale=50.0, seed=5)
    honest = _flat(weighted_mean([{"adapter.0": m} for m in mods[:-1]])["adapter.0"])
    rules = {
        "fedavg": ("fedavg", {}),
        "median": ("median", {}),
        "trimmed_mean": ("trimmed_mean", {"beta": 0.2}),
        "multi-krum": ("krum", {"f": 1, "m": 3}),
        "bulyan": ("bulyan", {"f": 1}),
        "clipped fedavg": ("fedavg", {"clip_norm": 1.0}),
    }
    dist = {k: float(np.linalg.norm(_flat(_aggregate(r, p, mods)) - honest)) for k, (r, p) in rules.items()}
    assert dist["fedavg"] > 50
    assert all(d < 2.0 for r, d in dist.items() if r != "fedavg"), dist


def test_heads_only_over_their_senders_and_memory_is_the_copies_plus_one_matrix():
    names = ["a", "b", "c", "d"]
    agg = make_aggregator("median", names)
    sets = {}
    for i, s in enumerate(names):
        mods = [make_module("adapter.0", AD, seed=i)]
        if s != "d":
            mods.append(make_module("head.art", {"w": (4, 3)}, seed=10 + i))
        sets[s] = mods
    order = names[:]
    random.Random(0).shuffle(order)
    for s in order:
        agg.add(s, sets[s])
    held = 4 * 35 * 4 + 3 * 12 * 4  # every copy, fp32
    assert agg.held_bytes == held
    res = agg.result(3)
    heads = np.stack([_flat(sets[s][1]) for s in "abc"])
    assert np.allclose(_flat(res["head.art"]), np.median(heads, axis=0))
    assert res["head.art"].num_samples == 3.0 and res["adapter.0"].num_samples == 4.0
    assert agg.peak_bytes == held + 4 * 35 * 4  # plus the largest module's n x d matrix
    assert agg.held_bytes == 0  # every copy released once its module was aggregated
    assert _flat(agg.result(3)["adapter.0"]).tolist() == _flat(res["adapter.0"]).tolist()  # asked again


def test_bad_parameters_named_at_config_load():
    for sets, match in (
        (["aggregation.rule=krum", "aggregation.params.g=1"], "takes no parameters ['g']"),
        (["aggregation.rule=trimmed_mean", "aggregation.params.beta=0.5"], "beta must be in"),
        (["aggregation.rule=krum", "aggregation.params.m=0"], "m must be in"),
        (["aggregation.rule=bulyan", "aggregation.params.f=1.5"], "f must be an integer"),
        (["aggregation.params.clip_norm=0"], "clip_norm must be finite and > 0"),
        (["aggregation.params.beta=0.1"], "'fedavg' takes no parameters ['beta']"),
    ):
        with pytest.raises(ConfigError, match="aggregation") as e:
            load_config(None, sets)
        assert match in str(e.value), (sets, str(e.value))
    cfg = load_config(None, ["aggregation.rule=krum", "aggregation.params.f=2", "aggregation.params.m=3"])
    assert cfg.aggregation.params == {"f": 2.0, "m": 3.0}
    common = ["clip_norm", "echo", "exclude_flagged", "flag_z", "structure", "subspace", "twin_cos", "update_z"]
    assert rule_parameters("krum") == sorted([*common, "f", "m"]) and rule_parameters("median") == common


def test_a_rule_per_tier():
    """aggregation.tiers: the planner gives each collect step its node's tier's rule (the median at the
    edges, plain FedAvg at a 2-edge cloud, Multi-Krum at D2D cluster heads); tiers that set nothing
    keep aggregation.rule; bad tier settings are named at config load."""
    from hffm.costmodel import CostModel
    from hffm.model import backbone_dims
    from hffm.planner import Planner
    from hffm.topology import Topology

    sets = ["method=hfm-d2d", "e_agg=1", "aggregation.rule=trimmed_mean", "aggregation.params.beta=0.2",
            "aggregation.tiers.edge.rule=median", "aggregation.tiers.edge.params.flag_z=3",
            "aggregation.tiers.head.rule=krum", "aggregation.tiers.head.params.f=1",
            "aggregation.tiers.head.params.m=2"]  # fmt: skip
    cfg = load_config(None, sets)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    plan = Planner(cfg, CostModel(cfg, topo)).plan(2, topo).plan
    want = {
        "cloud": ("trimmed_mean", (("beta", 0.2),)),  # no tier rule: aggregation.rule
        "edge": ("median", (("flag_z", 3.0),)),
        "device": ("krum", (("f", 1.0), ("m", 2.0))),
    }
    seen = set()
    for node, c in plan.collects():
        role = topo.role(node)
        assert (c.rule, c.params) == want[role], (node, c)
        seen.add(role)
    assert seen == set(want)
    for bad, match in (
        (["aggregation.tiers.cloud.params.f=1"], "tiers.cloud.params: set without tiers.cloud.rule"),
        (["aggregation.tiers.edge.rule=mean"], "tiers.edge.rule"),
        (["aggregation.tiers.edge.rule=median", "aggregation.tiers.edge.params.beta=0.1"], "tiers.edge.params"),
        (["aggregation.tiers.fog.rule=median"], "unknown key"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)


def test_a_sync_is_adopted_as_sent_whatever_the_rule():
    """A sync (a node adopting another's state) never goes through a robust rule or clipping."""
    from hffm.methods import Collect, RoundPlan
    from hffm.model import backbone_dims
    from hffm.recovery import StartPlan, SyncSource, with_syncs
    from hffm.topology import Topology

    def collect(tag, senders, link):
        return Collect(tag, tuple(senders), link, False, "krum", (("clip_norm", 0.1), ("f", 1.0)))

    cfg = load_config(None, ["topology.edges=1", "topology.devices_per_edge=2"])
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    plan = with_syncs(RoundPlan(1, {}), StartPlan({}, {"edge-0": SyncSource("cloud", "edge_cloud")}), topo, collect)
    sync = plan.steps["edge-0"][0]
    assert sync.tag == "sync" and sync.rule == "fedavg" and sync.params == ()
    assert plan.steps["cloud"][0].tag == "sync"  # the source's send


@pytest.mark.parametrize(
    ("rule", "params"),
    [("median", ()), ("trimmed_mean", (("beta", 0.2),)), ("krum", (("f", 1.0), ("m", 2.0))), ("bulyan", (("f", 1.0),))],
)
def test_an_edge_aggregates_pushes_over_grpc_with_the_rule(small_cfg, rule, params):
    """A real edge node on loopback (mTLS): five devices push their modules through gRPC, one of them
    scaled by 40; the edge adopts exactly what the rule makes of the five copies, far from the attacker."""
    from hffm.methods import Collect
    from hffm.modules import encode_module
    from services.common.bootstrap import node_modules, topology
    from services.common.client import push_requests
    from services.common.server import NodeServer
    from services.rpc import pb
    from tests.test_grpc_node import EDGE, Clients, _device_modules, _Edge, _header, _push

    cfg = small_cfg.model_copy(update={"topology": small_cfg.topology.model_copy(update={"devices_per_edge": 5})})
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    ch = Clients(cfg, f"127.0.0.1:{srv.port}", EDGE)
    devices = [f"device-0-{i}" for i in range(5)]
    try:
        node.assign(
            1, "hfm", [Collect("aggregate", tuple(devices), "device_edge", False, rule, params)],
            {d: f"127.0.0.1:{i + 1}" for i, d in enumerate(devices)},
        )  # fmt: skip
        sent = []
        for i, d in enumerate(devices):
            mods = _device_modules(node, seed=i, samples=10.0 + i)
            if i == 4:
                mods = {
                    n: Module(n, {k: v * 40 for k, v in m.tensors.items()}, 1, m.num_samples) for n, m in mods.items()
                }
            sent.append(mods)
            ems = [encode_module(m) for m in mods.values()]
            _push(ch, push_requests(_header(d, ems), ems, 4096))
        report = ch.control()("AwaitRound", pb.AwaitRequest(round=1), timeout=30)
        assert [(a.tag, sorted(a.counted)) for a in report.aggregates] == [("aggregate", devices)]
        for name in sent[0]:
            x = np.stack([_flat(s[name]) for s in sent])
            w = np.array([s[name].num_samples for s in sent])
            want = _reference(rule, dict(params), x, w)
            got = node.modules[name]
            assert got.version == 1 and got.num_samples == sum(w)
            assert np.allclose(_flat(got), want, rtol=1e-5, atol=1e-6), name
            assert np.linalg.norm(_flat(got) - x[4]) > np.linalg.norm(_flat(got) - x[:4].mean(0))
    finally:
        ch.close()
        srv.stop(0)


def test_the_rule_and_its_parameters_travel_in_a_collect_step():
    """Every node gets its collect steps from the coordinator over gRPC: the rule and parameters from
    config survive the protobuf round trip (the plan's methods build them from config.aggregation)."""
    from hffm.circulation import aggregation_spec
    from hffm.methods import make_method
    from services.common.convert import step_from_pb, step_to_pb

    cfg = load_config(None, ["aggregation.rule=bulyan", "aggregation.params.f=2", "aggregation.params.clip_norm=3"])
    method = make_method("hfm", 2, aggregation_spec(cfg.aggregation))
    step = method.collect_updates("aggregate", ("device-0-0", "device-0-1"), "device_edge")
    back = step_from_pb(step_to_pb(step))
    assert back.rule == "bulyan" and back.params == (("clip_norm", 3.0), ("f", 2.0)) and back == step


# ---- detection ---------------------------------------------------------------------------------------
def _scored(rule: str, mods: list[Module], **params) -> tuple[Module, list]:
    names = [f"d{i}" for i in range(len(mods))]
    agg = make_aggregator(rule, names, None, params)
    for i, m in enumerate(mods):
        agg.add(names[i], [m])
    return agg.result(1)["adapter.0"], agg.scores


def test_scores_match_their_definition_and_flag_the_attacker():
    mods = _senders(8, attacker_scale=-10.0, seed=6)
    x = np.stack([_flat(m) for m in mods])
    _, scores = _scored("median", mods, flag_z=3.5)
    med = np.median(x, axis=0)
    dist = np.linalg.norm(x - med, axis=1)
    norm = dist  # no reference: updates are measured from the median
    for i, s in enumerate(scores):
        assert s.module == "adapter.0" and s.sender == f"d{i}"
        assert np.isclose(s.distance, dist[i]) and np.isclose(s.norm, norm[i])
        mad = max(np.median(np.abs(dist - np.median(dist))) * 1.4826, 0.25 * np.median(norm))
        assert np.isclose(s.z, abs((dist[i] - np.median(dist)) / mad), rtol=1e-3)  # the median: fp32
    assert [s.sender for s in scores if s.flagged] == ["d7"] and not any(s.excluded for s in scores)


@pytest.mark.parametrize("rule", ["fedavg", "median", "krum"])
def test_exclude_flagged_leaves_the_attacker_out(rule):
    mods = _senders(7, attacker_scale=40.0, seed=7)
    got, scores = _scored(rule, mods, flag_z=3.5, exclude_flagged=1)
    clean, _ = _scored(rule, mods[:-1], **({"f": 1} if rule == "krum" else {}))
    if rule == "krum":
        got, _ = _scored(rule, mods, flag_z=3.5, exclude_flagged=1, f=1)
    assert [s.sender for s in scores if s.excluded] == ["d6"]
    assert np.allclose(_flat(got), _flat(clean), atol=1e-6)
    assert got.num_samples == sum(m.num_samples for m in mods[:-1])  # the excluded sender's weight too


def test_exclusion_keeps_a_majority_and_few_senders_are_not_flagged():
    mods = _senders(6, seed=8)
    # three far apart from three: whatever is flagged, at least 4 of 6 stay
    mods = [
        Module(m.name, {k: v * (1 if i < 3 else 30) for k, v in m.tensors.items()}, 1, 1.0) for i, m in enumerate(mods)
    ]
    _, scores = _scored("median", mods, flag_z=0.5, exclude_flagged=1)
    assert sum(not s.excluded for s in scores) >= 4
    _, few = _scored("median", _senders(3, attacker_scale=100.0, seed=9), flag_z=3.5)
    assert few == []  # 3 copies: no spread to judge by, not scored


def test_twins_are_senders_whose_whole_updates_point_the_same_way():
    """twin_cos: the highest cosine of a sender's whole update (every module it sent, minus the centre)
    with another's, against a NumPy reference over the concatenated updates; two colluders sending one
    vector (ALIE, IPM) are twins at 1 and flagged, then excluded; honest random updates are not."""
    g = torch.Generator().manual_seed(11)
    names = [f"d{i}" for i in range(6)]
    shapes = {"adapter.0": (5, 4), "head.art": (3,)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    ups = [{n: torch.randn(*sh, generator=g) for n, sh in shapes.items()} for _ in range(4)]
    ups += [ups[3], {n: 0.5 * t for n, t in ups[3].items()}]  # d3, d4 and d5 point the same way
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in ups]
    agg = make_aggregator("fedavg", names, own, {"twin_cos": 0.99, "exclude_flagged": 1})
    for n, m in zip(names, mods, strict=True):
        agg.add(n, list(m.values()))
    out = agg.result(1)
    flat = np.stack([np.concatenate([u[n].numpy().ravel() for n in sorted(shapes)]) for u in ups])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -1)
    for sc in agg.scores:
        assert np.isclose(sc.twin, cos[int(sc.sender[1:])].max(), atol=1e-6)
    assert {sc.sender for sc in agg.scores if sc.flagged} == {"d3", "d4", "d5"}
    # a majority is always kept: of the flagged twins, the one with the lowest twin score (ties: by
    # sender order) stays, the same one in every module
    kept = {sc.sender for sc in agg.scores if not sc.excluded}
    assert len(kept) == 4 and {"d0", "d1", "d2"} <= kept
    want = sum(mods[int(s[1:])]["head.art"].tensors["w"] for s in kept) / 4
    assert torch.allclose(out["head.art"].tensors["w"], want, atol=1e-6)
    with pytest.raises(ValueError, match="twin_cos must be in"):
        make_aggregator("median", params={"twin_cos": 1.5})
    assert type(make_aggregator("median", params={"twin_cos": 0.9, "exclude_flagged": 1})).__name__ == "Median"


def test_update_z_scores_whole_updates_and_spares_a_sender_odd_in_one_module():
    """update_z: a sender's whole update (every module it sent, minus the centre, as one vector) scored
    like a module's copy, against a NumPy reference; an honest sender whose one small head stands far
    out (labels nobody else holds) is flagged by the per-module flag_z but not by update_z; an attacker
    scaling its whole update is flagged by both, and with exclude_flagged left out of every module."""
    g = torch.Generator().manual_seed(12)
    names = [f"d{i}" for i in range(7)]
    shapes = {"adapter.0": (40, 30), "adapter.1": (40, 30), "head.art": (4,)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    ups = [{n: 0.1 * torch.randn(*sh, generator=g) for n, sh in shapes.items()} for _ in range(7)]
    ups[2]["head.art"] = ups[2]["head.art"] + 1.5  # honest, with a head of its own
    ups[6] = {n: 8.0 * u for n, u in ups[6].items()}  # the attacker: everything scaled
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in ups]
    agg = make_aggregator("fedavg", names, own, {"flag_z": 3.5, "update_z": 3.5, "exclude_flagged": 1})
    for n, m in zip(names, mods, strict=True):
        agg.add(n, list(m.values()))
    out = agg.result(1)
    x = {n: np.stack([(own[n].tensors["w"] + u[n]).numpy().ravel() for u in ups]) for n in shapes}
    dist = np.sqrt(sum(((x[n] - np.median(x[n], axis=0)) ** 2).sum(axis=1) for n in shapes))
    norm = np.sqrt(sum(((x[n] - own[n].tensors["w"].numpy().ravel()) ** 2).sum(axis=1) for n in shapes))

    def rz(v, floor):
        return (v - np.median(v)) / max(1.4826 * np.median(np.abs(v - np.median(v))), floor)

    floor = 0.25 * np.median(norm)
    want = np.maximum(rz(dist, floor), np.abs(rz(norm, floor)))
    for sc in agg.scores:
        assert np.isclose(sc.update_z, want[int(sc.sender[1:])], rtol=1e-4), sc
    assert want[6] > 3.5 > want.max(initial=0, where=np.arange(7) != 6)
    per_module = {(sc.sender, sc.module) for sc in agg.scores if sc.z > 3.5}
    assert ("d2", "head.art") in per_module  # flag_z alone would flag the honest d2
    assert {sc.sender for sc in agg.scores if sc.excluded} == {"d2", "d6"}
    agg2 = make_aggregator("fedavg", names, own, {"update_z": 3.5, "exclude_flagged": 1})
    for n, m in zip(names, mods, strict=True):
        agg2.add(n, list(m.values()))
    out2 = agg2.result(1)
    assert {sc.sender for sc in agg2.scores if sc.flagged} == {"d6"}
    assert {sc.sender for sc in agg2.scores if sc.excluded} == {"d6"}
    for n in shapes:  # FedAvg of the six others, in every module
        want_mean = sum(mods[i][n].tensors["w"] for i in range(6)) / 6
        assert torch.allclose(out2[n].tensors["w"], want_mean, atol=1e-5)
    assert not torch.allclose(out["head.art"].tensors["w"], out2["head.art"].tensors["w"])
    with pytest.raises(ValueError, match="update_z must be finite and > 0"):
        make_aggregator("fedavg", params={"update_z": -1})
    assert type(make_aggregator("median", params={"update_z": 3, "exclude_flagged": 1})).__name__ == "Median"


def test_colluding_twins_do_not_set_the_yardstick_the_others_are_scored_by():
    """Two IPM colluders sending one vector among five senders pull the median onto them and shrink the
    MAD: scored over everyone, two honest senders stand out (measured in the full-size matrix: every
    honest sender of a cluster flagged, the colluders kept as the least suspicious majority). With
    twin_cos the medians and MADs are taken over the senders that are not twins: only the colluders are
    flagged and left out, and the aggregate is the honest senders' mean."""
    g = torch.Generator().manual_seed(13)
    names = [f"d{i}" for i in range(5)]
    shapes = {"adapter.0": (30, 20), "adapter.1": (30, 20)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    ups = [{n: torch.randn(*sh, generator=g) * (0.5 + 0.5 * i) for n, sh in shapes.items()} for i in range(3)]
    ipm = {n: -0.5 * sum(u[n] for u in ups) / 3 for n in shapes}
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in [*ups, ipm, ipm]]

    def scored(params):
        agg = make_aggregator("fedavg", names, own, params)
        for n, m in zip(names, mods, strict=True):
            agg.add(n, list(m.values()))
        out = agg.result(1)
        return out, {sc.sender for sc in agg.scores if sc.flagged}, {sc.sender for sc in agg.scores if sc.excluded}

    _, flagged, _ = scored({"update_z": 3.5})
    assert flagged and flagged <= {"d0", "d1", "d2"}  # without twins: honest senders flagged
    for params in ({"update_z": 3.5, "twin_cos": 0.99}, {"flag_z": 3.5, "twin_cos": 0.99}):
        out, flagged, excluded = scored({**params, "exclude_flagged": 1})
        assert flagged == excluded == {"d3", "d4"}, params
        for n in shapes:
            want = sum(mods[i][n].tensors["w"] for i in range(3)) / 3
            assert torch.allclose(out[n].tensors["w"], want, atol=1e-5), (params, n)


def test_senders_returning_what_they_received_are_twins():
    """Two free riders send back the node's own modules (their updates are zero: no cosine to compare):
    the same whole update twice is a twin at 1, so with twin_cos both are flagged and left out, and the
    medians the others are scored by are the honest senders'. One free rider alone is a twin of the start it
    was sent (its update measured from it is zero); without a start to measure from (the copies' median as
    the centre) a sender at the median is a twin of nothing. A round in which nobody's update moved (a no-op
    step) flags nobody."""
    g = torch.Generator().manual_seed(14)
    names = [f"d{i}" for i in range(5)]
    shapes = {"adapter.0": (30, 20), "head.art": (4,)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    ups = [{n: torch.randn(*sh, generator=g) for n, sh in shapes.items()} for _ in range(3)]
    zero = {n: torch.zeros(sh) for n, sh in shapes.items()}

    def run(updates, reference=own):
        mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in updates]
        agg = make_aggregator("fedavg", names[: len(mods)], reference, {"twin_cos": 0.99, "exclude_flagged": 1})
        for n, m in zip(names, mods, strict=False):
            agg.add(n, list(m.values()))
        return mods, agg.result(1), agg.scores

    mods, out, scores = run([*ups, zero, zero])
    assert {sc.sender for sc in scores if sc.flagged} == {sc.sender for sc in scores if sc.excluded} == {"d3", "d4"}
    assert all(sc.twin == 1.0 for sc in scores if sc.sender in ("d3", "d4"))
    for n in shapes:
        want = sum(mods[i][n].tensors["w"] for i in range(3)) / 3
        assert torch.allclose(out[n].tensors["w"], want, atol=1e-6)
    _, _, scores = run([*ups, {n: torch.randn(*sh, generator=g) for n, sh in shapes.items()}, zero])
    assert {sc.sender for sc in scores if sc.flagged} == {"d4"}  # one free rider: a twin of its start
    assert {sc.sender: sc.twin for sc in scores}["d4"] == 1.0
    # no start held: updates are measured from the copies' median, which d4 is (two above it, two below
    # in every value): zero from there is no sign of free riding
    up = {n: ups[0][n].abs() + 0.1 for n in shapes}
    down = {n: -ups[1][n].abs() - 0.1 for n in shapes}
    _, _, scores = run([up, up, down, down, zero], reference={})
    assert {sc.sender: sc.twin for sc in scores}["d4"] < 0.99
    assert {sc.sender for sc in scores if sc.flagged} == {"d0", "d1", "d2", "d3"}  # the pairs are twins
    _, _, scores = run([zero] * 5)
    assert not any(sc.flagged for sc in scores)  # nobody trained


def test_detection_parameters_are_checked():
    with pytest.raises(ValueError, match="needs flag_z, update_z, twin_cos, structure, subspace or echo"):
        make_aggregator("median", params={"exclude_flagged": 1})
    with pytest.raises(ValueError, match="flag_z must be finite and > 0"):
        make_aggregator("fedavg", params={"flag_z": 0})
    with pytest.raises(ValueError, match="exclude_flagged must be 0 or 1"):
        make_aggregator("krum", params={"flag_z": 3, "exclude_flagged": 2})
    assert type(make_aggregator("fedavg", params={"flag_z": 3})).__name__ == "BufferedFedAvg"
    assert type(make_aggregator("fedavg")).__name__ == "FedAvg"  # no detection: the streaming sum


def test_detection_summary_counts_events_per_round_node_and_sender():
    from hffm.results import detection_summary

    def sc(sender, flagged, module="adapter.0"):
        return {"module": module, "sender": sender, "flagged": flagged}

    rounds = [
        {"aggregates": [{"scores": [sc("a", True), sc("a", False, "head.x"), sc("b", False), sc("c", True)]}]},
        {"aggregates": [{"scores": [sc("a", False), sc("b", False), sc("c", False)]}, {"scores": []}]},
    ]
    got = detection_summary(rounds, ["a"])
    assert got == {
        "adversaries": ["a"],
        "scored": 6,
        "flagged": ["a", "c"],
        "precision": 0.5,
        "recall": 0.5,
        "false_positive_rate": 0.25,
    }
    none = detection_summary([], [])
    assert none["precision"] is None and none["recall"] is None and none["scored"] == 0


def test_scores_travel_in_the_round_report():
    from hffm.results import AggregateRecord, NodeReport, SenderScore
    from services.common.convert import report_from_pb, report_to_pb

    s = SenderScore("adapter.0", "device-0-1", 1.5, 2.5, -0.25, 7.0, True, False, 0.5, 4.25)
    rep = NodeReport("edge-0", 3)
    rep.aggregates.append(AggregateRecord("edge-0", "aggregate", ("device-0-0", "device-0-1"), (), (s,)))
    back = report_from_pb(report_to_pb(rep))
    assert back.aggregates[0].scores == (s,)


def test_lowered_weights_travel_in_the_round_report_and_only_believable_ones_are_kept():
    """The weights a node folded a sender's modules with, where lower than pushed (``AggregateRecord.weights``),
    reach the cloud; one for a sender the step did not count, a second one for the same module, or a value no
    fold uses (negative, not finite) is dropped, the rest of the report kept."""
    import math

    from hffm.results import AggregateRecord, NodeReport
    from services.common.convert import report_from_pb, report_to_pb

    good = {"device-0-1": {"adapter.0": 2.0, "head.art": 1.0}}
    rep = NodeReport("edge-0", 3)
    rep.aggregates.append(AggregateRecord("edge-0", "aggregate", ("device-0-0", "device-0-1"), (), (), good))
    assert report_from_pb(report_to_pb(rep)).aggregates[0].weights == good
    msg = report_to_pb(rep)
    for sender, module, w in [
        ("device-1-0", "adapter.0", 1.0),  # not counted in this step
        ("device-0-1", "adapter.0", 5.0),  # a second weight for the same module
        ("device-0-0", "adapter.1", -1.0),
        ("device-0-0", "adapter.2", math.nan),
        ("device-0-0", "adapter.3", math.inf),
    ]:
        msg.aggregates[0].weights.add(sender=sender, module=module, weight=w)
    back = report_from_pb(msg)
    assert back.aggregates[0].weights == good and back.aggregates[0].counted == ("device-0-0", "device-0-1")


def test_the_cloud_believes_only_scores_a_node_could_have_measured():
    """A lying node cannot incriminate a sender it did not aggregate, score one sender twice, or put
    values no aggregation makes into the run's results: those scores are dropped, the rest kept."""
    import math

    from hffm.results import AggregateRecord, NodeReport, SenderScore
    from services.common.convert import report_from_pb, report_to_pb

    def sc(sender, module="adapter.0", distance=1.0, norm=1.0, cosine=0.5, z=1.0):
        return SenderScore(module, sender, distance, norm, cosine, z, z > 3.5, False)

    good = [sc("device-0-0"), sc("device-0-1", z=math.inf), sc("device-0-1", module="adapter.1", cosine=math.nan)]
    good.append(SenderScore("adapter.2", "device-0-1", 1.0, 1.0, 0.5, 1.0, True, True, structure=0.97, echo=0.98))
    lies = [
        sc("device-1-0", z=99.0),  # not a sender of this step
        sc("device-0-0", z=50.0),  # a second score for (adapter.0, device-0-0)
        sc("device-0-0", module="adapter.2", distance=math.inf),
        sc("device-0-0", module="adapter.3", norm=-1.0),
        sc("device-0-0", module="adapter.4", cosine=3.0),
        sc("device-0-0", module="adapter.5", z=math.nan),
        SenderScore("adapter.6", "device-0-0", 1.0, 1.0, 0.5, 1.0, False, False, 0.0, math.nan),  # update_z
    ]
    lies += [
        SenderScore("adapter.7", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, label_t=-1.0),  # label_t
        SenderScore("adapter.8", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, label_t=math.inf),
        SenderScore("adapter.9", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, structure=-1.0),  # structure
        SenderScore("adapter.10", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, structure=math.nan),
        SenderScore("adapter.11", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, subspace=-2.0),  # subspace
        SenderScore("adapter.12", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, echo=1.5),  # echo: a cosine
        SenderScore("adapter.13", "device-0-0", 0.0, 0.0, 0.0, 0.0, True, True, echo=math.nan),
    ]
    rep = NodeReport("edge-0", 3)
    rep.aggregates.append(AggregateRecord("edge-0", "aggregate", ("device-0-0", "device-0-1"), (), (*good, *lies)))
    # a deferred label check's scores sit in the federation collect's record (counted: the cloud): believed for
    # the senders of the node's statistics collect, not for others
    checked = SenderScore("stats.art", "device-0-1", 0.0, 0.0, 0.0, 0.0, True, True, label_t=30.0)
    stranger = SenderScore("stats.art", "device-1-0", 0.0, 0.0, 0.0, 0.0, True, True, label_t=30.0)
    rep.aggregates.append(AggregateRecord("edge-0", "stats", ("device-0-0", "device-0-1"), ()))
    rep.aggregates.append(AggregateRecord("edge-0", "federation", ("cloud",), (), (checked, stranger)))
    back = report_from_pb(report_to_pb(rep))
    assert [(s.module, s.sender, s.z) for s in back.aggregates[0].scores] == [(s.module, s.sender, s.z) for s in good]
    assert back.aggregates[0].scores[3].structure == 0.97 and back.aggregates[0].scores[3].echo == 0.98  # carried
    assert back.aggregates[0].counted == ("device-0-0", "device-0-1")  # the report itself is kept
    assert back.aggregates[2].scores == (checked,)


def test_results_json_is_strict_json(tmp_path):
    """An infinite z or a NaN loss is written as null: strict readers (JavaScript, jq) can read it."""
    import json
    import math

    from hffm.results import write_results

    write_results(tmp_path / "r.json", {}, [{"round": 1, "train_loss": math.nan, "scores": [{"z": math.inf}]}])
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert doc["rounds"][0]["train_loss"] is None and doc["rounds"][0]["scores"][0]["z"] is None


def test_config_checks_rule_parameters_without_torch():
    """Health checks (every few seconds in every container) load config: checking a rule's parameters
    must not import torch (it did once: 170 MB and seconds per check, and on the 2-core testbed the
    checks overran, piled up and exhausted memory)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hffm.config import load_config\n"
        "import services.healthcheck\n"
        "load_config(None, ['aggregation.rule=krum', 'aggregation.params.f=2', 'aggregation.params.flag_z=3'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_copies_that_agree_closely_do_not_make_a_small_difference_an_outlier():
    """Five senders return the same head, one a head 40 % farther: a zero MAD would make that infinitely
    far; the floor (25 % of the median update's norm) keeps it unflagged, while a head 100x off is
    flagged."""
    same = {"w": torch.ones(4, 3)}
    mods = [Module("adapter.0", dict(same), 1, 1.0) for _ in range(5)]
    mods.append(Module("adapter.0", {"w": torch.ones(4, 3) * 1.4}, 1, 1.0))
    own = {"adapter.0": Module("adapter.0", {"w": torch.zeros(4, 3)}, 0, 1.0)}
    names = [f"d{i}" for i in range(7)]
    for extra, want in ((None, []), (100.0, ["d6"])):
        ms = mods + ([Module("adapter.0", {"w": torch.ones(4, 3) * extra}, 1, 1.0)] if extra else [])
        agg = make_aggregator("median", names[: len(ms)], own, {"flag_z": 3.5})
        for n, m in zip(names, ms, strict=False):
            agg.add(n, [m])
        agg.result(1)
        assert [s.sender for s in agg.scores if s.flagged] == want


def _trained(sh: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """An update shaped as gradient training makes one: a main direction, a weaker one and a little noise."""
    m, k = sh
    low = torch.randn(m, 2, generator=g) @ (torch.randn(2, k, generator=g) * torch.tensor([[1.0], [0.3]]))
    return low + 0.05 * low.norm() / (m * k) ** 0.5 * torch.randn(m, k, generator=g)


def test_structure_is_the_top_singular_values_share_over_independent_noise_s():
    """``structure_of`` against a NumPy reference (s_1^2 / |u|^2 over (sqrt m + sqrt n)^2 / (m n)): about 1
    for independent noise whatever its size, m n / (sqrt m + sqrt n)^2 for a rank-1 update, None for zero."""
    rng = np.random.default_rng(3)
    for sigma in (1e-4, 1e-2, 1.0, 100.0):
        u = rng.normal(0, sigma, size=(256, 64))
        s = np.linalg.svd(u, compute_uv=False)
        want = s[0] ** 2 / (u**2).sum() * 256 * 64 / (16 + 8) ** 2
        got = structure_of(torch.from_numpy(u))
        assert np.isclose(got, want, rtol=1e-9) and 0.85 < got < 1.15, (sigma, got)
    a, b = rng.normal(size=(40, 1)), rng.normal(size=(1, 30))
    assert np.isclose(structure_of(torch.from_numpy(a @ b)), 40 * 30 / (40**0.5 + 30**0.5) ** 2)
    assert structure_of(torch.zeros(8, 8)) is None


def test_structure_flags_a_free_rider_hiding_in_noise_of_an_honest_size():
    """A free rider sends what it received plus independent noise scaled to an honest update's norm: its
    distance and norm are the honest senders', so update_z does not see it. Honest updates are a few
    directions plus a little noise (gradient training's shape); ``structure`` flags the free rider alone, in
    every module, and with exclude_flagged the aggregate is the honest senders' mean. Matrices narrower than
    STRUCTURE_MIN_SIDE are not scored; a sender whose update is zero there is not scored (the twins' case)."""
    g = torch.Generator().manual_seed(15)
    names = [f"d{i}" for i in range(5)]
    shapes = {"adapter.0": (64, 16), "adapter.1": (64, 16), "head.art": (3, 16)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}

    ups = [{n: _trained(sh, g) for n, sh in shapes.items()} for _ in range(4)]
    size = {n: float(sum(u[n].norm() for u in ups) / 4) for n in shapes}
    noise = {n: torch.randn(*sh, generator=g) for n, sh in shapes.items()}
    ups.append({n: t * size[n] / float(t.norm()) for n, t in noise.items()})  # d4: an honest-sized norm
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in ups]

    def run(params, senders=mods):
        agg = make_aggregator("fedavg", names[: len(senders)], own, params)
        for n, m in zip(names, senders, strict=False):
            agg.add(n, list(m.values()))
        return agg.result(1), agg.scores

    _, scores = run({"update_z": 3.5})
    assert not any(sc.flagged for sc in scores)  # its size is an honest one
    out, scores = run({"update_z": 3.5, "structure": 3, "exclude_flagged": 1})
    assert {sc.sender for sc in scores if sc.flagged} == {sc.sender for sc in scores if sc.excluded} == {"d4"}
    assert {sc.module for sc in scores if sc.sender == "d4" and sc.excluded} == set(shapes)
    for i, u in enumerate(ups):  # the median of the two adapters' structure (the 3-wide head is not scored)
        want = float(np.median([structure_of(u[n].double()) for n in ("adapter.0", "adapter.1")]))
        assert all(np.isclose(sc.structure, want) for sc in scores if sc.sender == names[i])
    assert max(sc.structure for sc in scores if sc.sender == "d4") < 1.3
    assert min(sc.structure for sc in scores if sc.sender != "d4") > 5
    for n in shapes:
        want = sum(mods[i][n].tensors["w"] for i in range(4)) / 4
        assert torch.allclose(out[n].tensors["w"], want, atol=1e-5)
    # a head only three senders hold (too few copies for a spread of its own): the free rider's whole-update
    # flag holds in it too, and the two honest copies are its aggregate
    rare = Module("head.rare", {"w": torch.randn(3, 16, generator=g)}, 0, 1.0)
    own_rare = {**own, "head.rare": rare}
    agg = make_aggregator("fedavg", names, own_rare, {"structure": 3, "exclude_flagged": 1})
    for i, (n, m) in enumerate(zip(names, mods, strict=True)):
        extra = [Module("head.rare", {"w": rare.tensors["w"] + ups[i]["head.art"]}, 1, 1.0)] if i >= 2 else []
        agg.add(n, [*m.values(), *extra])
    out = agg.result(1)
    held = [sc for sc in agg.scores if sc.module == "head.rare"]
    assert {sc.sender for sc in held} == {"d2", "d3", "d4"} and all(sc.z == 0 for sc in held)
    assert {sc.sender for sc in held if sc.excluded} == {"d4"}
    want = rare.tensors["w"] + (ups[2]["head.art"] + ups[3]["head.art"]) / 2
    assert torch.allclose(out["head.rare"].tensors["w"], want, atol=1e-6)
    zero = {n: Module(n, {"w": own[n].tensors["w"].clone()}, 1, 1.0) for n in shapes}
    _, scores = run({"structure": 3}, [*mods[:4], zero])
    assert not any(sc.flagged for sc in scores) and all(sc.structure == 0 for sc in scores if sc.sender == "d4")
    _, few = run({"structure": 3}, mods[2:])
    assert few == []  # 3 senders: not scored
    with pytest.raises(ValueError, match="structure must be finite and > 0"):
        make_aggregator("fedavg", params={"structure": 0})
    assert type(make_aggregator("median", params={"structure": 3, "exclude_flagged": 1})).__name__ == "Median"


def test_subspace_flags_noise_of_any_shape_off_the_other_senders_directions():
    """A free rider that knows the structure check sends one random direction per matrix (rank 1: its
    ``structure`` is the largest there is). Honest updates of a round share their main directions (here: each
    a mix of the same few input directions); ``subspace`` measures the share of a sender's update along the
    other senders' top SUBSPACE_RANK directions over chance (a NumPy reference: the leave-one-out SVD of the
    others' stacked updates, each of unit norm), about 1 for the free rider, several times that for the
    honest: flagged and left out in every module."""
    g = torch.Generator().manual_seed(16)
    names = [f"d{i}" for i in range(5)]
    shapes = {"adapter.0": (128, 64), "adapter.1": (64, 128)}  # either side the short one
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    basis = {n: torch.linalg.qr(torch.randn(min(sh), 6, generator=g)).Q for n, sh in shapes.items()}

    def trained(n):  # every honest update mixes the same 6 directions of its short side
        long = max(shapes[n])
        u = torch.randn(long, 6, generator=g) @ basis[n].T + 0.02 * torch.randn(long, min(shapes[n]), generator=g)
        return u if shapes[n][0] == long else u.T

    ups = [{n: trained(n) for n in shapes} for _ in range(4)]
    ups.append({n: torch.randn(sh[0], 1, generator=g) @ torch.randn(1, sh[1], generator=g) for n, sh in shapes.items()})
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in ups]
    agg = make_aggregator("fedavg", names, own, {"structure": 3, "subspace": 2, "exclude_flagged": 1})
    for n, m in zip(names, mods, strict=True):
        agg.add(n, list(m.values()))
    out = agg.result(1)
    for i in range(5):
        want = []
        for n in shapes:
            us = [u[n].double().numpy() for u in ups]
            us = [u if u.shape[1] <= u.shape[0] else u.T for u in us]  # the short side as columns
            others = np.concatenate([us[j] / np.linalg.norm(us[j]) for j in range(5) if j != i])  # one vote each
            top = np.linalg.svd(others, full_matrices=False)[2][:SUBSPACE_RANK].T
            want.append(((us[i] @ top) ** 2).sum() / (us[i] ** 2).sum() / (SUBSPACE_RANK / us[i].shape[1]))
        got = {sc.subspace for sc in agg.scores if sc.sender == names[i]}
        assert len(got) == 1 and np.isclose(got.pop(), np.median(want), rtol=1e-6), i
    rider = [sc for sc in agg.scores if sc.sender == "d4"]
    assert all(sc.structure > 3 and sc.subspace < 1.5 and sc.excluded for sc in rider)  # structure passes it
    assert min(sc.subspace for sc in agg.scores if sc.sender != "d4") > 4
    assert {sc.sender for sc in agg.scores if sc.flagged} == {"d4"}
    for n in shapes:
        want = sum(mods[i][n].tensors["w"] for i in range(4)) / 4
        assert torch.allclose(out[n].tensors["w"], want, atol=1e-5)
    assert subspace_of(torch.zeros(32, 32), torch.eye(32)) is None
    assert subspace_of(torch.eye(32), torch.zeros(32, 32)) is None
    with pytest.raises(ValueError, match="subspace must be finite and > 0"):
        make_aggregator("fedavg", params={"subspace": float("nan")})


def test_echo_flags_a_free_rider_that_sends_the_last_step_back():
    """A free rider that echoes the federation's last step (its start minus its previous start, at any scale,
    a little independent noise added so that two of them are not twins) sends an update of an honest size and
    an honest shape: update_z, twins and structure pass it. ``echo`` is the cosine of a sender's whole update
    (every module it sent) with the node's last step over the same modules (a NumPy reference): 1 or nearly
    for the echo, about 0 for honest updates (their own data's directions); flagged at the cut and, with
    exclude_flagged, left out of every module. No last step (``previous`` unset, a zero step, modules the
    previous start lacks): not scored."""
    g = torch.Generator().manual_seed(21)
    names = [f"d{i}" for i in range(6)]
    shapes = {"adapter.0": (64, 16), "adapter.1": (64, 16), "head.art": (3, 16)}
    before = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}

    step = {n: _trained(sh, g) for n, sh in shapes.items()}
    own = {n: Module(n, {"w": before[n].tensors["w"] + step[n]}, 1, 1.0) for n in shapes}
    ups = [{n: _trained(sh, g) for n, sh in shapes.items()} for _ in range(4)]
    for scale in (0.7, 1.3):  # two echoers, each with its own noise: not twins
        ups.append({n: scale * (s + 0.2 * s.norm() / s.numel() ** 0.5 * torch.randn(s.shape, generator=g))
                    for n, s in step.items()})  # fmt: skip
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 2, 1.0) for n in shapes} for u in ups]

    def run(params, previous=before, senders=mods):
        agg = make_aggregator("fedavg", names[: len(senders)], own, params)
        agg.previous = dict(previous)
        for n, m in zip(names, senders, strict=False):
            agg.add(n, list(m.values()))
        return agg.result(2), agg.scores

    _, scores = run({"update_z": 3.5, "twin_cos": 0.99, "structure": 3}, {})  # no last step known (no echo)
    assert not any(sc.flagged for sc in scores)  # its size, its direction's uniqueness and its shape are honest
    _, scores = run({"structure": 3})  # less its component along a known last step, its shape is its noise's
    assert {sc.sender for sc in scores if sc.flagged} == {"d4", "d5"}
    out, scores = run({"update_z": 3.5, "twin_cos": 0.99, "echo": 0.5, "exclude_flagged": 1})
    assert {sc.sender for sc in scores if sc.flagged} == {sc.sender for sc in scores if sc.excluded} == {"d4", "d5"}
    flat_step = np.concatenate([step[n].double().numpy().ravel() for n in sorted(shapes)])
    for i, u in enumerate(ups):  # the cosine over every module sent, as one vector
        flat = np.concatenate([u[n].double().numpy().ravel() for n in sorted(shapes)])
        want = flat @ flat_step / np.linalg.norm(flat) / np.linalg.norm(flat_step)
        assert all(np.isclose(sc.echo, want) for sc in scores if sc.sender == names[i]), (i, want)
    assert min(sc.echo for sc in scores if sc.sender in ("d4", "d5")) > 0.95
    assert max(abs(sc.echo) for sc in scores if sc.sender not in ("d4", "d5")) < 0.5
    assert max(sc.twin for sc in scores if sc.sender == "d4") < 0.99
    for n in shapes:
        want = sum(mods[i][n].tensors["w"] for i in range(4)) / 4
        assert torch.allclose(out[n].tensors["w"], want, atol=1e-5)
    for previous in ({}, own):  # no previous start, or a zero step: nothing to compare with
        _, scores = run({"echo": 0.5}, previous)
        assert not any(sc.flagged for sc in scores) and all(sc.echo == 0 for sc in scores)
    _, scores = run({"echo": 0.5}, {"adapter.0": before["adapter.0"]})  # one module's step: over it alone
    assert {sc.sender for sc in scores if sc.flagged} == {"d4", "d5"}
    with pytest.raises(ValueError, match=r"echo must be in \(0, 1\]"):
        make_aggregator("fedavg", params={"echo": 1.5})


def test_one_loud_sender_does_not_set_the_directions_the_others_are_measured_along():
    """``subspace`` measures a sender along the other senders' main directions, each other sender one vote
    (its Gram matrix over its trace): a sender of noise ten times an honest update's size would otherwise make
    its random directions "the others' main directions" for every honest sender (measured in the matrix: an
    honest device's score from 3.06 to 1.92, flagged). Only the noise is flagged."""
    g = torch.Generator().manual_seed(17)
    names = [f"d{i}" for i in range(6)]
    shapes = {"adapter.0": (128, 64)}
    own = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    basis = torch.linalg.qr(torch.randn(64, 6, generator=g)).Q
    ups = [{"adapter.0": torch.randn(128, 6, generator=g) @ basis.T + 0.02 * torch.randn(128, 64, generator=g)}
           for _ in range(5)]  # fmt: skip
    honest = float(ups[0]["adapter.0"].norm())
    loud = torch.randn(128, 64, generator=g)
    ups.append({"adapter.0": loud * (10 * honest / float(loud.norm()))})
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 1, 1.0) for n in shapes} for u in ups]
    agg = make_aggregator("fedavg", names, own, {"subspace": 2, "exclude_flagged": 1})
    for n, m in zip(names, mods, strict=True):
        agg.add(n, list(m.values()))
    agg.result(1)
    along = {sc.sender: sc.subspace for sc in agg.scores}
    assert min(v for s, v in along.items() if s != "d5") > 4 and along["d5"] < 1.5, along
    assert {sc.sender for sc in agg.scores if sc.flagged} == {"d5"}


def test_an_echo_drowned_in_noise_shows_the_noise_s_shape_once_the_last_step_is_taken_out():
    """An echo of the last step with noise of twice the step's size added (``adversary.jitter`` 2) is under
    ``echo``'s cut (a cosine of about 1/sqrt(5)), and its update's shape is the step's, structured, plus noise:
    ``structure`` on the whole update passes it (measured in traced runs: one such push passed every check).
    With the last step known, the shape scores judge each update less its component along the step: the
    echo's is its noise (``structure`` about 1), an honest update's nearly all of itself. So the echoes are
    flagged by ``structure`` and left out, the honest senders neither; without a last step, as before."""
    g = torch.Generator().manual_seed(5)
    names = [f"d{i}" for i in range(6)]
    shapes = {"adapter.0": (256, 64), "adapter.1": (256, 64)}
    before = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    step = {n: _trained(sh, g) for n, sh in shapes.items()}
    own = {n: Module(n, {"w": before[n].tensors["w"] + step[n]}, 1, 1.0) for n in shapes}
    ups = [{n: k * _trained(sh, g) for n, sh in shapes.items()} for k in (0.8, 1.5, 2.2, 3.0)]  # honest sizes vary
    for _ in range(2):
        ups.append(
            {n: s + 2 * s.norm() / s.numel() ** 0.5 * torch.randn(s.shape, generator=g) for n, s in step.items()}
        )
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 2, 1.0) for n in shapes} for u in ups]
    params = {"update_z": 3.5, "twin_cos": 0.99, "structure": 3, "echo": 0.5, "exclude_flagged": 1}

    def run(previous):
        agg = make_aggregator("fedavg", names, own, params)
        agg.previous = dict(previous)
        for n, m in zip(names, mods, strict=True):
            agg.add(n, list(m.values()))
        out = agg.result(2)
        return out, {s: min(sc.structure for sc in agg.scores if sc.sender == s) for s in names}, agg.scores

    _, whole, _ = run({})  # no last step: the shapes of the whole updates
    assert min(whole.values()) > 3  # the echoes' included (the step's shape shows through the noise)
    out, shape, scores = run(before)
    echoes = {"d4", "d5"}
    assert all(0.3 < sc.echo < 0.5 for sc in scores if sc.sender in echoes)  # under echo's cut
    assert {sc.sender for sc in scores if sc.flagged} == {sc.sender for sc in scores if sc.excluded} == echoes
    assert max(shape[s] for s in echoes) < 1.5  # their noise's shape
    assert all(shape[s] > 0.8 * whole[s] for s in names if s not in echoes)  # honest: nearly all of itself
    for n in shapes:
        want = sum(mods[i][n].tensors["w"] for i in range(4)) / 4
        assert torch.allclose(out[n].tensors["w"], want, atol=1e-5)


def test_echoes_do_not_set_the_yardstick_the_others_are_scored_by():
    """Two echoes of one step (a fifth of its norm in noise each: not twins) among five senders sit close
    together and pull update_z's median onto them: the honest sender with the largest update stands out
    (measured in the full-size matrix: an honest device flagged in four rounds of six). With echo the medians
    and MADs are taken over the senders that do not echo: only the echoes are flagged."""
    g = torch.Generator().manual_seed(13)
    names = [f"d{i}" for i in range(5)]
    shapes = {"adapter.0": (30, 20), "adapter.1": (30, 20)}
    before = {n: Module(n, {"w": torch.randn(*sh, generator=g)}, 0, 1.0) for n, sh in shapes.items()}
    step = {n: 0.55 * torch.randn(*sh, generator=g) for n, sh in shapes.items()}
    own = {n: Module(n, {"w": before[n].tensors["w"] + step[n]}, 1, 1.0) for n in shapes}
    ups = [{n: torch.randn(*sh, generator=g) * s for n, sh in shapes.items()} for s in (0.5, 0.8, 1.2)]
    for _ in range(2):
        ups.append(
            {n: s + 0.2 * s.norm() / s.numel() ** 0.5 * torch.randn(s.shape, generator=g) for n, s in step.items()}
        )
    mods = [{n: Module(n, {"w": own[n].tensors["w"] + u[n]}, 2, 1.0) for n in shapes} for u in ups]

    def flagged(params):
        agg = make_aggregator("fedavg", names, own, params)
        agg.previous = dict(before)
        for n, m in zip(names, mods, strict=True):
            agg.add(n, list(m.values()))
        agg.result(2)
        return {sc.sender for sc in agg.scores if sc.flagged}

    assert flagged({"update_z": 3.5}) == flagged({"update_z": 3.5, "twin_cos": 0.99}) == {"d2"}  # honest
    assert flagged({"update_z": 3.5, "echo": 0.5}) == {"d3", "d4"}


def test_the_last_step_a_node_compares_echoes_with_is_where_its_devices_trained_from():
    """The inbox gives each training collect with ``echo`` the start its devices trained from last (their
    previous start, what an echo subtracts): none in a node's first round; in round 1 with an opening
    calibration, the start before the heads were calibrated; later, the last start of an earlier round, the
    calibrated one where calibration moved it; a re-attempt of a round compares with the same."""
    from hffm.inbox import Inbox
    from hffm.methods import Collect

    def start(v):
        return {"adapter.0": Module("adapter.0", {"w": torch.full((4, 3), float(v))}, 0, 1.0)}

    step = Collect("aggregate", ("d0", "d1", "d2", "d3"), "device_edge", params=(("echo", 0.5),))
    inbox = Inbox("edge-0")

    def previous():
        agg = inbox._collections["aggregate"].aggregator
        return {n: float(m.tensors["w"][0, 0]) for n, m in agg.previous.items()}

    inbox.open_round(1, [step], {"d0", "d1", "d2", "d3"}, reference=start(1))
    assert previous() == {}  # nothing to compare with yet
    inbox.rebase(start(2))  # round 1's heads calibrated: its devices train from 2, having held 1
    assert previous() == {"adapter.0": 1.0}
    inbox.open_round(2, [step], {"d0", "d1", "d2", "d3"}, reference=start(3))
    assert previous() == {"adapter.0": 2.0}
    inbox.rebase(start(4))
    inbox.rebase(start(5))  # moved twice: still the step since round 1's start
    assert previous() == {"adapter.0": 2.0}
    inbox.open_round(2, [step], {"d0", "d1", "d2", "d3"}, attempt=1, reference=start(3))  # a re-attempt
    assert previous() == {"adapter.0": 2.0}
    inbox.open_round(3, [step], {"d0", "d1", "d2", "d3"}, reference=start(6))
    assert previous() == {"adapter.0": 3.0}
    plain = Collect("aggregate", ("d0", "d1", "d2", "d3"), "device_edge")
    inbox.open_round(4, [plain], {"d0", "d1", "d2", "d3"}, reference=start(7))
    assert previous() == {}  # no echo asked for: none kept in the aggregator
