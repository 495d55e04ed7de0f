"""Adversarial devices (config ``adversary``, tests and benchmarks only): who attacks, what each
behaviour sends, and a real federation with a boosted attacker: FedAvg is dragged away from the clean
run, the coordinate-wise median is not, and the cloud's outlier scores flag the attacker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hffm.adversary import adversaries, poison
from hffm.config import AdversaryConfig, load_config
from hffm.modules import Module, load_modules
from services.launcher import RunFailed, run

DEVICES = [f"device-{e}-{i}" for e in range(2) for i in range(5)]


def test_who_attacks_is_named_or_drawn_by_seed():
    assert adversaries(AdversaryConfig(), DEVICES, 0) == frozenset()
    assert adversaries(AdversaryConfig(nodes=["device-1-2"]), DEVICES, 0) == {"device-1-2"}
    drawn = adversaries(AdversaryConfig(fraction=0.2), DEVICES, 0)
    assert len(drawn) == 2 and drawn <= set(DEVICES)
    assert adversaries(AdversaryConfig(fraction=0.2), DEVICES, 0) == drawn  # reproducible
    assert adversaries(AdversaryConfig(fraction=0.3, nodes=["device-0-0"]), DEVICES, 0) >= {"device-0-0"}
    assert len(adversaries(AdversaryConfig(fraction=0.3, nodes=["device-0-0"]), DEVICES, 0)) == 3
    with pytest.raises(ValueError, match=r"adversary.nodes: \['edge-0'\] are not devices or edges"):
        adversaries(AdversaryConfig(nodes=["edge-0"]), DEVICES, 0)
    # an edge may attack (it poisons the aggregate it forwards); the fraction counts devices only
    edges = ["edge-0", "edge-1"]
    both = adversaries(AdversaryConfig(nodes=["edge-1"], fraction=0.2), DEVICES, 0, edges)
    assert "edge-1" in both and len(both - {"edge-1"}) == 2 and both - {"edge-1"} <= set(DEVICES)
    with pytest.raises(ValueError, match=r"adversary.behaviour: label_flip needs training data, and \['edge-0'\]"):
        adversaries(AdversaryConfig(nodes=["edge-0"], behaviour="label_flip"), DEVICES, 0, edges)
    # a device that may join later (topology.joins) is named by the id it will join with, under an existing edge
    late = AdversaryConfig(nodes=["device-1-7"], behaviour="label_flip")
    assert adversaries(late, DEVICES, 0, edges, joins=True) == {"device-1-7"}
    with pytest.raises(ValueError, match=r"adversary.nodes: \['device-1-7'\] are not devices or edges"):
        adversaries(late, DEVICES, 0, edges)  # joins off: nobody can join as it
    with pytest.raises(ValueError, match=r"adversary.nodes: \['device-2-0'\] are not devices or edges"):
        adversaries(AdversaryConfig(nodes=["device-2-0"]), DEVICES, 0, edges, joins=True)  # no edge-2 to join


def test_each_behaviour_sends_what_it_says():
    start = {"adapter.0": Module("adapter.0", {"w": torch.ones(3)}, 0, 1.0)}
    trained = {"adapter.0": Module("adapter.0", {"w": torch.tensor([2.0, 1.0, 0.0])}, 1, 7.0)}

    def sent(**kw):
        m = poison(AdversaryConfig(**kw), trained, start, 0, "device-0-0", 1)["adapter.0"]
        assert m.version == 1 and m.num_samples == 7.0  # weight and version as the honest update
        return m.tensors["w"]

    assert torch.equal(sent(behaviour="sign_flip", scale=2), torch.tensor([-1.0, 1.0, 3.0]))
    assert torch.equal(sent(behaviour="scale", scale=3), torch.tensor([4.0, 1.0, -2.0]))
    assert torch.equal(sent(behaviour="free_ride"), torch.ones(3))
    noisy = sent(behaviour="noise", sigma=0.5)
    assert not torch.equal(noisy, torch.ones(3)) and torch.equal(noisy, sent(behaviour="noise", sigma=0.5))
    assert torch.equal(trained["adapter.0"].tensors["w"], torch.tensor([2.0, 1.0, 0.0]))  # untouched


def test_an_echo_sends_the_last_step_it_saw_and_trains_nothing():
    """echo: start + scale x (start - previous start), whatever it trained; its first round (no previous
    start) what it received; with jitter independent noise of that fraction of the step's norm on top."""
    before = {"adapter.0": Module("adapter.0", {"w": torch.zeros(64, 16)}, 0, 1.0)}
    start = {"adapter.0": Module("adapter.0", {"w": torch.ones(64, 16)}, 1, 1.0)}
    trained = {"adapter.0": Module("adapter.0", {"w": torch.full((64, 16), 5.0)}, 2, 7.0)}
    cfg = AdversaryConfig(behaviour="echo", scale=2)
    sent = poison(cfg, trained, start, 0, "device-0-0", 2, before)["adapter.0"]
    assert torch.equal(sent.tensors["w"], torch.full((64, 16), 3.0)) and sent.num_samples == 7.0
    first = poison(cfg, trained, start, 0, "device-0-0", 1)["adapter.0"]
    assert torch.equal(first.tensors["w"], torch.ones(64, 16))
    jittered = [
        poison(AdversaryConfig(behaviour="echo", scale=1, jitter=0.2), trained, start, 0, d, 2, before)[
            "adapter.0"
        ].tensors["w"]
        - 1
        for d in ("device-0-0", "device-0-1")
    ]
    for u in jittered:  # the step (all ones, norm 32) and noise of a fifth of its norm
        assert 0.97 < float(torch.nn.functional.cosine_similarity(u.flatten(), torch.ones(1024), dim=0)) < 0.995
        assert 0.15 < float((u - 1).norm()) / 32 < 0.25
    twin = float(torch.nn.functional.cosine_similarity(jittered[0].flatten(), jittered[1].flatten(), dim=0))
    assert twin < 0.99  # two echoers are not twins


