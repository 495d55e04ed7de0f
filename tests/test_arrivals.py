"""Tasks that arrive mid-run (circulation.arrivals; issue 16, V-B): nobody holds the task before its
first arrival, whose devices introduce its modules from their initial values; devices that take it up
later are relayed its modules (its head) by the cheapest holder before they train it. Config errors name
the field; over real gRPC the head moves exactly as planned."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from hffm.config import ConfigError, load_config
from hffm.topology import Topology, arrived

ARRIVALS = (
    "circulation.arrivals=[{task: gqa, round: 2, devices: [device-0-0]}, "
    "{task: gqa, round: 4, devices: [device-0-2, device-1-1]}]"
)
SETS = ["method=hfm-d2d", "e_agg=2", "topology.edges=2", "topology.devices_per_edge=3", "model.num_layers=2",
        ARRIVALS]  # fmt: skip


@pytest.mark.parametrize(
    "arrivals, why",
    [
        ("[{task: vqa, round: 2, devices: [device-0-0]}]", "circulation.arrivals.0.task"),
        ("[{task: gqa, round: 1, devices: [device-0-0]}]", "round"),
        ("[{task: gqa, round: 9, devices: [device-0-0]}]", "circulation.arrivals.0.round"),
        ("[{task: gqa, round: 2, devices: [device-5-0]}]", "circulation.arrivals.0.devices"),
        ("[{task: gqa, round: 2, devices: [edge-0]}]", "circulation.arrivals.0.devices"),
        ("[{task: gqa, round: 2, devices: [device-0-0]}, {task: gqa, round: 3, devices: [device-0-0]}]",
         "circulation.arrivals.1.devices"),
        ("[{task: gqa, round: 2, devices: [device-0-0]}, {task: art, round: 3, devices: [device-0-0]}]",
         "circulation.arrivals: every task arrives"),
    ],
)  # fmt: skip
def test_an_arrival_that_cannot_happen_is_refused_naming_the_field(arrivals, why):
    with pytest.raises(ConfigError, match=why):
        load_config(None, ["rounds=8", "topology.edges=2", f"circulation.arrivals={arrivals}"])


def test_nobody_holds_an_arriving_task_before_it_arrives():
    cfg = load_config(None, SETS)
    topo = Topology.from_config(cfg, 2)
    assert all(d.tasks == ("art",) for d in topo.devices)  # gqa is nobody's at start
    assert arrived(cfg.circulation.arrivals, 1) == {}
    assert arrived(cfg.circulation.arrivals, 3) == {"device-0-0": ("gqa",)}
    at4 = topo.with_tasks(arrived(cfg.circulation.arrivals, 4))
    assert at4.holders("gqa") == ["device-0-0", "device-0-2", "device-1-1"]
    assert "head.gqa" in at4.modules_for("edge-1") and "head.gqa" not in topo.modules_for("cloud")


def test_a_task_arrives_mid_run_and_spreads_by_relay(tmp_path):
    """hfm-d2d, 2 edges x 3 devices, 6 rounds, real gRPC and mTLS: gqa is introduced on device-0-0 in
    round 2 (its head from the initial modules) and taken up by device-0-2 and device-1-1 in round 4.
    Before round 2 no gqa module moves; in round 4 device-0-2 is relayed the head alone over D2D by the
    only holder of its cluster, device-1-1 (no holder in its cluster) by the cloud; from their arrival
    on, each trains, sends and evaluates gqa, and nobody else does."""
    from hffm.costmodel import module_sizes
    from services.launcher import run

    cfg = load_config(None, [*SETS, "rounds=6", "data.train_per_task=120", "train.eval_every=1",
                             "runtime.devices_per_process=6"])  # fmt: skip
    res = run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=300)
    assert res["complete"]
    size = module_sizes(cfg)["head.gqa"]
    holders = {1: set(), 2: {"device-0-0"}, 3: {"device-0-0"}}
    for r in (4, 5, 6):
        holders[r] = {"device-0-0", "device-0-2", "device-1-1"}
    for rec in res["rounds"]:
        r = rec["round"]
        gqa = {n for n, acc in rec["node_accuracy"].items() if "gqa" in acc}
        assert gqa == holders[r], r  # evaluated by its holders alone
        assert ("head.gqa" in rec["bytes_by_module"]) == (r >= 2), r
        assert rec["arrivals"] == ({"device-0-0": ["gqa"]} if r == 2 else
                                   {"device-0-2": ["gqa"], "device-1-1": ["gqa"]} if r == 4 else {}), r  # fmt: skip
        syncs = [h for h in rec["hops"] if h["tag"] == "sync"]
        if r != 4:
            assert not syncs and not rec["synced"], r
            continue
        assert rec["synced"] == {"device-0-2": "device-0-0", "device-1-1": "cloud"}
        to02 = [h for h in syncs if h["destination"] == "device-0-2"]
        assert to02 and all(h["link"] == "d2d" for h in to02) and to02[0]["origin"] == "device-0-0"
        assert all(h["bytes"] == size for h in to02)  # the head alone, nothing else
        to11 = [h for h in syncs if h["destination"] == "device-1-1"]
        assert [(h["sender"], h["link"], h["bytes"]) for h in to11] == [("cloud", "device_cloud", size)]
        counted = [a for a in rec["aggregates"] if a["tag"].startswith("cluster") and a["node"].startswith("device-1")]
        assert counted  # device-1-1's cluster now aggregates a gqa head too
