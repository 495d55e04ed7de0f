"""``hffm report``: the dashboards' panels as PNG, for people without Grafana.

Two sources:
- results.json files (one or several runs): every panel whose data a run records — progress,
  accuracy, bytes by link, modeled energy by tier and link, modeled vs measured latency, traffic per
  module, and the Table I view across runs. Panels that need live metrics (RPC latency, rejections)
  are drawn from Prometheus only.
- a Prometheus URL: every panel of deploy/grafana/dashboards/*.json, its PromQL run as a range query
  over the window given, one line per series.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from hffm.results import plot_accuracy, plot_bytes_by_link

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def from_results(results: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Panels from one or more results.json documents; returns {name: png}."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    first = results[0]
    rounds = first["rounds"]
    xs = [r["round"] for r in rounds]
    fig, axes = plt.subplots(3, 2, figsize=(13, 12))
    (a_prog, a_acc), (a_bytes, a_energy), (a_lat, a_mod) = axes

    a_prog.plot(xs, [sum(r["wall_s"] for r in rounds[: i + 1]) for i in range(len(rounds))], "-o")
    a_prog.set_title(f"round progress: {len(rounds)}/{first['config']['rounds']} rounds ({rounds[0]['method']})")
    a_prog.set_xlabel("round")
    a_prog.set_ylabel("elapsed wall time (s)")

    plot_accuracy(a_acc, rounds)
    a_acc.set_title("accuracy per task (device modules; local / global test sets)")
    plot_bytes_by_link(a_bytes, rounds)
    a_bytes.set_title("MB sent per round by link kind")

    cum: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(rounds))
    for i, r in enumerate(rounds):
        for key, e in r.get("modeled", {}).get("by_tier_link", {}).items():
            cum[key][i] += e
    for key, ys in sorted(cum.items()):
        acc = 0.0
        line = []
        for y in ys:
            acc += y
            line.append(acc)
        a_energy.plot(xs, line, label=key)
    a_energy.set_title("cumulative modeled energy (J) by tier and link kind")
    if cum:
        a_energy.legend(fontsize=7)

    a_lat.plot(xs, [r.get("modeled", {}).get("latency_s", float("nan")) for r in rounds], "-o", label="modeled")
    a_lat.plot(xs, [r["wall_s"] for r in rounds], "--s", label="measured (wall)")
    a_lat.set_title("latency per round (s): modeled vs measured")
    a_lat.legend(fontsize=8)

    per_module: dict[str, int] = defaultdict(int)
    for r in rounds:
        for m, b in r["bytes_by_module"].items():
            per_module[m] += b
    names = sorted(per_module)
    a_mod.barh(names, [per_module[n] / 1e6 for n in names])
    a_mod.set_title("traffic per module (MB, whole run)")
    fig.tight_layout()
    paths = {"run": out / "report-run.png"}
    fig.savefig(paths["run"], dpi=90)
    plt.close(fig)

    # Table I view: per-round modeled latency and energy by method, runs side by side
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{d['rounds'][0]['method']} (E={d['config']['e_agg']})" for d in results if d["rounds"]]

    def mean_modeled(d: dict, key: str) -> float:
        vals = [r.get("modeled", {}).get(key, float("nan")) for r in d["rounds"]]
        return sum(vals) / len(vals)

    lat = [mean_modeled(d, "latency_s") for d in results if d["rounds"]]
    en = [mean_modeled(d, "energy_j") for d in results if d["rounds"]]
    acc = [
        sum(v["global"] for v in d["rounds"][-1]["accuracy"].values()) / max(len(d["rounds"][-1]["accuracy"]), 1)
        for d in results
        if d["rounds"]
    ]
    for ax, ys, title in (
        (a1, lat, "modeled latency per round (s)"),
        (a2, en, "modeled energy per round (J)"),
        (a3, acc, "global accuracy, last round"),
    ):
        ax.bar(range(len(ys)), ys)
        ax.set_xticks(range(len(ys)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    paths["table1"] = out / "report-table1.png"
    fig.savefig(paths["table1"], dpi=90)
    plt.close(fig)
    return paths


def _substitute(expr: str, step_s: float) -> str:
    rate = f"{max(int(4 * step_s), 60)}s"
    return expr.replace("$__rate_interval", rate).replace("$node", ".*").replace("$method", ".*")


def _range_query(url: str, expr: str, start: float, end: float, step_s: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as r:  # noqa: S310 - user's URL
        doc = json.loads(r.read())
    if doc.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {doc.get('error')}")
    return doc["data"]["result"]


def _legend(fmt: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) or json.dumps(metric)


def from_prometheus(
    url: str, start: float, end: float, out: Path, dashboards: list[Path] | None = None, step_s: float = 2.0
) -> dict[str, dict[str, int]]:
    """Every panel of every dashboard, from Prometheus; returns {dashboard: {panel: series drawn}}."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, dict[str, int]] = {}
    for path in dashboards or sorted(DASHBOARD_DIR.glob("*.json")):
        dash = json.loads(path.read_text())
        panels = dash["panels"]
        cols = 2
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
        counts: dict[str, int] = {}
        for ax, p in zip(axes.flat, panels, strict=False):
            n = 0
            for t in p["targets"]:
                for series in _range_query(url, _substitute(t["expr"], step_s), start, end, step_s):
                    ts = [float(v[0]) - start for v in series["values"]]
                    ys = [float(v[1]) for v in series["values"]]
                    ax.plot(ts, ys, label=_legend(t.get("legendFormat", ""), series["metric"]))
                    n += 1
            ax.set_title(p["title"], fontsize=9)
            ax.set_xlabel("s since start", fontsize=8)
            if 0 < n <= 12:
                ax.legend(fontsize=6)
            counts[p["title"]] = n
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(dash["title"])
        fig.tight_layout()
        fig.savefig(out / f"report-{dash['uid']}.png", dpi=80)
        plt.close(fig)
        drawn[dash["uid"]] = counts
    return drawn