def test_low_rank_noise_has_the_rank_and_the_size_asked_for():
    """noise_rank: each matrix's noise is a random rank-k matrix whose values have sigma^2 variance on
    average (a squared norm about sigma^2 m n, as independent noise's); vectors stay independent noise."""
    start = {"adapter.0": Module("adapter.0", {"w": torch.zeros(256, 64), "b": torch.zeros(64)}, 0, 1.0)}
    sizes = {}
    for rank in (None, 1, 3):
        cfg = AdversaryConfig(behaviour="noise", sigma=0.5, noise_rank=rank)
        got = [poison(cfg, start, start, 0, "device-0-0", r)["adapter.0"].tensors for r in range(20)]
        ranks = {int(torch.linalg.matrix_rank(t["w"])) for t in got}  # float32, its own tolerance
        assert ranks == {64 if rank is None else rank}, (rank, ranks)
        sizes[rank] = float(torch.stack([t["w"].pow(2).mean() for t in got]).mean()) / 0.25
        assert all(float(t["b"].std()) > 0.3 for t in got)
    assert 0.9 < sizes[None] < 1.1 and 0.6 < sizes[1] < 1.4 and 0.75 < sizes[3] < 1.25, sizes
    with pytest.raises(ValueError, match="noise_rank"):
        AdversaryConfig(behaviour="noise", noise_rank=0)


def test_an_unknown_adversary_is_refused_before_any_process_starts(tmp_path):
    cfg = load_config(None, ["adversary.nodes=[device-9-9]", "topology.edges=1", "topology.devices_per_edge=2"])
    with pytest.raises(RunFailed, match=r"adversary.nodes: \['device-9-9'\]"):
        run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=60)
    assert not (tmp_path / "run" / "logs").exists() or not list((tmp_path / "run" / "logs").iterdir())


