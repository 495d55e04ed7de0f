"""Leave-one-out validation at an edge, offline (issue 17: would it catch label flippers?).

``python -m benchmarks.loo RUN_DIR TRACE_DIR EDGE [--tolerance 0.02] [--context round|last] [--metric auc] [--mean]``

Takes a finished run made with ``runtime.trace_dir=TRACE_DIR`` (every copy a node received, saved) and,
for each round, the copies ``EDGE`` collected from its devices: the FedAvg of all of them and of all but
each sender, each set into the run's model and scored on held-out data (the run's global test set,
standing in for a root set the edge would hold; the mean accuracy over tasks). A sender's *gain* is how
much the score rises without it. Then greedy removal: drop the sender whose removal gains most, while
that gain exceeds ``--tolerance`` and a majority is kept (Fang et al. 2020's loss-based rejection, made
sequential because one of two colluding flippers removed alone can look harmless: the other still
dominates). ``--context round|last`` scores each aggregate as part of the global model instead of alone
(``leave_one_out``); ``--metric auc`` scores it by how well each answer's logit ranks that answer's
questions (``scorer``) instead of by accuracy; ``--mean`` adds each sender's gain averaged over the rounds
(``mean_gains``). Prints JSON; docs/robustness.md quotes what it found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hffm.aggregation import FedAvg
from hffm.config import load_config
from hffm.data import build_global_test, build_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import Module, ModuleSet, load_modules
from hffm.training import evaluate


def scorer(run_dir: Path, metric: str = "accuracy"):
    """(score, start): ``score(modules)`` is the mean over tasks of the run's model with those modules (the
    initial ones where a module is missing) on the run's global test set: its accuracy, or with ``metric``
    ``"auc"`` the mean over answers of how well each answer's logit ranks that answer's questions above the
    others (one-vs-rest ROC AUC, which a per-answer offset, i.e. a learned prior, does not change);
    ``start`` holds the initial modules' tensors."""
    cfg = load_config(run_dir / "config.yaml", [])
    tok = build_tokenizer()
    model = build_model(cfg, len(tok), task_labels(cfg))
    test = {t: build_global_test(cfg, t, tok) for t in cfg.tasks}
    start = {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in model.module_names()}

    def score(mods: ModuleSet) -> float:
        for n in model.module_names():
            model.load_module_state(n, mods[n].tensors if n in mods else start[n])
        if metric == "auc":
            return sum(macro_auc(model, td) for td in test.values()) / len(test)
        s = evaluate(model, test, "cpu")
        return sum(v.correct / v.total for v in s.values()) / len(s)

    return score, start


@torch.no_grad()
def macro_auc(model, td) -> float:
    """``macro_auc_of`` the model's logits on all of ``td``."""
    torch.manual_seed(0)  # ViLT's patch order, as in evaluate
    batch = td.batch(torch.arange(len(td)), "cpu")
    return macro_auc_of(model(batch, td.task).float(), batch["labels"])


