"""The benchmark harness runs and writes what it promises (no timing asserts: benchmarks check speed,
tests check behaviour). The aggregator's memory bound is behaviour: O(one module set)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from benchmarks.common import MemoryWatch, paper_modules
from hffm_cli.main import app


def test_the_memory_watch_sees_a_process_and_keeps_its_own_cpu_to_its_duty(tmp_path):
    """MemoryWatch finds a child holding 300 MB by its command line (PSS: touched pages), and however short
    its period, its own CPU stays within its duty of the wall time (plus one sample): the sampler must not
    take the machine from the run it measures."""
    import subprocess
    import sys
    import time

    marker = str(tmp_path / "holder-marker")
    code = "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, marker])
    try:
        time.sleep(1.5)  # the child has touched its pages
        t0 = time.monotonic()
        with MemoryWatch(marker, period_s=0.01, duty=0.02) as watch:
            time.sleep(2.0)
        wall = time.monotonic() - t0
    finally:
        child.kill()
        child.wait()
    assert watch.peak > 250 << 20 and watch.samples >= 1
    assert watch.cpu_s <= 0.02 * wall + watch.cpu_s / watch.samples + 0.01, (watch.cpu_s, watch.samples, wall)


def test_bench_quick_writes_its_outputs(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "transfer_ratio",
        "aggregation_ratio",
        "aggregator_peak_sets",
        "flower_round_ratio",
        "max_devices",
        "security_round_ratio",
    ):
        assert key in b
    sec = b["details"]["security"]  # both sides ran (--quick: one run each), rounds 2-4 each
    assert len(sec["rounds_tls"]) == len(sec["rounds_plaintext"]) == 3 and sec["ratio"] > 0
    assert "| security_round_ratio |" in (tmp_path / "bench.md").read_text()
    assert b["transfer_ratio"] > 0 and b["aggregation_ratio"] > 0
    tr = b["details"]["transfer"]
    assert 37e6 < tr["fp32"]["bytes"] < 39e6  # the paper-size module set, measured on the wire
    assert 0.45 < tr["fp16"]["bytes"] / tr["fp32"]["bytes"] < 0.55
    assert b["aggregator_peak_sets"] <= 3  # running sum: not one copy per sender
    dv = b["details"]["devices"]
    # the harness, not the figure: two points on a busy machine (the suite runs two test files at once) can
    # give a round at 8 devices no longer than at 4, so the fit is checked to exist, not its sign
    assert b["max_devices"] == 8 and math.isfinite(dv["fit"]["slope_s_per_device"]), dv.get("error")
    assert [p["devices"] for p in dv["points"]] == [4, 8] and all(p["ms_per_device"] > 0 for p in dv["points"])
    assert dv["model"] == "tiny" and b["device_round_ms"] == dv["points"][-1]["ms_per_device"] > 0
    dvp = b["details"]["devices_paper"]  # the paper-size module set, training on, stated as such
    assert b["max_devices_paper"] == 2 and 37e6 < dvp["module_set_bytes"] < 39e6, dvp.get("error")
    assert all(p["pss_per_device_bytes"] > 0 for p in dv["points"] + dvp["points"])
    tta = b["time_to_accuracy"]
    assert set(tta["methods"]) == {"star", "hfm", "hfm-d2d"}
    for x in tta["methods"].values():  # reached or not, the record says which
        assert (x["round"] is None) == (x["wall_s"] is None)
    md = (tmp_path / "bench.md").read_text()
    assert "| transfer_ratio (fp32) |" in md and "| transfer_ratio_bulk (fp32) |" in md
    assert b["transfer_ratio_bulk"] == tr["fp32"]["bulk_ratio"] > 0
    assert (tmp_path / "transfer.png").stat().st_size > 5_000
    bounds = tr["bounds"]
    assert bounds["grpc_bare_gbps"] > 0 and bounds["socket_blake3_gbps"] > 0
    assert tr["fp32"]["receiver_cpu_s"] > 0 and tr["fp32"]["sender_cpu_s"] > 0
    tls = tr["tls"]  # the push over mTLS (signed) and its limit, a TLS socket with gRPC's cipher
    assert tls["bytes"] == tr["fp32"]["bytes"] and tls["cipher"] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert tls["hffm_gbps"] > 0 and tls["tls_socket_gbps"] > 0 and b["transfer_tls_ratio"] == tls["ratio"]
    assert (
        tls["socket_blake3_gbps"] > 0 and tls["socket_blake3_ratio"] > 0
    )  # its bound: the receiver checked each digest
    assert "| transfer_tls_ratio (fp32, mTLS) |" in (tmp_path / "bench.md").read_text()
    fl = b["details"]["flower"]["points"][0]
    assert fl["clients"] == 2 and fl["hffm"]["devices"] == 2 and len(fl["hffm"]["rounds_s"]) == 3
    assert fl["hffm"]["method"] == "star" and fl["hffm_hfm"] is None  # --quick: the headline's side alone
    if fl["flower"] is None:  # Flower is installed from PyPI into build/flower-venv
        pytest.skip(f"Flower could not run here: {fl['error']}")
    payload = sum(t.numel() * 4 for m in paper_modules().values() for t in m.tensors.values())
    # --quick: 3 rounds (SuperLink 2), the first left out of the median; the same payload went both ways,
    # in both Flower configurations: FedAvg returns arrays of its size
    f = fl["flower"]  # the persistent-client path (start_server + NumPyClient): the headline's baseline
    assert f["payload_bytes"] == payload and len(f["rounds_s"]) == 3 and f["peak_pss_bytes"] > 0
    assert b["flower_round_ratio"] == fl["ratio"] == fl["hffm"]["round_s"] / f["round_s"] > 0
    s = fl["superlink"]
    assert s is not None, fl.get("superlink_error")
    assert s["payload_bytes"] == payload and len(s["rounds_s"]) == 2 and b["flower_round_ratio_superlink"] > 0


def test_realdata_writes_its_table_and_plot_and_reuses_what_it_ran(tmp_path):
    """benchmarks.realdata (the easy-VQA comparison in docs/results.md), quick: the centralised bound and
    one federated method as real services; a second call with the same settings reruns nothing."""
    from benchmarks.realdata import main

    main(["--quick", "--methods", "hfm", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "realdata.json").read_text())
    assert set(res["methods"]) == {"hfm"} and set(res["centralised"]["accuracy"]) == {"color", "shape", "yesno"}
    assert [x for x, _ in res["curves"]["centralised"]] == [1, 2] and res["methods"]["hfm"]["bytes"] > 0
    table = (tmp_path / "realdata.md").read_text()
    assert "| centralised |" in table and "| hfm |" in table and (tmp_path / "realdata.png").stat().st_size > 0
    # the table states its split: what `hffm partition` reports for the same settings
    from benchmarks.realdata import split_summary
    from hffm.config import load_config

    split = split_summary(load_config(None, res["sets"]))
    assert res["split"] == json.loads(json.dumps(split)) and set(split) == {"color", "shape", "yesno"}
    y = split["yesno"]
    assert f"yesno: {y['single_answer']} of {y['devices']} devices hold one answer" in table
    kept = (tmp_path / "hfm.json").stat().st_mtime_ns
    main(["--quick", "--methods", "hfm", "--out", str(tmp_path)])
    assert (tmp_path / "hfm.json").stat().st_mtime_ns == kept
    # a variant (FedProx) in the same folder: its own row; the centralised bound (which ignores it) is kept
    central = (tmp_path / "centralised.json").stat().st_mtime_ns
    main(["--quick", "--methods", "hfm", "--out", str(tmp_path), "--set", "train.prox_mu=0.01", "--label", "prox"])
    res = json.loads((tmp_path / "realdata.json").read_text())
    assert set(res["methods"]) == {"hfm (prox)"} and (tmp_path / "hfm-prox.json").is_file()
    assert (tmp_path / "centralised.json").stat().st_mtime_ns == central
    assert (tmp_path / "hfm.json").stat().st_mtime_ns == kept
    # a result made by other code is made again
    f = tmp_path / "centralised.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "code": "other"}))
    main(["--quick", "--methods", "hfm", "--out", str(tmp_path)])
    assert json.loads(f.read_text())["code"] != "other" and (tmp_path / "hfm.json").stat().st_mtime_ns == kept


def test_checkpoint_bench_saves_the_same_modules_once_when_shared(tmp_path):
    """``benchmarks.checkpoints``: both ways save every round of every node (each loads back), and the
    shared way holds one file per round where the other holds one per node."""
    from benchmarks.checkpoints import compare
    from hffm.persist import Persistor

    r = compare(tmp_path, nodes=3, repeat=2)
    assert r["own"] > 0 and r["shared"] > 0 and r["ratio"] == r["shared"] / r["own"]
    for way in ("own", "shared"):
        for i in range(3):
            p = Persistor(tmp_path / way / f"device-0-{i}")
            assert p.available() == [(2, 0), (3, 0)]  # a warm-up round, two timed ones; two kept
            assert p.load().modules
    # own: 3 nodes x 2 round ends; shared: each round's bytes once (3: a file no round end links any more
    # is kept for a minute)
    size = r["disk_bytes"]["own"] / 6
    assert r["disk_bytes"]["shared"] == pytest.approx(3 * size, rel=0.01)
    own_files = {f.stat().st_ino for f in (tmp_path / "own").rglob("modules.safetensors")}
    shared_files = {f.stat().st_ino for f in (tmp_path / "shared").rglob("modules.safetensors")}
    assert len(own_files) == 6 and len(shared_files) == 2


def test_leave_one_out_scores_every_sender_of_an_edge_and_removes_greedily(tmp_path):
    """benchmarks.loo on a real attacked run (label flippers registering 20x their samples, copies traced):
    every sender of the edge in every round gets a gain (the score without it minus with all); greedy
    removal starts with the largest gain when it exceeds the tolerance, never removes below a majority,
    and with an infinite tolerance removes nobody."""
    import io

    from rich.console import Console

    from benchmarks.attacks import BASE, QUICK
    from benchmarks.loo import leave_one_out, mean_gains, scorer
    from hffm.config import load_config
    from hffm.modules import load_modules
    from services.launcher import run

    trace = tmp_path / "trace"
    sets = [*BASE, *QUICK, "adversary.behaviour=label_flip", "adversary.claim=20", f"runtime.trace_dir={trace}"]
    run(load_config(None, sets), tmp_path / "run", Console(file=io.StringIO()), timeout_s=300)
    senders = {f"device-1-{i}" for i in range(5)}
    got = leave_one_out(tmp_path / "run", trace, "edge-1", tolerance=0.0)
    assert sorted(got) == [1, 2]
    for v in got.values():
        assert set(v["gain"]) == senders and 0 <= v["all"] <= 1
        removed = [s for s, _ in v["removed"]]
        assert set(removed) <= senders and len(removed) <= len(senders) - (len(senders) // 2 + 1)
        top, best = max(v["gain"].items(), key=lambda kv: kv[1])
        assert (removed[:1] == [top]) if best > 0 else removed == []
        assert all(g > 0 for _, g in v["removed"])
    means = mean_gains(got)
    assert set(means) == senders
    assert all(abs(means[s] - sum(v["gain"][s] for v in got.values()) / 2) < 1e-12 for s in senders)
    none = leave_one_out(tmp_path / "run", trace, "edge-1", tolerance=float("inf"))
    assert all(v["removed"] == [] and v["gain"] == got[r]["gain"] for r, v in none.items())
    # in the round's context (cloud rounds only: round 2 here), every sender kept scores what the cloud made
    score, _ = scorer(tmp_path / "run")
    in_round = leave_one_out(tmp_path / "run", trace, "edge-1", tolerance=0.0, context="round")
    assert sorted(in_round) == [2] and set(in_round[2]["gain"]) == senders
    assert in_round[2]["all"] == score(load_modules(str(trace / "cloud" / "r2-aggregate-aggregate.safetensors")))
    # with the last global modules: every round, and round 1's (before any cloud round) differs from alone
    last = leave_one_out(tmp_path / "run", trace, "edge-1", tolerance=0.0, context="last")
    assert sorted(last) == [1, 2] and (last[1]["all"], last[1]["gain"]) != (got[1]["all"], got[1]["gain"])
    # scored by per-answer ranking (AUC): the same rounds and senders, on its own scale
    auc = leave_one_out(tmp_path / "run", trace, "edge-1", tolerance=float("inf"), metric="auc")
    assert sorted(auc) == [1, 2] and all(set(v["gain"]) == senders and 0 <= v["all"] <= 1 for v in auc.values())
    assert [v["all"] for v in auc.values()] != [v["all"] for v in got.values()]


def test_macro_auc_is_the_rank_statistic_and_ignores_a_learned_prior():
    """benchmarks.loo's ``--metric auc``: per answer, the one-vs-rest ROC AUC of its logit equals the
    Mann-Whitney rank statistic (ties at mid-ranks), averaged over the answers present; adding a per-answer
    offset to the logits (what a device's answer prior puts into a head's bias) leaves it unchanged, while
    accuracy moves."""
    import torch

    from benchmarks.loo import macro_auc_of

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[:3] = -1  # outside the vocabulary: skipped
    logits = torch.randint(-3, 4, (60, 5), generator=g).float()  # small integers: many ties

    def rank_auc(scores, positive):
        order = scores.argsort()
        ranks = torch.empty_like(scores)
        ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
        for v in scores.unique():  # mid-ranks for ties
            tie = scores == v
            ranks[tie] = ranks[tie].mean()
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

    valid = labels >= 0
    expected = [rank_auc(logits[valid, k].double(), labels[valid] == k) for k in labels[valid].unique().tolist()]
    # the reference ranks within the valid questions; ours compares against every other question, -1 too
    ours_valid = macro_auc_of(logits[valid], labels[valid])
    assert abs(ours_valid - sum(expected) / len(expected)) < 1e-9
    offset = torch.tensor([5.0, -2.0, 0.5, 9.0, -4.0])
    assert macro_auc_of(logits + offset, labels) == macro_auc_of(logits, labels)
    assert not torch.equal((logits + offset).argmax(-1), logits.argmax(-1))


def _screen_model(sets: list[str]):
    """(config, tokenizer, model) as the screen builds them."""
    from hffm.config import load_config
    from hffm.data import load_tokenizer, task_labels
    from hffm.model import build_model

    cfg = load_config(None, sets)
    tok = load_tokenizer(cfg)
    return cfg, tok, build_model(cfg, len(tok), task_labels(cfg))


def _bitwise_equal(a: dict, b: dict) -> bool:
    """Two module sets hold the same tensors, bit for bit."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[n].tensors[k], b[n].tensors[k]) for n in a for k in a[n].tensors)


