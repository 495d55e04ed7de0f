"""The structure, subspace and echo scores (``aggregation.params.structure``, ``subspace``, ``echo``) offline, on
a traced run: every collect of devices' pushes that a node traced, scored as the node scores it (issue 17;
docs/robustness.md "A free rider hiding in noise", "A free rider echoing the last step").

``python -m benchmarks.structure RUN_DIR TRACE_DIR [--disguise K [--size X]]``

Takes a finished run made with ``runtime.trace_dir=TRACE_DIR``. For each round and collecting node, the pushes
it traced from devices (``r<round>-aggregate-from-<device>``) go into the aggregator the node uses (FedAvg with
``structure`` and ``subspace``, flags only), with the modules the devices started from as its reference: what
they received at the end of the round before (``r<round-1>-broadcast-aggregate``), in round 1 the initial
modules, rebuilt from the run's config and seed; the last step (``echo``) from the start of the round before,
found the same way (not scored in round 1). Prints each sender's scores, then the honest devices' lowest and
the configured adversaries' highest (for echo the other way round; ``update_z`` the senders' whole-update z), and
JSON at the end.

``--disguise K`` (a what-if, with an echo run's traces): where a collect has a last step, each configured
adversary's push is replaced by an echo disguised along the step's own main directions: start + step + noise, the
noise of each matrix (both sides at least 8) a random mix of the step's top K singular directions (U_K R V_K^T, R
Gaussian), made orthogonal to the step and scaled to ``--size`` X times the step's norm (its cosine with the step
1/sqrt(1 + X^2)); other tensors get independent noise of the same relative size, likewise orthogonal. Shaped
like an honest update and lying along the federation's directions, it is what the shape scores cannot tell from
one by construction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hffm.adversary import adversaries
from hffm.aggregation import make_aggregator
from hffm.config import load_config
from hffm.data import load_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import Module, load_modules
from hffm.topology import Topology

SCORES = ("structure", "subspace", "echo", "update_z")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    p.add_argument("--disguise", type=int, default=0, metavar="K", help="replace the adversaries' pushes (above)")
    p.add_argument("--size", type=float, default=2.0, help="--disguise: the noise's norm over the step's")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
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
        agg = make_aggregator("fedavg", senders, start, {"structure": 3, "subspace": 2, "echo": 0.5, "update_z": 3.5})
        agg.previous = previous or {}
        for s in senders:
            mods = [m for n, m in load_modules(str(pushes[s])).items() if not n.startswith("stats.")]
            if a.disguise and s in bad and previous:
                mods = [_disguised(m, start[m.name], previous[m.name], a.disguise, a.size, gen) for m in mods]
            agg.add(s, mods)
        agg.result(r)
        for s in senders:
            got = {k: max(getattr(sc, k) for sc in agg.scores if sc.sender == s) for k in SCORES}
            rows.append({"round": r, "node": node, "device": s, "adversary": s in bad, **got})
            print(r, node, s, "adversary" if s in bad else "honest", *(f"{k} {got[k]:.2f}" for k in SCORES))
    for k in SCORES:
        sign = -1 if k in ("echo", "update_z") else 1  # these flag at or above their cuts, the others below
        scored = [x for x in rows if x[k] != 0]  # 0: not scored (no last step; too few senders scored)
        honest = sorted((x[k] for x in scored if not x["adversary"]), key=lambda v: sign * v)
        attackers = sorted((x[k] for x in scored if x["adversary"]), key=lambda v: sign * v)
        worst = "highest" if sign < 0 else "lowest"
        print(k, "honest pushes", len(honest), worst, [round(v, 2) for v in honest[:3]], end="; ")
        best = "lowest" if sign < 0 else "highest"
        print("adversaries'", len(attackers), best, [round(v, 2) for v in attackers[-3:]])
    print(json.dumps({"pushes": rows}))


def _disguised(m: Module, start: Module, previous: Module, k: int, size: float, gen: torch.Generator) -> Module:
    """``--disguise``: ``m`` replaced by start + step + noise along the step's top ``k`` directions (the module
    docstring), the noise orthogonal to the step and ``size`` times its norm."""
    out = {}
    for key, t in start.tensors.items():
        t = t.double()
        step = t - previous.tensors[key].double()
        s2 = float((step * step).sum())
        if s2 == 0:
            out[key] = m.tensors[key]
            continue
        if step.dim() == 2 and min(step.shape) >= 8:
            u, _, vh = torch.linalg.svd(step, full_matrices=False)
            kk = min(k, u.shape[1])
            noise = u[:, :kk] @ torch.randn(kk, kk, generator=gen, dtype=torch.float64) @ vh[:kk]
        else:
            noise = torch.randn(step.shape, generator=gen, dtype=torch.float64)
        noise -= float((noise * step).sum()) / s2 * step
        noise *= size * s2**0.5 / float(noise.norm())
        out[key] = (t + step + noise).float()
    return Module(m.name, out, m.version, m.num_samples)


def _start(trace_dir: Path, device: str, r: int, init: dict) -> dict | None:
    """What ``device`` started round ``r`` from: the broadcast it received at the end of round r - 1 (round 1:
    ``init``; before it: None)."""
    if r < 1:
        return None
    before = trace_dir / device / f"r{r - 1}-broadcast-aggregate.safetensors"
    return init if r == 1 else load_modules(str(before)) if before.is_file() else None


if __name__ == "__main__":
    main()
