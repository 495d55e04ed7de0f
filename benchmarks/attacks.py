"""The rule x attack matrix (issue 17): every robust rule against every poisoning behaviour, as real
federations, at 20 % attackers on Dirichlet(0.1) data.

``python -m benchmarks.attacks --out DIR [--quick] [--set KEY=VALUE ...]``

Each cell is one ``hffm run`` (gRPC on loopback, mTLS, hfm: devices -> edges -> cloud) with the same
topology, data, seed and attackers (``adversary.fraction=0.2``, drawn by seed); only the rule and the
behaviour change. Every run also scores every sender (``flag_z``, flags only: nothing is excluded), so
each cell reports the detection's true and false positive rates too. Written: DIR/attacks.json and
DIR/attacks.md (the tables docs/robustness.md quotes). Accuracy: the mean over tasks of the global test
accuracy after the last round (a cloud round: every device holds the global modules).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import time
from pathlib import Path

from rich.console import Console

from hffm.config import load_config

BASE = [
    "method=hfm",
    "e_agg=2",
    "seed=0",
    "data.alpha=0.1",
    "topology.edges=2",
    "topology.devices_per_edge=5",
    "runtime.devices_per_process=5",
    "rounds=6",
    "train.eval_every=6",
    "adversary.fraction=0.2",
    "aggregation.params.flag_z=3.5",
]
QUICK = ["rounds=2", "train.eval_every=2", "data.train_per_task=150", "data.global_test_per_task=64"]
RULES: dict[str, list[str]] = {
    "fedavg": ["aggregation.rule=fedavg"],
    "median": ["aggregation.rule=median"],
    "trimmed_mean": ["aggregation.rule=trimmed_mean", "aggregation.params.beta=0.2"],
    "multi-krum": ["aggregation.rule=krum", "aggregation.params.f=1", "aggregation.params.m=3"],
    "bulyan": ["aggregation.rule=bulyan", "aggregation.params.f=1"],
    # a rule per tier: Bulyan where the devices' updates arrive, plain FedAvg over the 2 edges at the cloud
    "bulyan (edges), fedavg (cloud)": [
        "aggregation.rule=bulyan",
        "aggregation.params.f=1",
        "aggregation.tiers.cloud.rule=fedavg",
        "aggregation.tiers.cloud.params.flag_z=3.5",
    ],
    "clipped fedavg": ["aggregation.rule=fedavg", "aggregation.params.clip_norm=2"],
    "fedavg, flagged excluded": ["aggregation.rule=fedavg", "aggregation.params.exclude_flagged=1"],
    # also flag senders whose whole updates are twins (cosine >= 0.99: colluders sending one vector)
    "fedavg, flagged or twins excluded": [
        "aggregation.rule=fedavg",
        "aggregation.params.exclude_flagged=1",
        "aggregation.params.twin_cos=0.99",
    ],
    "trimmed_mean, flagged or twins excluded": [
        "aggregation.rule=trimmed_mean",
        "aggregation.params.beta=0.2",
        "aggregation.params.exclude_flagged=1",
        "aggregation.params.twin_cos=0.99",
    ],
    # senders scored by their whole update (update_z) instead of module by module (the matrix's flag_z:
    # the params dict replaced): an honest device whose head stands out alone is not flagged
    "fedavg, update outliers or twins excluded": [
        "aggregation.rule=fedavg",
        "aggregation.params={update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
    ],
    "trimmed_mean, update outliers or twins excluded": [
        "aggregation.rule=trimmed_mean",
        "aggregation.params={beta: 0.2, update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
    ],
    # and a device's weight bounded by 2 x its task's median claim (label flippers buying influence)
    "fedavg, update outliers or twins excluded, claims bounded": [
        "aggregation.rule=fedavg",
        "aggregation.params={update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
        "aggregation.claim_bound=2",
    ],
    # per module (the circulation policy's rule): heads by the trimmed mean, adapters by FedAvg; both
    # with flagged and twin senders excluded
    "fedavg, trimmed heads, flagged or twins excluded": [
        "aggregation.rule=fedavg",
        "aggregation.params.exclude_flagged=1",
        "aggregation.params.twin_cos=0.99",
        'circulation.rules=[{modules: "head.*", depth: cloud, path: direct, rule: trimmed_mean, '
        "params: {beta: 0.2, flag_z: 3.5, exclude_flagged: 1, twin_cos: 0.99}}]",
    ],
    # a device's own update counts with at most 2 x its task's median registered claim
    "fedavg, claims bounded": ["aggregation.rule=fedavg", "aggregation.claim_bound=2"],
    # the heads calibrated on the devices' feature statistics in every cloud round (CCVR), and those
    # statistics checking every device's labels: a device found mislabelled is left out from then on
    "fedavg, calibrated": ["aggregation.rule=fedavg", "calibration.enabled=true"],
    "fedavg, calibrated, labels checked": [
        "aggregation.rule=fedavg",
        "calibration.enabled=true",
        "calibration.label_t=4",
    ],
    "trimmed_mean, update outliers or twins excluded, labels checked": [
        "aggregation.rule=trimmed_mean",
        "aggregation.params={beta: 0.2, update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
        "calibration.enabled=true",
        "calibration.label_t=4",
    ],
    "fedavg, update outliers or twins excluded, labels checked": [
        "aggregation.rule=fedavg",
        "aggregation.params={update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
        "calibration.enabled=true",
        "calibration.label_t=4",
    ],
    # and every device's training push held to the statistics it sent last (a liar's honest statistics
    # beside a flipped update): its heads must not make its reported answers less likely than its start did
    "fedavg, calibrated, labels and heads checked": [
        "aggregation.rule=fedavg",
        "calibration.enabled=true",
        "calibration.label_t=4",
        "calibration.head_check=0.3",
    ],
    "fedavg, update outliers or twins excluded, labels and heads checked": [
        "aggregation.rule=fedavg",
        "aggregation.params={update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
        "calibration.enabled=true",
        "calibration.label_t=4",
        "calibration.head_check=0.3",
    ],
    # and the statistics sent before round 1's training too (calibration.opening): no push unchecked or
    # unbounded by its sender's statistics, the first included
    "fedavg, update outliers or twins excluded, labels and heads checked, statistics first": [
        "aggregation.rule=fedavg",
        "aggregation.params={update_z: 3.5, twin_cos: 0.99, exclude_flagged: 1}",
        "calibration.enabled=true",
        "calibration.label_t=4",
        "calibration.head_check=0.3",
        "calibration.opening=true",
    ],
}
# and each device's weight bounded by 2 x its task's median registered claim (what the statistics' own counts
# cannot bound: a liar inflating them with its claim)
RULES["fedavg, update outliers or twins excluded, labels and heads checked, statistics first, claims bounded"] = [
    *RULES["fedavg, update outliers or twins excluded, labels and heads checked, statistics first"],
    "aggregation.claim_bound=2",
]
BEST = "fedavg, update outliers or twins excluded, labels and heads checked, statistics first, claims bounded"
# senders whose update's matrices look like independent noise flagged too (aggregation.params.structure: a free
# rider hiding in noise of an honest size)
NOISE = "aggregation.params={update_z: 3.5, twin_cos: 0.99, structure: 3, exclude_flagged: 1}"
# and senders whose update lies off the other senders' main directions (aggregation.params.subspace: noise of
# any shape, the free rider that knows the structure check included)
STRAYS = "aggregation.params={update_z: 3.5, twin_cos: 0.99, structure: 3, subspace: 2, exclude_flagged: 1}"
# and senders whose whole update points where the node's last step went (aggregation.params.echo: a free rider
# sending the federation's last step back)
ECHOES = "aggregation.params={update_z: 3.5, twin_cos: 0.99, structure: 3, subspace: 2, echo: 0.5, exclude_flagged: 1}"
for _label, _params in (
    ("twins or noise", NOISE),
    ("twins, noise or strays", STRAYS),
    ("twins, noise, strays or echoes", ECHOES),
):
    RULES[f"fedavg, update outliers, {_label} excluded"] = ["aggregation.rule=fedavg", _params]
    RULES[BEST.replace("update outliers or twins", f"update outliers, {_label}", 1)] = [
        _params if s.startswith("aggregation.params=") else s for s in RULES[BEST]
    ]
ATTACKS: dict[str, list[str]] = {
    "none": ["adversary.fraction=0"],
    # no attack: the attackers hold no training data (the yardstick of a defence that left theirs out from the
    # start: what only they hold leaves with them)
    "absent": ["adversary.behaviour=absent"],
    "sign_flip": ["adversary.behaviour=sign_flip", "adversary.scale=10"],
    "scale": ["adversary.behaviour=scale", "adversary.scale=20"],
    "noise": ["adversary.behaviour=noise", "adversary.sigma=1"],
    "free_ride": ["adversary.behaviour=free_ride"],
    "label_flip": ["adversary.behaviour=label_flip"],
    "alie": ["adversary.behaviour=alie"],  # z from Baruch et al.'s formula at each attacker's edge
    "ipm": ["adversary.behaviour=ipm", "adversary.epsilon=0.5"],
    # label flipping with the attackers registering (and pushing with) 20x their samples: influence bought
    "label_flip x20": ["adversary.behaviour=label_flip", "adversary.claim=20"],
    # a free rider hiding: what it received plus noise the size of an honest update (σ 0.01 per value:
    # an adapter's update of about 2.6 in norm, where honest ones measure 2.4-3.9 at full size)
    "free_ride + noise": ["adversary.behaviour=noise", "adversary.sigma=0.01"],
    # ... and knowing the structure check: the noise of each matrix one random direction (rank 1), of the
    # same expected size
    "free_ride + rank-1 noise": ["adversary.behaviour=noise", "adversary.sigma=0.01", "adversary.noise_rank=1"],
    # ... or sending the last step it saw back (its start minus its previous start, an honest size at full size:
    # 2.2-2.6 where honest updates measure 2.1-6.4), a fifth of its norm in noise so that two are not twins
    "echo": ["adversary.behaviour=echo", "adversary.scale=1", "adversary.jitter=0.2"],
    # ... drowned in noise of twice the step's size, which takes its cosine with the step under echo's cut (1/√5)
    "echo + noise": ["adversary.behaviour=echo", "adversary.scale=1", "adversary.jitter=2"],
    # label flippers that report their data's true statistics (a liar hiding from the label check)
    "label_flip, honest stats": ["adversary.behaviour=label_flip", "adversary.stats=honest"],
    "label_flip x20, honest stats": ["adversary.behaviour=label_flip", "adversary.claim=20", "adversary.stats=honest"],
    "label_flip x20, empty stats": ["adversary.behaviour=label_flip", "adversary.claim=20", "adversary.stats=empty"],
    "label_flip x20, inflated stats": [
        "adversary.behaviour=label_flip",
        "adversary.claim=20",
        "adversary.stats=inflated",
    ],
}


YARDSTICK = "absent"  # not an attack: what a defence that left the attackers' data out from the start reaches


def mean_accuracy(results: dict) -> float:
    last = [r for r in results["rounds"] if r["accuracy"]][-1]
    vals = [v["global"] for v in last["accuracy"].values()]
    return sum(vals) / len(vals)


def run_matrix(
    out: Path,
    quick: bool = False,
    sets: list[str] | None = None,
    log=print,
    rules: list[str] | None = None,
    attacks: list[str] | None = None,
) -> dict:
    """Run the matrix's cells (``rules`` x ``attacks``: those only, the other cells kept from an earlier
    DIR/attacks.json of the same settings; default: every rule and every attack)."""
    from services.launcher import run

    out.mkdir(parents=True, exist_ok=True)
    base = [*BASE, *(QUICK if quick else []), *(sets or [])]
    res: dict = {"sets": base, "cells": {}}
    kept = out / "attacks.json"
    if (rules or attacks) and kept.is_file():
        old = json.loads(kept.read_text())
        if not _same_settings(old.get("sets", []), base):  # its cells would be lost, or mixed with these
            raise SystemExit(f"{kept} holds a matrix of other settings ({old.get('sets')}); give another --out")
        res["cells"] = old["cells"]
    for rule, rsets in RULES.items():
        if rules and rule not in rules:
            continue
        for attack, asets in ATTACKS.items():
            if attacks and attack not in attacks:
                continue
            name = re.sub(r"[^\w.-]+", "_", f"{rule}--{attack}")
            cfg_sets = [*base, *rsets, *asets]
            t = time.time()
            results = run(load_config(None, cfg_sets), out / name, Console(file=io.StringIO()), force=True)
            det = results["detection"]
            cell = {
                "accuracy": mean_accuracy(results),
                "tpr": det["recall"],
                "fpr": det["false_positive_rate"],
                "adversaries": det["adversaries"],
                "wall_s": time.time() - t,
            }
            res["cells"].setdefault(rule, {})[attack] = cell
            log(f"{rule:15s} {attack:10s} acc={cell['accuracy']:.3f} tpr={cell['tpr']} fpr={cell['fpr']}")
    (out / "attacks.json").write_text(json.dumps(res, indent=1))
    (out / "attacks.md").write_text(tables(res))
    return res


def _same_settings(a: list[str], b: list[str]) -> bool:
    """Whether two lists of KEY=VALUE settings make the same config (``seed=0`` written out is the default)."""
    return a == b or load_config(None, a).model_dump(mode="json") == load_config(None, b).model_dump(mode="json")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def tables(res: dict) -> str:
    """Accuracy per cell with each rule's worst case (over every column but ``absent``, the yardstick) against
    the clean FedAvg run, its own clean run and its own attackers-absent run, then detection (the clean column's
    FPR: honest senders flagged with no attacker at all)."""
    cells = {r: cells for r in RULES if (cells := res["cells"].get(r))}
    cells.update({r: c for r, c in res["cells"].items() if r not in cells})  # rules of other versions
    present = {a for row in cells.values() for a in row}
    attacks = [a for a in ATTACKS if a in present] + sorted(present - set(ATTACKS))
    clean = cells.get("fedavg", {}).get("none", {}).get("accuracy")  # absent where those rows were not run
    lines = [
        "| rule | "
        + " | ".join(attacks)
        + " | worst (points vs clean FedAvg) | worst (points vs its own clean run)"
        + " | worst (points vs its own attackers-absent run) |",
        "|---|" + "---|" * (len(attacks) + 3),
    ]

    def acc(row: dict, a: str) -> str:
        return f"{row[a]['accuracy']:.3f}" if a in row else "—"

    def points(worst: float, ref: float | None) -> str:
        return "—" if ref is None else f"{100 * (worst - ref):+.1f}"

    for rule, row in cells.items():
        judged = [c["accuracy"] for a, c in row.items() if a != YARDSTICK]
        worst = min(judged) if judged else None
        own = row.get("none", {}).get("accuracy")
        absent = row.get(YARDSTICK, {}).get("accuracy")
        cols = " | ".join(acc(row, a) for a in attacks)
        vs = " | ".join("—" if worst is None else points(worst, ref) for ref in (clean, own, absent))
        lines.append(f"| {rule} | {cols} | {vs} |")
    # "none": no attacker, so no TPR; its FPR is the honest senders flagged in a clean run
    lines += ["", "| rule | " + " | ".join(f"{a} TPR / FPR" for a in attacks) + " |"]
    lines.append("|---|" + "---|" * len(attacks))

    def det(row: dict, a: str) -> str:
        return f"{_pct(row[a]['tpr'])} / {_pct(row[a]['fpr'])}" if a in row else "—"

    for rule, row in cells.items():
        lines.append(f"| {rule} | " + " | ".join(det(row, a) for a in attacks) + " |")
    return "\n".join(lines) + "\n"


# ---- draws: the same matrix under other initialisations ------------------------------------------------------
# One matrix is one draw of everything random in training. The seed fixes the data, its split and the attackers;
# ``model.init_seed`` draws the adapters' and heads' initial values, and every step after differs with it. Two
# cells of one draw differing by a few points can be the draw (docs/robustness.md: the same cell moved by up to
# 3.6 points with the random numbers alone), so a goal of "within 2 points of the clean run" is judged on the
# difference of each cell from the clean cell of the same draw, over several draws.


def draw_dir(out: Path, init_seed: int) -> Path:
    """Where a draw's matrix is kept: one attacks.json per initialisation."""
    return out / f"init-{init_seed}"


