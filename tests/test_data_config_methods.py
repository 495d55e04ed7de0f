"""Data generation and split, config overrides, and round plans."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hffm.config import ConfigError, load_config
from hffm.data import (
    TASK_LABELS,
    build_device_data,
    build_tokenizer,
    dirichlet_split,
    render_sample,
    task_pool_labels,
)
from hffm.methods import EDGE_CLOUD, Collect, Evaluate, Send, Train, evaluates, make_method
from hffm.topology import CLOUD, Topology, device_tasks


# ---- data ------------------------------------------------------------------------------------
def test_dirichlet_split_is_a_partition_with_min_size():
    labels = task_pool_labels("art", 700, seed=3)
    parts = dirichlet_split(labels, 6, 0.1, np.random.default_rng(0), min_size=8)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) == len(set(allidx.tolist()))
    assert min(len(p) for p in parts) >= 8


def _skew(parts, labels):
    """Mean over parts of the share of the part's most common label."""
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])


def test_small_alpha_is_non_iid_large_alpha_near_iid():
    labels = task_pool_labels("gqa", 1200, seed=0)
    skew_small = _skew(dirichlet_split(labels, 8, 0.1, np.random.default_rng(1), 8), labels)
    skew_large = _skew(dirichlet_split(labels, 8, 1000.0, np.random.default_rng(1), 8), labels)
    assert skew_small > 0.5
    assert skew_large < 0.3  # uniform over 5 labels would be 1/5


