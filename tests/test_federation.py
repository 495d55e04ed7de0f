"""Whole federations through the real launcher: cloud, edges and devices as separate processes on
loopback, modules moving over gRPC. The nodes' trace (runtime.trace_dir) records what each node
accepted and adopted, so aggregates can be checked against the uploads that produced them."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hffm.aggregation import weighted_mean
from hffm.config import load_config
from hffm.modules import load_modules
from services.launcher import run
from tests.conftest import processes_with

BASE = [
    "topology.edges=2",
    "topology.devices_per_edge=2",
    "runtime.devices_per_process=2",
    "data.train_per_task=800",
    "data.global_test_per_task=200",
]


def _run(tmp: Path, *sets: str, trace: bool = True) -> tuple[Path, dict]:
    cfg = load_config(None, [*BASE, *([f"runtime.trace_dir={tmp / 'trace'}"] if trace else []), *sets])
    console = Console(file=io.StringIO(), width=120)
    results = run(cfg, tmp, console, timeout_s=600)
    return tmp, results


@pytest.fixture(scope="module")
def hfm_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("hfm"), "method=hfm", "e_agg=2", "rounds=6")


@pytest.fixture(scope="module")
def star_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("star"), "method=star", "rounds=3")


def _close(a: dict, b: dict, atol=1e-6) -> bool:
    return set(a) == set(b) and all(
        torch.allclose(a[n].tensors[k], b[n].tensors[k], atol=atol) for n in a for k in a[n].tensors
    )


def _trace(out: Path, node: str, name: str):
    return load_modules(str(out / "trace" / node / f"{name}.safetensors"))


def test_hfm_edge_aggregate_is_weighted_mean_of_its_devices(hfm_run):
    out, results = hfm_run
    for r in range(1, 7):
        for e in (0, 1):
            ups = [_trace(out, f"edge-{e}", f"r{r}-aggregate-from-device-{e}-{i}") for i in (0, 1)]
            agg = _trace(out, f"edge-{e}", f"r{r}-aggregate-aggregate")
            assert _close(agg, weighted_mean(ups))
            assert all(m.version == r for m in agg.values())
            # weights are sample counts: the adapters' weight is the cluster's total samples
            assert agg["adapter.0"].num_samples == sum(u["adapter.0"].num_samples for u in ups)


def test_hfm_cloud_aggregate_is_weighted_mean_of_edges_every_e_agg(hfm_run):
    out, results = hfm_run
    for r in (2, 4, 6):
        ups = [_trace(out, "cloud", f"r{r}-aggregate-from-edge-{e}") for e in (0, 1)]
        for e in (0, 1):  # what the cloud received is what the edge had aggregated (fp32 wire)
            assert _close(ups[e], _trace(out, f"edge-{e}", f"r{r}-aggregate-aggregate"), atol=0)
        cloud = _trace(out, "cloud", f"r{r}-aggregate-aggregate")
        assert _close(cloud, weighted_mean(ups))
        # the cloud's aggregate travels down: edges and then devices adopt it
        for e in (0, 1):
            assert _close(_trace(out, f"edge-{e}", f"r{r}-broadcast-aggregate"), cloud, atol=0)
            assert _close(_trace(out, f"device-{e}-0", f"r{r}-broadcast-aggregate"), cloud, atol=0)
    for r in (1, 3, 5):
        assert not (out / "trace" / "cloud" / f"r{r}-aggregate-aggregate.safetensors").exists()
        edge0 = _trace(out, "edge-0", f"r{r}-aggregate-aggregate")
        assert _close(_trace(out, "device-0-1", f"r{r}-broadcast-aggregate"), edge0, atol=0)


def test_hfm_edge_cloud_traffic_exactly_in_rounds_divisible_by_e_agg(hfm_run):
    _, results = hfm_run
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 7))
    for r in rounds:
        links = r["bytes_by_link"]
        assert (links["edge_cloud"] > 0) == (r["round"] % 2 == 0) == r["cloud_aggregation"]
        assert links["device_edge"] > 0 and links["device_cloud"] == 0 and links["d2d"] == 0
        assert sum(r["bytes_by_module"].values()) == r["bytes_total"] == sum(links.values())
    # device<->edge traffic is the same every round: 4 uploads + 4 downloads of the same module shapes
    assert len({r["bytes_by_link"]["device_edge"] for r in rounds}) == 1


def test_hfm_accuracy_rises_above_chance(hfm_run):
    _, results = hfm_run
    first, last = results["rounds"][0]["accuracy"], results["rounds"][-1]["accuracy"]
    mean = lambda acc, split: sum(v[split] for v in acc.values()) / len(acc)  # noqa: E731
    assert mean(last, "global") > mean(first, "global") + 0.1
    assert last["art"]["global"] > 2 / 7  # twice chance (7 labels)
    assert last["gqa"]["global"] > 1.5 / 5


def test_hfm_outputs_written(hfm_run):
    out, results = hfm_run
    assert results["complete"] and (out / "results.png").stat().st_size > 10_000
    mods = load_modules(str(out / "global_modules.safetensors"))
    assert set(mods) == {"adapter.0", "adapter.1", "adapter.2", "adapter.3", "head.art", "head.gqa"}
    assert all(m.version == 6 for m in mods.values())
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["cloud.log", "devices-0.log", "devices-1.log", "edge-0.log", "edge-1.log"]
    assert "registered" in (out / "logs" / "cloud.log").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["method"] == "hfm" and len(saved["rounds"]) == 6
    # every process the launcher started is gone
    assert processes_with(str(out / "config.yaml")) == []


def test_star_cloud_averages_every_device_each_round(star_run):
    out, results = star_run
    for r in results["rounds"]:
        links = r["bytes_by_link"]
        assert links["device_cloud"] > 0 and links["device_edge"] == links["edge_cloud"] == 0
        assert r["cloud_aggregation"]
    for r in (1, 2, 3):
        ups = [_trace(out, "cloud", f"r{r}-aggregate-from-device-{e}-{i}") for e in (0, 1) for i in (0, 1)]
        assert _close(_trace(out, "cloud", f"r{r}-aggregate-aggregate"), weighted_mean(ups))
    assert not (out / "trace" / "edge-0").exists()  # edges idle in star


def test_a_server_learning_rate_steps_the_global_modules_past_the_clouds_fedavg(tmp_path):
    """aggregation.server_lr = 2, star over real gRPC: each round the cloud averages the devices' uploads
    (FedAvg, traced) and broadcasts global + 2 x (that average - global); devices adopt it. Round 2's
    global is round 1's broadcast."""
    from hffm.aggregation import server_step

    out, _ = _run(tmp_path, "method=star", "rounds=2", "aggregation.server_lr=2")
    ups = [_trace(out, "cloud", f"r2-aggregate-from-device-{e}-{i}") for e in (0, 1) for i in (0, 1)]
    avg = _trace(out, "cloud", "r2-aggregate-aggregate")
    assert _close(avg, weighted_mean(ups))
    start = _trace(out, "device-0-0", "r1-broadcast-aggregate")
    sent = _trace(out, "device-1-1", "r2-broadcast-aggregate")
    assert _close(sent, server_step(start, avg, 2.0), atol=1e-5)
    assert not _close(sent, avg, atol=1e-4)  # a real step past the average
    assert all(sent[n].num_samples == avg[n].num_samples for n in avg)


