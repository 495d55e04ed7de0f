"""Round records from node reports, ``results.json``, and the accuracy/bytes plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from hffm.methods import LINK_KINDS


def round_record(
    method: str,
    round_: int,
    e_agg: int,
    cloud_aggregation: bool,
    reports: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """One round's results from every node's report (plain dicts, see ``RoundReport``)."""
    by_link = dict.fromkeys(LINK_KINDS, 0)
    by_module: dict[str, int] = defaultdict(int)
    by_link_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    transfers = 0
    hops: dict[tuple[str, ...], int] = defaultdict(int)
    acc: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    loss_sum, samples = 0.0, 0
    for r in reports:
        for t in r.get("sent", []):
            by_link[t["link"]] = by_link.get(t["link"], 0) + int(t["bytes"])
            by_module[t["module"]] += int(t["bytes"])
            by_link_module[t["link"]][t["module"]] += int(t["bytes"])
            transfers += 1
            key = (
                t["sender"],
                t["receiver"],
                t.get("origin") or t["sender"],
                t.get("destination") or t["receiver"],
                t["tag"],
                t["link"],
            )
            hops[key] += int(t["bytes"])
        for m in r.get("metrics", []):
            cell = acc[m["task"]][m["split"]]
            cell[0] += int(m["correct"])
            cell[1] += int(m["total"])
        n = int(r.get("train_samples", 0))
        loss_sum += float(r.get("train_loss", 0.0)) * n
        samples += n
    return {
        "method": method,
        "round": round_,
        "e_agg": e_agg,
        "cloud_aggregation": cloud_aggregation,
        # device level = each device's modules on its own test split; global = the same modules on
        # the task's global test set. Pooled over devices (sample-weighted).
        "accuracy": {
            task: {split: (c / n if n else None) for split, (c, n) in splits.items()}
            for task, splits in sorted(acc.items())
        },
        "loss": loss_sum / samples if samples else None,
        "train_samples": samples,
        "bytes_by_link": by_link,
        "bytes_by_module": dict(sorted(by_module.items())),
        "bytes_by_link_module": {k: dict(sorted(v.items())) for k, v in by_link_module.items()},
        "bytes_total": sum(by_link.values()),
        "transfers": transfers,
        # every hop of every push, as the sending (or relaying) node recorded it
        "hops": [
            {
                "sender": k[0],
                "receiver": k[1],
                "origin": k[2],
                "destination": k[3],
                "tag": k[4],
                "link": k[5],
                "bytes": b,
            }
            for k, b in sorted(hops.items())
        ],
        "wall_s": wall_s,
    }


def write_results(path: str | Path, config: dict[str, Any], rounds: list[dict[str, Any]], **extra: Any) -> None:
    doc = {"config": config, "rounds": rounds, **extra}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def plot_accuracy(ax, rounds: list[dict[str, Any]]) -> None:
    """Accuracy per task and split over rounds (one colour per task; solid local, dashed global)."""
    xs = [r["round"] for r in rounds]
    for i, task in enumerate(sorted({t for r in rounds for t in r["accuracy"]})):
        for split, style in (("local", "-o"), ("global", "--s")):
            ys = [r["accuracy"].get(task, {}).get(split) for r in rounds]
            ax.plot(
                xs, [y if y is not None else float("nan") for y in ys], style, color=f"C{i}", label=f"{task} ({split})"
            )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no round was evaluated
        ax.legend(fontsize=8)


def plot_bytes_by_link(ax, rounds: list[dict[str, Any]]) -> None:
    """MB sent per round, stacked by link kind."""
    xs = [r["round"] for r in rounds]
    bottom = [0.0] * len(xs)
    for link in LINK_KINDS:
        ys = [r["bytes_by_link"].get(link, 0) / 1e6 for r in rounds]
        if any(ys):
            ax.bar(xs, ys, bottom=bottom, label=link)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("MB sent")
    ax.legend(fontsize=8)


def plot_results(results: dict[str, Any], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(ax1, rounds)
    ax1.set_title(f"accuracy — {rounds[0]['method'] if rounds else ''}")
    plot_bytes_by_link(ax2, rounds)
    ax2.set_title("bytes per round by link")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
