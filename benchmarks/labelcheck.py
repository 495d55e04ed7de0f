"""The label check (``calibration.label_t``) offline, on a traced run: which devices would it flag, round by
round, against each reference? (issue 17; docs/robustness.md "Catching label flippers by their statistics")

``python -m benchmarks.labelcheck RUN_DIR TRACE_DIR [--cut 4] [--rounds 1 2 ...]``

Takes a finished hfm run made with ``runtime.trace_dir=TRACE_DIR`` (with or without calibration) and, for
each round and edge, the modules the edge's devices started the round from (the initial ones in round 1,
else the broadcast they received at the end of the round before). Every device's feature statistics of
its own training data (flipped for a configured label flipper, as the device trains on it) are computed
under those modules here, and scored by ``hffm.calibration``: against the other devices of its cluster
(what an edge can check alone), against the whole federation's sums minus itself (every edge's devices
under the same modules, with no device left out yet), and against both (what an hfm edge checks in a cloud
round: ``hffm.calibration.label_scores``). Prints one line per (round, edge) and JSON at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hffm.adversary import adversaries, flip_labels
from hffm.calibration import LABEL_METRICS, feature_stats, label_scores, merge
from hffm.config import load_config
from hffm.data import build_device_data, load_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import load_modules
from hffm.topology import Topology, split_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.labelcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    p.add_argument("--rounds", type=int, nargs="*", help="default: every round")
    p.add_argument("--cut", type=float, default=4.0, help="calibration.label_t")
    p.add_argument("--metric", choices=LABEL_METRICS, default="trace", help="calibration.label_metric")
    a = p.parse_args(argv)
    cfg = load_config(a.run_dir / "config.yaml", [])
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok), task_labels(cfg))
    topo = Topology.from_config(cfg, 0)
    start = split_table(cfg).holders_by_task()
    attackers = adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins)
    flips = cfg.adversary.behaviour == "label_flip"
    data = {}
    for d in topo.device_map:
        dd = build_device_data(cfg, d, start, tok, topo.device_map[d].tasks)
        data[d] = flip_labels(dd, task_labels(cfg)) if d in attackers and flips else dd
    init = {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in model.module_names()}
    out: dict = {"attackers": sorted(attackers) if flips else [], "rounds": {}}
    for r in a.rounds or range(1, cfg.rounds + 1):
        out["rounds"][r] = {}
        # every edge's devices under that edge's modules (the same global ones after a cloud round)
        stats = {}
        for e in topo.edges:
            devs = [d.id for d in topo.cluster(e)]
            if r == 1:
                mods = init
            else:
                f = a.trace_dir / devs[0] / f"r{r - 1}-broadcast-aggregate.safetensors"
                mods = {n: m.tensors for n, m in load_modules(str(f)).items()}
            for n in model.module_names():
                if n in mods:
                    model.load_module_state(n, mods[n])
            stats.update({d: feature_stats(model, data[d].train, "cpu") for d in devs})
        federation = merge(list(stats.values()))
        for e in topo.edges:
            cluster = {d.id: stats[d.id] for d in topo.cluster(e)}
            t_here, by_here = label_scores(cluster, a.cut, metric=a.metric)
            t_fed, by_fed = label_scores(cluster, a.cut, federation, set(cluster), here=False, metric=a.metric)
            _, by_both = label_scores(cluster, a.cut, federation, set(cluster), metric=a.metric)
            row = {
                "here": {d: round(v, 2) for d, v in t_here.items()},
                "federation": {d: round(v, 2) for d, v in t_fed.items()},
                "flagged_here": by_here,
                "flagged_federation": by_fed,
                "flagged_both": by_both,
            }
            out["rounds"][r][e] = row
            print(r, e, "attackers", out["attackers"], "here", by_here, "federation", by_fed, "both", by_both)
            print("   here", json.dumps(row["here"]))
            print("   federation", json.dumps(row["federation"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