def macro_auc_of(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the answers present in ``labels`` (with questions of other answers too) of the one-vs-rest
    ROC AUC of that answer's logit: P(a question with the answer scores higher than one without; ties
    count half). Label -1 (an answer outside the vocabulary) has no logit of its own and is skipped."""
    aucs = []
    for k in labels.unique().tolist():
        if k < 0:
            continue
        pos, neg = logits[labels == k, k], logits[labels != k, k]
        if len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()))
    return sum(aucs) / max(len(aucs), 1)


def leave_one_out(
    run_dir: Path, trace_dir: Path, edge: str, tolerance: float = 0.02, context: str = "", metric: str = "accuracy"
) -> dict:
    """{round: {"all": score, "gain": {sender: gain}, "removed": [(sender, gain), ...]}} for ``edge``.

    ``context``: score each aggregate as part of the global model rather than alone (an edge's aggregate
    judged alone penalises an honest device whose data is unlike its cluster's, which the other edges'
    data may complement): ``"round"``, averaged (by samples) with the other edges' aggregates of the same
    round, as the cloud makes it (cloud rounds only; an edge cannot know them when it aggregates);
    ``"last"``, averaged with the last global modules the edge received (what it can know), weighted as
    the other edges' samples in them; before the first cloud round, the initial modules weighted as this
    edge's own samples."""
    score, start = scorer(run_dir, metric)

    def last_global(r: int, copies: dict[str, ModuleSet]) -> ModuleSet:
        """What the edge knows of the other edges at round r: the last global modules before r, each weighted
        as the other edges' samples in it; before the first cloud round, the initial modules weighted as this
        edge's own samples of the round."""
        cloud = trace_dir / "cloud"
        prev = [q for q in range(1, r) if (cloud / f"r{q}-aggregate-aggregate.safetensors").is_file()]
        if not prev:
            own: dict[str, float] = {}
            for mods in copies.values():
                for k, m in mods.items():
                    own[k] = own.get(k, 0.0) + m.num_samples
            return {k: Module(k, start[k], 0, w) for k, w in own.items()}
        g = load_modules(str(cloud / f"r{prev[-1]}-aggregate-aggregate.safetensors"))
        mine = load_modules(str(cloud / f"r{prev[-1]}-aggregate-from-{edge}.safetensors"))
        return {
            k: Module(k, m.tensors, 0, max(m.num_samples - (mine[k].num_samples if k in mine else 0.0), 1.0))
            for k, m in g.items()
        }

    out: dict = {}
    rounds = sorted({int(p.name.split("-")[0][1:]) for p in (trace_dir / edge).glob("r*-aggregate-from-*")})
    for r in rounds:
        copies = _received(trace_dir / edge, r)

        others: dict = {}
        if context == "round":
            others = _received(trace_dir / "cloud", r)
            if edge not in others:
                continue  # not a cloud round
            others.pop(edge)
        elif context == "last":
            others = {"global": last_global(r, copies)}

        def mean_of(senders: set[str], r: int = r, copies: dict = copies, others: dict = others) -> float:
            mine = _fedavg({s: copies[s] for s in senders}, r)
            return score(_fedavg({edge: mine, **others}, r) if others else mine)

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


def mean_gains(rounds: dict) -> dict[str, float]:
    """Each sender's first leave-one-out gain averaged over the rounds it was scored in (``leave_one_out``'s
    result): evidence that adds up over rounds where one round's is noise."""
    gains: dict[str, list[float]] = {}
    for v in rounds.values():
        for sender, g in v["gain"].items():
            gains.setdefault(sender, []).append(g)
    return {s: sum(g) / len(g) for s, g in sorted(gains.items())}


def _fedavg(sets: dict[str, ModuleSet], r: int) -> ModuleSet:
    """The FedAvg of ``sets`` (sender -> its copy), senders added in sorted order as a collecting node does."""
    agg = FedAvg()
    for s in sorted(sets):
        agg.add(s, list(sets[s].values()))
    return agg.result(r)


def _received(node_trace: Path, r: int) -> dict[str, ModuleSet]:
    """{sender: the copy it sent} for the copies a node collected in round ``r`` (its trace's files)."""
    files = sorted(node_trace.glob(f"r{r}-aggregate-from-*.safetensors"))
    return {f.name.split("-from-")[1].removesuffix(".safetensors"): load_modules(str(f)) for f in files}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loo", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    p.add_argument("edge")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument(
        "--context",
        choices=["", "round", "last"],
        default="",
        help="score mixed with the other edges' aggregates of the round (cloud rounds), or with the last global "
        "modules",
    )
    p.add_argument("--metric", choices=["accuracy", "auc"], default="accuracy", help="what an aggregate is scored by")
    p.add_argument("--mean", action="store_true", help="also each sender's gain averaged over the rounds")
    a = p.parse_args(argv)
    res = leave_one_out(a.run_dir, a.trace_dir, a.edge, a.tolerance, a.context, a.metric)
    print(json.dumps({"rounds": res, "mean_gain": mean_gains(res)} if a.mean else res, indent=1))


if __name__ == "__main__":
    main()
