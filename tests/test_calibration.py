"""Classifier calibration with virtual representations (CCVR; hffm/calibration.py, calibration.enabled):
the statistics' algebra against direct computation, a biased head fixed by calibration, the plan's
calibration phase, and a real hfm run over gRPC whose calibrated heads are recomputed here from what the
nodes sent (traced)."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hffm.aggregation import weighted_mean
from hffm.calibration import (
    calibrate_head,
    empty_stats,
    feature_stats,
    from_module,
    merge,
    stats_of,
    to_module,
    virtual_features,
)
from hffm.config import ConfigError, load_config
from hffm.ids import CLOUD, head_name, stats_name
from hffm.methods import CALIBRATED, STATS, Calibrate, Collect, Evaluate, Send, Stats, Train
from hffm.model import TaskHead, build_head, build_model
from hffm.modules import load_modules


def _clusters(n: int, d: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` features per class around well-separated class means, and their labels."""
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(classes, d, generator=g)
    x = torch.cat([means[c] + torch.randn(n, d, generator=g) for c in range(classes)])
    return x, torch.arange(classes).repeat_interleave(n)


def test_statistics_add_up_and_give_each_answers_mean_and_covariance():
    x, y = _clusters(50)
    y[:3] = -1  # answers outside the vocabulary are left out
    whole = stats_of(x, y, classes=4)
    halves = merge([{"t": stats_of(x[::2], y[::2], 4)}, {"t": stats_of(x[1::2], y[1::2], 4)}])["t"]
    for a, b in zip(
        (whole.count, whole.total, whole.squares), (halves.count, halves.total, halves.squares), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-9)
    gs = whole.gaussians(shrink=0.0)
    assert gs[3] is None  # nobody holds answer 3
    for c in range(3):
        xc = x[y == c].double()
        n, mean, cov = gs[c]
        assert n == len(xc) and torch.allclose(mean, xc.mean(0), atol=1e-9)
        assert torch.allclose(cov, torch.cov(xc.T), atol=1e-6)  # unbiased, as torch.cov
    diag = stats_of(x, y, classes=4, diagonal=True)
    assert diag.diagonal and torch.allclose(diag.squares, torch.diagonal(whole.squares, dim1=1, dim2=2))
    with pytest.raises(ValueError, match="different shapes"):
        _ = whole + diag


def test_statistics_travel_as_modules_whose_fedavg_is_the_sum():
    """What a device sends (per-sample sums weighted by its samples), averaged as any module is, gives back
    the federation's sums: an edge and the cloud need nothing new. A device without samples adds nothing."""
    x, y = _clusters(30, seed=1)
    parts = [stats_of(x[i::3], y[i::3], 3) for i in range(3)] + [empty_stats(8, 3, False)]
    mods = [{"stats.t": to_module("stats.t", p, 2)} for p in parts]
    assert [m["stats.t"].num_samples for m in mods] == [30.0, 30.0, 30.0, 1.0]
    edge = weighted_mean(mods[:2])
    cloud = weighted_mean([edge, weighted_mean(mods[2:])])
    assert cloud["stats.t"].num_samples == 91.0
    total = from_module(cloud["stats.t"])
    whole = stats_of(x, y, 3)
    assert torch.allclose(total.count, whole.count, rtol=1e-5)
    assert torch.allclose(total.total, whole.total, rtol=1e-5, atol=1e-4)
    assert torch.allclose(total.squares, whole.squares, rtol=1e-5, atol=1e-3)


def test_virtual_features_follow_the_counts_and_the_seed():
    x, y = _clusters(20)
    keep = y != 1  # answer 1: nobody's
    st = stats_of(x[keep], y[keep], 3)
    f, lab = virtual_features(st, factor=2.5, seed=7)
    assert torch.bincount(lab, minlength=3).tolist() == [50, 0, 50]
    f2, lab2 = virtual_features(st, factor=2.5, seed=7)
    assert torch.equal(f, f2) and torch.equal(lab, lab2)
    assert not torch.equal(f, virtual_features(st, factor=2.5, seed=8)[0])
    assert torch.allclose(f[lab == 0].mean(0).double(), st.total[0] / 20, atol=0.5)