def test_split_and_samples_deterministic_by_seed():
    labels = task_pool_labels("art", 300, seed=0)
    a = dirichlet_split(labels, 4, 0.1, np.random.default_rng(7), 4)
    b = dirichlet_split(labels, 4, 0.1, np.random.default_rng(7), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    i1, q1 = render_sample("gqa", 4, 0, 42, 32)
    i2, q2 = render_sample("gqa", 4, 0, 42, 32)
    assert q1 == q2 and np.array_equal(i1, i2)
    i3, _ = render_sample("gqa", 4, 1, 42, 32)
    assert not np.array_equal(i1, i3)


def test_tasks_differ_in_questions_and_labels():
    assert TASK_LABELS["art"] != TASK_LABELS["gqa"]
    qa = {render_sample("art", lab, 0, i, 32)[1] for i, lab in enumerate(range(7))}
    qg = {render_sample("gqa", lab, 0, i, 32)[1] for i, lab in enumerate(range(5))}
    assert qa.isdisjoint(qg)
    tok = build_tokenizer()
    ids = tok("is there a red shape ?")["input_ids"]
    assert tok.unk_token_id not in ids


def test_device_tasks_assignment():
    assert device_tasks(3, ["art", "gqa"], "all") == ["art", "gqa"]
    assert device_tasks(0, ["art", "gqa"], 1) == ["art"]
    assert device_tasks(1, ["art", "gqa"], 1) == ["gqa"]


def test_device_data_local_test_follows_device_mix(small_cfg):
    topo = Topology.from_config(small_cfg, 2)
    tok = build_tokenizer()
    holders = topo.holders_by_task()
    datas = {d.id: build_device_data(small_cfg, d.id, holders, tok) for d in topo.devices}
    total = sum(len(dd.train["art"]) for dd in datas.values())
    assert total == small_cfg.data.train_per_task
    for dd in datas.values():
        train_labels = set(np.flatnonzero(dd.train["art"].label_counts()).tolist())
        test_labels = set(np.flatnonzero(dd.test["art"].label_counts()).tolist())
        assert test_labels <= train_labels


# ---- config ----------------------------------------------------------------------------------
def test_required_overrides_apply():
    cfg = load_config(
        None,
        [
            "topology.edges=3",
            "topology.devices_per_edge=4",
            "method=star",
            "e_agg=2",
            "rounds=6",
            "seed=7",
            "tasks=[art,gqa]",
        ],
    )
    assert (cfg.topology.edges, cfg.topology.devices_per_edge, cfg.method, cfg.e_agg, cfg.rounds, cfg.seed) == (
        3,
        4,
        "star",
        2,
        6,
        7,
    )
    assert cfg.tasks == ["art", "gqa"]
    assert load_config(None, ["tasks=[gqa]"]).tasks == ["gqa"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("topology.edgez=3", "topology.edgez"),
        ("nosuch=1", "nosuch"),
        ("rounds=0", "rounds"),
        ("rounds=many", "rounds"),
        ("method=ring", "method"),
        ("tasks=[art,vqa2]", "tasks"),
        ("topology.devices_per_edge=-1", "topology.devices_per_edge"),
        ("e_agg.x=1", "e_agg.x"),
        ("wire.dtype=fp8", "wire.dtype"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("topology:\n  edges: 2\n  colour: red\n")
    with pytest.raises(ConfigError, match="topology.colour: unknown key"):
        load_config(p)
    p.write_text("rounds: 3\n")
    assert load_config(p, ["rounds=4"]).rounds == 4


def test_repo_configs_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files, "configs/ holds the run configs"
    for f in files:
        load_config(f)


# ---- methods ---------------------------------------------------------------------------------
def _topo(edges=3, per=2):
    cfg = load_config(
        None, [f"topology.edges={edges}", f"topology.devices_per_edge={per}", "topology.tasks_per_device=1"]
    )
    return Topology.from_config(cfg, 2)


def test_hfm_edge_cloud_only_every_e_agg_rounds():
    topo = _topo()
    method = make_method("hfm", e_agg=3)
    for r in range(1, 10):
        plan = method.plan(r, topo)
        plan.validate()
        cloud_links = [s for _, s in plan.transfers() if s.link == EDGE_CLOUD]
        assert bool(cloud_links) == (r % 3 == 0)
        assert (CLOUD in plan.steps) == (r % 3 == 0)
        for d in topo.devices:
            steps = plan.steps[d.id]
            assert isinstance(steps[0], Train)
            assert steps[1] == Send(d.edge, "device_edge", "aggregate", tuple(topo.modules_for(d.id)))


def test_star_every_device_talks_to_cloud():
    topo = _topo()
    plan = make_method("star").plan(1, topo)
    plan.validate()
    collect = plan.steps[CLOUD][0]
    assert isinstance(collect, Collect) and set(collect.senders) == {d.id for d in topo.devices}
    assert not any(e in plan.steps for e in topo.edges)


def test_heads_only_where_tasks_are():
    topo = _topo(edges=1, per=2)
    assert topo.modules_for("device-0-0") == ["adapter.0", "adapter.1", "head.art"]
    assert topo.modules_for("device-0-1") == ["adapter.0", "adapter.1", "head.gqa"]
    assert topo.modules_for("edge-0") == ["adapter.0", "adapter.1", "head.art", "head.gqa"]


def test_plan_validation_catches_dangling_sends():
    from hffm.methods import RoundPlan

    plan = RoundPlan(1)
    plan.add("device-0-0", Send("edge-0", "device_edge", "aggregate", ("adapter.0",)))
    with pytest.raises(ValueError, match="does not collect"):
        plan.validate()
    with pytest.raises(ValueError, match="unknown method"):
        make_method("gossip")


def test_dirichlet_split_many_parts_is_repaired_not_refused():
    """Dirichlet(0.1) over 40 devices rarely gives every device 8 samples; the split still does."""
    labels = task_pool_labels("art", 1200, seed=0)
    parts = dirichlet_split(labels, 40, 0.1, np.random.default_rng(0), min_size=8)
    assert min(len(p) for p in parts) >= 8
    assert len(np.concatenate(parts)) == 1200 == len(set(np.concatenate(parts).tolist()))
    assert _skew(parts, labels) > 0.5  # still strongly non-IID
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split(labels[:100], 40, 0.1, np.random.default_rng(0), min_size=8)


def test_config_writes_are_atomic_and_skip_unchanged(tmp_path):
    """Processes read the run's config.yaml while others (re)write it: never empty or partial."""
    import threading

    from hffm.config import write_config

    path = tmp_path / "config.yaml"
    a = load_config(None, ["topology.edges=10", "topology.devices_per_edge=10"])
    b = load_config(None, ["topology.edges=10", "topology.devices_per_edge=10", "seed=3"])
    write_config(a, path)
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(load_config(path).topology.edges)

    t = threading.Thread(target=read)
    t.start()
    for i in range(200):
        write_config(a if i % 2 else b, path)
    stop.set()
    t.join()
    assert seen and set(seen) == {10}  # never the defaults of an empty file
    mtime = path.stat().st_mtime_ns
    write_config(a, path)
    write_config(a, path)
    assert path.stat().st_mtime_ns == mtime or load_config(path) == a


def test_eval_every_leaves_evaluation_out_of_plans_but_keeps_exchanges():
    assert [r for r in range(1, 8) if evaluates(r, 7, 3)] == [3, 6, 7]  # every 3rd and the last
    assert not any(evaluates(r, 7, 0) for r in range(1, 8))  # 0: never
    assert all(evaluates(r, 7, 1) for r in range(1, 8))
    topo = Topology.from_config(load_config(None, ["topology.edges=2", "topology.devices_per_edge=2"]), 2)
    plan = make_method("hfm", 1).plan(1, topo)
    bare = plan.without_evaluation()
    bare.validate()
    assert any(isinstance(s, Evaluate) for ss in plan.steps.values() for s in ss)
    assert not any(isinstance(s, Evaluate) for ss in bare.steps.values() for s in ss)
    assert bare.transfers() == plan.transfers()


def _device_0_0(cfg):
    """device-0-0's training data, a model, its trainable modules' names and their state before any training
    (to train from again)."""
    from hffm.data import build_device_data, task_labels
    from hffm.model import build_model

    tok = build_tokenizer()
    topo = Topology.from_config(cfg, cfg.model.num_layers)
    data = build_device_data(cfg, "device-0-0", topo.holders_by_task(), tok).train
    model = build_model(cfg, len(tok), task_labels(cfg))
    names = model.module_names()
    return data, model, names, {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in names}


def test_fedprox_keeps_local_modules_near_their_start(small_cfg):
    """train.prox_mu: the proximal term mu/2 ||w - w_start||^2 pulls the trained modules back towards the
    round's start (a large mu moves them less than plain training on the same data and seed); mu = 0
    is plain training, bit for bit (the same seed twice gives the same modules)."""
    import torch

    from hffm.training import train_local

    data, model, names, start = _device_0_0(small_cfg)

    def moved(mu: float) -> float:
        for n in names:
            model.load_module_state(n, start[n])
        cfg = small_cfg.train.model_copy(update={"prox_mu": mu})
        train_local(model, data, names, cfg, "cpu", seed=7)
        d = [(v - start[n][k]).reshape(-1) for n in names for k, v in model.module_state(n).items()]
        return float(torch.cat(d).norm())

    plain, again, prox = moved(0.0), moved(0.0), moved(50.0)
    assert plain == again > 0
    assert prox < 0.7 * plain, (prox, plain)
    with pytest.raises(ConfigError, match="prox_mu"):
        load_config(None, ["train.prox_mu=-1"])


def test_restricted_softmax_leaves_the_answers_a_device_never_sees_alone(small_cfg):
    """train.restricted_softmax (FedRS): the logits of a task's answers absent from the device's data are
    scaled by alpha in local training. With alpha 0 the head's output rows of those answers get no
    gradient (unchanged, bit for bit) while plain training (alpha 1) pushes them down; the rows of the
    answers it holds are trained either way."""
    import torch

    from hffm.training import train_local

    data, model, names, start = _device_0_0(small_cfg)
    task = sorted(data)[0]
    present = torch.tensor(data[task].label_counts()) > 0
    assert present.any() and not present.all(), "the fixture's device should miss some answers"
    head = f"head.{task}"
    last = max(k for k, v in start[head].items() if v.ndim == 2 and v.shape[0] == present.numel())

    def rows_after(alpha: float) -> torch.Tensor:
        for n in names:
            model.load_module_state(n, start[n])
        train_local(
            model, {task: data[task]}, names, small_cfg.train.model_copy(update={"restricted_softmax": alpha}), "cpu", 7
        )
        return model.module_state(head)[last] - start[head][last]

    plain, restricted = rows_after(1.0), rows_after(0.0)
    assert plain[~present].abs().sum() > 0 and plain[present].abs().sum() > 0
    assert torch.equal(restricted[~present], torch.zeros_like(restricted[~present]))
    assert restricted[present].abs().sum() > 0
    with pytest.raises(ConfigError, match="restricted_softmax"):
        load_config(None, ["train.restricted_softmax=1.5"])


def test_logit_adjustment_leaves_a_devices_answer_prior_out_of_its_head(small_cfg):
    """train.logit_adjust (balanced softmax): tau * log(the device's answer prior) is added to the logits
    in local training. A device's label skew then stays out of its head: the head's output bias, which
    plain training drives towards the device's most common answer, moves far less towards it with tau 1
    (SGD: steps in proportion to the gradient); tau 0 trains every bit as before, and a negative tau is a
    config error naming the field."""
    import torch

    from hffm.training import train_local

    data, model, names, start = _device_0_0(small_cfg)
    task = sorted(data)[0]
    counts = torch.tensor(data[task].label_counts())
    top = int(counts.argmax())
    assert counts[top] > 0.5 * counts.sum(), "the fixture's device should be skewed towards one answer"
    head = f"head.{task}"
    bias = max(k for k, v in start[head].items() if v.ndim == 1 and k.endswith("bias") and v.numel() == counts.numel())

    def after(update: dict) -> dict[str, torch.Tensor]:
        for n in names:
            model.load_module_state(n, start[n])
        train_local(model, {task: data[task]}, names, small_cfg.train.model_copy(update=update), "cpu", 7)
        return {k: v.clone() for k, v in model.module_state(head).items()}

    def lean(state: dict[str, torch.Tensor]) -> float:
        """How far training moved the top answer's output bias above the others' (mean)."""
        d = state[bias] - start[head][bias]
        return float(d[top] - torch.cat([d[:top], d[top + 1 :]]).mean())

    off, zero = after({}), after({"logit_adjust": 0.0})
    assert off.keys() == zero.keys() and all(torch.equal(off[k], zero[k]) for k in off)
    sgd = {"optimizer": "sgd", "lr": 0.1}  # steps in proportion to the gradient (AdamW's first ones are ~lr each)
    plain, adjusted = after(sgd), after({**sgd, "logit_adjust": 1.0})
    assert lean(plain) > 0 and lean(adjusted) < 0.5 * lean(plain), (lean(plain), lean(adjusted))
    with pytest.raises(ConfigError, match="logit_adjust"):
        load_config(None, ["train.logit_adjust=-1"])


def test_a_skewed_task_trains_its_head_alone(small_cfg):
    """train.head_only_share: a task whose most common local answer holds at least that share of the device's
    samples of it updates its head alone; the shared modules (adapters) learn from the other tasks only. With
    every task skewed (a share the smallest top share reaches) no adapter moves while every head does; with
    the threshold above the skewed task's share training is as with the option off, and the option off
    trains every bit as before; out of (0, 1] is a config error naming the field."""
    import torch

    from hffm.ids import task_of
    from hffm.training import skewed_tasks, train_local

    data, model, names, start = _device_0_0(small_cfg)
    shares = {t: max(td.label_counts()) / len(td) for t, td in data.items()}
    assert len(shares) == 2 and min(shares.values()) < max(shares.values()) < 1, shares

    def after(update: dict) -> dict[str, dict[str, torch.Tensor]]:
        for n in names:
            model.load_module_state(n, start[n])
        train_local(model, data, names, small_cfg.train.model_copy(update=update), "cpu", 7)
        return {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in names}

    def moved(state, n) -> bool:
        return any(not torch.equal(state[n][k], start[n][k]) for k in start[n])

    shared = [n for n in names if task_of(n) is None]
    heads = [n for n in names if task_of(n) in data]
    assert shared and len(heads) == 2
    every = min(shares.values())
    assert skewed_tasks(data, every) == set(data)
    frozen = after({"head_only_share": every})
    assert not any(moved(frozen, n) for n in shared) and all(moved(frozen, n) for n in heads)
    # only the more skewed task trains its head alone: the adapters move, and differently from plain training
    top = max(shares, key=shares.get)
    assert skewed_tasks(data, shares[top]) == {top}
    one, plain = after({"head_only_share": shares[top]}), after({})
    assert all(moved(one, n) for n in shared) and any(
        not torch.equal(one[n][k], plain[n][k]) for n in shared for k in plain[n]
    )
    # above every task's share nothing is skewed: plain training, bit for bit, as with the option off
    above = after({"head_only_share": max(shares.values()) + 1e-3})
    assert all(torch.equal(above[n][k], plain[n][k]) for n in names for k in plain[n])
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="head_only_share"):
            load_config(None, [f"train.head_only_share={bad}"])


def test_feddecorr_penalises_correlated_features_and_spreads_them(small_cfg):
    """train.decorr (FedDecorr, Shi et al. 2023): the loss is N times the mean squared correlation between two
    feature dimensions over the batch (``decorrelation``, against numpy's correlation matrix); local training
    with it leaves the device's pooled features less correlated than plain training does, moving the adapters
    differently, and off it changes nothing. Negative is a config error naming the field."""
    import torch

    from hffm.ids import task_of
    from hffm.training import decorrelation, train_local

    z = torch.randn(24, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * torch.arange(1, 11)
    corr = np.corrcoef(z.numpy(), rowvar=False)
    off = corr[~np.eye(10, dtype=bool)]
    n = len(z)  # zᵀz of the standardised features is (N - 1) times the correlation matrix
    assert float(decorrelation(z)) == pytest.approx((n - 1) ** 2 * float(np.mean(off**2)) / n, rel=1e-4)
    assert float(decorrelation(z[:, :1].repeat(1, 4))) == pytest.approx((n - 1) ** 2 / n, rel=1e-4)  # collapsed

    data, model, names, start = _device_0_0(small_cfg)
    train = small_cfg.train.model_copy(update={"local_epochs": 3})

    def after(beta: float) -> tuple[dict, float]:
        for n in names:
            model.load_module_state(n, start[n])
        train_local(model, data, names, train.model_copy(update={"decorr": beta}), "cpu", 7)
        with torch.no_grad():
            spread = sum(
                float(decorrelation(model.pooled(td.batch(torch.arange(len(td))), t))) for t, td in data.items()
            )
        return {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in names}, spread

    plain, plain_corr = after(0.0)
    again, again_corr = after(0.0)
    assert again_corr == plain_corr and all(torch.equal(again[n][k], plain[n][k]) for n in names for k in plain[n])
    spread, spread_corr = after(1.0)
    assert spread_corr < 0.9 * plain_corr, (spread_corr, plain_corr)  # 6.2 against 7.9 here
    assert any(not torch.equal(spread[n][k], plain[n][k]) for n in names if task_of(n) is None for k in plain[n])
    with pytest.raises(ConfigError, match="decorr"):
        load_config(None, ["train.decorr=-1"])


def test_sgd_steps_scale_with_the_gradient_where_a_fresh_adamw_moves_every_weight_by_about_lr(small_cfg):
    """train.optimizer: one local step on one batch. SGD's step is -lr x gradient (twice the lr, twice the
    step; a weight with a tiny gradient barely moves), a fresh AdamW's is about lr on every weight with a
    gradient, however small (why a device that already fits its answers still drifts). momentum is SGD's:
    set with AdamW it is a config error naming the field."""
    import torch

    from hffm.training import train_local

    data, model, names, start = _device_0_0(small_cfg)
    task = sorted(data)[0]

    def step(**update) -> torch.Tensor:
        for n in names:
            model.load_module_state(n, start[n])
        cfg = small_cfg.train.model_copy(update={"batch_size": len(data[task]), "local_epochs": 1, **update})
        stats = train_local(model, {task: data[task]}, names, cfg, "cpu", 7)
        assert stats.steps == 1
        d = [(v - start[n][k]).reshape(-1) for n in names for k, v in model.module_state(n).items()]
        return torch.cat(d)

    a, b = step(optimizer="sgd", lr=1e-3), step(optimizer="sgd", lr=2e-3)
    moved = a.abs() > 0
    assert moved.sum() > 100
    assert torch.allclose(b[moved], 2 * a[moved], rtol=1e-2, atol=1e-7)  # fp32 rounding of w + step
    assert a.abs().max() / a[moved].abs().median() > 10  # steps follow the gradient's size
    adam = step(optimizer="adamw", lr=1e-3)
    big = adam.abs() > 0
    # a fresh Adam's first step is lr x g / (|g| + eps): about lr wherever the gradient is not ~eps
    assert (adam[big].abs() > 0.5e-3).float().mean() > 0.8
    with pytest.raises(ConfigError, match="train.momentum"):
        load_config(None, ["train.momentum=0.9"])
    assert load_config(None, ["train.optimizer=sgd", "train.momentum=0.9"]).train.momentum == 0.9


def test_claims_are_bounded_by_a_multiple_of_their_tasks_median_and_the_plan_carries_the_bounds():
    """aggregation.claim_bound k: a device's own update counts with at most k x the median claim of its
    task (a liar registering 1000 samples among devices claiming 10-30 counts as 2 x 20); honest claims
    under the bound keep their caps and get no bound; aggregates (an edge's) are not bounded."""
    from hffm.methods import bound_claims

    claims = {"device-0-0": 1000, "device-0-1": 20, "device-1-0": 10, "device-1-1": 30}
    samples = {d: {"art": n} for d, n in claims.items()}
    assert bound_claims(samples, 2.0) == {
        "device-0-0": {"art": 50},  # median of (10, 20, 30, 1000) is 25
        "device-0-1": {"art": 20},
        "device-1-0": {"art": 10},
        "device-1-1": {"art": 30},
    }
    cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=2", "tasks=[art]", "method=hfm"])
    topo = Topology.from_config(cfg, 2)
    plan = make_method("hfm", 2).plan(1, topo).with_weight_caps(samples, topo, 2.0)
    edge0 = next(s for s in plan.steps["edge-0"] if isinstance(s, Collect))
    assert edge0.caps_of("device-0-0")["head.art"] == 1000  # what it may claim: its registration
    assert edge0.bounds_of("device-0-0")["head.art"] == 50 and edge0.bounds_of("device-0-0")["adapter.0"] == 50
    assert edge0.bounds_of("device-0-1") == {}  # under its bound: counted as registered
    cloud = [s for s in plan.steps.get("cloud", []) if isinstance(s, Collect)]
    assert all(not c.weight_bounds for c in cloud)
    assert plan.with_weight_caps(samples, topo).steps["edge-0"] == [
        replace(s, weight_bounds=()) if isinstance(s, Collect) else s for s in plan.steps["edge-0"]
    ]
    with pytest.raises(ConfigError, match="claim_bound"):
        load_config(None, ["aggregation.claim_bound=0.5"])


def test_an_aggregate_may_weigh_what_its_devices_may_each_at_least_one_where_one_holds_no_sample():
    """A device holding no sample of a task still weighs 1 (``update_weight``'s floor), so an edge's aggregate
    of that task may weigh its devices' caps summed, floors included: the registered total alone (0 + 5 + 7 +
    9 = 21) refused an honest edge's push of 22 (found with ``adversary.behaviour: absent``, whose devices
    hold nothing). Devices that do not hold the task add nothing; a device's own cap is its registration."""
    cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=2", "tasks=[art,gqa]", "method=hfm"])
    topo = Topology.from_config(cfg, 2)
    samples = {
        "device-0-0": {"art": 0, "gqa": 4},
        "device-0-1": {"art": 5, "gqa": 0},
        "device-1-0": {"art": 7, "gqa": 3},
        "device-1-1": {"art": 9, "gqa": 2},
    }
    plan = make_method("hfm", 2).plan(2, topo).with_weight_caps(samples, topo)
    edge0 = next(s for s in plan.steps["edge-0"] if isinstance(s, Collect))
    assert edge0.caps_of("device-0-0")["head.art"] == 1 and edge0.caps_of("device-0-1")["head.art"] == 5
    cloud = next(s for s in plan.steps["cloud"] if isinstance(s, Collect))
    assert cloud.caps_of("edge-0")["head.art"] == 1 + 5 + 7 + 9  # was 21: edge-0's 1 + 5 = 6 of it refused
    assert cloud.caps_of("edge-0")["head.gqa"] == 4 + 1 + 3 + 2
    assert cloud.caps_of("edge-0")["adapter.0"] == 4 + 5 + 10 + 11
    one = load_config(
        None,
        [
            "topology.edges=2",
            "topology.devices_per_edge=2",
            "tasks=[art,gqa]",
            "method=hfm",
            "topology.tasks_per_device=1",
        ],
    )
    topo1 = Topology.from_config(one, 2)
    held = {d.id: {t: 3 for t in d.tasks} for d in topo1.devices}
    cloud1 = next(
        s
        for s in make_method("hfm", 2).plan(2, topo1).with_weight_caps(held, topo1).steps["cloud"]
        if isinstance(s, Collect)
    )
    holders = sum("art" in d.tasks for d in topo1.devices)
    assert 0 < holders < 4 and cloud1.caps_of("edge-0")["head.art"] == 3 * holders


def test_the_cosine_schedule_falls_from_lr_to_its_final_fraction_over_the_rounds():
    """train.lr_schedule: constant is train.lr every round; cosine starts at train.lr in round 1, is halfway
    at the middle round, ends at lr x lr_final in the last and stays there for rounds beyond it; it never
    rises. lr_final outside (0, 1] is a config error naming the field."""
    from hffm.training import round_lr

    const = load_config(None, ["train.lr=0.01"]).train
    assert {round_lr(const, r, 11) for r in range(1, 15)} == {0.01}
    cos = load_config(None, ["train.lr=0.01", "train.lr_schedule=cosine", "train.lr_final=0.1"]).train
    lrs = [round_lr(cos, r, 11) for r in range(1, 15)]
    assert lrs[0] == 0.01 and lrs[5] == pytest.approx(0.0055) and lrs[10] == pytest.approx(0.001)
    assert lrs[11:] == [pytest.approx(0.001)] * 3
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert round_lr(cos, 1, 1) == 0.01  # a one-round run trains at train.lr
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="lr_final"):
            load_config(None, [f"train.lr_final={bad}"])
