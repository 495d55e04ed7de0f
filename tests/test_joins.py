"""Devices that join a running federation (topology.joins; issue 16, V-B): admitted between rounds,
given a position and links by the cost model, onboarded by a sync from a holder of their cluster's
current modules, then trained and aggregated like everyone else. Everything else about a join is
refused with a message, and changes nothing."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hffm.config import load_config
from hffm.costmodel import CostModel
from hffm.topology import Registration, Topology
from services.cloud.membership import Membership
from tests.conftest import processes_with


def _run_and(cfg, out, rounds_done: int, action) -> dict:
    """Run ``cfg`` for real in a thread; once ``rounds_done`` rounds are in results.json, call
    ``action(supervisor)``; the run's results."""
    from services.launcher import run

    box: dict = {}

    def go() -> None:
        box["res"] = run(cfg, out, Console(file=io.StringIO()), timeout_s=300, on_start=lambda s: box.update(sup=s))

    t = threading.Thread(target=go)
    t.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            f = out / "results.json"
            if f.is_file() and len(json.loads(f.read_text())["rounds"]) >= rounds_done:
                break
            time.sleep(0.2)
        action(box["sup"])
    finally:
        t.join(300)
    return box["res"]


def _topo(*sets: str) -> tuple:
    cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=2", "tasks=[art,gqa]", *sets])
    return cfg, Topology.from_config(cfg, 2)


def test_a_joiner_is_admitted_only_when_joins_are_on_and_its_registration_holds_up():
    cfg, topo = _topo("topology.tasks_per_device=1")
    reg = Registration("device-1-5", "device", "127.0.0.1:1", "edge-1", (("gqa", 30),))
    closed = Membership(topo, "127.0.0.1:0")
    with pytest.raises(ValueError, match="topology.joins is off"):
        closed.register(reg)
    m = Membership(topo, "127.0.0.1:0", joins=True)
    for bad, why in (
        (Registration("device-1-5", "device", "a:1", "edge-0", (("gqa", 3),)), "belongs to edge-1"),
        (Registration("device-7-0", "device", "a:1", "edge-7", (("gqa", 3),)), "among those edge-7"),
        (Registration("device-1-5", "device", "a:1", "edge-1", ()), "tasks"),
        (Registration("device-1-5", "device", "a:1", "edge-1", (("vqa", 3),)), "tasks"),
        (Registration("edge-4", "edge", "a:1"), "only devices join"),
        (Registration("nobody", "device", "a:1", "edge-1", (("gqa", 3),)), "not a node id"),
    ):
        with pytest.raises(ValueError, match=why):
            m.register(bad)
        assert m.topo == topo and m.addresses == {"cloud": "127.0.0.1:0"}  # a refusal changes nothing
    assert m.register(reg) == 2 and m.topo.device_map["device-1-5"].tasks == ("gqa",)
    assert m.topo.device_map["device-1-5"].edge == "edge-1" and m.expected == 1 + 2 + 5
    capped = Membership(topo, "127.0.0.1:0", joins=True, max_joins=1)
    capped.register(reg)
    with pytest.raises(ValueError, match=r"topology.max_joins \(1\)"):
        capped.register(Registration("device-0-7", "device", "a:2", "edge-0", (("art", 3),)))
    assert len(capped.topo.devices) == 5
    # a resumed coordinator starts from the table again: a joiner's saved entry waits for it to register
    resumed = Membership(topo, "127.0.0.1:0", joins=True)
    resumed.restore(m.to_json())
    assert "device-1-5" not in resumed.addresses and "device-1-5" not in resumed.samples
    assert resumed.missing() == ["device-0-0", "device-0-1", "device-1-0", "device-1-1", "edge-0", "edge-1"]
    # its own tasks: what the config's round-robin gives it, among its edge's tasks
    joined = topo.joiner("device-0-3", 1)
    assert set(joined.device_map["device-0-3"].tasks) <= set(topo.node_tasks("edge-0"))