def _flat(path: Path) -> torch.Tensor:
    ms = load_modules(str(path / "global_modules.safetensors"))
    return torch.cat([ms[n].tensors[k].reshape(-1) for n in sorted(ms) for k in sorted(ms[n].tensors)])


def test_a_boosted_attacker_drags_fedavg_not_the_median(tmp_path):
    """Star over real gRPC, 6 devices, one of which sends its update x200. The median's global modules
    stay where the clean run's are (they differ by median vs mean only); FedAvg's are dragged away."""
    base = ["method=star", "rounds=2", "topology.edges=2", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=120"]  # fmt: skip
    attack = ["adversary.nodes=[device-1-2]", "adversary.behaviour=scale", "adversary.scale=200"]
    flag = ["aggregation.params.flag_z=3.5"]  # FedAvg that scores every copy (flags only, keeps all)
    runs = {"clean": base, "fedavg": base + attack + flag, "median": base + attack + ["aggregation.rule=median"]}
    got = {}
    for name, sets in runs.items():
        out = tmp_path / name
        run(load_config(None, sets), out, Console(file=io.StringIO()), timeout_s=300)
        got[name] = _flat(out)
        logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
        attackers = [n for n, text in logs.items() if "is an adversary" in text]
        assert attackers == ([] if name == "clean" else ["devices-1.log"]), attackers
    det = json.loads((tmp_path / "fedavg" / "results.json").read_text())["detection"]
    assert det["adversaries"] == ["device-1-2"] and det["scored"] == 2 * 6  # the cloud scores 6 devices a round
    assert det["recall"] == 1.0 and det["false_positive_rate"] <= 0.2, det
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert clean["detection"]["scored"] == 0 and all(a["scores"] == [] for a in clean["rounds"][-1]["aggregates"])
    dragged = float((got["fedavg"] - got["clean"]).norm())
    held = float((got["median"] - got["clean"]).norm())
    assert dragged > 10 * held, (dragged, held)


def test_the_attack_matrix_tables():
    """benchmarks/attacks.py's tables (hffm attacks): accuracy per cell with each rule's worst case
    against the clean FedAvg run and against its own clean run (— where either was not run), and the
    detection's rates per attack (the clean run's: its FPR)."""
    from benchmarks.attacks import tables

    def cell(acc, tpr=None, fpr=None):
        return {"accuracy": acc, "tpr": tpr, "fpr": fpr}

    res = {
        "cells": {
            "fedavg": {"none": cell(0.5, None, 0.0), "scale": cell(0.2, 1.0, 0.05)},
            "median": {"none": cell(0.48, None, 0.0), "scale": cell(0.47, 0.5, 0.0)},
        }
    }
    md = tables(res).splitlines()
    assert md[0] == (
        "| rule | none | scale | worst (points vs clean FedAvg) | worst (points vs its own clean run) "
        "| worst (points vs its own attackers-absent run) |"
    )
    assert md[2] == "| fedavg | 0.500 | 0.200 | -30.0 | -30.0 | — |"
    assert md[3] == "| median | 0.480 | 0.470 | -3.0 | -1.0 | — |"
    assert md[5] == "| rule | none TPR / FPR | scale TPR / FPR |"
    assert md[7] == "| fedavg | — / 0 % | 100 % / 5 % |" and md[8] == "| median | — / 0 % | 50 % / 0 % |"
    # a matrix without the FedAvg row (rows run on their own): no clean FedAvg to compare with
    md = tables({"cells": {"median": res["cells"]["median"], "krum": {"scale": cell(0.4, 1.0, 0.0)}}}).splitlines()
    assert md[2] == "| median | 0.480 | 0.470 | — | -1.0 | — |" and md[3] == "| krum | — | 0.400 | — | — | — |"
    # the attackers-absent column is the yardstick, never the worst case: below every attack it is not counted
    res["cells"]["median"]["absent"] = cell(0.40, 0.0, 0.0)
    md = tables(res).splitlines()
    assert md[0].startswith("| rule | none | absent | scale |")
    assert md[3] == "| median | 0.480 | 0.400 | 0.470 | -3.0 | -1.0 | +7.0 |"


def test_the_attack_matrix_keeps_the_cells_of_the_same_settings_and_refuses_to_overwrite_others(tmp_path):
    """Re-running some cells keeps the others of OUT's matrix when the settings make the same config (``seed=0``
    written out is the default), and stops, with OUT's matrix untouched, when they make another (until
    2026-12-06 (13) any textual difference dropped every kept cell)."""
    import json

    from benchmarks.attacks import BASE, run_matrix

    kept = {"sets": list(BASE), "cells": {"fedavg": {"none": {"accuracy": 0.5, "tpr": None, "fpr": 0.0}}}}
    (tmp_path / "attacks.json").write_text(json.dumps(kept))
    res = run_matrix(tmp_path, sets=["seed=0"], rules=["no such rule"], log=lambda *_: None)
    assert res["cells"] == kept["cells"]
    assert json.loads((tmp_path / "attacks.json").read_text())["cells"] == kept["cells"]
    before = (tmp_path / "attacks.json").read_text()
    with pytest.raises(SystemExit, match="holds a matrix of other settings"):
        run_matrix(tmp_path, sets=["seed=1"], rules=["no such rule"], log=lambda *_: None)
    assert (tmp_path / "attacks.json").read_text() == before


def test_label_flip_reverses_training_labels_only():
    from hffm.adversary import flip_labels
    from hffm.data import DeviceData, TaskData

    def td(labels):
        n = len(labels)
        return TaskData("shape", torch.zeros(n, 2), torch.ones(n, 2), None, torch.tensor(labels))

    data = DeviceData(train={"shape": td([0, 1, 4, -1])}, test={"shape": td([0, 1])})
    flipped = flip_labels(data, {"shape": 5})
    assert flipped.train["shape"].labels.tolist() == [4, 3, 0, -1]  # -1 (outside the vocabulary) stays
    assert flipped.test["shape"].labels.tolist() == [0, 1]  # the local test split is untouched
    assert data.train["shape"].labels.tolist() == [0, 1, 4, -1]  # and so is the honest copy


def test_withheld_data_leaves_no_training_sample_and_the_test_split_as_it_was():
    from hffm.adversary import withhold
    from hffm.data import DeviceData, TaskData

    def td(labels):
        n = len(labels)
        return TaskData(
            "shape", torch.arange(2 * n).view(n, 2), torch.ones(n, 2), None, torch.tensor(labels), ["a", "b", "c"]
        )

    data = DeviceData(train={"shape": td([0, 1, 2])}, test={"shape": td([0, 1])})
    gone = withhold(data)
    assert len(gone.train["shape"]) == 0 and gone.train_samples() == {"shape": 0}
    assert gone.train["shape"].input_ids.shape == (0, 2) and gone.train["shape"].label_counts() == [0, 0, 0]
    assert gone.test["shape"].labels.tolist() == [0, 1] and len(data.train["shape"]) == 3


def test_absent_attackers_take_part_holding_nothing_and_weigh_one_sample(tmp_path):
    """adversary.behaviour absent (the matrix's yardstick of a perfect defence), over real gRPC with calibration,
    statistics first and bounded claims: the two drawn devices register no sample, report statistics of none
    and push updates of weight 1, untrained; the run completes (an edge's aggregate counts their floor of 1,
    which the cloud's weight caps refused before)."""
    sets = ["method=hfm", "e_agg=2", "rounds=2", "topology.edges=2", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=120", "data.global_test_per_task=32",
            "adversary.fraction=0.34", "adversary.behaviour=absent", "calibration.enabled=true",
            "calibration.label_t=4", "calibration.opening=true", "aggregation.claim_bound=2",
            "runtime.trace_dir=" + str(tmp_path / "trace")]  # fmt: skip
    res = run(load_config(None, sets), tmp_path / "run", Console(file=io.StringIO()), timeout_s=300)
    assert res["complete"]
    absent = res["detection"]["adversaries"]
    assert len(absent) == 2
    from hffm.modules import load_modules

    pushes = {p: load_modules(str(p)) for d in absent for p in (tmp_path / "trace").glob(f"edge-*/r*-from-{d}.*")}
    assert len(pushes) >= 2 * 2  # each absent device's training pushes of both rounds (statistics too)
    assert all(m.num_samples == 1 for ms in pushes.values() for m in ms.values())
    honest = [
        p
        for p in (tmp_path / "trace").glob("edge-*/r1-aggregate-from-device-*.*")
        if not any(d in p.name for d in absent)
    ]
    assert honest and all(max(m.num_samples for m in load_modules(str(p)).values()) > 1 for p in honest)


def test_alie_z_follows_baruch_et_al():
    from statistics import NormalDist

    from hffm.adversary import alie_z

    # s = floor(n/2 + 1) - f; z = inverse normal CDF of (n - s) / n
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    assert alie_z(5, 1) == pytest.approx(NormalDist().inv_cdf(3 / 5))
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(6 / 10))
    assert alie_z(4, 1) == 0.0  # s = 2: (4 - 2) / 4 = 1/2, nothing to hide behind
    assert alie_z(10, 4) > alie_z(10, 2) > 0
    with pytest.raises(ValueError, match="f >= 1"):
        alie_z(5, 0)