def _skewed_federation():
    """(config, model, {device: its training data}, the federation's merged feature statistics) of a small
    Dirichlet(0.1) federation, as the screen builds them: what the screen's remedies from statistics start from."""
    from hffm.calibration import feature_stats, merge
    from hffm.data import build_device_data
    from hffm.topology import split_table

    cfg, tok, model = _screen_model(["data.alpha=0.1", "data.train_per_task=160", "train.local_epochs=3"])
    topo = split_table(cfg)
    holders = topo.holders_by_task()
    data = {d: build_device_data(cfg, d, holders, tok, topo.device_map[d].tasks).train for d in topo.device_map}
    return cfg, model, data, merge([feature_stats(model, data[d], "cpu") for d in sorted(data)])


def test_the_screen_reproduces_a_real_hfm_run(golden_run):
    """benchmarks.screen (hfm's round plan in one process) against the golden run's real services (hfm-d2d:
    D2D changes who aggregates a cluster, not the aggregate): the same global accuracy at every cloud round
    (within a sample of the 64), and final global modules within a small fraction of how far training moved
    them (the cloud folds in float32, the screen in float64; AdamW turns such differences into steps)."""
    from benchmarks.screen import screen
    from hffm.config import load_config
    from hffm.modules import load_modules

    golden, _, out = golden_run
    sets = [s for s in golden["sets"] if not s.startswith(("method=", "d2d."))] + ["method=hfm"]
    curve, mods = screen(load_config(None, sets), "plain", log=lambda _: None)
    results = json.loads((out / "results.json").read_text())
    real = {r["round"]: r["accuracy"] for r in results["rounds"] if r["cloud_aggregation"] and r["accuracy"]}
    assert [c["round"] for c in curve] == sorted(real) == [2, 4]
    for c in curve:
        for task, acc in c["accuracy"].items():
            assert abs(acc - real[c["round"]][task]["global"]) <= 1 / 64 + 1e-9, (c["round"], task)
    ref = load_modules(str(out / "global_modules.safetensors"))
    _, _, model = _screen_model(sets)
    off = moved = 0.0
    for n, m in mods.items():
        for k, v in m.tensors.items():
            off += float((v - ref[n].tensors[k]).abs().sum())
            moved += float((ref[n].tensors[k] - model.module_state(n)[k]).abs().sum())
    assert off < moved / 50, (off, moved)