def test_a_member_that_leaves_is_off_the_table_for_good_and_a_leave_counts_no_join_back():
    cfg, topo = _topo()
    m = Membership(topo, "127.0.0.1:0", joins=True, max_joins=1)
    m.register(Registration("device-0-1", "device", "127.0.0.1:7", "edge-0", (("art", 30), ("gqa", 30))))
    with pytest.raises(ValueError, match="topology.joins is off"):
        Membership(topo, "127.0.0.1:0").leave("device-0-1")
    for who, err in (("device-0-9", LookupError), ("edge-0", LookupError)):
        with pytest.raises(err):
            m.leave(who)
        assert m.topo == topo and not m.departed  # a refusal changes nothing
    m.leave("device-0-1", "test")
    assert "device-0-1" not in m.topo.device_map and "device-0-1" not in m.samples and m.expected == 1 + 2 + 3
    assert m.address("device-0-1") == "127.0.0.1:7"  # until the coordinator shuts it down
    assert m.take_leaving() == {"device-0-1": "127.0.0.1:7"} and m.take_leaving() == {}
    assert "device-0-1" not in m.addresses
    # a resumed coordinator keeps it off; it may come back only as a newcomer (a join, counted as one)
    resumed = Membership(topo, "127.0.0.1:0", joins=True, max_joins=1)
    resumed.restore(m.to_json())
    assert "device-0-1" not in resumed.topo.device_map and resumed.departed == {"device-0-1"}
    resumed.register(Registration("device-0-1", "device", "127.0.0.1:8", "edge-0", (("art", 30), ("gqa", 30))))
    assert "device-0-1" in resumed.topo.device_map and not resumed.departed
    with pytest.raises(ValueError, match=r"topology.max_joins \(1\)"):
        resumed.register(Registration("device-0-7", "device", "a:2", "edge-0", (("art", 3),)))


def test_a_round_is_planned_over_one_view_and_a_leave_names_the_last_round_planned_with_it():
    """plan_view takes the leavers to shut down, the table and the samples at one instant: a device that
    leaves after it is in that round with its samples (and the round is its last, as Leave says); one that
    left before is in neither. (A Leave landing between reading the table and the samples once planned a
    device with no samples: its push claimed more than the cap of 1, and the round aborted.)"""
    cfg, topo = _topo()
    m = Membership(topo, "127.0.0.1:0", joins=True)
    devices = sorted(topo.device_map)
    for i, d in enumerate(devices):
        m.register(Registration(d, "device", f"127.0.0.1:{10 + i}", topo.device_map[d].edge,
                                tuple((t, 30) for t in topo.device_map[d].tasks)))  # fmt: skip
    assert m.leave(devices[0]) == 0  # never planned
    gone, view, samples, _ = m.plan_view(3)
    assert gone == {devices[0]: "127.0.0.1:10"} and devices[0] not in view.device_map
    assert set(samples) == set(view.device_map) and samples[devices[1]] is not m.samples[devices[1]]
    assert m.leave(devices[1]) == 3  # after the view: round 3 has it, with its samples, and is its last
    assert devices[1] in view.device_map and samples[devices[1]]
    gone, view, samples, _ = m.plan_view(4)
    assert gone == {devices[1]: "127.0.0.1:11"} and devices[1] not in view.device_map
    # leaves racing the planning: every view's table and samples agree, whatever lands when
    stop, views = threading.Event(), []

    def plan() -> None:
        r = 5
        while not stop.is_set() and r < 5000:
            _, v, smp, _ = m.plan_view(r)
            views.append((set(v.device_map), set(smp)))
            r += 1

    t = threading.Thread(target=plan)
    t.start()
    for d in devices[2:]:
        m.leave(d)
        time.sleep(0.002)
    stop.set()
    t.join(10)
    assert views and all(table <= smp for table, smp in views)