def test_colluders_send_alie_and_ipm_from_their_benign_updates():
    """Against a NumPy reference: ALIE = start + mean - z std, IPM = start - eps mean, over the benign
    updates of the colluders that hold each module (a head held by one colluder: std 0)."""
    import numpy as np

    from hffm.adversary import collude

    rng = np.random.default_rng(3)
    start = {n: Module(n, {"w": torch.tensor(rng.normal(size=6), dtype=torch.float32)}, 2, 1.0)
             for n in ("adapter.0", "head.shape")}  # fmt: skip
    benign = []
    for i in range(3):
        ms = {"adapter.0": Module("adapter.0", {"w": torch.tensor(rng.normal(size=6), dtype=torch.float32)}, 3, 9.0)}
        if i == 0:
            ms["head.shape"] = Module(
                "head.shape", {"w": torch.tensor(rng.normal(size=6), dtype=torch.float32)}, 3, 4.0
            )
        benign.append(ms)
    s0 = start["adapter.0"].tensors["w"].double().numpy()
    ups = np.stack([b["adapter.0"].tensors["w"].double().numpy() - s0 for b in benign])
    alie = collude(AdversaryConfig(behaviour="alie"), start, benign, 1.5)
    np.testing.assert_allclose(alie["adapter.0"].tensors["w"].numpy(), s0 + ups.mean(0) - 1.5 * ups.std(0), rtol=1e-6)
    assert torch.equal(alie["head.shape"].tensors["w"], benign[0]["head.shape"].tensors["w"])  # one holder: its own
    assert alie["adapter.0"].version == 3 and alie["adapter.0"].num_samples == 9.0
    ipm = collude(AdversaryConfig(behaviour="ipm", epsilon=0.25), start, benign, 1.5)
    np.testing.assert_allclose(ipm["adapter.0"].tensors["w"].numpy(), s0 - 0.25 * ups.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="not a colluding attack"):
        collude(AdversaryConfig(behaviour="scale"), start, benign, 1.0)
    # poison leaves the data and colluding attacks' updates alone
    for b in ("label_flip", "alie", "ipm"):
        assert poison(AdversaryConfig(behaviour=b), benign[0], start, 0, "device-0-0", 1) is benign[0]