def test_the_virtual_remedy_trains_a_device_s_heads_on_answers_it_does_not_hold():
    """The screen's ``virtual`` remedy: each batch adds the cross-entropy of the device's head on as many
    features drawn from the federation's statistics (answers in the global prior). A device's heads trained
    on its own data alone learn its prior: the draws of the answers it does not hold get a high loss; with the
    virtual features a lower one. With weight 0 training is plain training, bit for bit."""
    import torch

    from benchmarks.screen import _snapshot, _virtual_loss
    from hffm.calibration import virtual_features
    from hffm.ids import head_name
    from hffm.training import train_local

    cfg, model, data, stats = _skewed_federation()
    names = model.module_names()
    start = _snapshot(model, names, 0, {})
    task, dev = next(
        (t, d) for d in sorted(data) for t, td in data[d].items()
        if 0 < len(set(td.labels.tolist())) < int((stats[t].count > 0).sum())
    )  # fmt: skip
    heads = [head_name(t) for t in data[dev]]
    absent = [
        c
        for c in range(len(stats[task].count))
        if stats[task].count[c] > 0 and c not in set(data[dev][task].labels.tolist())
    ]
    feats, labels = virtual_features(stats[task], 1.0, seed=3)
    keep = torch.isin(labels, torch.tensor(absent))

    def trained(weight: float | None) -> tuple[float, dict]:
        for n in names:
            model.load_module_state(n, start[n].tensors)
        extra = _virtual_loss(model, stats, weight, 5, "cpu") if weight is not None else None
        train_local(model, data[dev], heads, cfg.train, "cpu", seed=7, extra_loss=extra)
        with torch.no_grad():  # how likely its head finds the absent answers' draws to be what they are
            logits = model.module(head_name(task))(feats[keep])
            loss = torch.nn.functional.cross_entropy(logits, labels[keep])
        return float(loss), _snapshot(model, names, 1, {})

    plain, plain_mods = trained(None)
    zero, zero_mods = trained(0.0)
    virtual, _ = trained(1.0)
    assert _bitwise_equal(plain_mods, zero_mods)
    assert plain == zero
    assert virtual < plain - 0.3, (virtual, plain)  # 2.33 against 2.93 nats here