def test_calibration_fixes_a_head_that_learned_one_answer():
    """A head trained on one answer's features only (a device holding one answer) predicts it for
    everything; trained on virtual features from every answer's statistics, it tells them apart."""
    x, y = _clusters(200, d=16, classes=3)
    torch.manual_seed(0)
    head = TaskHead(16, 32, 3)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(50):  # the skewed device: answer 0 only
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[y == 0]), y[y == 0]).backward()
        opt.step()
    test_x, test_y = _clusters(100, d=16, classes=3, seed=0)

    def acc() -> float:
        with torch.no_grad():
            return float((head(test_x).argmax(-1) == test_y).float().mean())

    before = acc()
    assert before < 0.4
    calibrate_head(head, stats_of(x, y, 3), epochs=5, seed=3)
    assert acc() > 0.95


def test_feature_statistics_of_parts_add_up_to_the_whole(small_cfg):
    from hffm.centralised import training_pool
    from hffm.data import load_tokenizer, task_labels

    tok = load_tokenizer(small_cfg)
    model = build_model(small_cfg, len(tok), task_labels(small_cfg))
    td = training_pool(small_cfg, "art", tok)
    whole = feature_stats(model, {"art": td}, "cpu", batch_size=64)["art"]
    parts = feature_stats(model, {"art": td}, "cpu", batch_size=40)["art"]  # other batches, same sums
    assert whole.count.sum() == len(td)
    assert torch.allclose(whole.total, parts.total, rtol=1e-5, atol=1e-4)
    assert torch.allclose(whole.squares, parts.squares, rtol=1e-5, atol=1e-4)


# ---- the plan ----------------------------------------------------------------------------------------
def _planned(*sets: str):
    from hffm.costmodel import CostModel
    from hffm.model import backbone_dims
    from hffm.planner import Planner
    from hffm.topology import Topology

    cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=2", *sets])
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    planner = Planner(cfg, CostModel(cfg, topo))
    return cfg, topo, planner


@pytest.mark.parametrize("method", ["hfm", "star"])
def test_the_plan_calibrates_after_the_clouds_broadcast_and_before_devices_evaluate(method):
    from hffm.costmodel import CostModel

    cfg, topo, planner = _planned(f"method={method}", "calibration.enabled=true", "e_agg=2", "aggregation.rule=median")
    first = planner.plan(1, topo).plan
    if method == "hfm":  # no cloud round, no calibration
        assert not any(isinstance(s, Stats | Calibrate) for ss in first.steps.values() for s in ss)
    samples = {x.id: {t: 10 + 7 * i + j for j, t in enumerate(x.tasks)} for i, x in enumerate(topo.devices)}
    plan = planner.plan(2, topo, samples=samples).plan
    plan.validate()
    d = "device-0-1"
    steps = plan.steps[d]
    up = CLOUD if method == "star" else "edge-0"
    tasks = tuple(topo.device_map[d].tasks)
    i = next(i for i, s in enumerate(steps) if isinstance(s, Stats))
    assert [type(s) for s in steps] == [Train, Send, Collect, Stats, Send, Collect, Evaluate]
    assert steps[i] == Stats(tasks)
    assert steps[i + 1] == Send(up, steps[1].link, STATS, tuple(stats_name(t) for t in tasks))
    assert steps[i + 2].tag == CALIBRATED and steps[i + 2].senders == (up,)
    # statistics are summed (FedAvg) whatever the rule; a device's weigh at most its registered samples of the task
    collect = next(s for s in plan.steps[up] if isinstance(s, Collect) and s.tag == STATS)
    assert collect.rule == "fedavg" and collect.caps_of(d) == {stats_name(t): float(samples[d][t]) for t in tasks}
    cloud = plan.steps[CLOUD]
    assert isinstance(cloud[-1 - len([s for s in cloud if isinstance(s, Send) and s.tag == CALIBRATED])], Calibrate)
    down = [s for s in cloud if isinstance(s, Send) and s.tag == CALIBRATED]
    assert all(all(m.startswith("head.") for m in s.modules) for s in down)
    assert {s.to for s in down} == ({"edge-0", "edge-1"} if method == "hfm" else set(topo.device_map))
    CostModel._critical_path(plan, {}, {})  # the cost model walks it to the end (it raises on a deadlock)