def _scores(out: Path, node: str) -> list[dict]:
    res = json.loads((out / "results.json").read_text())
    return [s for r in res["rounds"] for a in r["aggregates"] if a["node"] == node for s in a["scores"]]


def test_alie_colluders_send_one_vector(tmp_path):
    """Star over real gRPC, 6 devices, two ALIE colluders: each trains on both attackers' partitions
    from the same global start, so both send the same vector: at the cloud their distances to the
    median are equal, every honest sender's differs. Their whole updates are twins (cosine 1: flagged
    with twin_cos 0.99), no honest sender's is. The run completes and results say who attacked."""
    sets = ["method=star", "rounds=2", "topology.edges=2", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=90", "aggregation.params.flag_z=3.5",
            "aggregation.params.twin_cos=0.99",
            "adversary.nodes=[device-0-1,device-1-0]", "adversary.behaviour=alie"]  # fmt: skip
    out = tmp_path / "alie"
    res = run(load_config(None, sets), out, Console(file=io.StringIO()), timeout_s=300)
    assert res["detection"]["adversaries"] == ["device-0-1", "device-1-0"]
    last = res["rounds"][-1]["aggregates"]
    dist = {(s["module"], s["sender"]): s["distance"] for a in last if a["node"] == "cloud" for s in a["scores"]}
    adapters = sorted({m for m, _ in dist if m.startswith("adapter")})
    assert adapters
    for m in adapters:
        assert dist[(m, "device-0-1")] == dist[(m, "device-1-0")], m
        honest = [dist[(m, d)] for d in ("device-0-0", "device-0-2", "device-1-1", "device-1-2")]
        assert dist[(m, "device-0-1")] not in honest, m
    for r in res["rounds"]:
        scores = [s for a in r["aggregates"] if a["node"] == "cloud" for s in a["scores"]]
        assert scores
        for s in scores:
            colluder = s["sender"] in ("device-0-1", "device-1-0")
            assert (s["twin"] > 0.999 and s["flagged"]) if colluder else s["twin"] < 0.99, s