@pytest.mark.parametrize("bound", [None, 1.0])
def test_a_device_claiming_50_times_its_samples_buys_no_more_than_the_claim_bound(tmp_path, bound):
    """Star over real gRPC: device-0-0 sign-flips its update and registers (and pushes with) 50 x its
    samples. Without a bound the cloud weighs it 50x (its registered claim: accepted); with
    aggregation.claim_bound = 1 it counts with at most the median claim of each task, and the cloud's
    aggregate is the weighted mean of the uploads with that weight."""
    from hffm.ids import task_of
    from hffm.methods import bound_claims

    sets = ["method=star", "rounds=1", "adversary.nodes=[device-0-0]", "adversary.claim=50"]
    out, _ = _run(tmp_path, *sets, *([f"aggregation.claim_bound={bound}"] if bound else []))
    devices = [f"device-{e}-{i}" for e in (0, 1) for i in (0, 1)]
    ups = {d: _trace(out, "cloud", f"r1-aggregate-from-{d}") for d in devices}
    claims = {d: {task_of(n): int(m.num_samples) for n, m in u.items() if task_of(n)} for d, u in ups.items()}
    honest = _trace(out, "device-0-1", "r1-broadcast-aggregate")  # any device: what the cloud sent back
    liar = claims["device-0-0"]
    assert all(n % 50 == 0 for n in liar.values())  # it pushed what it registered: 50x
    bounded = bound_claims(claims, bound) if bound else claims

    def weight(d: str, name: str) -> float:
        t = task_of(name)
        return float(bounded[d][t]) if t else float(sum(bounded[d].values()))

    want = weighted_mean([{n: replace(m, num_samples=weight(d, n)) for n, m in u.items()} for d, u in ups.items()])
    assert _close(_trace(out, "cloud", "r1-aggregate-aggregate"), want, atol=1e-5)
    assert _close(honest, want, atol=1e-5)
    if bound:
        assert all(bounded["device-0-0"][t] < liar[t] for t in liar)  # the bound bit