def run_draws(
    out: Path,
    init_seeds: list[int],
    quick: bool = False,
    sets: list[str] | None = None,
    log=print,
    rules: list[str] | None = None,
    attacks: list[str] | None = None,
) -> dict:
    """``run_matrix`` once per initialisation (``model.init_seed``), each under OUT/init-<seed>, then
    ``summarise_draws`` over every draw kept under OUT."""
    if len(set(init_seeds)) != len(init_seeds):
        raise ValueError(f"--init-seed: each draw once, got {init_seeds}")
    for s in init_seeds:
        log(f"draw: model.init_seed={s}")
        run_matrix(draw_dir(out, s), quick, [*(sets or []), f"model.init_seed={s}"], log, rules, attacks)
    return write_draws(out)


def write_draws(out: Path) -> dict:
    """``summarise_draws`` of OUT, written to OUT/draws.json and OUT/draws.md."""
    summary = summarise_draws(out)
    (out / "draws.json").write_text(json.dumps(summary, indent=1))
    (out / "draws.md").write_text(draw_tables(summary))
    return summary


def summarise_draws(out: Path) -> dict:
    """rule -> attack -> {"accuracy": [per draw], "vs_clean": [per draw: the cell minus the same draw's clean
    cell, in points], "vs_absent": [the same against the draw's attackers-absent cell], "tpr"/"fpr": [per draw]}
    over every OUT/init-*/attacks.json, draws in order of their seed. A draw without the rule's clean (absent)
    cell gives no ``vs_clean`` (``vs_absent``) for it. Draws of other settings than the first's (apart from the
    initialisation) are refused: they would not be draws of one matrix."""
    found = sorted(out.glob("init-*/attacks.json"), key=lambda p: int(p.parent.name.removeprefix("init-")))
    if not found:
        raise ValueError(f"no draws under {out} (init-<seed>/attacks.json)")

    def settings(path: Path) -> list[str]:
        return [s for s in json.loads(path.read_text())["sets"] if not s.startswith("model.init_seed=")]

    first = settings(found[0])
    for path in found[1:]:
        if not _same_settings(settings(path), first):
            raise ValueError(f"{path} holds a matrix of other settings than {found[0]}")
    summary: dict = {"sets": first, "draws": [int(p.parent.name.removeprefix("init-")) for p in found], "cells": {}}
    for path in found:
        cells = json.loads(path.read_text())["cells"]
        for rule, row in cells.items():
            refs = {
                "vs_clean": row.get("none", {}).get("accuracy"),
                "vs_absent": row.get(YARDSTICK, {}).get("accuracy"),
            }
            for attack, cell in row.items():
                got = (
                    summary["cells"]
                    .setdefault(rule, {})
                    .setdefault(attack, {"accuracy": [], "vs_clean": [], "vs_absent": [], "tpr": [], "fpr": []})
                )
                got["accuracy"].append(cell["accuracy"])
                got["tpr"].append(cell["tpr"])
                got["fpr"].append(cell["fpr"])
                for key, ref in refs.items():
                    if ref is not None:
                        got[key].append(100 * (cell["accuracy"] - ref))
    return summary