def test_an_adversarial_edge_is_flagged_and_left_out_by_the_cloud(tmp_path):
    """hfm over real gRPC, 4 edges x 1 device, cloud every round; edge-3 forwards its device's
    aggregate boosted x50. The cloud (4 senders: enough to score) flags edge-3 in every round, module by
    module (flag_z) or by its whole update (update_z), and, with exclude_flagged, its global modules stay
    near the clean run's while plain FedAvg's are dragged."""
    base = ["method=hfm", "e_agg=1", "rounds=2", "topology.edges=4", "topology.devices_per_edge=1",
            "runtime.devices_per_process=4", "data.train_per_task=40"]  # fmt: skip
    attack = ["adversary.nodes=[edge-3]", "adversary.behaviour=scale", "adversary.scale=50"]
    runs = {
        "clean": base,
        "fedavg": base + attack,
        "excluded": base + attack + ["aggregation.params.flag_z=3.5", "aggregation.params.exclude_flagged=1"],
        # the sender's whole update scored (update_z), not module by module: the same verdict here
        "excluded by update": base
        + attack
        + ["aggregation.params.update_z=3.5", "aggregation.params.exclude_flagged=1"],
    }
    got = {}
    for name, sets in runs.items():
        out = tmp_path / name
        res = run(load_config(None, sets), out, Console(file=io.StringIO()), timeout_s=300)
        got[name] = _flat(out)
        if name.startswith("excluded"):
            det = res["detection"]
            assert det["adversaries"] == ["edge-3"] and det["flagged"] == ["edge-3"], det
            assert det["recall"] == 1.0 and det["false_positive_rate"] == 0.0, det
            assert all(s["excluded"] for s in _scores(out, "cloud") if s["sender"] == "edge-3")
        if name == "excluded by update":  # its whole-update z, measured at the cloud, reached results.json
            zs = {s["sender"]: s["update_z"] for s in _scores(out, "cloud")}
            assert zs["edge-3"] > 3.5 and max(z for n, z in zs.items() if n != "edge-3") < 3.5, zs
        logs = "".join(p.read_text() for p in (out / "logs").iterdir())
        assert ("edge-3 is an adversary" in logs) == (name != "clean")
    dragged = float((got["fedavg"] - got["clean"]).norm())
    held = float((got["excluded"] - got["clean"]).norm())
    assert dragged > 5 * held, (dragged, held)
    assert torch.equal(got["excluded"], got["excluded by update"])  # the same senders left out, bit for bit


