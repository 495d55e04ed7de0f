"""Cost model: formulas against values worked out by hand, the paper profile's Table I,
geometry and D2D graphs, head policies, and the critical path of a round."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from hffm.config import LinkConfig, load_config
from hffm.costmodel import PAPER_MODULE_BYTES, CostModel, Hop, _h2, channel_gain, effective_cost, noise_w, rate_bps
from hffm.geometry import choose_head, d2d_graph, draw_geometry, path
from hffm.methods import D2D, DEVICE_EDGE, EDGE_CLOUD, Collect, RoundPlan, Send, Train
from hffm.table1 import PAPER_ROWS, build_rows, ordering, plan_hops
from hffm.topology import Topology


def _cfg(*sets):
    return load_config(None, ["topology.edges=10", "topology.devices_per_edge=4", *sets])


# ---- formulas by hand ----------------------------------------------------------------------------
def test_noise_converts_dbm_per_hz_to_watts():
    c = _cfg().cost
    # -174 dBm/Hz = 10^-17.4 mW/Hz = 3.981e-21 W/Hz; over 1 MHz: 3.981e-15 W
    assert noise_w(c, 1e6) == pytest.approx(3.981e-15, rel=1e-3)
    # the seed code's error: bandwidth in kHz -> 30 dB less noise
    p = effective_cost(_cfg("cost.profile=paper").cost)
    assert noise_w(p, 1e6) == pytest.approx(3.981e-18, rel=1e-3)


def test_path_loss_models():
    c = _cfg().cost
    assert channel_gain(c, 100.0) == pytest.approx(1e-9)  # -30 dB - 30*log10(100) = -90 dB
    uma = c.model_copy(update={"pathloss": "uma"})
    assert channel_gain(uma, 1000.0) == pytest.approx(10**-12.81)  # 128.1 dB at 1 km
    assert channel_gain(uma, 100.0) == pytest.approx(10 ** (-(128.1 - 37.6) / 10))


def test_rate_by_hand():
    c = _cfg().cost
    link = LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6)
    snr = 1.0 * 1.0 * 1e-9 / 3.981e-15
    assert rate_bps(c, link, 100.0, 1.0) == pytest.approx(1e6 * math.log2(1 + snr), rel=1e-3)  # ~17.94 Mb/s


def test_fading_mean_power():
    rng = np.random.default_rng(0)
    assert np.mean([_h2(rng, "corrected") for _ in range(20000)]) == pytest.approx(1.0, abs=0.03)
    rng = np.random.default_rng(0)
    assert np.mean([_h2(rng, "paper") for _ in range(20000)]) == pytest.approx(2.0, abs=0.06)


def test_hop_energy_and_compute_and_backhaul_by_hand():
    cfg = _cfg("topology.edges=1", "topology.devices_per_edge=2")
    topo = Topology.from_config(cfg, 4)
    cm = CostModel(cfg, topo)
    r = cm.budget.uplink_bps["device-0-0"]
    t, e = cm.hop_cost(DEVICE_EDGE, "device-0-0", "edge-0", 1e6)
    assert t == pytest.approx(8e6 / r) and e == pytest.approx(1.0 * 8e6 / r)  # P_tx = 1 W
    t, e = cm.hop_cost(EDGE_CLOUD, "edge-0", "cloud", 1e6)
    assert t == pytest.approx(0.1 + 2.0) and e == pytest.approx(0.8 * 2.0)  # 8 Mbit at 4 Mb/s, 0.8 W
    # T = c*D/f = 1e7*100/1e9 = 1 s; E = kappa*c*D*f^2 = 1e-28 * 1e9 * 1e18 = 0.1 J
    assert cm.compute_cost(100) == (pytest.approx(1.0), pytest.approx(0.1))


# ---- the paper profile reproduces Table I -----------------------------------------------------
@pytest.fixture(scope="module")
def paper_rows():
    return build_rows(load_config("configs/paper.yaml", ["cost.profile=paper"]), rounds=8)


def test_paper_star_row_exact(paper_rows):
    star = paper_rows[0]
    assert (star.method, round(star.latency_s, 6), round(star.energy_j, 6)) == ("star", 12.1, 387.2)


def test_paper_hfm_and_edge_only_within_one_percent(paper_rows):
    for r in paper_rows:
        if r.method in ("hfm", "edge-only"):
            assert abs(r.latency_ratio - 1) < 0.01, r
            assert abs(r.energy_ratio - 1) < 0.01, r


def test_paper_d2d_rows_within_25_percent(paper_rows):
    for r in paper_rows:
        if r.method.endswith("d2d"):
            assert abs(r.latency_ratio - 1) < 0.25 and abs(r.energy_ratio - 1) < 0.25, r


def test_paper_row_ordering_matches(paper_rows):
    assert ordering([r.latency_s for r in paper_rows]) == ordering([p[2] for p in PAPER_ROWS])
    assert ordering([r.energy_j for r in paper_rows]) == ordering([p[3] for p in PAPER_ROWS])


def test_paper_profile_uses_the_seed_quirks():
    c = effective_cost(_cfg("cost.profile=paper").cost)
    assert c.module_bytes_override == PAPER_MODULE_BYTES == 6_000_000
    assert c.uplink.tx_power_w == 1.0 and c.uplink.energy_power_w == 0.6
    assert c.compute.cycles_per_sample == 0
    corrected = effective_cost(_cfg().cost)
    assert corrected.uplink.energy_power_w is None and corrected.module_bytes_override is None


# ---- geometry and D2D --------------------------------------------------------------------------
def test_geometry_respects_constraints():
    cfg = _cfg()
    topo = Topology.from_config(cfg, 4)
    geo = draw_geometry(cfg.geometry, topo)
    pts = list(geo.servers.values())
    for i, a in enumerate(pts):
        for b in pts[i + 1 :]:
            assert math.dist(a, b) >= 500
    for e in topo.edges:
        assert math.dist(geo.centres[e], geo.servers[e]) <= 1000 + 1e-6
        for d in topo.cluster(e):
            assert math.dist(geo.devices[d.id], geo.centres[e]) <= 500 + 1e-6
            assert all(0 <= v <= 5000 for v in geo.devices[d.id])
    assert draw_geometry(cfg.geometry, topo) == geo  # seeded


def test_d2d_graph_patched_with_mst_when_disconnected():
    cfg = _cfg("topology.edges=1", "geometry.d2d_range_m=1")
    topo = Topology.from_config(cfg, 4)
    cm = CostModel(cfg, topo)
    g = cm.d2d_graph("edge-0")
    assert nx.is_strongly_connected(g)
    assert g.number_of_edges() == 2 * (len(topo.devices) - 1)  # exactly a spanning tree, both ways


def _line_graph():
    """a - b - c - d with latencies 1, 1, 1 (a chain: d reaches a in 3 hops)."""
    g = nx.DiGraph()
    for u, v in (("a", "b"), ("b", "c"), ("c", "d")):
        g.add_edge(u, v, weight=1.0)
        g.add_edge(v, u, weight=1.0)
    g.add_edge("a", "d", weight=10.0)
    g.add_edge("d", "a", weight=10.0)
    return g


def test_shortest_path_is_latency_weighted():
    g = _line_graph()
    assert path(g, "d", "a") == ["d", "c", "b", "a"]  # 3 hops at 3.0 beat 1 hop at 10.0
    assert path(g, "a", "a") == ["a"]


def test_head_policies_and_failover():
    g = _line_graph()
    members = ["a", "b", "c", "d"]
    assert choose_head("central", members, g, 0, 1, "e") in ("b", "c")  # the middle of the chain
    r1 = choose_head("random", members, g, 7, 1, "e")
    assert r1 == choose_head("random", members, g, 7, 5, "e")  # fixed for the run, seeded
    assert [choose_head("rotate", members, g, 0, r, "e") for r in (1, 2, 3, 4, 5)] == ["a", "b", "c", "d", "a"]
    central = choose_head("central", members, g, 0, 1, "e")
    assert choose_head("central", members, g, 0, 1, "e", exclude={central}) != central
    assert choose_head("rotate", members, g, 0, 2, "e", exclude={"b"}) == "c"  # next by the same policy
    with pytest.raises(ValueError, match="no reachable"):
        choose_head("random", members, g, 0, 1, "e", exclude=set(members))


def test_d2d_graph_function_on_fixed_points():
    from hffm.geometry import Geometry

    geo = Geometry({}, {}, {"a": (0, 0), "b": (20, 0), "c": (40, 0), "d": (100, 0)})
    g = d2d_graph(["a", "b", "c", "d"], geo, 30.0, geo.distance)  # latency ~ distance
    assert g.has_edge("a", "b") and g.has_edge("b", "c") and not g.has_edge("a", "c")
    assert nx.is_strongly_connected(g)  # d joined by the MST patch, via its nearest: c
    assert g.has_edge("c", "d") and not g.has_edge("a", "d")


# ---- a round's critical path -------------------------------------------------------------------
def test_critical_path_sums_hops_and_takes_max_of_branches():
    plan = RoundPlan(1)
    plan.add("d1", Train(), Send("e", DEVICE_EDGE, "agg", ("m",)))
    plan.add("d2", Train(), Send("e", DEVICE_EDGE, "agg", ("m",)))
    plan.add("e", Collect("agg", ("d1", "d2"), DEVICE_EDGE), Send("c", EDGE_CLOUD, "agg", ("m",)))
    plan.add("c", Collect("agg", ("e",), EDGE_CLOUD))
    pushes = {("d1", "e", "agg"): 2.0, ("d2", "e", "agg"): 5.0, ("e", "c", "agg"): 3.0}
    # d2: compute 1 + upload 5 = 6; then the edge's 3 -> 9
    assert CostModel._critical_path(plan, pushes, {"d1": 1.0, "d2": 1.0}) == pytest.approx(9.0)
    plan.add("x", Collect("never", ("nobody",), D2D))
    with pytest.raises(ValueError, match="deadlocks"):
        CostModel._critical_path(plan, pushes, {})


def test_relayed_push_latency_is_the_sum_of_its_hops():
    cfg = _cfg("topology.edges=1")
    topo = Topology.from_config(cfg, 4)
    cm = CostModel(cfg, topo)
    plan = RoundPlan(1)
    plan.add("device-0-0", Send("device-0-2", D2D, "cluster", ("adapter.0",), ("device-0-1",)))
    plan.add("device-0-2", Collect("cluster", ("device-0-0",), D2D))
    hops = plan_hops(plan, {"adapter.0": 1_000_000})
    assert [(h.sender, h.receiver) for h in hops] == [("device-0-0", "device-0-1"), ("device-0-1", "device-0-2")]
    rc = cm.round_cost(plan, hops, {})
    want = sum(cm.hop_cost(D2D, h.sender, h.receiver, 1e6)[0] for h in hops)
    assert rc.latency_s == pytest.approx(want)
    assert rc.by_link[D2D]["bytes"] == 2_000_000
    assert rc.energy_j == pytest.approx(sum(cm.hop_cost(D2D, h.sender, h.receiver, 1e6)[1] for h in hops))


def test_module_bytes_override_spreads_over_a_push():
    cfg = _cfg("topology.edges=1", "cost.module_bytes_override=6000000")
    topo = Topology.from_config(cfg, 4)
    cm = CostModel(cfg, topo)
    hops = [Hop("device-0-0", "edge-0", DEVICE_EDGE, m, b, "agg") for m, b in (("a", 100), ("b", 300))]
    assert cm._charged_bytes(hops) == [1_500_000, 4_500_000]