def test_the_moon_remedy_pulls_a_device_s_features_to_the_start_s_and_from_its_last_round_s():
    """The screen's ``moon`` remedy (MOON's model-contrastive loss): local training keeps the device's pooled
    features closer, by cosine, to those of the modules it started from than plain training does, and further
    from those of its own last round's; with μ = 0 it is plain training, bit for bit."""
    import copy

    import torch

    from benchmarks.screen import _moon_loss, _snapshot
    from hffm.data import build_device_data
    from hffm.modules import ModuleSet
    from hffm.topology import split_table
    from hffm.training import train_local

    cfg, tok, model = _screen_model(["data.alpha=0.1", "data.train_per_task=160", "train.local_epochs=3"])
    topo = split_table(cfg)
    holders = topo.holders_by_task()
    dev = sorted(topo.device_map)[0]
    data = build_device_data(cfg, dev, holders, tok, topo.device_map[dev].tasks).train
    names = model.module_names()
    start = _snapshot(model, names, 0, {})
    anchor = copy.deepcopy(model).eval()

    def trained(mods: ModuleSet, mu: float | None, prev: ModuleSet) -> ModuleSet:
        for n in names:
            model.load_module_state(n, mods[n].tensors)
        extra = _moon_loss(anchor, names, mods, prev, mu, 0.5) if mu is not None else None
        train_local(model, data, names, cfg.train, "cpu", seed=7, extra_loss=extra)
        return _snapshot(model, names, 1, {})

    last = trained(start, None, start)  # the device's round 1, plain: where its skew took its features

    def cosine_to(mods: ModuleSet, ref: ModuleSet) -> float:
        sims = []
        for task, td in data.items():
            batch = td.batch(torch.arange(len(td)), "cpu")
            with torch.no_grad():
                for n in names:
                    model.load_module_state(n, mods[n].tensors)
                z = model.pooled(batch, task)
                for n in names:
                    model.load_module_state(n, ref[n].tensors)
                zr = model.pooled(batch, task)
            sims.append(torch.nn.functional.cosine_similarity(z, zr, dim=-1).mean())
        return float(torch.stack(sims).mean())

    plain = trained(start, None, last)
    zero = trained(start, 0.0, last)
    moon = trained(start, 1.0, last)
    assert _bitwise_equal(plain, zero)
    assert cosine_to(moon, start) > cosine_to(plain, start) + 0.01, (cosine_to(moon, start), cosine_to(plain, start))
    assert cosine_to(moon, last) < cosine_to(plain, last), (cosine_to(moon, last), cosine_to(plain, last))