def test_an_attacking_cluster_head_poisons_its_clusters_aggregate(tmp_path):
    """hfm-d2d over real gRPC, one cluster of 3 whose head (central policy: fixed by geometry) free-rides:
    it returns what it started the round with for the whole cluster, so the run ends exactly where a run
    in which every device free-rides ends (the honest members' updates never get past their head)."""
    from hffm.costmodel import CostModel
    from hffm.model import backbone_dims
    from hffm.topology import Topology

    base = ["method=hfm-d2d", "e_agg=2", "rounds=2", "topology.edges=1", "topology.devices_per_edge=3",
            "runtime.devices_per_process=3", "data.train_per_task=60", "d2d.head_policy=central",
            "adversary.behaviour=free_ride", "train.eval_every=0"]  # fmt: skip
    cfg = load_config(None, base)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    cm = CostModel(cfg, topo)
    heads = {cm.d2d_context(topo, r, set()).heads["edge-0"] for r in (1, 2)}
    assert len(heads) == 1, heads  # the same head in both rounds
    head = heads.pop()
    got = {}
    everyone = ",".join(d.id for d in topo.devices)
    for name, nodes in (("head", head), ("everyone", everyone)):
        out = tmp_path / name
        run(load_config(None, [*base, f"adversary.nodes=[{nodes}]"]), out, Console(file=io.StringIO()), timeout_s=300)
        got[name] = _flat(out)
    assert torch.equal(got["head"], got["everyone"])


@pytest.mark.parametrize("rank", [None, 1])
def test_a_free_rider_hiding_in_noise_is_flagged_by_its_update_s_shape(tmp_path, rank):
    """hfm over real gRPC and mTLS, one edge of five devices; device-0-4 trains nothing and sends what it
    received plus noise (adversary noise, sigma 0.003: an update about as large as an honest one). Its edge
    scores every sender's whole update: by its size (update_z) it passes. Independent noise: by its
    structure (its matrices' top singular value's share over noise's) it is about 1 where honest devices are
    many times that. One random direction per matrix (noise_rank 1, a free rider that knows the structure
    check): its structure is the highest of all, but little of it lies along the other senders' main
    directions (subspace about 1 over chance, the honest several). Either way it is flagged and left out in
    every round, by that score alone, and results.json carries the scores."""
    sets = ["method=hfm", "e_agg=1", "rounds=2", "topology.edges=1", "topology.devices_per_edge=5",
            "runtime.devices_per_process=5", "data.train_per_task=60", "adversary.nodes=[device-0-4]",
            "adversary.behaviour=noise", "adversary.sigma=0.003",
            "aggregation.params={update_z: 3.5, structure: 3, subspace: 2, exclude_flagged: 1}"]  # fmt: skip
    if rank:
        sets.append(f"adversary.noise_rank={rank}")
    out = tmp_path / "run"
    res = run(load_config(None, sets), out, Console(file=io.StringIO()), timeout_s=300)
    det = res["detection"]
    assert det["adversaries"] == ["device-0-4"] and det["flagged"] == ["device-0-4"], det
    assert det["recall"] == 1.0 and det["false_positive_rate"] == 0.0 and det["scored"] == 2 * 5, det
    scores = _scores(out, "edge-0")
    shape = {s["sender"]: s["structure"] for s in scores}
    along = {s["sender"]: s["subspace"] for s in scores}
    honest = [d for d in shape if d != "device-0-4"]
    assert min(along[d] for d in honest) > 2.5 and min(shape[d] for d in honest) > 5, (shape, along)
    if rank:  # the largest structure there is, off everyone else's directions
        assert shape["device-0-4"] > max(shape[d] for d in honest) and along["device-0-4"] < 1.5, (shape, along)
    else:
        assert shape["device-0-4"] < 1.5 and along["device-0-4"] < 1.5, (shape, along)
    zs = {s["sender"]: s["update_z"] for s in scores}
    assert max(abs(z) for z in zs.values()) < 3.5, zs  # its size gives it away nowhere
    assert all(s["excluded"] == (s["sender"] == "device-0-4") for s in scores)


