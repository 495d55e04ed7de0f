"""The structure, subspace and echo scores (``aggregation.params.structure``, ``subspace``, ``echo``) offline, on
a traced run: every collect of devices' pushes that a node traced, scored as the node scores it (issue 17;
docs/robustness.md "A free rider hiding in noise", "A free rider echoing the last step").

``python -m benchmarks.structure RUN_DIR TRACE_DIR``

Takes a finished run made with ``runtime.trace_dir=TRACE_DIR``. For each round and collecting node, the pushes
it traced from devices (``r<round>-aggregate-from-<device>``) go into the aggregator the node uses (FedAvg with
``structure`` and ``subspace``, flags only), with the modules the devices started from as its reference: what
they received at the end of the round before (``r<round-1>-broadcast-aggregate``), in round 1 the initial
modules, rebuilt from the run's config and seed; the last step (``echo``) from the start of the round before,
found the same way (not scored in round 1). Prints each sender's scores, then the honest devices' lowest and
the configured adversaries' highest (for echo the other way round), and JSON at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hffm.adversary import adversaries
from hffm.aggregation import make_aggregator
from hffm.config import load_config
from hffm.data import load_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import Module, load_modules
from hffm.topology import Topology

SCORES = ("structure", "subspace", "echo")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    a = p.parse_args(argv)
    cfg = load_config(a.run_dir / "config.yaml", [])
    topo = Topology.from_config(cfg, 0)
    bad = adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins)
    model = build_model(cfg, len(load_tokenizer(cfg)), task_labels(cfg))
    init = {n: Module(n, model.module_state(n), 0, 1.0) for n in model.module_names()}
    collects: dict[tuple[int, str], dict[str, Path]] = {}
    for f in a.trace_dir.glob("*/r*-aggregate-from-device-*.safetensors"):
        head, device = f.name.removesuffix(".safetensors").split("-aggregate-from-")
        if head[1:].isdigit():  # a re-run attempt's (r<round>a<attempt>) are not scored here
            collects.setdefault((int(head[1:]), f.parent.name), {})[device] = f
    rows = []
    for (r, node), pushes in sorted(collects.items()):
        senders = sorted(pushes)
        start, previous = (_start(a.trace_dir, senders[0], r - k, init) for k in (0, 1))
        if start is None:
            continue
        agg = make_aggregator("fedavg", senders, start, {"structure": 3, "subspace": 2, "echo": 0.5})
        agg.previous = previous or {}
        for s in senders:
            agg.add(s, [m for n, m in load_modules(str(pushes[s])).items() if not n.startswith("stats.")])
        agg.result(r)
        for s in senders:
            got = {k: max(getattr(sc, k) for sc in agg.scores if sc.sender == s) for k in SCORES}
            rows.append({"round": r, "node": node, "device": s, "adversary": s in bad, **got})
            print(r, node, s, "adversary" if s in bad else "honest", *(f"{k} {got[k]:.2f}" for k in SCORES))
    for k in SCORES:
        sign = -1 if k == "echo" else 1  # echo flags at or above its cut, the others below theirs
        scored = [x for x in rows if x[k] != 0]  # 0: not scored (no last step; too few senders scored)
        honest = sorted((x[k] for x in scored if not x["adversary"]), key=lambda v: sign * v)
        attackers = sorted((x[k] for x in scored if x["adversary"]), key=lambda v: sign * v)
        worst = "highest" if sign < 0 else "lowest"
        print(k, "honest pushes", len(honest), worst, [round(v, 2) for v in honest[:3]], end="; ")
        best = "lowest" if sign < 0 else "highest"
        print("adversaries'", len(attackers), best, [round(v, 2) for v in attackers[-3:]])
    print(json.dumps({"pushes": rows}))


def _start(trace_dir: Path, device: str, r: int, init: dict) -> dict | None:
    """What ``device`` started round ``r`` from: the broadcast it received at the end of round r - 1 (round 1:
    ``init``; before it: None)."""
    if r < 1:
        return None
    before = trace_dir / device / f"r{r - 1}-broadcast-aggregate.safetensors"
    return init if r == 1 else load_modules(str(before)) if before.is_file() else None


if __name__ == "__main__":
    main()