def test_the_cost_model_places_a_joiner_without_moving_anyone():
    cfg, topo = _topo()
    costs = CostModel(cfg, topo)
    before = (dict(costs.geo.devices), dict(costs.budget.uplink_bps), dict(costs.budget.d2d_bps))
    grown = topo.with_device("device-0-9", "edge-0", ("art",))
    assert costs.admit(grown) == ["device-0-9"] and costs.admit(grown) == []
    assert {k: v for k, v in costs.geo.devices.items() if k != "device-0-9"} == before[0]
    assert all(costs.budget.d2d_bps[k] == v for k, v in before[2].items())
    assert costs.budget.uplink_bps["device-0-9"] > 0 and ("device-0-9", "device-0-0") in costs.budget.d2d_bps
    ctx = costs.d2d_context(grown, 1)  # the joiner is in its cluster's D2D graph
    assert "device-0-9" in ctx.up_paths
    again = CostModel(cfg, topo)  # seeded by its id: the same place and links in every process
    again.admit(grown)
    assert again.geo.devices["device-0-9"] == costs.geo.devices["device-0-9"]


def test_a_joiner_that_says_where_it_is_joins_the_nearest_edge_and_is_placed_there(tmp_path):
    """Nearest edge by geometry: ``hffm join --position`` names the device after the edge nearest to it
    (the cloud's own draw) and the lowest free index; the cloud admits it only there, and the cost model
    computes its links from that point."""
    from hffm.config import write_config
    from services.launcher import place_joiner

    cfg, topo = _topo("topology.edges=3", "topology.joins=true")
    costs = CostModel(cfg, topo)
    servers = costs.geo.servers
    for e, (x, y) in servers.items():
        assert costs.locate((x, y)) == e
        others = [o for o in servers if o != e]  # a point 1 m off a server towards another is still its
        ox, oy = servers[others[0]]
        d = ((ox - x) ** 2 + (oy - y) ** 2) ** 0.5
        assert costs.locate((x + (ox - x) / d, y + (oy - y) / d)) == e
    for bad in ((-1.0, 0.0), (0.0, cfg.geometry.area_m + 1), (float("inf"), 0.0)):
        with pytest.raises(ValueError, match="outside the area"):
            costs.locate(bad)
    write_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "logs").mkdir()
    at = servers["edge-2"]
    assert place_joiner(tmp_path, cfg, at) == "device-2-2"  # 2 per edge in the table: index 2 is free
    (tmp_path / "logs" / "device-2-2.log").write_text("")  # it joined: the next one gets index 3
    assert place_joiner(tmp_path, cfg, at) == "device-2-3"

    m = Membership(topo, "127.0.0.1:0", joins=True, locate=costs.locate)
    wrong = Registration("device-0-5", "device", "a:1", "edge-0", (("art", 3),), position=servers["edge-1"])
    with pytest.raises(ValueError, match="nearest to edge-1, not edge-0"):
        m.register(wrong)
    assert m.topo == topo and not m.positions  # refused: nothing changed
    m.register(Registration("device-2-2", "device", "a:1", "edge-2", (("art", 3),), position=at))
    assert m.positions == {"device-2-2": at}
    assert costs.admit(m.topo, m.positions) == ["device-2-2"] and costs.geo.devices["device-2-2"] == at
    assert costs.geo.distance("device-2-2", "edge-2") == 0.0
    assert all((("device-2-2", p.id) in costs.budget.d2d_bps) for p in topo.cluster("edge-2"))