@pytest.mark.parametrize(
    ("bad", "jitter"),
    [(["device-0-3", "device-0-4"], 0.2), (["device-0-4"], 0.2), (["device-0-3", "device-0-4"], 2.0)],
    ids=["two", "lone", "drowned"],
)
def test_an_echo_of_the_last_step_is_flagged_by_its_direction(tmp_path, bad, jitter):
    """hfm over real gRPC and mTLS, one edge of five devices; the echoes train nothing and send the last step
    they saw (their start minus their previous start, jitter 0.2: two are not twins). Round 1 they have no
    step to echo and send what they received: a zero update from the edge's start, a twin of that start
    (two of them, of each other too). From round 2 on their updates are of an honest size and shape, but the
    edge's last step (its start minus its previous round's) is where they point: echo flags them, each round,
    and leaves them out; the honest devices' cosine with it stays near 0. ``drowned``: noise of twice the
    step's size (jitter 2) takes their cosine under echo's cut, and ``structure``, judging each update less its
    component along the last step, sees their noise (about 1) where the honest devices' shapes stay high."""
    params = "update_z: 3.5, twin_cos: 0.99, echo: 0.5, exclude_flagged: 1" + (", structure: 3" if jitter > 1 else "")
    sets = ["method=hfm", "e_agg=1", "rounds=3", "topology.edges=1", "topology.devices_per_edge=5",
            "runtime.devices_per_process=5", "data.train_per_task=60", f"adversary.nodes=[{','.join(bad)}]",
            "adversary.behaviour=echo", "adversary.scale=1", f"adversary.jitter={jitter}",
            f"aggregation.params={{{params}}}"]  # fmt: skip
    out = tmp_path / "run"
    res = run(load_config(None, sets), out, Console(file=io.StringIO()), timeout_s=300)
    det = res["detection"]
    assert det["flagged"] == det["adversaries"] == bad, det
    assert det["false_positive_rate"] == 0.0, det
    bad = set(bad)
    for r in res["rounds"]:
        scores = [s for a in r["aggregates"] if a["node"] == "edge-0" for s in a["scores"]]
        assert {s["sender"] for s in scores if s["excluded"]} == bad, r["round"]
        echo = {s["sender"]: s["echo"] for s in scores}
        if r["round"] == 1:  # no last step yet: not scored; their zero updates are twins
            assert all(v == 0 for v in echo.values()) and all(s["twin"] == 1 for s in scores if s["sender"] in bad)
        elif jitter > 1:  # under echo's cut; their shape, less the last step, is noise's
            assert all(0.3 < echo[d] < 0.5 for d in bad) and max(abs(v) for v in echo.values()) < 0.5, echo
            shape = {s["sender"]: s["structure"] for s in scores}
            assert max(shape[d] for d in bad) < 1.5 < 3 < min(v for d, v in shape.items() if d not in bad), shape
        else:
            assert min(echo[d] for d in bad) > 0.9 and max(abs(v) for d, v in echo.items() if d not in bad) < 0.5, echo
            assert all(s["twin"] < 0.99 for s in scores), r["round"]  # flagged by echo alone
