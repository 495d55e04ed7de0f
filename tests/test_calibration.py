"""Classifier calibration with virtual representations (CCVR; hffm/calibration.py, calibration.enabled):
the statistics' algebra against direct computation, a biased head fixed by calibration, the plan's
calibration phase, and a real hfm run over gRPC whose calibrated heads are recomputed here from what the
nodes sent (traced)."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from hffm.aggregation import weighted_mean
from hffm.calibration import (
    calibrate_head,
    check_stats,
    empty_stats,
    feature_stats,
    from_module,
    label_scores,
    label_t,
    merge,
    stats_of,
    to_module,
    virtual_features,
)
from hffm.config import ConfigError, load_config
from hffm.ids import CLOUD, head_name, stats_name, stats_task
from hffm.methods import CALIBRATED, CHECKED, FEDERATION, STATS, Calibrate, Collect, Evaluate, Send, Stats, Train
from hffm.model import TaskHead, build_head, build_model
from hffm.modules import Module, ModuleError, load_modules


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


def _correlated(n: int, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` features per class around class means, all classes sharing one correlation structure but each
    with its own scale per coordinate."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # the shared correlations
    xs = []
    for _ in range(classes):
        scale = 0.5 + 2 * torch.rand(d, generator=g)
        xs.append(4 * torch.randn(d, generator=g) + (torch.randn(n, d, generator=g) @ mix.T) * scale)
    return torch.cat(xs), torch.arange(classes).repeat_interleave(n)


def test_pooled_statistics_give_each_answer_its_variances_and_the_tasks_within_answer_correlations():
    """``calibration.pooled``: per-answer variances plus one sum of outer products per task. The sums add up
    over parts; the correlations are the pooled within-answer ones computed from the centred samples; each
    answer's covariance is its own standard deviations times them; the module round trip keeps them, and a
    pooled and an unpooled sum do not mix."""
    x, y = _correlated(400)
    whole = stats_of(x, y, classes=4, diagonal=True, pooled=True)
    halves = stats_of(x[::2], y[::2], 4, True, True) + stats_of(x[1::2], y[1::2], 4, True, True)
    assert torch.allclose(whole.pooled, x.double().T @ x.double()) and torch.allclose(halves.pooled, whole.pooled)
    centred = torch.cat([x[y == c].double() - x[y == c].double().mean(0) for c in range(3)])
    within = centred.T @ centred
    sd = within.diagonal().sqrt()
    corr = within / torch.outer(sd, sd)
    assert torch.allclose(whole.correlations(), corr, atol=1e-9)
    gs = whole.gaussians(shrink=0.0)
    assert gs[3] is None
    for c in range(3):
        n, mean, cov = gs[c]
        var = x[y == c].double().var(0)
        assert cov.shape == (6, 6) and torch.allclose(cov.diagonal(), var, rtol=1e-6)
        assert torch.allclose(cov, corr * torch.outer(var.sqrt(), var.sqrt()), atol=1e-9)
        # closer to the answer's own covariance than variances alone are (the correlations are shared)
        own = torch.cov(x[y == c].double().T)
        assert torch.linalg.norm(cov - own) < 0.5 * torch.linalg.norm(torch.diag(var) - own)
    feats, labels = virtual_features(whole, factor=5, seed=1)
    drawn = torch.corrcoef(feats[labels == 0].double().T)
    assert torch.allclose(drawn, corr, atol=0.05)  # the draws carry the correlations
    back = from_module(to_module("stats.t", whole, 1))
    assert torch.allclose(back.pooled, whole.pooled, rtol=1e-5)
    assert torch.allclose(back.correlations(), corr, atol=1e-4)
    assert to_module("stats.t", whole, 1).tensors.keys() == {"count", "total", "squares", "pooled"}
    with pytest.raises(ValueError, match="one of them pooled"):
        _ = whole + stats_of(x, y, 4, diagonal=True)
    bad = to_module("stats.t", whole, 1)
    bad.tensors["pooled"] = -bad.tensors["pooled"]
    with pytest.raises(ModuleError, match="stats.t: a negative sum of squares"):
        check_stats(bad)
    check_stats(to_module("stats.t", whole, 1))
    with pytest.raises(ConfigError, match="calibration.pooled"):
        load_config(None, ["calibration.enabled=true", "calibration.pooled=true"])


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
    for method in ("edge-only", "edge-only-d2d"):
        with pytest.raises(ConfigError, match="calibration.enabled"):
            load_config(None, [f"method={method}", "calibration.enabled=true"])
    # hfm-d2d calibrates, but its cluster heads are devices: nobody trusted holds each device's statistics
    assert load_config(None, ["method=hfm-d2d", "calibration.enabled=true"]).calibration.enabled
    with pytest.raises(ConfigError, match="calibration.label_t: in hfm-d2d"):
        load_config(None, ["method=hfm-d2d", "calibration.enabled=true", "calibration.label_t=4"])


def test_an_hfm_d2d_plan_sums_each_clusters_statistics_at_its_head_over_d2d():
    """hfm-d2d's cloud round: each device sends its statistics to its cluster head along its update's D2D route
    (relays included) and gets its tasks' calibrated heads back along the head's broadcast route; the head
    counts its own statistics (made after it forwarded the global modules), forwards the sum to its edge, the
    edge to the cloud; a cluster head's sum weighs at most the federation's total, a device's its samples."""
    from hffm.costmodel import CostModel

    cfg, topo, planner = _planned(
        "method=hfm-d2d", "calibration.enabled=true", "e_agg=2", "topology.devices_per_edge=3"
    )
    assert not any(isinstance(s, Stats | Calibrate) for ss in planner.plan(1, topo).plan.steps.values() for s in ss)
    samples = {x.id: {t: 10 + 7 * i + j for j, t in enumerate(x.tasks)} for i, x in enumerate(topo.devices)}
    planned = planner.plan(2, topo, samples=samples)
    plan, heads = planned.plan, planned.ctx.heads
    plan.validate()
    relayed = 0
    for edge, head in heads.items():
        members = [d.id for d in topo.cluster(edge) if d.id != head]
        hs = plan.steps[head]
        kinds = [type(s) for s in hs]
        first_stats = kinds.index(Stats)
        assert kinds.index(Send) < first_stats  # after forwarding the global modules
        assert hs[-1] == Evaluate()
        collect = next(s for s in hs if isinstance(s, Collect) and s.tag == STATS)
        tasks = tuple(topo.device_map[head].tasks)
        assert collect.include_self and collect.own == tuple(stats_name(t) for t in tasks)
        assert sorted(collect.senders) == sorted(members) and collect.link == "d2d"
        assert Send(edge, "device_edge", STATS, tuple(stats_name(t) for t in tasks)) in hs
        ec = next(s for s in plan.steps[edge] if isinstance(s, Collect) and s.tag == STATS)
        assert ec.senders == (head,) and ec.caps_of(head) == {
            stats_name(t): float(sum(samples[d.id][t] for d in topo.devices)) for t in tasks
        }
        for d in members:
            update = next(s for s in plan.steps[d] if isinstance(s, Send) and s.tag == "cluster")
            stats = next(s for s in plan.steps[d] if isinstance(s, Send) and s.tag == STATS)
            assert (stats.to, stats.link, stats.route) == (head, "d2d", update.route)
            relayed += bool(stats.route)
            down = next(s for s in hs if isinstance(s, Send) and s.tag == CALIBRATED and s.to == d)
            bcast = next(s for s in hs if isinstance(s, Send) and s.tag == "broadcast" and s.to == d)
            assert down.route == bcast.route and all(m.startswith("head.") for m in down.modules)
            assert collect.caps_of(d) == {stats_name(t): float(samples[d][t]) for t in topo.device_map[d].tasks}
    assert relayed  # this geometry has a multi-hop route
    CostModel._critical_path(plan, {}, {})  # the cost model walks it to the end


