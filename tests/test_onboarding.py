"""``hffm onboard``'s measures (benchmarks/onboarding.py): when a newcomer counts as having reached the
federation's accuracy, and the from-scratch arm (the newcomer's own data, alone). The onboarded arm is a
real mid-run join: tests/test_joins.py runs one over gRPC."""

from __future__ import annotations

from benchmarks.onboarding import goal, onboarded_curve, rounds_to_match, rounds_to_reach, scratch_curve
from hffm.config import load_config


def test_reaching_is_the_first_round_within_tolerance():
    assert rounds_to_reach([0.1, 0.295, 0.5], 0.3, tol=0.01) == 2
    assert rounds_to_reach([0.1, 0.2], 0.3, tol=0.01) is None
    assert rounds_to_reach([None, 0.4], 0.3) == 2  # a round without evaluation never counts
    assert rounds_to_match([0.2, 0.5, 0.6], [0.5, 0.5, 0.7], tol=0.01) == 2
    assert rounds_to_match([0.6], [None]) is None


def test_the_newcomers_curve_starts_at_its_first_round_and_its_peers_are_its_cluster():
    def row(acc: dict[str, float]) -> dict:
        return {n: {"art": {"global": a, "local": 0.0}} for n, a in acc.items()}

    results = {
        "rounds": [
            {"round": 1, "synced": {}, "node_accuracy": row({"device-0-0": 0.3, "device-1-0": 0.9})},
            {"round": 2, "synced": {"device-0-2": "device-0-1"},
             "node_accuracy": row({"device-0-0": 0.4, "device-0-1": 0.6, "device-0-2": 0.5, "device-1-0": 0.9})},
            {"round": 3, "synced": {}, "node_accuracy": row({"device-0-0": 0.6, "device-0-2": 0.6})},
        ]
    }  # fmt: skip
    on = onboarded_curve(results, "device-0-2", ["art"])
    assert on["first_round"] == 2 and on["synced_from"] == "device-0-1"
    assert on["curve"] == [0.5, 0.6] and on["peer_curve"] == [0.5, 0.6]  # device-1-0 is another cluster's
    assert on["target"] == 0.5 and rounds_to_match(on["curve"], on["peer_curve"]) == 1


def test_from_scratch_a_newcomer_trains_alone_on_its_own_draw_reproducibly():
    cfg = load_config(
        None,
        ["topology.edges=1", "topology.devices_per_edge=2", "data.train_per_task=40", "data.global_test_per_task=16"],
    )
    a = scratch_curve(cfg, "device-0-2", ["art"], rounds=2, target=2.0)  # unreachable: both rounds run
    assert len(a) == 2 and all(0.0 <= v <= 1.0 for v in a)
    assert scratch_curve(cfg, "device-0-2", ["art"], rounds=2, target=2.0) == a
    assert len(scratch_curve(cfg, "device-0-2", ["art"], rounds=5, target=0.0)) == 1  # stops once reached


def test_the_goal_counts_a_newcomer_that_never_gets_there_from_scratch_as_past_the_limit():
    res = {"scratch_max": 40, "seeds": [{"onboarded_rounds": 1, "scratch_rounds": None}]}
    assert goal(res) == {"ratios": [41.0], "at_least": 41.0, "met": True}
    res["seeds"].append({"onboarded_rounds": 2, "scratch_rounds": 6})
    assert goal(res)["met"] is False and goal(res)["at_least"] == 3.0
