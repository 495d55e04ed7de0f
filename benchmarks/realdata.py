"""Federated results on a real data set nobody here made (easy-VQA), against the upper bound.

``python -m benchmarks.realdata --out DIR [--quick] [--set KEY=VALUE ...]``

Runs star, hfm, hfm-d2d and edge-only as real services (``hffm run``: gRPC on loopback, mTLS) on the
same topology, data, seed and number of passes over the data, and trains the same modules centralised
on the whole training pool (``hffm.centralised``). Writes DIR/realdata.json, DIR/realdata.md (the
table docs/results.md quotes) and DIR/realdata.png (mean global accuracy per round).

Compared: each task's global test accuracy after the last round, pooled over the devices holding the
task (in star, hfm and hfm-d2d the last round ends with a cloud aggregation, so every device holds the
same global modules; in edge-only each cluster keeps its own).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from pathlib import Path

from rich.console import Console

from hffm.centralised import run_centralised
from hffm.config import load_config
from hffm.runinfo import totals  # one definition of a run's totals: results.json's

METHODS = ("star", "hfm", "hfm-d2d", "edge-only")
BASE = [
    "data.source=easy-vqa",
    "model.image_size=64",  # easy-VQA's own resolution
    "e_agg=2",
    "seed=0",
    "data.global_test_per_task=300",
    "train.eval_every=2",  # devices test in the cloud rounds (and the last): 12 devices x 3 tasks x 300 each time
    "topology.edges=3",
    "topology.devices_per_edge=4",
    "rounds=10",
]
QUICK = [
    "topology.edges=2",
    "topology.devices_per_edge=2",
    "rounds=2",
    "data.train_per_task=120",
    "data.global_test_per_task=64",
]


def final_accuracy(results: dict) -> dict[str, float]:
    last = [r for r in results["rounds"] if r["accuracy"]][-1]
    return {t: v["global"] for t, v in sorted(last["accuracy"].items())}


# settings centralised training ignores (its cached result is kept)
FEDERATED_ONLY = (
    "train.prox_mu",
    "train.restricted_softmax",
    "train.logit_adjust",
    "train.decorr",
    "train.head_only_share",
    "aggregation.server_lr",
    "calibration.",
    "adversary.",  # the bound is the honest pool's: centralised training has no adversaries
)


def run_all(
    out: Path,
    quick: bool = False,
    sets: list[str] | None = None,
    log=print,
    methods: tuple[str, ...] = METHODS,
    label: str = "",
) -> dict:
    """``label`` names a variant (e.g. ``prox0.01`` with ``--set train.prox_mu=0.01``): its rows are
    ``<method> (<label>)`` and its results are kept beside the plain ones in the same DIR."""
    out.mkdir(parents=True, exist_ok=True)
    sets_ = [*BASE, *(QUICK if quick else []), *(sets or [])]
    from services.launcher import run

    res: dict = {"sets": sets_, "methods": {}, "curves": {}, "split": split_summary(load_config(None, sets_))}

    code = code_digest()

    def part(name: str, make, key: list[str]) -> dict:
        # each part's results are kept (DIR/<name>.json with the settings and the code): a re-run redoes only
        # what changed, and a result of other code is made again (float rounding alone moves the bound)
        f = out / f"{name}.json"
        if f.is_file() and (kept := json.loads(f.read_text())).get("sets") == key and kept.get("code") == code:
            log(f"{name}: kept from {f}")
            return kept["results"]
        log(f"{name}...")
        results = make()
        f.write_text(json.dumps({"sets": key, "code": code, "results": results}))
        return results

    t = time.time()
    central_sets = [s for s in sets_ if not s.startswith(FEDERATED_ONLY)]
    central = part(
        "centralised",
        lambda: run_centralised(load_config(None, central_sets), log=lambda s: log("  " + s)),
        central_sets,
    )
    res["centralised"] = {"accuracy": final_accuracy(central), "wall_s": time.time() - t}
    res["curves"]["centralised"] = [[r["round"], _mean(r)] for r in central["rounds"]]
    for m in methods:
        name, row = (f"{m}-{label}", f"{m} ({label})") if label else (m, m)
        results = part(
            name,
            lambda m=m, name=name: run(
                load_config(None, [*sets_, f"method={m}"]), out / name, Console(file=io.StringIO()), force=True
            ),
            sets_,
        )
        res["methods"][row] = {"accuracy": final_accuracy(results), **totals(results["rounds"])}
        res["curves"][row] = [[r["round"], _mean(r)] for r in results["rounds"] if r["accuracy"]]
        log("  " + " ".join(f"{k}={v:.3f}" for k, v in res["methods"][row]["accuracy"].items()))
    (out / "realdata.json").write_text(json.dumps(res, indent=1))
    (out / "realdata.md").write_text(table(res))
    plot(res, out / "realdata.png")
    return res


def code_digest() -> str:
    """A digest of the code that makes a result (the Python sources under hffm/ and services/): what a kept
    result must have been made by to be reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted([*root.glob("hffm/**/*.py"), *root.glob("services/**/*.py")]):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def split_summary(cfg) -> dict[str, dict]:
    """Each task's split over the starting devices (``hffm partition``'s summary): how many devices hold
    a single answer and the share of samples not of their device's most common answer, against the pool."""
    from hffm.data import partition_counts, skew_summary
    from hffm.topology import split_table

    holders = split_table(cfg).holders_by_task()
    return {t: skew_summary(c) for t, c in partition_counts(cfg, holders).items()}


