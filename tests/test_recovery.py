"""Recovery planning (pure): where each node starts a round — its own round end, or a sync from a node
holding its tier's current state — and which nodes a round cannot lose midway."""

from __future__ import annotations

from hffm.config import load_config
from hffm.costmodel import CostModel
from hffm.methods import SYNC, Collect, Send, Train
from hffm.planner import Planner
from hffm.recovery import critical
from hffm.topology import Topology
from services.chaos import kill_schedule


def _planner(method: str, *sets: str, edges: int = 2, per_edge: int = 3) -> tuple[Planner, Topology]:
    cfg = load_config(
        None, [f"method={method}", f"topology.edges={edges}", f"topology.devices_per_edge={per_edge}", *sets]
    )
    topo = Topology.from_config(cfg, 2)
    return Planner(cfg, CostModel(cfg, topo)), topo


def _everyone(topo: Topology, key=(2, 0)) -> dict:
    return {n: key for n in topo.node_ids()}


def test_a_device_that_missed_a_round_syncs_from_its_edge_before_it_trains():
    planner, topo = _planner("hfm", "e_agg=2")
    held = _everyone(topo)
    held["device-1-1"] = (1, 0)  # lost in round 2
    p = planner.plan(3, topo, held=held, cloud_rounds_done=[2])
    assert p.starts.sync["device-1-1"].source == "edge-1" and "device-1-1" not in p.starts.base
    assert p.starts.base["device-1-0"] == (2, 0)
    dev = p.plan.steps["device-1-1"]
    assert dev[0] == Collect(SYNC, ("edge-1",), "device_edge") and isinstance(dev[1], Train)
    edge = p.plan.steps["edge-1"]
    sync = edge[0]
    assert isinstance(sync, Send) and (sync.to, sync.tag) == ("device-1-1", SYNC)
    assert set(sync.modules) == set(topo.modules_for("device-1-1"))
    # the edge sends an aggregate: its weights are capped by the federation's samples, not the device's
    p = planner.plan(3, topo, samples={d.id: {"art": 5, "gqa": 5} for d in topo.devices}, held=held)
    caps = next(c for c in p.plan.steps["device-1-1"] if isinstance(c, Collect) and c.tag == SYNC)
    assert caps.caps_of("edge-1")["adapter.0"] == 5 * 2 * 6


def test_an_edge_that_missed_a_cloud_round_syncs_from_the_cloud_and_its_devices_after_it():
    planner, topo = _planner("hfm", "e_agg=2")
    held = _everyone(topo, (4, 0))
    for n in ["edge-1", *(d.id for d in topo.cluster("edge-1"))]:
        held[n] = (1, 0)  # the cluster sat out rounds 2-4 (round 2 and 4: cloud rounds)
    p = planner.plan(5, topo, held=held, cloud_rounds_done=[2, 4])
    assert p.starts.sync["edge-1"].source == "cloud"
    assert {n for n, s in p.starts.sync.items() if s.source == "edge-1"} == {d.id for d in topo.cluster("edge-1")}
    edge = p.plan.steps["edge-1"]
    assert edge[0].tag == SYNC and all(isinstance(s, Send) and s.tag == SYNC for s in edge[1:4])
    # without a cloud round since, the cluster's own state is current: nobody is synced
    p = planner.plan(
        4, topo, held={**held, **{n: (4, 0) for n in held if n != "edge-1" and "-1-" not in n}}, cloud_rounds_done=[]
    )
    assert p.starts.sync == {} and p.starts.base["edge-1"] == (1, 0)


def test_a_d2d_device_syncs_from_a_current_cluster_member_over_d2d():
    planner, topo = _planner("hfm-d2d", "e_agg=2", "topology.tasks_per_device=all")
    held = _everyone(topo)
    held["device-0-2"] = (1, 0)
    p = planner.plan(3, topo, held=held, cloud_rounds_done=[2])
    src = p.starts.sync["device-0-2"]
    assert src.link == "d2d" and src.source == p.ctx.heads["edge-0"] != "device-0-2"
    p.plan.validate()
    # nobody in the cluster holds the newest state and can serve: the edge does, over its own link
    held = {n: k for n, k in _everyone(topo).items() if not n.startswith("device-0")}
    p = planner.plan(3, topo, held=held, cloud_rounds_done=[2])
    assert {s.source for n, s in p.starts.sync.items() if n.startswith("device-0")} == {"edge-0"}


def test_star_devices_sync_from_the_cloud():
    planner, topo = _planner("star")
    held = _everyone(topo)
    del held["device-0-0"]  # restarted without its state
    p = planner.plan(3, topo, held=held)
    assert p.starts.sync == {"device-0-0": p.starts.sync["device-0-0"]}
    assert p.starts.sync["device-0-0"].source == "cloud"


def test_critical_nodes_are_those_others_wait_on_alone():
    planner, topo = _planner("hfm", "e_agg=2")
    crit = planner.plan(2, topo).critical
    assert crit == {"cloud", "edge-0", "edge-1"}  # devices' updates are one of several
    planner, topo = _planner("hfm", edges=1, per_edge=1)
    assert "device-0-0" in planner.plan(1, topo).critical  # a cluster's only device
    planner, topo = _planner("hfm-d2d", "e_agg=2", per_edge=3)
    p = planner.plan(2, topo)
    relays = {h for _, s in p.plan.transfers() for h in s.route}
    assert set(p.ctx.heads.values()) | relays <= p.critical == critical(p.plan)


def test_the_kill_schedule_is_seeded():
    a = kill_schedule(3, 10, 20, ["cloud", "edge-0", "device-0-0"], 4.0)
    assert a == kill_schedule(3, 10, 20, ["cloud", "edge-0", "device-0-0"], 4.0)
    assert a != kill_schedule(4, 10, 20, ["cloud", "edge-0", "device-0-0"], 4.0)
    assert len(a) == 10 and all(1 <= k.round <= 19 and 0 <= k.delay_s <= 4.0 for k in a)
    assert [(k.round, k.delay_s) for k in a] == sorted((k.round, k.delay_s) for k in a)
