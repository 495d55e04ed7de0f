"""Leave-one-out validation at an edge, offline (issue 17: would it catch label flippers?).

``python -m benchmarks.loo RUN_DIR TRACE_DIR EDGE [--tolerance 0.02]``

Takes a finished run made with ``runtime.trace_dir=TRACE_DIR`` (every copy a node received, saved) and,
for each round, the copies ``EDGE`` collected from its devices: the FedAvg of all of them and of all but
each sender, each set into the run's model and scored on held-out data (the run's global test set,
standing in for a root set the edge would hold; the mean accuracy over tasks). A sender's *gain* is how
much the score rises without it. Then greedy removal: drop the sender whose removal gains most, while
that gain exceeds ``--tolerance`` and a majority is kept (Fang et al. 2020's loss-based rejection, made
sequential because one of two colluding flippers removed alone can look harmless: the other still
dominates). Prints JSON; docs/robustness.md quotes what it found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hffm.aggregation import FedAvg
from hffm.config import load_config
from hffm.data import build_global_test, build_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import ModuleSet, load_modules
from hffm.training import evaluate


def leave_one_out(run_dir: Path, trace_dir: Path, edge: str, tolerance: float = 0.02) -> dict:
    """{round: {"all": score, "gain": {sender: gain}, "removed": [(sender, gain), ...]}} for ``edge``."""
    cfg = load_config(run_dir / "config.yaml", [])
    tok = build_tokenizer()
    model = build_model(cfg, len(tok), task_labels(cfg))
    test = {t: build_global_test(cfg, t, tok) for t in cfg.tasks}
    start = {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in model.module_names()}

    def score(mods: ModuleSet) -> float:
        for n in model.module_names():
            model.load_module_state(n, mods[n].tensors if n in mods else start[n])
        s = evaluate(model, test, "cpu")
        return sum(v.correct / v.total for v in s.values()) / len(s)

    out: dict = {}
    rounds = sorted({int(p.name.split("-")[0][1:]) for p in (trace_dir / edge).glob("r*-aggregate-from-*")})
    for r in rounds:
        files = sorted((trace_dir / edge).glob(f"r{r}-aggregate-from-*.safetensors"))
        copies = {f.name.split("-from-")[1].removesuffix(".safetensors"): load_modules(str(f)) for f in files}

        def mean_of(senders: set[str], r: int = r, copies: dict = copies) -> float:
            agg = FedAvg()
            for s in sorted(senders):
                agg.add(s, list(copies[s].values()))
            return score(agg.result(r))

        every = set(copies)
        full = mean_of(every)
        gain = {s: mean_of(every - {s}) - full for s in sorted(every)}
        kept, removed, base = set(every), [], full
        while len(kept) > len(every) // 2 + 1:
            # the first step's gains are the leave-one-out gains above: not aggregated and scored again
            g = gain if kept == every else {s: mean_of(kept - {s}) - base for s in sorted(kept)}
            s, best = max(g.items(), key=lambda kv: kv[1])
            if best <= tolerance:
                break
            kept.discard(s)
            removed.append((s, best))
            base += best
        out[r] = {"all": full, "gain": gain, "removed": removed}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loo", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    p.add_argument("edge")
    p.add_argument("--tolerance", type=float, default=0.02)
    a = p.parse_args(argv)
    print(json.dumps(leave_one_out(a.run_dir, a.trace_dir, a.edge, a.tolerance), indent=1))


if __name__ == "__main__":
    main()