def test_a_device_joining_mid_run_is_onboarded_over_d2d_and_takes_part(tmp_path):
    """hfm-d2d, one cluster of 3, over real gRPC and mTLS. Once round 2 is done, ``hffm join --position``
    starts device-0-3 (named after the nearest edge, a certificate from the run's CA, its edge's address
    from the run). The cloud admits it
    between rounds; in its first round it is synced over D2D from a cluster member (the catch-up carries
    the round its source holds), then its updates count in its head's aggregate like everyone else's."""
    from hffm_cli.main import app

    out = tmp_path / "run"
    sets = ["method=hfm-d2d", "e_agg=2", "rounds=24", "topology.edges=1", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=60", "train.eval_every=24",
            "topology.joins=true"]  # fmt: skip
    cfg = load_config(None, sets)

    x, y = CostModel(cfg, Topology.from_config(cfg, 1)).geo.servers["edge-0"]
    at = f"{x + 10:.1f},{y:.1f}"  # 10 m from its edge's server: the nearest edge, the lowest free index

    def join(_sup) -> None:
        r = CliRunner().invoke(app, ["join", "--run", str(out), "--position", at])
        assert r.exit_code == 0 and "device-0-3 started" in r.output, r.output

    res = _run_and(cfg, out, 2, join)
    assert res["complete"] and "device-0-3" in res["nodes"]
    rounds = res["rounds"]
    first = next((x for x in rounds if any(h["origin"] == "device-0-3" for h in x["hops"])), None)
    assert first is not None, "device-0-3 never took part"
    assert first["round"] >= 3 and first["synced"].get("device-0-3", "").startswith("device-0-")
    sync = [h for h in first["hops"] if h["tag"] == "sync" and h["destination"] == "device-0-3"]
    assert sync and all(h["link"] == "d2d" for h in sync)
    later = [x for x in rounds if x["round"] > first["round"]]
    assert later, "device-0-3 joined in the last round: too late to check it is aggregated"
    for x in later:  # counted in its cluster's aggregate every round after it joined
        counted = [a for a in x["aggregates"] if a["tag"] == "cluster"]
        assert any("device-0-3" in a["counted"] or a["node"] == "device-0-3" for a in counted), x["round"]
        assert "device-0-3" not in x["synced"]
    # results.json has its own scores; after the last round (a cloud round) it holds the cloud's modules,
    # as its peers do: the same accuracy on the global test set of every task they share
    last = rounds[-1]["node_accuracy"]
    mine = last["device-0-3"]
    assert mine and all(set(s) == {"local", "global"} for s in mine.values())
    shared = [(p, t) for p in ("device-0-0", "device-0-1", "device-0-2") for t in mine if t in last[p]]
    assert shared and all(last[p][t]["global"] == mine[t]["global"] for p, t in shared)
    log = (out / "logs" / "device-0-3.log").read_text()
    assert "device-0-3 registered" in log
    assert f"admitted device-0-3 to edge-0 at ({at.replace(',', ', ')}) m" in (out / "logs" / "cloud.log").read_text()

    def joiner() -> list[str]:
        return [p for p in processes_with(str(out)) if "device-0-3=" in p]

    deadline = time.monotonic() + 30  # the joiner leaves with the run
    while joiner() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not joiner(), "the joiner outlived the run"


def test_with_statistics_first_a_joiner_s_statistics_reach_its_edge_before_its_first_push(tmp_path):
    """hfm over real gRPC and mTLS, calibration.opening with the label and head checks, topology.joins on.
    Once round 2 is done, ``hffm join`` starts device-0-3. In its first round it is synced from its cluster,
    sends its statistics to edge-0 (``join-stats``) and only then trains: edge-0 holds them before its
    training push, whose heads are checked against them (a head_drop score, which a device with no statistics
    at its edge would not get) in that very round; nobody else sends any statistics outside the phases."""
    from hffm_cli.main import app

    out = tmp_path / "run"
    sets = ["method=hfm", "e_agg=2", "rounds=40", "topology.edges=1", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=60", "train.eval_every=40",
            "topology.joins=true", "calibration.enabled=true", "calibration.opening=true",
            "calibration.label_t=4", "calibration.head_check=0.3"]  # fmt: skip
    cfg = load_config(None, sets)
    joiner = "device-0-3"

    def join(_sup) -> None:
        r = CliRunner().invoke(app, ["join", "--run", str(out), "--id", joiner])
        assert r.exit_code == 0 and f"{joiner} started" in r.output, r.output

    res = _run_and(cfg, out, 2, join)
    assert res["complete"] and joiner in res["nodes"]
    rounds = res["rounds"]
    first = next((x for x in rounds if any(h["origin"] == joiner for h in x["hops"])), None)
    assert first is not None, f"{joiner} never took part"
    assert first["round"] >= 3 and joiner in first["synced"]
    stats = [h for h in first["hops"] if h["tag"] == "join-stats"]
    assert stats and {(h["origin"], h["destination"]) for h in stats} == {(joiner, "edge-0")}
    held = [a for a in first["aggregates"] if a["tag"] == "join-stats"]
    assert [(a["node"], a["counted"]) for a in held] == [("edge-0", [joiner])]
    trained = [a for a in first["aggregates"] if a["node"] == "edge-0" and a["tag"].startswith("aggregate")]
    mine = [sc for a in trained for sc in a["scores"] if sc["sender"] == joiner]
    assert mine and all(sc["module"].startswith("head.") and not sc["flagged"] for sc in mine), trained
    assert joiner in {s for a in trained for s in a["counted"]}
    for x in rounds:  # a statistics phase of its own in no other round: the joiner's first only
        tags = {h["tag"] for h in x["hops"]}
        assert ("join-stats" in tags) == (x["round"] == first["round"]), (x["round"], tags)
    later = [x for x in rounds if x["round"] > first["round"]]
    assert later and all(joiner not in x["synced"] for x in later)