# ---- checking senders' labels by their statistics (calibration.label_t) ----------------------------------
def _skewed_senders(flip: set[int], n: int = 6, classes: int = 4, d: int = 6, seed: int = 0):
    """``n`` senders' raw (features, labels): each answer's features from one Gaussian shared by all (label
    skew: Dirichlet(0.3) counts), senders in ``flip`` with every label y replaced by classes - 1 - y."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    means = 1.5 * torch.randn(classes, d, generator=g)
    out = []
    for i in range(n):
        counts = torch.from_numpy((rng.dirichlet([0.3] * classes) * 120).round().astype(np.int64)) + 2
        y = torch.arange(classes).repeat_interleave(counts)
        x = means[y] + torch.randn(len(y), d, generator=g)
        out.append((x, classes - 1 - y if i in flip else y))
    return out


def _label_t_by_hand(mine, others, classes: int) -> float:
    """label_t from the raw samples (the definition, with no sums): per answer both hold, the squared distance
    of the two means over the pooled within-answer variance times (1/n_mine + 1/n_others), weighted by n_mine."""
    x = torch.cat([mine[0]] + [o[0] for o in others]).double()
    y = torch.cat([mine[1]] + [o[1] for o in others])
    present = [c for c in range(classes) if (y == c).any()]
    within = sum(float(((x[y == c] - x[y == c].mean(0)) ** 2).sum()) for c in present)
    v = within / (len(y) - len(present))
    ox = torch.cat([o[0] for o in others]).double()
    oy = torch.cat([o[1] for o in others])
    num = den = 0.0
    for c in range(classes):
        a, b = mine[0][mine[1] == c].double(), ox[oy == c]
        if len(a) and len(b):
            num += len(a) * float(((a.mean(0) - b.mean(0)) ** 2).sum()) / (v * (1 / len(a) + 1 / len(b)))
            den += len(a)
    return num / den


def test_label_t_is_the_standardised_distance_of_answer_means_and_flags_only_flippers():
    raw = _skewed_senders(flip={2})
    stats = {f"s{i}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(raw)}
    for i in range(len(raw)):
        others = [raw[j] for j in range(len(raw)) if j != i]
        want = _label_t_by_hand(raw[i], others, 4)
        got = label_t(stats[f"s{i}"], [stats[f"s{j}"] for j in range(len(raw)) if j != i])
        assert got == pytest.approx(want, rel=1e-9)
        diag = {k: {"t": stats_of(raw[j][0], raw[j][1], 4, diagonal=True)} for j, k in enumerate(stats)}
        assert label_t(diag[f"s{i}"], [diag[f"s{j}"] for j in range(len(raw)) if j != i]) == pytest.approx(want)
    t, flagged = label_scores(stats, cut=4.0)
    assert flagged == ["s2"], t
    assert t["s2"] > 20 and max(v for s, v in t.items() if s != "s2") < 3, t
    # honest senders, however skewed, stay near 1; a second flipper is found once the first is left out
    clean = _skewed_senders(set())
    t, flagged = label_scores({f"s{i}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(clean)}, 4.0)
    assert flagged == [] and max(t.values()) < 3, t
    raw = _skewed_senders(flip={1, 4})
    t, flagged = label_scores({f"s{i}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(raw)}, 4.0)
    assert sorted(flagged) == ["s1", "s4"], t
    # never more than a minority: at a cut nobody passes, three of six are flagged at most
    _, flagged = label_scores({f"s{i}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(raw)}, 1e-9)
    assert len(flagged) == 2  # 6 senders: a majority of 4 stays
    # the limit: where the flippers hold most of the samples (10x here), the reference is theirs and the
    # honest are the ones that stand out (docs/robustness.md)
    raw = [(x.repeat(10, 1), y.repeat(10)) if i in (1, 4) else (x, y) for i, (x, y) in enumerate(raw)]
    _, flagged = label_scores({f"s{i}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(raw)}, 4.0)
    assert len(flagged) == 2 and not {"s1", "s4"} & set(flagged)
    # nothing comparable (no answer held by two senders): no evidence, score 0
    alone = {"a": {"t": stats_of(*_clusters(5, d=6, classes=1), 4)}, "b": {"u": stats_of(*_clusters(5, d=6), 4)}}
    assert label_t(alone["a"], [alone["b"]]) == 0.0


def test_the_whitened_label_metric_is_hotelling_s_statistic_per_dimension():
    """``metric="whitened"`` (measured on the full-size matrix's traces and not adopted: docs/robustness.md): the
    difference of the means in units of the pooled within-answer covariance (full, or diagonal where the
    statistics are), over its effective dimension: about 1 for honest data, like the trace; where answers
    differ along directions of little spread, a flipper stands out in it and not in the trace. Against NumPy."""
    g = torch.Generator().manual_seed(4)
    d, classes = 24, 3
    sd = torch.logspace(0, -2, d)
    centres = torch.zeros(classes, d)
    for c in range(classes):
        centres[c, -1 - c] = 0.08  # told apart only where the spread is least

    def draw(counts, flip=False):
        x = torch.cat([centres[c] + sd * torch.randn(n, d, generator=g) for c, n in enumerate(counts)])
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return x, (y + 1) % classes if flip else y

    ref_x, ref_y = draw([400, 400, 400])
    for diagonal in (False, True):
        ref = {"t": stats_of(ref_x, ref_y, classes, diagonal)}
        honest = [label_t({"t": stats_of(*draw([50, 20, 40]), classes, diagonal)}, [ref], "whitened") for _ in range(5)]
        flipped = label_t({"t": stats_of(*draw([50, 20, 40], True), classes, diagonal)}, [ref], "whitened")
        trace = label_t({"t": stats_of(*draw([50, 20, 40], True), classes, diagonal)}, [ref])
        assert max(honest) < 2.5 and flipped > 4 > trace, (diagonal, honest, flipped, trace)
    # by hand (NumPy) for one sender, full covariance
    x, y = draw([30, 10, 0])
    mine, others = {"t": stats_of(x, y, classes)}, {"t": stats_of(ref_x, ref_y, classes)}
    xs, ys = np.concatenate([x.numpy(), ref_x.numpy()]).astype(np.float64), np.concatenate([y, ref_y])
    w = sum(np.cov(xs[ys == c].T, bias=True) * (ys == c).sum() for c in range(classes)) / (len(ys) - classes)
    lam, vec = np.linalg.eigh(w)
    s = 1e-2 * lam.clip(0).mean()
    k = (lam.clip(0) / (lam.clip(0) + s)).sum()
    num = 0.0
    for c in (0, 1):
        a, b = (y == c).sum().item(), (ref_y == c).sum().item()
        diff = x.numpy()[y == c].mean(0) - ref_x.numpy()[ref_y == c].mean(0)
        num += a * float(((vec.T @ diff) ** 2 / (lam.clip(0) + s)).sum()) / (k * (1 / a + 1 / b))
    assert label_t(mine, [others], "whitened") == pytest.approx(num / 40, rel=1e-6)
    with pytest.raises(ValueError, match="label metric"):
        label_t(mine, [others], "cosine")


def test_checked_against_the_federation_flippers_who_outvote_their_cluster_are_found():
    """Two flippers holding most of their cluster's samples make its own reference theirs (label_scores flags
    the honest); against the federation's sums (another 12 honest devices' too) they stand out. A deferred
    LabelCheck (an edge's) scores each sender by the smaller of the two: the honest are unremarkable against
    the federation, the flippers still stand out here (less than the honest do, but above the cut), and the
    greedy flags them."""
    from hffm.aggregation import LabelCheck, make_aggregator

    def senders(heavy: int) -> dict:
        raw = _skewed_senders(flip={1, 4}, n=18)
        raw = [(x.repeat(heavy, 1), y.repeat(heavy)) if i in (1, 4) else (x, y) for i, (x, y) in enumerate(raw)]
        return {f"s{i:02d}": {"t": stats_of(x, y, 4)} for i, (x, y) in enumerate(raw)}

    def deferred(cluster: dict, federation: dict, excluded: dict | None = None) -> tuple[LabelCheck, list]:
        agg = make_aggregator("label_check", sorted(cluster), None, {"label_t": 4.0, "defer": 1})
        assert isinstance(agg, LabelCheck) and agg.defer
        agg.excluded = excluded or {}
        for s in sorted(cluster):
            agg.add(s, [to_module(stats_name("t"), cluster[s]["t"], 1)])
        agg.result(1)
        fed = to_module(stats_name("t"), federation["t"], 1)
        return agg, agg.check({stats_name("t"): fed, "head.t": fed})  # anything not statistics is ignored

    stats = senders(10)
    cluster = {s: v for s, v in stats.items() if int(s[1:]) < 6}
    _, local = label_scores(cluster, 4.0)
    assert not {"s01", "s04"} & set(local)  # outvoted
    federation = merge(list(stats.values()))
    t, flagged = label_scores(cluster, 4.0, federation, set(cluster), here=False)
    assert sorted(flagged) == ["s01", "s04"], t
    assert max(v for s, v in t.items() if s not in flagged) < 3, t
    agg, scores = deferred(cluster, federation)
    assert agg.scores == [] and sorted({sc.sender for sc in scores if sc.flagged}) == ["s01", "s04"]
    assert max(sc.label_t for sc in scores if not sc.flagged) < 3
    # kept for a later sender: the four honest here, and the federation less all six (whom it summed)
    ref = agg.label_reference(1)
    assert ref.peers == 4 and set(ref.here) == set(ref.rest) == {"t"}
    outside = merge([v for s, v in stats.items() if int(s[1:]) >= 6])["t"]
    assert torch.allclose(ref.rest["t"].count, outside.count) and torch.allclose(ref.rest["t"].total, outside.total)
    assert torch.allclose(ref.here["t"].count, merge([cluster[s] for s in ("s00", "s02", "s03", "s05")])["t"].count)
    # flippers of their own weight: both references flag them, and so does the deferred check
    stats = senders(1)
    cluster = {s: v for s, v in stats.items() if int(s[1:]) < 6}
    agg, scores = deferred(cluster, merge(list(stats.values())))
    assert sorted({sc.sender for sc in scores if sc.flagged}) == ["s01", "s04"]
    assert all(sc.excluded == sc.flagged for sc in scores)
    # one edge alone (the federation is this cluster): the rest holds nothing to compare with, which is no
    # evidence either way; the flippers are found here (until 2026-12-06 the rest's 0 cleared every sender)
    lone, lone_scores = deferred(cluster, merge(list(cluster.values())))
    assert sorted({sc.sender for sc in lone_scores if sc.flagged}) == ["s01", "s04"], lone_scores
    assert lone.label_reference(1).score(stats["s01"]) > 4 and lone.label_reference(1).score(stats["s00"]) < 3
    up = from_module(agg.result(1)[stats_name("t")])
    assert torch.allclose(up.count, merge(list(cluster.values()))["t"].count)  # round 1: sent up whole
    # next round the node leaves them out of its sum (excluded: held, scored, not summed), and checks them again
    honest = {s: v for s, v in stats.items() if s not in ("s01", "s04")}
    agg, scores = deferred(cluster, merge(list(honest.values())), {"s01": 9.0, "s04": 9.0})
    mine = merge([v for s, v in cluster.items() if s in honest])["t"]
    assert torch.allclose(from_module(agg.result(2)[stats_name("t")]).count, mine.count, rtol=1e-5)
    assert sorted({sc.sender for sc in scores if sc.flagged}) == ["s01", "s04"]


def test_a_label_check_sums_the_statistics_of_the_unflagged_only():
    from hffm.aggregation import LabelCheck, make_aggregator

    raw = _skewed_senders(flip={3})
    mods = {f"device-{i}": to_module(stats_name("t"), stats_of(x, y, 4), 1) for i, (x, y) in enumerate(raw)}
    agg = make_aggregator("label_check", sorted(mods), None, {"label_t": 4.0})
    assert isinstance(agg, LabelCheck)
    for s in reversed(sorted(mods)):  # arrival order does not matter
        agg.add(s, [mods[s]])
    out = agg.result(1)[stats_name("t")]
    honest = [from_module(m) for s, m in sorted(mods.items()) if s != "device-3"]
    want = sum(honest[1:], honest[0])
    got = from_module(out)
    assert torch.allclose(got.count, want.count, rtol=1e-5) and torch.allclose(got.total, want.total, rtol=1e-4)
    assert agg.flagged == ["device-3"]
    by = {s.sender: s for s in agg.scores}
    assert by["device-3"].flagged and by["device-3"].excluded and by["device-3"].label_t > 4
    assert not any(by[s].flagged for s in by if s != "device-3")
    # what it judged by, kept for statistics that come later (a joiner's): the kept senders' sum, nothing else;
    # against it a newcomer scores as it would have beside them (here: a flipper and an honest one)
    ref = agg.label_reference(1)
    assert (ref.round, ref.peers, ref.rest) == (1, 5, None)
    assert torch.allclose(ref.here["t"].count, want.count) and torch.allclose(ref.here["t"].total, want.total)
    flipped, honest_new = (stats_of(x, y, 4) for x, y in _skewed_senders(flip={6}, n=8)[6:])
    kept = [stats_of(x, y, 4) for i, (x, y) in enumerate(raw) if i != 3]
    assert ref.score({"t": flipped}) == pytest.approx(label_t({"t": flipped}, [{"t": k} for k in kept]))
    assert ref.score({"t": flipped}) > 20 and ref.score({"t": honest_new}) < 3
    # fewer than 4 senders: no spread to judge by, summed as they came, nobody scored and no reference kept
    few = make_aggregator("label_check", [], None, {"label_t": 4.0})
    for s in sorted(mods)[:3]:
        few.add(s, [mods[s]])
    assert few.result(1)[stats_name("t")].num_samples == sum(mods[s].num_samples for s in sorted(mods)[:3])
    assert few.scores == [] and few.flagged == [] and few.label_reference(1) is None
    with pytest.raises(ValueError, match="label_t"):
        make_aggregator("label_check", [], None, {"label_t": 0})


def test_the_plan_checks_labels_in_every_statistics_collect_with_label_t():
    # star: the cloud checks every device against the others at once
    cfg, topo, planner = _planned("method=star", "calibration.enabled=true", "calibration.label_t=4")
    plan = planner.plan(1, topo).plan
    [(node, collect)] = [(n, s) for n, s in plan.collects() if s.tag == STATS]
    assert node == CLOUD and collect.rule == "label_check" and collect.params == (("label_t", 4.0),)
    assert all(
        set(s.modules) == {head_name(t) for t in ("art", "gqa")} for _, s in plan.transfers() if s.tag == CALIBRATED
    )
    # hfm: each edge defers its check to the federation's statistics, which the cloud sends down before it
    # calibrates; each edge sends its statistics up again without those it flagged, and the cloud calibrates on
    # those (FEDERATION, then CHECKED, then CALIBRATED: heads only)
    cfg, topo, planner = _planned("calibration.enabled=true", "calibration.label_t=4", "e_agg=2")
    plan = planner.plan(2, topo).plan
    stats = dict((n, s) for n, s in plan.collects() if s.tag == STATS)
    assert set(stats) == {"edge-0", "edge-1", CLOUD}
    assert stats[CLOUD].rule == "fedavg"
    assert all(
        stats[e].rule == "label_check" and stats[e].params == (("defer", 1.0), ("label_t", 4.0)) for e in topo.edges
    )
    sums = {"stats.art", "stats.gqa"}
    down = {s.to: s.modules for n, s in plan.transfers() if s.tag == FEDERATION and n == CLOUD}
    assert set(down) == {"edge-0", "edge-1"} and all(set(mods) == sums for mods in down.values())
    up = {n: s.modules for n, s in plan.transfers() if s.tag == CHECKED}
    assert set(up) == {"edge-0", "edge-1"} and all(set(mods) == sums for mods in up.values())
    assert all(not any(m.startswith("stats.") for m in s.modules) for n, s in plan.transfers() if s.tag == CALIBRATED)
    kinds = [(type(s).__name__, getattr(s, "tag", None)) for s in plan.steps[CLOUD]]
    i = kinds.index(("Collect", STATS))
    assert kinds[i:] == [("Collect", STATS), ("Send", FEDERATION), ("Send", FEDERATION), ("Collect", CHECKED),
                         ("Calibrate", None), ("Send", CALIBRATED), ("Send", CALIBRATED)]  # fmt: skip
    edge = [(type(s).__name__, s.tag) for s in plan.steps["edge-0"] if hasattr(s, "tag")]
    j = edge.index(("Collect", STATS))
    assert edge[j:j + 5] == [("Collect", STATS), ("Send", STATS), ("Collect", FEDERATION), ("Send", CHECKED),
                             ("Collect", CALIBRATED)]  # fmt: skip
    # without the label check nothing goes down before the heads
    cfg, topo, planner = _planned("calibration.enabled=true", "e_agg=2")
    assert not [s for _, s in planner.plan(2, topo).plan.transfers() if s.tag in (FEDERATION, CHECKED)]
    with pytest.raises(ConfigError, match="label_t"):
        load_config(None, ["calibration.enabled=true", "calibration.label_t=0"])
    with pytest.raises(ConfigError, match="calibration.label_t.*calibration.enabled"):
        load_config(None, ["calibration.label_t=4"])


# ---- over real gRPC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["hfm", "hfm-d2d", "hfm-pooled"])
def test_an_hfm_run_calibrates_the_global_heads_on_its_devices_statistics(tmp_path, method):
    """hfm and hfm-d2d, 2 rounds, e_agg 2, calibration on, traced: in round 2 each device's statistics are
    those of its own training data under the global modules it received (in hfm-d2d sent to its cluster head
    over D2D, relayed where its route has hops, and the head's own counted by the head); the cloud's sum is
    all of them; the global heads are the cloud's aggregate calibrated on that sum (recomputed here, same
    seed), the adapters as aggregated; the devices evaluate the calibrated heads and every node drops the
    statistics at the round's end. ``hfm-pooled``: hfm with per-answer variances and a pooled matrix per task
    (``calibration.diagonal``, ``calibration.pooled``)."""
    from hffm.data import build_device_data, load_tokenizer, task_labels
    from hffm.topology import split_table
    from services.launcher import run

    per_edge = 3 if method == "hfm-d2d" else 2  # with 3, device-0-0's route to its head has a relay
    pooled = method == "hfm-pooled"
    sets = [
        f"method={method.removesuffix('-pooled')}",
        *(["calibration.diagonal=true", "calibration.pooled=true"] if pooled else []),
        "topology.edges=2",
        f"topology.devices_per_edge={per_edge}",
        "runtime.devices_per_process=3",
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
    heads = r2["modeled"]["heads"]  # edge -> its cluster head (hfm-d2d)
    if method == "hfm-d2d":
        assert set(heads) == {"edge-0", "edge-1"}
        relayed = {h["origin"] for h in r2["hops"] if h["tag"] == "stats" and h["sender"] != h["origin"]}
        assert "device-0-0" in relayed  # a relay carried its statistics to its head
        for e, h in heads.items():
            counted = next(a["counted"] for a in r2["aggregates"] if a["node"] == h and a["tag"] == "stats")
            assert sorted(counted) == sorted(f"device-{e[-1]}-{i}" for i in range(per_edge))  # itself included

    torch.set_num_threads(cfg.runtime.torch_threads)  # as the nodes compute
    tok = load_tokenizer(cfg)
    labels = task_labels(cfg)
    model = build_model(cfg, len(tok), labels)
    holders = split_table(cfg).holders_by_task()
    topo = split_table(cfg)
    sums: dict = {}
    for e in (0, 1):
        for i in range(per_edge):
            d = f"device-{e}-{i}"
            head = heads.get(f"edge-{e}")
            # the global modules it computed its statistics under: a cluster head got them from its edge
            held = trace(d, "r2-down-aggregate" if d == head else "r2-broadcast-aggregate")
            for n, m in held.items():
                model.load_module_state(n, m.tensors)
            data = build_device_data(cfg, d, holders, tok, topo.device_map[d].tasks).train
            mine = feature_stats(model, data, "cpu", diagonal=pooled, pooled=pooled)
            if head is None:
                sent = trace(f"edge-{e}", f"r2-stats-from-{d}")
            else:
                sent = trace(head, "r2-stats-own" if d == head else f"r2-stats-from-{d}")
            for t, fs in mine.items():
                got = from_module(sent[stats_name(t)])
                assert torch.allclose(got.count, fs.count, rtol=1e-5)
                assert torch.allclose(got.total, fs.total, rtol=1e-4, atol=1e-3)
                assert torch.allclose(got.squares, fs.squares, rtol=1e-4, atol=1e-3)
                if pooled:
                    assert torch.allclose(got.pooled, fs.pooled, rtol=1e-4, atol=1e-3)
                sums[t] = sums[t] + fs if t in sums else fs
    total = trace(CLOUD, "r2-stats-aggregate")
    for t, fs in sums.items():
        got = from_module(total[stats_name(t)])
        assert torch.allclose(got.count, fs.count, rtol=1e-5)
        assert torch.allclose(got.squares, fs.squares, rtol=1e-4, atol=1e-2)
        assert (got.pooled is None) == (not pooled)
        if pooled:
            assert torch.allclose(got.pooled, fs.pooled, rtol=1e-4, atol=1e-2)

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
        for d in ("device-0-0", "device-1-0"):
            assert torch.equal(trace(d, "r2-calibrated-aggregate")[name].tensors["net.0.weight"],
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


def _flipped_run(tmp_path: Path, *sets: str) -> dict:
    """A traced run over gRPC with calibration and its label check, device-1-0 training on flipped labels."""
    from services.launcher import run

    common = [
        "data.alpha=0.3",
        "data.global_test_per_task=32",
        "rounds=2",
        "calibration.enabled=true",
        "calibration.epochs=1",
        "calibration.label_t=4",
        "adversary.nodes=[device-1-0]",
        "adversary.behaviour=label_flip",
        f"runtime.trace_dir={tmp_path / 'trace'}",
    ]
    results = run(load_config(None, [*common, *sets]), tmp_path, Console(file=io.StringIO(), width=120), timeout_s=600)
    assert results["complete"]
    return results


def _copies(node_trace: Path, prefix: str) -> dict:
    """{sender: the copy it sent} of a node's collect (its trace files ``<prefix>-from-<sender>``)."""
    return {
        f.name.split("-from-")[1].removesuffix(".safetensors"): load_modules(str(f))
        for f in node_trace.glob(f"{prefix}-from-*.safetensors")
    }


def _assert_fedavg_without(node_trace: Path, prefix: str, left_out: str, senders: int) -> None:
    """The node's aggregate ``prefix`` is the FedAvg of the copies it received, ``left_out``'s excepted."""
    ups = _copies(node_trace, prefix)
    assert len(ups) == senders and left_out in ups
    agg = load_modules(str(node_trace / f"{prefix}-aggregate.safetensors"))
    want = weighted_mean([ups[s] for s in sorted(ups) if s != left_out])
    for name, m in agg.items():
        assert m.num_samples == pytest.approx(want[name].num_samples), name
        for k, v in m.tensors.items():
            assert torch.allclose(v, want[name].tensors[k], rtol=1e-4, atol=1e-5), (prefix, name, k)


def test_a_star_run_flags_a_label_flipper_by_its_statistics_and_leaves_them_out(tmp_path):
    """star, 6 devices, one of them training on flipped labels (adversary.behaviour label_flip), calibration
    with label_t, traced: the cloud's statistics collect flags the flipper (and no one else) in both rounds,
    its statistics are not in the sum the heads are calibrated on, its next update is left out of the
    aggregate, and results.json's detection counts it."""
    results = _flipped_run(
        tmp_path,
        "method=star",
        "topology.edges=2",
        "topology.devices_per_edge=3",
        "runtime.devices_per_process=3",
        "data.train_per_task=600",
    )
    trace = tmp_path / "trace" / CLOUD
    for r in (1, 2):
        rec = next(a for a in results["rounds"][r - 1]["aggregates"] if a["node"] == CLOUD and a["tag"] == STATS)
        flagged = {s["sender"] for s in rec["scores"] if s["flagged"]}
        assert flagged == {"device-1-0"}, rec["scores"]
        worst = max(s["label_t"] for s in rec["scores"] if s["sender"] == "device-1-0")
        honest = max(s["label_t"] for s in rec["scores"] if s["sender"] != "device-1-0")
        assert worst > 4 > honest, (worst, honest)
        sent = _copies(trace, f"r{r}-stats")
        assert len(sent) == 6
        total = load_modules(str(trace / f"r{r}-stats-aggregate.safetensors"))
        for name, m in total.items():
            honest_sums = [from_module(sent[s][name]) for s in sorted(sent) if s != "device-1-0" and name in sent[s]]
            want = sum(honest_sums[1:], honest_sums[0])
            got = from_module(m)
            assert torch.allclose(got.count, want.count, rtol=1e-5), name
            assert torch.allclose(got.total, want.total, rtol=1e-4, atol=1e-3), name
    # flagged in round 1, its round-2 update is left out of the cloud's aggregate (pushed, counted, excluded)
    rec = next(a for a in results["rounds"][1]["aggregates"] if a["node"] == CLOUD and a["tag"] == "aggregate")
    assert "device-1-0" in rec["counted"]
    assert {s["sender"] for s in rec["scores"]} == {"device-1-0"}
    assert all(s["excluded"] and s["label_t"] > 4 for s in rec["scores"])
    _assert_fedavg_without(trace, "r2-aggregate", "device-1-0", 6)
    det = results["detection"]
    assert det["flagged"] == ["device-1-0"] and det["recall"] == 1.0 and det["false_positive_rate"] == 0.0, det


def test_hfm_edges_check_their_devices_against_the_federation_and_leave_a_flipper_out(tmp_path):
    """hfm, 2 edges x 4 devices, a cloud round every round (e_agg 1), device-1-0 training on flipped labels,
    calibration with label_t: edge-1 sends its devices' statistics up whole in round 1, checks them against
    the federation's sums the cloud sends down, flags the flipper alone and sends its statistics up again
    without the flipper's, which (with edge-0's) the cloud calibrates the heads on: the flipper's statistics
    reach no heads, not even in the phase that flags it. In round 2 it leaves the flipper's update and
    statistics out of what it sends up; edge-0 flags nobody."""
    results = _flipped_run(
        tmp_path,
        "method=hfm",
        "e_agg=1",
        "topology.edges=2",
        "topology.devices_per_edge=4",
        "runtime.devices_per_process=4",
        "data.train_per_task=800",
    )

    def record(r: int, node: str, tag: str) -> dict:
        return next(a for a in results["rounds"][r - 1]["aggregates"] if a["node"] == node and a["tag"] == tag)

    for r in (1, 2):
        for edge, bad in (("edge-0", set()), ("edge-1", {"device-1-0"})):
            # deferred: scored when the federation's sums came; here only the senders left out as flagged before
            held = {(s["sender"], s["excluded"], s["flagged"]) for s in record(r, edge, STATS)["scores"]}
            assert held == ({("device-1-0", True, True)} if (r, edge) == (2, "edge-1") else set()), held
            scores = record(r, edge, FEDERATION)["scores"]
            assert {s["sender"] for s in scores} == {f"device-{edge[-1]}-{i}" for i in range(4)}
            assert {s["sender"] for s in scores if s["flagged"]} == bad, scores
            assert not record(r, edge, CALIBRATED)["scores"]
    # round 1: what edge-1 sent up checked is its devices' statistics without the flipper's, and the cloud's
    # calibration sum is the edges' checked statistics (the first sum, with the flipper's, only went down)
    trace = tmp_path / "trace"
    edge_stats = _copies(trace / "edge-1", "r1-stats")
    checked = load_modules(str(trace / "edge-1" / "r1-federation-kept.safetensors"))
    want = weighted_mean([edge_stats[d] for d in sorted(edge_stats) if d != "device-1-0"])
    whole = weighted_mean([edge_stats[d] for d in sorted(edge_stats)])
    for name, m in checked.items():
        assert m.num_samples == pytest.approx(want[name].num_samples) and m.num_samples < whole[name].num_samples
        assert all(torch.allclose(v, want[name].tensors[k], rtol=1e-4, atol=1e-5) for k, v in m.tensors.items())
    assert _copies(trace / CLOUD, "r1-checked")["edge-1"].keys() == checked.keys()
    ups = _copies(trace / CLOUD, "r1-checked")
    calibrated_on = load_modules(str(trace / CLOUD / "r1-checked-aggregate.safetensors"))
    sums = weighted_mean([ups[e] for e in sorted(ups)])
    first = load_modules(str(trace / CLOUD / "r1-stats-aggregate.safetensors"))
    for name, m in calibrated_on.items():
        assert m.num_samples == pytest.approx(sums[name].num_samples) and m.num_samples < first[name].num_samples
    # round 2: edge-1 counted the flipper's pushes and left them out of both sums it sent up
    for tag in ("aggregate", STATS):
        rec = record(2, "edge-1", tag)
        assert "device-1-0" in rec["counted"]
        assert {s["sender"] for s in rec["scores"] if s["excluded"]} == {"device-1-0"}
        _assert_fedavg_without(tmp_path / "trace" / "edge-1", f"r2-{tag}", "device-1-0", 4)
    det = results["detection"]
    assert det["flagged"] == ["device-1-0"] and det["recall"] == 1.0 and det["false_positive_rate"] == 0.0, det


# ---- checking a sender's heads against its statistics (calibration.head_check) ---------------------------
def _trained_head(x: torch.Tensor, y: torch.Tensor, classes: int, start: TaskHead, steps: int = 150) -> TaskHead:
    """``start`` trained on (x, y) with AdamW (a device's local training, head only)."""
    head = TaskHead(x.shape[1], 16, classes)
    head.load_state_dict(start.state_dict())
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def _as_heads(task: str, head: TaskHead) -> dict:
    from hffm.modules import Module

    return {
        head_name(task): Module(head_name(task), {k: v.detach().clone() for k, v in head.state_dict().items()}, 1, 1.0)
    }


def test_head_drop_compares_a_senders_heads_with_its_start_on_the_answer_means_it_reported():
    """head_drop by hand: the mean over the reported samples of log p_start(answer | answer's mean) minus the
    sender's own; below 0 for heads trained on the data the statistics describe, well above 0 for heads trained
    on its flipped labels (reported or not), None where nothing is comparable; the global RNG untouched."""
    from hffm.calibration import claims_of, head_drop

    cfg = load_config(None, ["model.head_hidden=16"])
    (x, y), _ = _skewed_senders(flip=set(), n=2, d=8)[:2]
    torch.manual_seed(0)
    start = TaskHead(8, 16, 4)
    honest = _trained_head(x, y, 4, start)
    flipped = _trained_head(x, 3 - y, 4, start)
    claims = claims_of({"t": stats_of(x, y, 4)})  # the true labels' statistics: what a liar reports
    torch.manual_seed(7)
    before = torch.get_rng_state()
    got = {
        name: head_drop(_as_heads("t", h), _as_heads("t", start), claims, cfg.model)
        for name, h in (("honest", honest), ("flipped", flipped))
    }
    assert torch.equal(torch.get_rng_state(), before)

    def by_hand(head: TaskHead) -> float:
        total = drop = 0.0
        for c in range(4):
            n = int((y == c).sum())
            if n:
                mean = x[y == c].double().mean(0).float()
                with torch.no_grad():
                    lp = [float(torch.log_softmax(h(mean[None]), 1)[0, c]) for h in (start, head)]
                drop += n * (lp[0] - lp[1])
                total += n
        return drop / total

    for name, h in (("honest", honest), ("flipped", flipped)):
        assert got[name] == pytest.approx(by_hand(h), abs=1e-4), name
    assert got["honest"] < 0 < 1 < got["flipped"], got
    built: dict = {}  # a collect's cache of the start's heads: the same scores, sender after sender
    for name, h in (("honest", honest), ("flipped", flipped)):
        assert head_drop(_as_heads("t", h), _as_heads("t", start), claims, cfg.model, built) == got[name]
    assert set(built) == {"t"}
    assert head_drop(_as_heads("other", honest), _as_heads("t", start), claims, cfg.model) is None
    empty = claims_of({"t": empty_stats(8, 4, False)})
    assert head_drop(_as_heads("t", honest), _as_heads("t", start), empty, cfg.model) is None


def test_an_aggregator_screen_leaves_out_a_sender_whose_heads_contradict_its_statistics():
    """``Aggregator.screen`` runs as each sender is folded: a sender over the cut is counted, scored
    (``head_drop``) on every module and not folded; one under it is folded and scored on its heads; one the
    screen cannot judge is folded unscored."""
    from hffm.aggregation import make_aggregator
    from tests.conftest import make_module

    mods = {
        s: {
            "adapter.0": make_module("adapter.0", {"w": (2, 2)}, version=1, num_samples=n, seed=k),
            head_name("t"): make_module(head_name("t"), {"w": (2,)}, num_samples=n, seed=k),
        }
        for k, (s, n) in enumerate((("device-0", 1.0), ("device-1", 2.0), ("device-2", 3.0)))
    }
    verdicts = {"device-0": (-0.2, False), "device-1": (1.5, True), "device-2": None}
    agg = make_aggregator("fedavg", sorted(mods), None, {})
    agg.screen = lambda sender, modules: verdicts[sender]
    for s in sorted(mods, reverse=True):
        agg.add(s, list(mods[s].values()))
    out = agg.result(1)
    assert agg.senders == sorted(mods)
    want = weighted_mean([mods["device-0"], mods["device-2"]])
    assert torch.allclose(out["adapter.0"].tensors["w"], want["adapter.0"].tensors["w"])
    assert out["adapter.0"].num_samples == 4.0
    scores = {(s.sender, s.module): (s.head_drop, s.flagged, s.excluded) for s in agg.scores}
    assert scores == {
        ("device-0", head_name("t")): (-0.2, False, False),
        ("device-1", "adapter.0"): (1.5, True, True),
        ("device-1", head_name("t")): (1.5, True, True),
    }


def test_head_check_needs_the_label_check():
    with pytest.raises(ConfigError, match="calibration.head_check.*calibration.label_t"):
        load_config(None, ["calibration.enabled=true", "calibration.head_check=0.3"])
    with pytest.raises(ConfigError, match="calibration.head_check.*calibration.enabled"):
        load_config(None, ["calibration.head_check=0.3"])
    with pytest.raises(ConfigError, match="head_check"):
        load_config(None, ["calibration.enabled=true", "calibration.label_t=4", "calibration.head_check=0"])


def _lying_scores(results: dict, node: str) -> dict:
    """round -> sender -> (head_drop, flagged) of ``node``'s collects of training updates (head modules)."""
    out: dict = {}
    for rec in results["rounds"]:
        for a in rec["aggregates"]:
            if a["node"] == node and a["tag"] == "aggregate":
                for s in a["scores"]:
                    if s["module"].startswith("head."):
                        out.setdefault(rec["round"], {})[s["sender"]] = (s["head_drop"], s["flagged"])
    return out


@pytest.mark.parametrize("method", ["hfm", "star"])
def test_a_liar_with_honest_statistics_is_caught_by_its_heads(tmp_path, method):
    """device-1-0 trains on flipped labels and reports its data's true statistics (adversary.stats=honest): the
    label check never flags it; with calibration.head_check, the node that holds its statistics (edge-1 in hfm,
    the cloud in star) finds its pushed heads make its reported answers less likely than the round's start did:
    in round 2, the round after its first statistics, by more than the cut, and its update is left out (the
    aggregate recomputed from the traces); in round 3 its drop is still the largest there (over the cut or not:
    from a calibrated start one epoch of flipped labels moves its heads less); no honest device is flagged."""
    topo = ["topology.devices_per_edge=4", "runtime.devices_per_process=4"]
    sets = ["method=hfm", "e_agg=1", *topo, "data.train_per_task=800"] if method == "hfm" else [
        "method=star", "topology.devices_per_edge=3", "runtime.devices_per_process=3", "data.train_per_task=600"
    ]  # fmt: skip
    results = _flipped_run(tmp_path, *sets, "rounds=3", "adversary.stats=honest", "calibration.head_check=0.3")
    node, senders = ("edge-1", 4) if method == "hfm" else (CLOUD, 9)
    label_t = [s for r in results["rounds"] for a in r["aggregates"] for s in a["scores"] if s["label_t"]]
    assert label_t and not any(s["flagged"] for s in label_t), "the label check must not see the liar"
    scores = _lying_scores(results, node)
    assert 1 not in scores  # no statistics from anyone yet
    for r in (2, 3):
        assert len(scores[r]) == senders, scores[r]
        honest = max(d for s, (d, _) in scores[r].items() if s != "device-1-0")
        assert scores[r]["device-1-0"][0] > honest and honest < 0.3, scores[r]
        assert {s for s, (_, flagged) in scores[r].items() if flagged} <= {"device-1-0"}, scores[r]
    assert scores[2]["device-1-0"][1]
    _assert_fedavg_without(tmp_path / "trace" / node, "r2-aggregate", "device-1-0", senders)
    assert results["detection"]["flagged"] == ["device-1-0"]


def test_a_liar_that_reports_no_statistics_adds_modules_of_weight_one_per_task(tmp_path):
    """device-1-0 trains on flipped labels and reports statistics of no sample (adversary.stats=empty): the head
    check has nothing to judge its heads by, so edge-1 weighs its push at what its statistics claimed instead of
    its registered samples: each head at its task's claim (at least 1), its adapters at the sum over its tasks.
    Honest devices' statistics cover exactly the samples they train on: their weights are untouched. The
    round-2 and round-3 aggregates are recomputed from the traces with those weights."""
    from dataclasses import replace as with_

    from hffm.audit import audit_run

    sets = ["method=hfm", "e_agg=1", "topology.devices_per_edge=4", "runtime.devices_per_process=4"]
    results = _flipped_run(
        tmp_path, *sets, "data.train_per_task=800", "rounds=3", "adversary.stats=empty", "calibration.head_check=0.3"
    )
    trace = tmp_path / "trace" / "edge-1"
    assert _lying_scores(results, "edge-1").get(2, {}).get("device-1-0") is None  # nothing to judge it by
    for r in (2, 3):
        ups = _copies(trace, f"r{r}-aggregate")
        assert len(ups) == 4
        liar = ups["device-1-0"]
        assert all(m.num_samples > 1 for m in liar.values())  # what it pushed: its registered samples
        tasks = sum(n.startswith("head.") for n in liar)
        bounded = {n: with_(m, num_samples=1.0 if n.startswith("head.") else tasks) for n, m in liar.items()}
        want = weighted_mean([bounded if s == "device-1-0" else ups[s] for s in sorted(ups)])
        agg = load_modules(str(trace / f"r{r}-aggregate-aggregate.safetensors"))
        for name, m in agg.items():
            assert m.num_samples == pytest.approx(want[name].num_samples), (r, name)
            for k, v in m.tensors.items():
                assert torch.allclose(v, want[name].tensors[k], rtol=1e-4, atol=1e-5), (r, name, k)
        # the record says whose weights were lowered, to what (nobody else's), and the audit folds by it
        rec = next(
            a for a in results["rounds"][r - 1]["aggregates"] if a["node"] == "edge-1" and a["tag"] == "aggregate"
        )
        assert rec["weights"] == {"device-1-0": {n: m.num_samples for n, m in sorted(bounded.items())}}
    audit = audit_run(results, tmp_path / "trace")
    assert audit.aggregates > 0 and not audit.wrong and not audit.double_counted and not audit.lost
    # a record that says it folded someone heavier than it pushed (or lowered nobody's weight when it did) lies
    import copy

    for lie in ({"device-1-1": {"head.art": 1e6}}, {}):
        forged = copy.deepcopy(results)
        rec = next(a for a in forged["rounds"][1]["aggregates"] if a["node"] == "edge-1" and a["tag"] == "aggregate")
        rec["weights"] = lie
        assert audit_run(forged, tmp_path / "trace").wrong
    # in round 1 (no statistics yet) its push counted in full
    ups = _copies(trace, "r1-aggregate")
    agg = load_modules(str(trace / "r1-aggregate-aggregate.safetensors"))
    full = weighted_mean([ups[s] for s in sorted(ups)])
    assert all(agg[n].num_samples == pytest.approx(full[n].num_samples) for n in agg)


def test_a_liar_that_inflates_its_statistics_with_its_claim_keeps_its_weight_and_looks_noisier(tmp_path):
    """What holding weights to the statistics does not stop: device-1-0 registers 20 x its samples, trains on
    flipped labels and sends its data's true statistics weighing 20 x (adversary.stats=inflated: the per-sample
    shares unchanged). Its statistics arrive at that weight (no arrival check can tell), so no bound lowers its
    round-2 push; what shows is its label_t, its true means judged against the noise 20 x its samples would
    leave: above every honest device's at edge-1."""
    sets = ["method=hfm", "e_agg=1", "topology.devices_per_edge=4", "runtime.devices_per_process=4"]
    results = _flipped_run(
        tmp_path,
        *sets,
        "data.train_per_task=800",
        "adversary.claim=20",
        "adversary.stats=inflated",
        "calibration.head_check=0.3",
    )
    trace = tmp_path / "trace" / "edge-1"
    sent = _copies(trace, "r1-stats")
    pushed = _copies(trace, "r1-aggregate")
    for name, m in sent["device-1-0"].items():
        head = head_name(name.removeprefix("stats."))
        assert m.num_samples == pytest.approx(pushed["device-1-0"][head].num_samples)  # 20 x, as registered
        honest = pushed["device-1-1"][head].num_samples
        assert sent["device-1-1"][name].num_samples == pytest.approx(honest)
    r1 = results["rounds"][0]
    scores = {
        s["sender"]: s["label_t"]
        for a in r1["aggregates"]
        if a["node"] == "edge-1" and a["tag"] == FEDERATION
        for s in a["scores"]
    }
    assert scores["device-1-0"] > max(v for k, v in scores.items() if k != "device-1-0"), scores
    rec = next(a for a in results["rounds"][1]["aggregates"] if a["node"] == "edge-1" and a["tag"] == "aggregate")
    assert "device-1-0" not in rec["weights"]


def test_a_label_check_reads_each_senders_own_statistics_after_summing_owned_receive_buffers():
    """Without a trace a node's receive buffers are ``owned`` (FedAvg may make the first its running sum in
    place); the label check reads its senders' statistics again after the sum (the deferred check, the head
    check's claims), so it must sum copies. Regression: the first sender's statistics read back as the sum."""
    from hffm.aggregation import make_aggregator
    from hffm.calibration import claims_of
    from hffm.modules import Module, flat_views

    raw = _skewed_senders(flip={3})
    plain = {f"device-{i}": to_module(stats_name("t"), stats_of(x, y, 4), 1) for i, (x, y) in enumerate(raw)}

    def owned(m: Module) -> Module:
        flat = torch.cat([m.tensors[k].reshape(-1) for k in sorted(m.tensors)]).float()
        return Module(m.name, flat_views(flat, m.shapes()), m.version, m.num_samples, flat=flat, owned=True)

    results = []
    for mods in (plain, {s: owned(m) for s, m in plain.items()}):
        agg = make_aggregator("label_check", sorted(mods), None, {"label_t": 4.0, "defer": 1})
        for s in sorted(mods):
            agg.add(s, [mods[s]])
        total = agg.result(1)[stats_name("t")]
        claims = agg.claims()
        first = from_module(plain["device-0"])
        assert torch.allclose(claims["device-0"]["t"].count, first.count.float())
        assert torch.allclose(claims["device-0"]["t"].mean, claims_of({"t": first})["t"].mean, atol=1e-5)
        checked = agg.check({stats_name("t"): total})
        results.append(sorted((s.sender, round(s.label_t, 4), s.flagged) for s in checked))
    assert results[0] == results[1]


def test_an_opening_phase_holds_round_1s_pushes_to_statistics_and_trains_from_calibrated_heads(tmp_path):
    """calibration.opening, hfm with e_agg=2 (round 1 is no cloud round): every device sends its statistics
    before it trains in round 1, the cloud calibrates the initial heads on them and the devices train from
    those. So round 1's training collect at edge-1 already holds everyone's statistics: the liar reporting no
    sample (adversary.stats=empty) weighs 1 per head and its adapters the sum over its tasks from its first push
    (without the phase it counted in full until round 3), and each honest push is head-checked against the
    calibrated heads it started from (its recorded head_drop recomputed from the traces)."""
    from dataclasses import replace as with_

    from hffm.calibration import claims_of, head_drop

    sets = ["method=hfm", "e_agg=2", "topology.devices_per_edge=4", "runtime.devices_per_process=4"]
    results = _flipped_run(
        tmp_path,
        *sets,
        "data.train_per_task=800",
        "adversary.stats=empty",
        "calibration.head_check=0.3",
        "calibration.opening=true",
    )
    trace = tmp_path / "trace"
    # the calibrated heads came down to the devices before they trained; they are what edge-1 checked against
    calibrated = load_modules(str(trace / "edge-1" / "r1-opening-calibrated-aggregate.safetensors"))
    start = {n: m for n, m in calibrated.items() if n.startswith("head.")}
    assert start
    got = load_modules(str(trace / "device-1-1" / "r1-opening-calibrated-aggregate.safetensors"))
    for n, m in got.items():
        assert all(torch.equal(v, start[n].tensors[k]) for k, v in m.tensors.items()), n
    # round 1's aggregate: the liar at weight 1 per head, its adapters at its tasks' count
    ups = _copies(trace / "edge-1", "r1-aggregate")
    assert len(ups) == 4
    liar = ups["device-1-0"]
    tasks = sum(n.startswith("head.") for n in liar)
    bounded = {n: with_(m, num_samples=1.0 if n.startswith("head.") else tasks) for n, m in liar.items()}
    want = weighted_mean([bounded if s == "device-1-0" else ups[s] for s in sorted(ups)])
    agg = load_modules(str(trace / "edge-1" / "r1-aggregate-aggregate.safetensors"))
    for name, m in agg.items():
        assert m.num_samples == pytest.approx(want[name].num_samples), name
        for k, v in m.tensors.items():
            assert torch.allclose(v, want[name].tensors[k], rtol=1e-4, atol=1e-5), (name, k)
    r1 = next(a for a in results["rounds"][0]["aggregates"] if a["node"] == "edge-1" and a["tag"] == "aggregate")
    assert r1["weights"] == {"device-1-0": {n: m.num_samples for n, m in sorted(bounded.items())}}
    # the head check ran on round 1's honest pushes, against the calibrated start
    sent = _copies(trace / "edge-1", "r1-opening-stats")
    scores = _lying_scores(results, "edge-1")[1]
    assert "device-1-0" not in scores and len(scores) == 3, scores  # nothing to judge the liar's heads by
    cfg = load_config(None, ["data.alpha=0.3"])
    for s, (drop, flagged) in scores.items():
        claims = claims_of({n.removeprefix("stats."): from_module(m) for n, m in sent[s].items()})
        heads = {n: m for n, m in ups[s].items() if n.startswith("head.")}
        assert drop == pytest.approx(head_drop(heads, start, claims, cfg.model), abs=1e-4), s
        assert not flagged and drop < 0.3, (s, drop)


@pytest.mark.parametrize("method", ["hfm", "star", "hfm-d2d"])
def test_an_opening_phase_comes_before_any_training_in_round_1_only(method):
    """calibration.opening: round 1's plan opens with the calibration phase under its own tags (star's round 1
    also ends with the usual one), first at the edges and the cloud, before each device's training; no later
    round has it. Refused without calibration.enabled."""
    from hffm.methods import OPENING_CALIBRATED, OPENING_STATS

    sets = [f"method={method}", "calibration.enabled=true", "calibration.opening=true", "e_agg=2"]
    cfg, topo, planner = _planned(*sets)
    plan = planner.plan(1, topo).plan
    plan.validate()
    opening = (OPENING_STATS, OPENING_CALIBRATED)
    for n, steps in plan.steps.items():
        tags = [getattr(s, "tag", None) for s in steps]
        if topo.role(n) == "device":
            train = next(i for i, s in enumerate(steps) if isinstance(s, Train))
            assert isinstance(steps[0], Stats) and OPENING_CALIBRATED in tags[:train], (n, tags)
            assert not any(t in opening for t in tags[train:]), (n, tags)
        elif n == CLOUD:
            assert [tags[0], type(steps[1])] == [OPENING_STATS, Calibrate], tags
        else:  # an edge: its devices' (or cluster head's) statistics first
            assert tags[:3] == [OPENING_STATS, OPENING_STATS, OPENING_CALIBRATED], tags
    cloud = [getattr(s, "tag", None) for s in plan.steps[CLOUD]]
    assert (STATS in cloud) == (method == "star")  # the usual phase at the end of a cloud round
    later = planner.plan(2, topo).plan
    assert not any(getattr(s, "tag", None) in opening for ss in later.steps.values() for s in ss)
    with pytest.raises(ConfigError, match="calibration.opening.*calibration.enabled"):
        load_config(None, ["calibration.opening=true"])


@pytest.mark.parametrize("method", ["hfm", "star"])
@pytest.mark.parametrize("round_", [2, 3, 4])
def test_a_device_that_starts_a_later_round_synced_sends_its_statistics_before_it_trains(method, round_):
    """Statistics first for joiners too: with calibration.opening and the head check, a device synced at the
    start of a round after the first (one that joined, or lost its state) computes its statistics once synced
    and sends them to its collector (its edge; the cloud in star) under ``join-stats`` before it trains; the
    collector holds them before its first collect of training updates, weighs them as registered (caps) and
    is not made to wait on the device (not critical). Nobody else sends any; round 1 has the opening phase
    instead; without the head check there is none (nothing would read them). In hfm after an edge round (rounds 2
    and 4 at e_agg 2), the edge first sends each of them (``join-ref``) every module but the heads, which it
    collects before it computes them (the modules its edge's label check of the last phase judged by)."""
    from hffm.ids import is_head
    from hffm.methods import JOIN_REF, JOIN_STATS, OPENING_STATS, SYNC, TRAINING_TAG
    from hffm.recovery import critical

    sets = [f"method={method}", "calibration.enabled=true", "calibration.opening=true", "e_agg=2",
            "calibration.label_t=4", "calibration.head_check=0.3"]  # fmt: skip
    cfg, topo, planner = _planned(*sets)
    joined = topo.joiner("device-0-5", "all")
    samples = {x.id: {t: 10 + i for t in x.tasks} for i, x in enumerate(joined.devices)}
    held = {n: (round_ - 1, 0) for n in topo.node_ids() if n != "device-1-1"}  # device-1-1 lost its state
    planned = planner.plan(round_, joined, samples=samples, held=held, cloud_rounds_done=[2] if round_ > 2 else [])
    plan = planned.plan
    plan.validate()
    synced = {"device-0-5", "device-1-1"}
    referred = method == "hfm" and round_ in (2, 4)  # after an edge round (1: with round 1's opening phase)
    assert set(planned.starts.sync) == synced
    collector = {d: (CLOUD if method == "star" else joined.device_map[d].edge) for d in synced}
    for n, steps in plan.steps.items():
        tags = [getattr(s, "tag", None) for s in steps]
        if n in synced:
            i, j, k = (
                tags.index(SYNC),
                tags.index(JOIN_STATS),
                next(i for i, s in enumerate(steps) if isinstance(s, Train)),
            )
            assert i < j < k and isinstance(steps[j - 1], Stats), (n, tags)
            send = steps[j]
            assert send.to == collector[n] and set(send.modules) == {stats_name(t) for t in joined.device_map[n].tasks}
            assert (tags[j - 2] == JOIN_REF) == referred and tags.count(JOIN_REF) == referred, (n, tags)
            if referred:
                assert steps[j - 2].senders == (collector[n],) and i < j - 2
        elif n in collector.values():
            c = next(s for s in steps if isinstance(s, Collect) and s.tag == JOIN_STATS)
            assert set(c.senders) == {d for d, to in collector.items() if to == n}
            assert (c.rule, dict(c.params)) == ("label_check", {"defer": 1.0, "label_t": 4.0})
            first = next(i for i, s in enumerate(steps) if isinstance(s, Collect) and s.tag.startswith(TRAINING_TAG))
            assert tags.index(JOIN_STATS) == first - 1, (n, tags)
            caps = {d: dict(m) for d, m in c.weight_caps}
            assert all(caps[d] == {stats_name(t): float(samples[d][t]) for t in samples[d]} for d in c.senders)
            refs = [s for s in steps[: tags.index(JOIN_STATS)] if isinstance(s, Send) and s.tag == JOIN_REF]
            assert {s.to for s in refs} == (set(c.senders) if referred else set()), (n, tags)
            for s in refs:  # what shapes its features: every module it holds but the heads
                assert set(s.modules) == {m for m in joined.modules_for(s.to) if not is_head(m)} and s.modules
        else:
            assert JOIN_STATS not in tags and JOIN_REF not in tags, (n, tags)
    assert not synced & critical(plan)
    assert not any(getattr(s, "tag", None) == OPENING_STATS for ss in plan.steps.values() for s in ss)
    first = planner.plan(1, joined, samples=samples, held={}).plan  # round 1: the opening phase covers everyone
    assert not any(getattr(s, "tag", None) == JOIN_STATS for ss in first.steps.values() for s in ss)
    _, _, unchecked = _planned(*sets[:-1])  # no head check: nothing reads them
    plain = unchecked.plan(round_, joined, samples=samples, held=held, cloud_rounds_done=[2] if round_ > 2 else [])
    assert not any(getattr(s, "tag", None) == JOIN_STATS for ss in plain.plan.steps.values() for s in ss)


def test_a_joiner_computes_its_statistics_under_the_modules_its_collector_sent_for_them(small_cfg):
    """A device whose collector sent it modules to compute its next statistics under (``join-ref``: its edge's
    label reference's, after an edge round) computes those statistics, and only those, under them: they equal
    the statistics of a device holding them, differ from those under its own modules, and the device's own
    modules (which it trains from) are not changed; its next statistics are under its own again."""
    from hffm.ids import is_head
    from services.common.bootstrap import topology
    from services.common.rounds import RoundState
    from services.device.node import DeviceNode, ModelHost

    cfg = small_cfg.model_copy(update={"calibration": small_cfg.calibration.model_copy(update={"enabled": True})})
    topo = topology(cfg)
    node = DeviceNode("device-0-0", cfg, topo, ModelHost(cfg), "127.0.0.1:0")
    tasks = tuple(topo.device_map["device-0-0"].tasks)
    state = RoundState(3, "hfm", [], {})

    def stats() -> dict[str, torch.Tensor]:
        node.feature_stats(state, tasks)
        return {t: node.modules[stats_name(t)].tensors["total"].clone() for t in tasks}

    own = stats()
    g = torch.Generator().manual_seed(3)
    sent = {n: Module(n, {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in m.tensors.items()}, 2, 1.0)
            for n, m in node.modules.items() if not is_head(n) and stats_task(n) is None}  # fmt: skip
    before = {n: {k: v.clone() for k, v in m.tensors.items()} for n, m in node.modules.items()}
    node.join_reference(sent)
    under = stats()
    assert all(not torch.allclose(under[t], own[t]) for t in tasks)
    assert all(torch.equal(node.modules[n].tensors[k], v) for n, ts in before.items() if stats_task(n) is None
               for k, v in ts.items())  # fmt: skip
    again = stats()
    assert all(torch.equal(again[t], own[t]) for t in tasks)
    holder = DeviceNode("device-0-0", cfg, topo, ModelHost(cfg), "127.0.0.1:0")
    holder.adopt(sent)
    holder.feature_stats(state, tasks)
    assert all(torch.allclose(holder.modules[stats_name(t)].tensors["total"], under[t]) for t in tasks)
    node.close()
    holder.close()