def test_the_proto_remedy_keeps_a_device_s_features_at_the_federation_s_answer_means():
    """The screen's ``proto`` remedy (FedPAC's feature alignment): each batch adds λ x the mean squared distance of
    its samples' pooled features from their answers' means in the federation's statistics. A skewed device
    trained with it ends with its features nearer those means than plain training leaves them; with λ = 0 it is
    plain training, bit for bit. Without the cloud's statistics the remedy is refused."""
    import torch

    from benchmarks.screen import _proto_loss, _snapshot, screen
    from hffm.training import train_local

    cfg, model, data, stats = _skewed_federation()
    names = model.module_names()
    start = _snapshot(model, names, 0, {})
    dev = sorted(data)[0]
    means = {t: stats[t].total / stats[t].count.clamp_min(1).unsqueeze(1) for t in stats}

    def trained(weight: float | None) -> tuple[float, dict]:
        for n in names:
            model.load_module_state(n, start[n].tensors)
        extra = _proto_loss(stats, weight) if weight is not None else None
        train_local(model, data[dev], names, cfg.train, "cpu", seed=7, extra_loss=extra)
        model.eval()
        dist = []
        with torch.no_grad():  # how far the device's features ended from the federation's answer means
            for task, td in data[dev].items():
                batch = td.batch(torch.arange(len(td)), "cpu")
                z = model.pooled(batch, task).double()
                dist.append((z - means[task][batch["labels"]]).pow(2).sum(-1).mean())
        return float(torch.stack(dist).mean()), _snapshot(model, names, 1, {})

    plain, plain_mods = trained(None)
    zero, zero_mods = trained(0.0)
    proto, _ = trained(1.0)
    assert _bitwise_equal(plain_mods, zero_mods)
    assert plain == zero
    assert proto < plain / 2, (proto, plain)
    with pytest.raises(ValueError, match="--calibrate cloud"):
        screen(cfg, "proto", log=lambda _: None)