def _run_with_a_flipper_joining(out, joiner: str, after: int, *sets: str) -> dict:
    """2 edges x 4 devices over real gRPC and mTLS, statistics first with the label and head checks, and ``sets``;
    once round ``after`` is done ``hffm join`` starts ``joiner``, which trains on flipped labels and reports the
    statistics it trained on (adversary label_flip). The run's results (complete, the joiner among its nodes)."""
    from hffm_cli.main import app

    base = ["topology.edges=2", "topology.devices_per_edge=4", "runtime.devices_per_process=4", "data.alpha=0.3",
            "data.train_per_task=800", "data.global_test_per_task=32", "topology.joins=true",
            "calibration.enabled=true", "calibration.epochs=1", "calibration.opening=true", "calibration.label_t=4",
            "calibration.head_check=0.3", f"adversary.nodes=[{joiner}]", "adversary.behaviour=label_flip"]  # fmt: skip
    cfg = load_config(None, [*base, *sets])

    def join(_sup) -> None:
        r = CliRunner().invoke(app, ["join", "--run", str(out), "--id", joiner])
        assert r.exit_code == 0 and f"{joiner} started" in r.output, r.output

    res = _run_and(cfg, out, after, join)
    assert res["complete"] and joiner in res["nodes"]
    return res


@pytest.mark.parametrize(("method", "collector"), [("hfm", "edge-1"), ("star", "cloud")])
def test_a_joiner_that_trains_on_flipped_labels_is_left_out_from_its_first_push(tmp_path, method, collector):
    """hfm (a cloud round every round, e_agg 1) or star over real gRPC and mTLS, statistics first with the label
    and head checks, 2 edges x 4 devices; once round 2 is done ``hffm join`` starts device-1-4, which trains on
    flipped labels and reports the statistics it trained on (adversary label_flip). Its ``join-stats`` are
    checked against what its collector's label check of the last round's phase judged its devices by (edge-1's
    deferred check in hfm, the cloud's in star): it is flagged in the round it joins, and the collector counts
    its first training push and leaves it out. Nobody else is flagged."""
    joiner = "device-1-4"
    res = _run_with_a_flipper_joining(
        tmp_path / "run", joiner, 2, f"method={method}", "e_agg=1", "rounds=8", "train.eval_every=8"
    )
    first = next((x for x in res["rounds"] if any(h["origin"] == joiner for h in x["hops"])), None)
    assert first is not None and first["round"] < 8, f"{joiner} joined too late to be checked"

    def record(tag: str) -> dict:
        return next(a for a in first["aggregates"] if a["node"] == collector and a["tag"].startswith(tag))

    stats = record("join-stats")
    assert stats["counted"] == [joiner]
    assert stats["scores"] and all(sc["flagged"] and sc["label_t"] > 4 for sc in stats["scores"]), stats["scores"]
    trained = record("aggregate")
    assert joiner in trained["counted"]
    mine = [sc for sc in trained["scores"] if sc["sender"] == joiner]
    assert mine and all(sc["excluded"] and sc["label_t"] > 4 for sc in mine), trained["scores"]
    flagged = {sc["sender"] for x in res["rounds"] for a in x["aggregates"] for sc in a["scores"] if sc["flagged"]}
    assert flagged == {joiner}, flagged