def test_paper_scale_topology_with_more_nodes_than_the_coordinators_thread_pool(tmp_path):
    """The paper's 10 edges, 7 devices each (81 nodes: more than the coordinator's 64 threads, so every
    node's round must be in flight at once, as they wait on each other), training on this 2-core
    machine, 16 device servers a process."""
    out, results = _run(
        tmp_path,
        "method=hfm",
        "e_agg=2",
        "rounds=2",
        "topology.edges=10",
        "topology.devices_per_edge=7",
        "runtime.devices_per_process=16",
        "data.train_per_task=1400",
        "data.global_test_per_task=40",
        "runtime.round_timeout_s=180",
        trace=False,
    )
    assert results["complete"] and len(results["rounds"]) == 2
    assert len(results["nodes"]) == 81
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert len(logs) == 1 + 10 + 5  # cloud, edges, 5 device processes
    for r in results["rounds"]:  # every device's update reached its edge in both rounds
        assert len({h["origin"] for h in r["hops"] if h["origin"].startswith("device")}) == 70
    assert results["rounds"][1]["bytes_by_link"]["edge_cloud"] > 0


def test_devices_train_each_round_at_the_schedules_rate(tmp_path):
    """train.lr_schedule=cosine over real gRPC (star, 2 rounds, lr_final 0.5): round 1 trains at train.lr,
    so its uploads are the constant schedule's bit for bit; round 2 at half of it, and a fresh AdamW moves
    each weight by about lr per step, so a device's round-2 update (its upload - the broadcast it started
    from) is about half as long as with the constant rate."""
    from hffm.training import round_lr

    runs = {
        s: _run(tmp_path / s, "method=star", "rounds=2", f"train.lr_schedule={s}", "train.lr_final=0.5")[0]
        for s in ("constant", "cosine")
    }
    cfg = load_config(None, [*BASE, "rounds=2", "train.lr_schedule=cosine", "train.lr_final=0.5"])
    assert [round_lr(cfg.train, r, 2) for r in (1, 2)] == [cfg.train.lr, 0.5 * cfg.train.lr]
    for dev in ("device-0-0", "device-1-1"):
        ups = {s: _trace(out, "cloud", f"r1-aggregate-from-{dev}") for s, out in runs.items()}
        assert all(
            torch.equal(ups["constant"][n].tensors[k], ups["cosine"][n].tensors[k])
            for n in ups["constant"]
            for k in ups["constant"][n].tensors
        )

        def update_norm(out: Path, dev: str = dev) -> float:
            start = _trace(out, dev, "r1-broadcast-aggregate")
            up = _trace(out, "cloud", f"r2-aggregate-from-{dev}")
            return (
                sum(float((up[n].tensors[k] - start[n].tensors[k]).norm() ** 2) for n in up for k in up[n].tensors)
                ** 0.5
            )

        ratio = update_norm(runs["cosine"]) / update_norm(runs["constant"])
        assert 0.35 < ratio < 0.65, ratio