def test_calibration_is_refused_where_it_has_no_cloud_round():
    for method in ("hfm-d2d", "edge-only"):
        with pytest.raises(ConfigError, match="calibration.enabled"):
            load_config(None, [f"method={method}", "calibration.enabled=true"])


# ---- over real gRPC ------------------------------------------------------------------------------------
def test_an_hfm_run_calibrates_the_global_heads_on_its_devices_statistics(tmp_path):
    """hfm, 2 rounds, e_agg 2, calibration on, traced: in round 2 each device's statistics are those of its own
    training data under the global modules it received; the cloud's sum is all of them; the global heads are
    the cloud's aggregate calibrated on that sum (recomputed here, same seed), the adapters as aggregated; the
    devices evaluate the calibrated heads and every node drops the statistics at the round's end."""
    from hffm.data import build_device_data, load_tokenizer, task_labels
    from hffm.topology import split_table
    from services.launcher import run

    sets = [
        "topology.edges=2",
        "topology.devices_per_edge=2",
        "runtime.devices_per_process=2",
        "data.train_per_task=400",
        "data.global_test_per_task=64",
        "rounds=2",
        "e_agg=2",
        "calibration.enabled=true",
        "calibration.epochs=3",
        f"runtime.trace_dir={tmp_path / 'trace'}",
    ]
    cfg = load_config(None, sets)
    results = run(cfg, tmp_path, Console(file=io.StringIO(), width=120), timeout_s=600)
    assert results["complete"]

    def trace(node: str, name: str):
        return load_modules(str(tmp_path / "trace" / node / f"{name}.safetensors"))

    r2 = results["rounds"][1]
    assert {"stats.art", "stats.gqa"} <= set(r2["bytes_by_module"])
    assert not any(m.startswith("stats.") for m in results["rounds"][0]["bytes_by_module"])
    cloud_steps = {a["tag"]: a["counted"] for a in r2["aggregates"] if a["node"] == CLOUD}
    assert cloud_steps["stats"] == ["edge-0", "edge-1"]

    torch.set_num_threads(cfg.runtime.torch_threads)  # as the nodes compute
    tok = load_tokenizer(cfg)
    labels = task_labels(cfg)
    model = build_model(cfg, len(tok), labels)
    holders = split_table(cfg).holders_by_task()
    topo = split_table(cfg)
    sums: dict = {}
    for e in (0, 1):
        for i in (0, 1):
            d = f"device-{e}-{i}"
            held = trace(d, "r2-broadcast-aggregate")  # the global modules it computed its statistics under
            for n, m in held.items():
                model.load_module_state(n, m.tensors)
            data = build_device_data(cfg, d, holders, tok, topo.device_map[d].tasks).train
            mine = feature_stats(model, data, "cpu")
            sent = trace(f"edge-{e}", f"r2-stats-from-{d}")
            for t, fs in mine.items():
                got = from_module(sent[stats_name(t)])
                assert torch.allclose(got.count, fs.count, rtol=1e-5)
                assert torch.allclose(got.total, fs.total, rtol=1e-4, atol=1e-3)
                assert torch.allclose(got.squares, fs.squares, rtol=1e-4, atol=1e-3)
                sums[t] = sums[t] + fs if t in sums else fs
    total = trace(CLOUD, "r2-stats-aggregate")
    for t, fs in sums.items():
        got = from_module(total[stats_name(t)])
        assert torch.allclose(got.count, fs.count, rtol=1e-5)
        assert torch.allclose(got.squares, fs.squares, rtol=1e-4, atol=1e-2)

    aggregate = trace(CLOUD, "r2-aggregate-aggregate")
    final = load_modules(str(tmp_path / "global_modules.safetensors"))
    assert not any(n.startswith("stats.") for n in final)  # dropped at the round's end
    for n, m in final.items():
        if not n.startswith("head."):
            assert all(torch.equal(m.tensors[k], aggregate[n].tensors[k]) for k in m.tensors)
    c = cfg.calibration
    for t in ("art", "gqa"):
        name = head_name(t)
        head = build_head(int(aggregate[name].tensors["net.0.weight"].shape[1]), cfg.model, t, labels[t])
        head.load_state_dict(aggregate[name].tensors)
        seed = zlib.crc32(f"{cfg.seed}/calibrate/2/{t}".encode())
        calibrate_head(head, from_module(total[stats_name(t)]), c.epochs, c.lr, c.batch_size, c.factor, seed, c.shrink)
        calibrated = head.state_dict()
        assert any(not torch.equal(v, aggregate[name].tensors[k]) for k, v in calibrated.items())
        for k, v in calibrated.items():
            assert torch.allclose(final[name].tensors[k], v, atol=1e-5), (name, k)
        # devices adopted (and evaluated) the calibrated heads
        assert torch.equal(trace("device-1-0", "r2-calibrated-aggregate")[name].tensors["net.0.weight"],
                           final[name].tensors["net.0.weight"])  # fmt: skip
    assert Path(tmp_path / "results.json").exists()