def test_a_flipper_that_joins_after_an_edge_round_is_checked_under_the_reference_s_modules(tmp_path):
    """hfm with one cloud round, the last (e_agg 8, 8 rounds), over real gRPC and mTLS, statistics first with the
    label and head checks; once round 1 is done ``hffm join`` starts device-1-4, a label flipper reporting the
    statistics it trained on. Its first round (2-8: a process takes seconds to start) follows an edge round: it
    was synced to edge-1's modules of that round, not to those edge-1's label check of the last phase judged by
    (round 1's opening phase: the initial modules). edge-1 sends it those first (``join-ref``), it computes its
    ``join-stats`` under them, and edge-1 flags it on arrival and leaves its first training push out (before,
    its labels waited for round 8's phase and its pushes until then were folded). After a cloud round's closing
    phase the same path runs in the scenario ``join-ref-edge-restarted``."""
    joiner = "device-1-4"
    res = _run_with_a_flipper_joining(
        tmp_path / "run", joiner, 1, "method=hfm", "e_agg=8", "rounds=8", "train.eval_every=8"
    )
    first = next((x for x in res["rounds"] if any(h["origin"] == joiner for h in x["hops"])), None)
    assert first is not None and first["round"] > 1, "it must join before the last round"
    refs = [h for h in first["hops"] if h["tag"] == "join-ref"]
    assert [(h["sender"], h["receiver"]) for h in refs] == [("edge-1", joiner)] and refs[0]["bytes"] > 0
    stats = next(a for a in first["aggregates"] if a["node"] == "edge-1" and a["tag"] == "join-stats")
    assert stats["counted"] == [joiner]
    assert stats["scores"] and all(sc["flagged"] and sc["label_t"] > 4 for sc in stats["scores"]), stats["scores"]
    trained = next(a for a in first["aggregates"] if a["node"] == "edge-1" and a["tag"].startswith("aggregate"))
    mine = [sc for sc in trained["scores"] if sc["sender"] == joiner]
    assert joiner in trained["counted"] and mine and all(sc["excluded"] for sc in mine), trained["scores"]
    flagged = {sc["sender"] for x in res["rounds"] for a in x["aggregates"] for sc in a["scores"] if sc["flagged"]}
    assert flagged == {joiner}, flagged


def test_join_refuses_a_run_that_takes_no_joiners(tmp_path):
    from hffm.config import write_config
    from hffm_cli.main import app

    write_config(load_config(None, []), tmp_path / "config.yaml")
    r = CliRunner().invoke(app, ["join", "--run", str(tmp_path), "--id", "device-0-9"])
    assert r.exit_code == 2 and "topology.joinsisfalse" in re.sub(r"[\s│]", "", r.output)  # rich may wrap it