def _spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "—"
    med = format(statistics.median(xs), fmt)
    return med if len(xs) == 1 else f"{med} ({format(min(xs), fmt)} to {format(max(xs), fmt)})"


def draw_tables(summary: dict) -> str:
    """Per rule and attack: the median accuracy over the draws, and the medians of each draw's difference from
    its own clean run and from its own attackers-absent run (ranges in brackets); per rule, the worst attack by
    each median (``absent`` is the yardstick, not an attack)."""
    lines = [
        f"draws (model.init_seed): {', '.join(map(str, summary['draws']))}",
        "",
        "| rule | attack | draws | accuracy, median (range) | vs the same draw's clean run, points: median (range) "
        "| vs the same draw's attackers-absent run | TPR, median | FPR, median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[str, dict[str, tuple[float, str]]] = {}
    order = list(ATTACKS)
    for rule, row in summary["cells"].items():
        for attack, c in sorted(row.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            tpr = [t for t in c["tpr"] if t is not None]
            fpr = [f for f in c["fpr"] if f is not None]
            vs_clean = _spread(c["vs_clean"], "+.1f") if attack != "none" else "—"
            vs_absent = _spread(c.get("vs_absent", []), "+.1f") if attack != YARDSTICK else "—"
            lines.append(
                f"| {rule} | {attack} | {len(c['accuracy'])} | {_spread(c['accuracy'], '.3f')} | {vs_clean} | "
                f"{vs_absent} | {_pct(statistics.median(tpr)) if tpr else '—'} | "
                f"{_pct(statistics.median(fpr)) if fpr else '—'} |"
            )
            if attack in ("none", YARDSTICK):
                continue
            for key in ("vs_clean", "vs_absent"):
                if c.get(key):
                    med = statistics.median(c[key])
                    if key not in worst.setdefault(rule, {}) or med < worst[rule][key][0]:
                        worst[rule][key] = (med, attack)

    def show(w: tuple[float, str] | None) -> str:
        return "—" if w is None else f"{w[0]:+.1f} ({w[1]})"

    lines += [
        "",
        "| rule | worst attack by the median difference from the clean run | ... from the attackers-absent run |",
        "|---|---|---|",
    ]
    lines += [f"| {rule} | {show(w.get('vs_clean'))} | {show(w.get('vs_absent'))} |" for rule, w in worst.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/attacks"))
    p.add_argument("--quick", action="store_true", help="2 rounds, small pools")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--rule", dest="rules", action="append", default=[], help=f"a row to (re)run (repeatable): {list(RULES)}"
    )
    p.add_argument(
        "--attack",
        dest="attacks",
        action="append",
        default=[],
        help=f"a column to (re)run (repeatable): {list(ATTACKS)}",
    )
    p.add_argument(
        "--init-seed",
        dest="init_seeds",
        action="append",
        type=int,
        default=[],
        help="run the matrix once per initialisation (model.init_seed; repeatable), each under OUT/init-<seed>, "
        "and summarise the draws",
    )
    p.add_argument("--summary", action="store_true", help="only summarise the draws kept under OUT")
    a = p.parse_args(argv)
    if unknown := [r for r in a.rules if r not in RULES]:
        p.error(f"--rule: unknown {unknown}; known: {list(RULES)}")
    if unknown := [x for x in a.attacks if x not in ATTACKS]:
        p.error(f"--attack: unknown {unknown}; known: {list(ATTACKS)}")
    if a.summary or a.init_seeds:
        try:
            if a.summary:
                summary = write_draws(a.out)
            else:
                summary = run_draws(
                    a.out, a.init_seeds, a.quick, a.sets, rules=a.rules or None, attacks=a.attacks or None
                )
        except ValueError as err:
            p.error(str(err))
        print(draw_tables(summary))
        return
    res = run_matrix(a.out, a.quick, a.sets, rules=a.rules or None, attacks=a.attacks or None)
    print(tables(res))


if __name__ == "__main__":
    main()