def test_an_edge_refuses_statistics_no_sum_could_hold_and_keeps_nothing(small_cfg):
    """A real edge over mTLS collecting statistics: a device's statistics with a negative count, counts summing
    to more than its samples or a negative sum of squares get INVALID_ARGUMENT naming the module, and nothing is
    kept; an honest push is then accepted, and one as heavy as the device's registered samples of the task
    (its cap) but no heavier."""
    import grpc

    from hffm.modules import encode_module
    from services.common.bootstrap import node_modules, topology
    from services.common.client import push_requests
    from services.common.server import NodeServer
    from tests.test_grpc_node import D0, D1, EDGE, Clients, _Edge, _expect, _header, _push

    cfg = small_cfg.model_copy(update={"calibration": small_cfg.calibration.model_copy(update={"enabled": True})})
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    assert set(spec["stats.art"]) == {"count", "total", "squares"}
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    ch = Clients(cfg, f"127.0.0.1:{srv.port}", EDGE)
    try:
        caps = tuple((d, (("stats.art", 20.0),)) for d in (D0, D1))
        node.assign(1, "hfm", [Collect(STATS, (D0, D1), "device_edge", weight_caps=caps)], {D0: "x:1", D1: "x:2"})
        hidden = spec["stats.art"]["total"][1]
        x, y = _clusters(4, d=hidden, classes=7)
        good = to_module("stats.art", stats_of(x[:20], y[:20], 7), 1)
        assert good.num_samples == 20.0

        def push(sender, m, code=None, match=""):
            ems = [encode_module(m)]
            h = _header(sender, ems, tag=STATS)
            if code is None:
                return _push(ch, push_requests(h, ems, 4096))
            _expect(ch, node, push_requests(h, ems, 4096), code, match)

        bad = {
            "a negative count": {**good.tensors, "count": good.tensors["count"] - 0.5},
            "summing to": {**good.tensors, "count": good.tensors["count"] * 2},
            "negative sum of squares": {**good.tensors, "squares": -good.tensors["squares"]},
        }
        for why, tensors in bad.items():
            push(D0, replace(good, tensors=tensors), grpc.StatusCode.INVALID_ARGUMENT, why)
            assert not node.inbox.snapshot()["accepted"].get(STATS)
        assert node.metrics.modules_rejected.labels(node=EDGE, reason="bad_stats")._value.get() == 3
        push(D0, replace(good, num_samples=21.0), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 20 samples")
        assert not node.inbox.snapshot()["accepted"].get(STATS)
        assert not push(D0, good).duplicate
        assert len(node.inbox.snapshot()["accepted"][STATS]) == 1
    finally:
        ch.close()
        srv.stop(0)