def test_scaffold_corrects_every_step_and_keeps_the_mean_raw_gradient():
    """The screen's SCAFFOLD hook with SGD (no momentum), where a run's displacement is exactly -lr x the sum
    of the gradients stepped on: every parameter moves by -lr x (its batches) x (its new c_i + c - c_i), i.e.
    the correction is added at every step and c_i is the mean raw gradient over the batches that reached
    it (a head only its task's); with c = c_i the run is plain training, bit for bit."""
    import torch

    from benchmarks.screen import _scaffold_hook, _snapshot, _zeros
    from hffm.data import build_device_data
    from hffm.ids import task_of
    from hffm.modules import Module
    from hffm.topology import split_table
    from hffm.training import train_local

    sets = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
            "model.bottleneck=16", "model.head_hidden=32", "data.train_per_task=160", "train.optimizer=sgd",
            "train.lr=0.05", "train.batch_size=16"]  # fmt: skip
    cfg, tok, model = _screen_model(sets)
    topo = split_table(cfg)
    dev = sorted(topo.device_map)[0]
    data = build_device_data(cfg, dev, topo.holders_by_task(), tok, topo.device_map[dev].tasks).train
    samples = {t: len(td) for t, td in data.items()}
    names = model.module_names()
    start = _snapshot(model, names, 0, samples)
    g = torch.Generator().manual_seed(1)
    c = {
        n: Module(n, {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in m.tensors.items()}, 0, 1.0)
        for n, m in start.items()
    }

    def trained(c=None, c_i=None):
        for n in names:
            model.load_module_state(n, start[n].tensors)
        hook, grads = _scaffold_hook(model, names, c, c_i) if c is not None else (None, None)
        train_local(model, data, names, cfg.train, "cpu", seed=7, on_grad=hook)
        return _snapshot(model, names, 1, samples), grads(samples) if grads else None

    end, new_c = trained(c, _zeros(start))
    batches = {t: -(-n // cfg.train.batch_size) for t, n in samples.items()}
    for n in names:
        steps = batches[task_of(n)] if task_of(n) else sum(batches.values())
        for k, v in end[n].tensors.items():
            want = start[n].tensors[k] - cfg.train.lr * steps * (new_c[n].tensors[k] + c[n].tensors[k])
            assert torch.allclose(v, want, atol=1e-5), (n, k)
    plain, _ = trained()
    same, _ = trained(c, c)
    keys = [(n, k) for n in names for k in plain[n].tensors]
    assert all(torch.equal(same[n].tensors[k], plain[n].tensors[k]) for n, k in keys)
    assert not all(torch.equal(end[n].tensors[k], plain[n].tensors[k]) for n, k in keys)


def test_fedadam_steps_by_adam_on_the_cloud_pseudo_gradient():
    """The screen's FedAdam step over two cloud rounds against Adam written out (β 0.9, 0.99, no bias
    correction): each tensor moves by η m / (√v + τ) from the last global, m and v kept between rounds;
    the aggregate's version and weight are kept."""
    import torch

    from benchmarks.screen import _adam_step
    from hffm.modules import Module

    g = torch.Generator().manual_seed(3)
    glob = {"head.a": Module("head.a", {"w": torch.randn(4, 3, generator=g)}, 2, 5.0)}
    moments: dict = {}
    m = v = torch.zeros(4, 3)
    for r in (1, 2):
        agg = {
            "head.a": Module(
                "head.a", {"w": glob["head.a"].tensors["w"] + 0.1 * torch.randn(4, 3, generator=g)}, r, 7.0
            )
        }
        delta = agg["head.a"].tensors["w"] - glob["head.a"].tensors["w"]
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta**2
        want = glob["head.a"].tensors["w"] + 0.02 * m / (v.sqrt() + 1e-3)
        glob = _adam_step(glob, agg, moments, lr=0.02, tau=1e-3)
        assert torch.allclose(glob["head.a"].tensors["w"], want)
        assert (glob["head.a"].version, glob["head.a"].num_samples) == (r, 7.0)


def test_feddisco_weighs_a_device_by_its_share_less_its_distance_from_the_federation_s_answers():
    """The screen's ``disco`` remedy (FedDisco): each module of a device weighs ReLU(share - a·d + b) in its
    group's average, d the L2 distance of the device's answer distribution from the pooled one; a head by its
    task's share and distance, the shared modules by all samples and the sample-weighted mean distance; a head
    of a task the device holds no samples of weighs (next to) nothing. Written out by hand for three devices."""
    from types import SimpleNamespace as NS

    import torch

    from benchmarks.screen import _disco_weighted
    from hffm.aggregation import weighted_mean
    from hffm.modules import Module

    def task(counts):
        return NS(label_counts=lambda: counts)

    data = {
        "a": NS(train={"yesno": task([50, 50]), "color": task([10, 0, 0, 0])}),
        "b": NS(train={"yesno": task([100, 0])}),
        "c": NS(train={"yesno": task([0, 30]), "color": task([5, 5, 5, 5])}),
    }
    new = {
        d: {n: Module(n, {"w": torch.full((2,), float(i))}, 1, 1.0) for n in ("adapter.0", "head.yesno", "head.color")}
        for i, d in enumerate(data)
    }
    out = dict(zip(data, _disco_weighted(new, ("a", "b", "c"), data, 0.5, 0.1), strict=True))
    yes = [150 / 230, 80 / 230]  # the pooled answer distributions
    col = [15 / 30, 5 / 30, 5 / 30, 5 / 30]

    def dist(counts, pooled):
        total = sum(counts)
        return sum((c / total - p) ** 2 for c, p in zip(counts, pooled, strict=True)) ** 0.5

    d_a = {"yesno": dist([50, 50], yes), "color": dist([10, 0, 0, 0], col)}
    want = {
        ("a", "head.yesno"): 100 / 230 - 0.5 * d_a["yesno"] + 0.1,
        ("b", "head.yesno"): 100 / 230 - 0.5 * dist([100, 0], yes) + 0.1,
        ("c", "head.yesno"): 0.0,  # 30/230 - 0.5 x 0.92 + 0.1 < 0
        ("a", "head.color"): 10 / 30 - 0.5 * d_a["color"] + 0.1,
        ("c", "head.color"): 20 / 30 - 0.5 * dist([5, 5, 5, 5], col) + 0.1,
        ("a", "adapter.0"): 110 / 260 - 0.5 * (100 * d_a["yesno"] + 10 * d_a["color"]) / 110 + 0.1,
        ("b", "adapter.0"): 100 / 260 - 0.5 * dist([100, 0], yes) + 0.1,
    }
    for (d, n), w in want.items():
        assert out[d][n].num_samples == pytest.approx(max(w, 0.0), abs=1e-9), (d, n)
    assert out["b"]["head.color"].num_samples < 1e-9  # b holds no color samples
    c_adapter = 50 / 260 - 0.5 * (30 * dist([0, 30], yes) + 20 * dist([5, 5, 5, 5], col)) / 50 + 0.1
    assert out["c"]["adapter.0"].num_samples == pytest.approx(max(c_adapter, 0.0), abs=1e-9)
    # the average follows the weights: a and b alone carry the yesno head (c's weight is 0)
    w_a, w_b = want["a", "head.yesno"], want["b", "head.yesno"]
    got = weighted_mean(list(out.values()))["head.yesno"].tensors["w"]
    assert torch.allclose(got, torch.full((2,), (0 * w_a + 1 * w_b) / (w_a + w_b)), atol=1e-6)


def test_a_disguised_echo_lies_along_the_step_s_main_directions_at_the_cosine_asked_for():
    """benchmarks.structure --disguise: the push is start + step + noise, the noise in the span of the step's
    top K singular directions (both sides), orthogonal to the step and X times its norm, so the update's cosine
    with the step is 1/sqrt(1 + X^2); a vector gets independent noise of the same relative size."""
    import torch

    from benchmarks.structure import _disguised
    from hffm.modules import Module

    g = torch.Generator().manual_seed(4)
    prev = {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)}
    step = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in prev.items()}
    start = {k: prev[k] + step[k] for k in prev}
    m = _disguised(
        Module("adapter.0", start, 1, 1.0),
        Module("adapter.0", start, 1, 1.0),
        Module("adapter.0", prev, 0, 1.0),
        4,
        2.0,
        torch.Generator().manual_seed(0),
    )
    for k in ("w", "b"):
        u = (m.tensors[k] - start[k]).double().flatten()
        s = step[k].double().flatten()
        assert float(u @ s / u.norm() / s.norm()) == pytest.approx(1 / 5**0.5, abs=1e-5), k
    noise, sw = (m.tensors["w"] - start["w"] - step["w"]).double(), step["w"].double()
    left, _, right = torch.linalg.svd(sw, full_matrices=False)

    def outside(x):  # x less its part in the span of the step's top 4 directions (both sides)
        return x - left[:, :4] @ (left[:, :4].T @ x @ right[:4].T) @ right[:4]

    c = float((outside(noise) * outside(sw)).sum() / (outside(sw) ** 2).sum())
    assert torch.allclose(outside(noise), c * outside(sw), atol=1e-5)  # a top-4 mix, less its part along the step
    assert float(noise.norm()) == pytest.approx(2 * float(step["w"].norm()), rel=1e-5)