def test_a_newcomer_is_synced_from_the_cheapest_holder_of_its_clusters_state():
    """The relay policy: among the members holding the cluster's newest round end (and its tasks), the
    one whose D2D path to the newcomer the cost model says is cheapest; without a cost, the head."""
    from hffm.methods import RoundContext, make_method
    from hffm.recovery import plan_starts

    _, topo = _topo()
    topo = topo.joiner("device-0-5", "all")
    held = {"cloud": (2, 0), "edge-0": (2, 0), "edge-1": (2, 0)}
    held |= {d.id: (2, 0) for d in topo.devices if d.id != "device-0-5"}
    ctx = RoundContext(heads={"edge-0": "device-0-0", "edge-1": "device-1-0"})
    m = make_method("hfm-d2d", 2)

    def route(edge, src, dst):
        return [src, dst]

    assert plan_starts(m, topo, held, [2], ctx, route).sync["device-0-5"].source == "device-0-0"
    cheap = plan_starts(m, topo, held, [2], ctx, route, lambda e, p: 1.0 if p[0] == "device-0-1" else 5.0)
    assert cheap.sync["device-0-5"].source == "device-0-1" and cheap.sync["device-0-5"].link == "d2d"
    assert set(cheap.sync) == {"device-0-5"}  # nobody else needs catching up

    def cost(e, p):
        return 1.0 if p[0] == "device-0-1" else 5.0

    # a holder whose latest accuracy on the newcomer's tasks is far below the best does not serve it
    acc = {"device-0-0": 0.62, "device-0-1": 0.40}.get
    low = plan_starts(m, topo, held, [2], ctx, route, cost, "cheapest", lambda n, t: acc(n), 0.05)
    assert low.sync["device-0-5"].source == "device-0-0"
    near = plan_starts(m, topo, held, [2], ctx, route, cost, "cheapest", lambda n, t: acc(n), 0.25)
    assert near.sync["device-0-5"].source == "device-0-1"  # within the tolerance: the cheapest again
    # head: the round's head whatever the cost; none: the newcomer starts from its initial modules
    assert plan_starts(m, topo, held, [2], ctx, route, cost, "head").sync["device-0-5"].source == "device-0-0"
    bare = plan_starts(m, topo, held, [2], ctx, route, cost, "none")
    assert "device-0-5" not in bare.sync and bare.base["device-0-5"] == (0, 0)
    stale = {**held, "device-0-5": (1, 0)}  # one holding an older round end is still caught up (head first)
    assert plan_starts(m, topo, stale, [2], ctx, route, cost, "none").sync["device-0-5"].source == "device-0-0"


def test_a_device_stopped_mid_run_leaves_cleanly(tmp_path):
    """hfm-d2d, one cluster of 4 over real gRPC and mTLS, topology.joins on. device-0-3's process gets
    SIGTERM after round 2: it tells its edge it leaves (its own certificate), the round it is in
    finishes with it (nothing lost, nothing aborted), the next round's planning shuts it down and plans
    without it: no hop to, from or through it, no aggregate counts it, it is not a member any more."""
    import os
    import signal

    out = tmp_path / "run"
    sets = ["method=hfm-d2d", "e_agg=2", "rounds=12", "topology.edges=1", "topology.devices_per_edge=4",
            "runtime.devices_per_process=1", "data.train_per_task=60", "train.eval_every=12",
            "topology.joins=true"]  # fmt: skip
    cfg = load_config(None, sets)

    def stop(sup) -> None:
        procs = [p for p in sup.procs if "device-0-3=" in " ".join(p.argv or [])]
        assert len(procs) == 1, [p.name for p in sup.procs]
        os.kill(procs[0].popen.pid, signal.SIGTERM)

    res = _run_and(cfg, out, 2, stop)
    assert res["complete"] and "device-0-3" not in res["nodes"]
    rounds = res["rounds"]
    gone = next((x for x in rounds if x["departed"]), None)
    assert gone is not None and gone["departed"] == ["device-0-3"] and gone["round"] >= 3
    for x in rounds:
        assert not x["aborted"] and not x["lost"] and not x["left_out"], x["round"]
        in_hops = any("device-0-3" in (h["sender"], h["receiver"]) for h in x["hops"])
        counted = any("device-0-3" in a["counted"] for a in x["aggregates"])
        if x["round"] < gone["round"]:
            assert in_hops and (counted or x["round"] > 0), x["round"]
        else:
            assert not in_hops and not counted and "device-0-3" not in x["node_accuracy"], x["round"]
    log = (out / "logs" / "device-0-3.log").read_text()
    assert re.search(r"device-0-3 left the federation \(its last round: (\d+|none)\)", log)
    assert "device-0-3 left the federation" in (out / "logs" / "cloud.log").read_text()