def _mean(r: dict) -> float:
    return sum(v["global"] for v in r["accuracy"].values()) / len(r["accuracy"])


def table(res: dict) -> str:
    tasks = list(res["centralised"]["accuracy"])
    head = (
        "| method | "
        + " | ".join(tasks)
        + " | mean | vs centralised (points, worst task) | MB moved | modeled latency s |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    c = res["centralised"]["accuracy"]
    cm = sum(c.values()) / len(c)
    lines.append("| centralised | " + " | ".join(f"{c[t]:.3f}" for t in tasks) + f" | {cm:.3f} | — | — | — |")
    for m, r in res["methods"].items():
        a = r["accuracy"]
        worst = min(100 * (a[t] - c[t]) for t in tasks)
        lines.append(
            f"| {m} | " + " | ".join(f"{a[t]:.3f}" for t in tasks) + f" | {sum(a.values()) / len(a):.3f} | "
            f"{worst:+.1f} | {r['bytes'] / 1e6:.1f} | {r['modeled_latency_s']:.1f} |"
        )
    if split := res.get("split"):
        lines.append("")
        lines.append(
            "Split (`hffm partition`): "
            + "; ".join(
                f"{t}: {v['single_answer']} of {v['devices']} devices hold one answer, "
                f"{v['minority_share']:.0%} of the samples are not of their device's top answer "
                f"(pooled {v['pool_minority_share']:.0%})"
                for t, v in split.items()
            )
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"centralised": ("--", "o"), "hfm-d2d": (":", "x")}  # hfm-d2d's accuracy is hfm's: drawn over it
    for name, curve in res["curves"].items():
        ls, marker = style.get(name, ("-", "o"))
        ax.plot([x for x, _ in curve], [y for _, y in curve], marker=marker, ls=ls, label=name)
    ax.set_xlabel("round (centralised: pass over the pool)")
    ax.set_ylabel("mean global accuracy (easy-VQA tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realdata", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/realdata"))
    p.add_argument("--quick", action="store_true", help="2 edges x 2 devices, 2 rounds, small pools")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--label", default="", help="name of a variant (its --set): rows '<method> (<label>)'")
    a = p.parse_args(argv)
    methods = tuple(m for m in a.methods.split(",") if m)
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {unknown}")
    if a.label and not a.label.replace(".", "").replace("-", "").replace("_", "").isalnum():
        p.error(f"--label: {a.label!r} must be letters, digits, '.', '-' or '_'")
    res = run_all(a.out, a.quick, a.sets, methods=methods, label=a.label)
    print(table(res))


if __name__ == "__main__":
    main()