def test_precision_benchmark_times_each_precision_against_fp32_and_says_what_it_changes():
    """benchmarks.precision: fp32 is its own baseline (ratio 1, no feature error); bf16 is timed beside it on
    the same epoch and its features differ a little; fp32 must be among the precisions; the basis is stated."""
    from benchmarks.precision import measure

    res = measure("tiny", samples=8, repeat=1, device="cpu", precisions=("fp32", "bf16"))
    assert res["fp32"]["ratio_to_fp32"] == 1.0 and res["fp32"]["feature_error"] == 0.0
    assert res["bf16"]["ratio_to_fp32"] > 0 and 0 < res["bf16"]["feature_error"] < 0.1
    assert res["basis"]["model"] == "tiny" and res["basis"]["samples_per_epoch"] == 16 and "fp16" not in res
    with pytest.raises(ValueError, match="--precisions"):
        measure("tiny", samples=8, repeat=1, device="cpu", precisions=("bf16",))


def test_draws_are_judged_by_each_cell_s_difference_from_its_own_draw_s_clean_run(tmp_path):
    """benchmarks.attacks' draws: every OUT/init-<seed>/attacks.json is one draw of the same matrix; each cell's
    difference is taken from the clean cell of its own draw, and the medians and the worst attack per rule come
    from those paired differences, not from the medians' difference. Draws of other settings are refused."""
    import json

    from benchmarks.attacks import BASE, draw_tables, summarise_draws

    def draw(seed, none, flip, sets=BASE):
        d = tmp_path / "out" / f"init-{seed}"
        d.mkdir(parents=True)
        cells = {"r": {"none": {"accuracy": none, "tpr": None, "fpr": 0.0}}}
        if flip is not None:
            cells["r"]["label_flip"] = {"accuracy": flip, "tpr": 0.5, "fpr": 0.0}
        (d / "attacks.json").write_text(json.dumps({"sets": [*sets, f"model.init_seed={seed}"], "cells": cells}))

    with pytest.raises(ValueError, match="no draws"):
        summarise_draws(tmp_path / "out")
    r = CliRunner().invoke(app, ["attacks", "--summary", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "no draws" in r.output and "--summary" in r.output
    # a draw that ran high and one that ran low: paired, the attack costs 1-3 points in every draw; the medians'
    # difference (0.61 - 0.60) would say +1
    draw(1234, 0.70, 0.69)
    draw(1, 0.60, 0.57)
    draw(2, 0.55, 0.53)
    draw(3, 0.61, None)  # a draw with the clean cell alone
    s = summarise_draws(tmp_path / "out")
    assert s["draws"] == [1, 2, 3, 1234]
    got = s["cells"]["r"]["label_flip"]
    assert got["accuracy"] == [0.57, 0.53, 0.69] and [round(v, 6) for v in got["vs_clean"]] == [-3.0, -2.0, -1.0]
    md = draw_tables(s)
    assert "| r | label_flip | 3 | 0.570 (0.530 to 0.690) | -2.0 (-3.0 to -1.0) | — | 50 % | 0 % |" in md
    assert "| r | -2.0 (label_flip) | — |" in md
    r = CliRunner().invoke(app, ["attacks", "--summary", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0 and (tmp_path / "out" / "draws.md").read_text() == md
    r = CliRunner().invoke(app, ["attacks", "--init-seed", "1", "--init-seed", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "each draw once" in r.output
    # with the attackers-absent yardstick in a draw: its cells are judged against it as well, and it is no attack
    cells = json.loads((tmp_path / "out" / "init-2" / "attacks.json").read_text())
    cells["cells"]["r"]["absent"] = {"accuracy": 0.54, "tpr": 0.0, "fpr": 0.0}
    (tmp_path / "out" / "init-2" / "attacks.json").write_text(json.dumps(cells))
    s = summarise_draws(tmp_path / "out")
    assert [round(v, 6) for v in s["cells"]["r"]["label_flip"]["vs_absent"]] == [-1.0]
    md = draw_tables(s)
    assert "| r | absent | 1 | 0.540 | -1.0 | — | 0 % | 0 % |" in md
    assert "| r | -2.0 (label_flip) | -1.0 (label_flip) |" in md
    draw(4, 0.6, 0.6, sets=[*BASE, "rounds=3"])
    with pytest.raises(ValueError, match="other settings"):
        summarise_draws(tmp_path / "out")


def test_the_gap_to_centralised_is_judged_by_each_draw_s_difference_from_its_own_bound(tmp_path, monkeypatch):
    """benchmarks.gap: each draw (model.init_seed) runs the screened federation and the centralised bound from the
    same initialisation under OUT/init-<seed>; a task's gap is the median of the draws' paired differences, not
    the difference of the medians. A draw kept with the same settings and code is not run again; a draw of other
    settings, or without its bound, is refused."""
    import json

    import benchmarks.gap as gap
    from hffm.config import load_config
    from hffm.modules import load_modules

    out = tmp_path / "gap"
    sets = ["rounds=2", "e_agg=2", "topology.edges=2", "topology.devices_per_edge=2", "data.train_per_task=64"]
    sets += ["data.global_test_per_task=32"]
    args = ["--out", str(out), "--probe-epochs", "3", *(x for s in sets for x in ("--set", s))]
    gap.main([*args, "--init-seed", "1", "--init-seed", "2"])
    s = json.loads((out / "draws.json").read_text())
    assert s["draws"] == [1, 2] and set(s["tasks"]) == set(load_config(None, sets).tasks)
    assert s["probe_epochs"] == 3
    bounds = []
    for i, seed in enumerate((1, 2)):
        d = out / f"init-{seed}"
        fed = json.loads((d / "screen.json").read_text())
        bound = json.loads((d / "centralised.json").read_text())
        probe = json.loads((d / "probe.json").read_text())
        assert fed["sets"][-1] == bound["sets"][-1] == probe["sets"][-1] == f"model.init_seed={seed}"
        assert fed["curve"][-1]["round"] == bound["rounds"][-1]["round"] == 2
        bounds.append(bound["rounds"][0]["loss"])
        cfg = load_config(None, fed["sets"])
        # the kept modules are what each run ended with: its heads as they are (0 epochs) score what it scored
        runs = {side: load_modules(str(d / f"{side}.safetensors")) for side in ("screen", "centralised")}
        as_they_are = gap.refit_heads(cfg, runs, 0)
        assert as_they_are["screen"] == fed["curve"][-1]["accuracy"]
        last = {t: a["global"] for t, a in bound["rounds"][-1]["accuracy"].items()}
        assert as_they_are["centralised"] == last
        for task, t in s["tasks"].items():
            want = 100 * (fed["curve"][-1]["accuracy"][task] - bound["rounds"][-1]["accuracy"][task]["global"])
            assert t["gap"][i] == pytest.approx(want)
            q = t["probe"]
            assert q["federation"][i] == probe["federation"][task] and q["centralised"][i] == probe["centralised"][task]
            assert q["features"][i] == pytest.approx(100 * (probe["federation"][task] - probe["centralised"][task]))
            assert q["features"][i] + q["heads"][i] == pytest.approx(t["gap"][i])
        # 3 epochs of head training on fixed features move the heads: the probe is not the run's own score
        assert probe["federation"] != fed["curve"][-1]["accuracy"] or probe["centralised"] != last
    assert bounds[0] != bounds[1]  # another initialisation: another bound
    assert "the features' share" in (out / "draws.md").read_text()
    # kept: run again, nothing is made again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("init-*/*")}
    monkeypatch.setattr(gap, "screen", lambda *a, **k: pytest.fail("a kept draw ran again"))
    monkeypatch.setattr(gap, "train_centralised", lambda *a, **k: pytest.fail("a kept bound ran again"))
    monkeypatch.setattr(gap, "refit_heads", lambda *a, **k: pytest.fail("a kept probe ran again"))
    gap.main([*args, "--init-seed", "2"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("init-*/*")} == stamps

    # paired: a draw that ran high and one that ran low (the medians' difference would say 0)
    def draw(seed, fed, bound, sets=("rounds=2",), central=True, remedy=None):
        d = tmp_path / "fab" / f"init-{seed}"
        d.mkdir(parents=True)
        key = {"sets": [*sets, f"model.init_seed={seed}"], "remedy": "plain", "calibrate": "cloud", **(remedy or {})}
        (d / "screen.json").write_text(json.dumps({**key, "curve": [{"round": 2, "accuracy": {"t": fed}}]}))
        if central:
            rounds = [{"round": 2, "accuracy": {"t": {"global": bound}}}]
            (d / "centralised.json").write_text(json.dumps({"sets": key["sets"], "rounds": rounds}))

    draw(1, 0.70, 0.72)
    draw(2, 0.60, 0.64)
    draw(3, 0.64, 0.60)
    s = gap.summarise(tmp_path / "fab")
    assert [round(g, 6) for g in s["tasks"]["t"]["gap"]] == [-2.0, -4.0, 4.0]
    md = gap.tables(s)
    assert "| t | 0.640 (0.600 to 0.700) | 0.640 (0.600 to 0.720) | -2.0 (-4.0 to +4.0) |" in md
    assert "worst task by median: t -2.0 points" in md and "remedy plain, calibrate cloud" in md
    # probed: the features' share is the refit federation's difference from the refit bound, the heads' the rest
    for seed, (f, c, n) in {1: (0.71, 0.72, 5), 2: (0.66, 0.64, 5), 3: (0.60, 0.62, 5)}.items():
        probe = {"probe_epochs": n, "federation": {"t": f}, "centralised": {"t": c}}
        (tmp_path / "fab" / f"init-{seed}" / "probe.json").write_text(json.dumps(probe))
    q = gap.summarise(tmp_path / "fab")["tasks"]["t"]["probe"]
    assert [round(x, 6) for x in q["features"]] == [-1.0, 2.0, -2.0]
    assert [round(x, 6) for x in q["heads"]] == [-1.0, -6.0, 6.0]
    assert "| t | 0.660 (0.600 to 0.710) | 0.640 (0.620 to 0.720) | -1.0 (-2.0 to +2.0) |" in gap.tables(
        gap.summarise(tmp_path / "fab")
    )
    (tmp_path / "fab" / "init-3" / "probe.json").write_text(json.dumps({**probe, "probe_epochs": 7}))
    with pytest.raises(ValueError, match="different epochs"):
        gap.summarise(tmp_path / "fab")
    for f in (tmp_path / "fab").glob("init-*/probe.json"):
        f.unlink()
    draw(4, 0.6, 0.6, central=False)
    with pytest.raises(ValueError, match="without its centralised bound"):
        gap.summarise(tmp_path / "fab")
    (tmp_path / "fab" / "init-4" / "screen.json").unlink()
    draw(5, 0.6, 0.6, sets=("rounds=3",))
    with pytest.raises(ValueError, match="other settings"):
        gap.summarise(tmp_path / "fab")
    (tmp_path / "fab" / "init-5" / "screen.json").unlink()
    draw(6, 0.6, 0.6, remedy={"remedy": "disco", "disco_a": 0.1, "disco_b": 0.05})
    with pytest.raises(ValueError, match="other settings"):
        gap.summarise(tmp_path / "fab")
    with pytest.raises(SystemExit):
        gap.main(["--out", str(out), "--init-seed", "1", "--init-seed", "1"])
    with pytest.raises(SystemExit):
        gap.main(["--out", str(out), "--init-seed", "1", "--probe-epochs", "-1"])
