"""Time to accuracy: rounds, wall-clock and modeled time for star, hfm and hfm-d2d to reach a fixed
mean global accuracy on the synthetic tasks (same topology, data and seed for all three)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from hffm.config import load_config
from services.launcher import run

METHODS = ("star", "hfm", "hfm-d2d")


def time_to(results: dict, threshold: float) -> dict:
    """First round whose mean global accuracy reaches ``threshold``, with cumulative times."""
    wall = modeled = 0.0
    for r in results["rounds"]:
        wall += r["wall_s"]
        modeled += r["modeled"]["latency_s"]
        acc = sum(v["global"] for v in r["accuracy"].values()) / len(r["accuracy"])
        if acc >= threshold:
            return {"round": r["round"], "wall_s": wall, "modeled_s": modeled, "accuracy": acc}
    return {
        "round": None,
        "wall_s": None,
        "modeled_s": None,
        "accuracy": max(
            sum(v["global"] for v in r["accuracy"].values()) / len(r["accuracy"]) for r in results["rounds"]
        ),
    }


def run_all(out: Path, quick: bool = False, threshold: float = 0.5, log=print) -> dict:
    sets = ["e_agg=2", "seed=0"] + (
        [
            "rounds=2",  # --quick (the test suite): the harness, not a measurement
            "topology.edges=2",
            "topology.devices_per_edge=2",
            "data.train_per_task=300",
            "data.global_test_per_task=64",
        ]
        if quick
        else ["rounds=10", "topology.edges=3", "topology.devices_per_edge=4"]
    )
    res = {}
    for m in METHODS:
        log(f"  time to accuracy {threshold:.2f}: {m}...")
        results = run(
            load_config(None, [*sets, f"method={m}"]), out / f"tta-{m}", Console(file=io.StringIO()), force=True
        )
        res[m] = time_to(results, threshold)
    return {"threshold": threshold, "methods": res}
