"""Comparing runs: each run labelled by what differs between their configs, per-round series (mean
global accuracy, cumulative MB, cumulative modeled latency and energy) overlaid in one figure, a table
of final figures; and the export of a run's metrics to TensorBoard event files and MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys that differ between any two runs without saying anything about what ran.
NOISE = ("checkpoint.dir", "security.dir", "runtime.trace_dir", "runtime.linger_s")


def load_run(path: Path) -> dict[str, Any]:
    """A run folder or its results.json; ``ValueError`` naming the path when it is neither."""
    f = path / "results.json" if path.is_dir() else path
    if not f.is_file():
        raise ValueError(f"{path}: no results.json (not a run folder)")
    try:
        res = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{f}: not valid JSON ({err})") from None
    if "rounds" not in res or "config" not in res:
        raise ValueError(f"{f}: not an hffm results.json")
    return res


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def labels(runs: list[dict[str, Any]]) -> list[str]:
    """Each run's label: the config values that differ between the runs (``method=hfm e_agg=2``); the
    run ids where the configs are the same; made unique with the run id where two labels collide."""
    flats = [_flat(r["config"]) for r in runs]
    keys = sorted({k for f in flats for k in f} - set(NOISE))
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]
    ids = [(r.get("run") or {}).get("id") or f"run {i + 1}" for i, r in enumerate(runs)]
    if not differing:
        return ids
    out = [" ".join(f"{k}={f.get(k)}" for k in differing) for f in flats]
    return [f"{lab} ({ids[i]})" if out.count(lab) > 1 else lab for i, lab in enumerate(out)]


def series(results: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per round: mean global accuracy (evaluated rounds), cumulative MB sent, cumulative modeled latency
    (s) and energy (J)."""
    acc, mb, lat, energy = [], [], [], []
    b = t = e = 0.0
    for r in results["rounds"]:
        vals = [s["global"] for s in r.get("accuracy", {}).values() if s.get("global") is not None]
        if vals:
            acc.append((r["round"], sum(vals) / len(vals)))
        b += r.get("bytes_total", 0) / 1e6
        t += r.get("modeled", {}).get("latency_s", 0.0)
        e += r.get("modeled", {}).get("energy_j", 0.0)
        mb.append((r["round"], b))
        lat.append((r["round"], t))
        energy.append((r["round"], e))
    return {"accuracy": acc, "mb": mb, "modeled_latency_s": lat, "modeled_energy_j": energy}


PANELS = (
    ("accuracy", "mean global accuracy"),
    ("mb", "MB sent (cumulative)"),
    ("modeled_latency_s", "modeled latency, s (cumulative)"),
    ("modeled_energy_j", "modeled energy, J (cumulative)"),
)


def compare(runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """compare.png (the four panels, one line per run), compare.md and compare.json under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = labels(runs)
    data = [series(r) for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for name, s in zip(names, data, strict=True):
            pts = s[key]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("modeled: the cost model on the bytes each run sent", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    rows = []
    for name, s, r in zip(names, data, runs, strict=True):
        rows.append(
            {
                "run": name,
                "id": (r.get("run") or {}).get("id"),
                "rounds": len(r["rounds"]),
                "final_global_accuracy": s["accuracy"][-1][1] if s["accuracy"] else None,
                "mb": s["mb"][-1][1] if s["mb"] else 0.0,
                "modeled_latency_s": s["modeled_latency_s"][-1][1] if s["modeled_latency_s"] else 0.0,
                "modeled_energy_j": s["modeled_energy_j"][-1][1] if s["modeled_energy_j"] else 0.0,
            }
        )
    md = [
        "| run | rounds | final global accuracy | MB sent | modeled latency s | modeled energy J |",
        "|---|---|---|---|---|---|",
    ]
    for x in rows:
        acc = "—" if x["final_global_accuracy"] is None else f"{x['final_global_accuracy']:.3f}"
        md.append(
            f"| {x['run']} | {x['rounds']} | {acc} | {x['mb']:.1f} | {x['modeled_latency_s']:.1f} | "
            f"{x['modeled_energy_j']:.1f} |"
        )
    (out / "compare.md").write_text("\n".join(md) + "\n")
    doc = {"runs": rows, "series": dict(zip(names, data, strict=True))}
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    return doc


# ---- export -----------------------------------------------------------------------------------------
def scalars(results: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """(round, {metric: value}) for every round: accuracy/<task>/<split>, loss, bytes_total, wall_s and
    the modeled latency_s and energy_j (names as in results.json)."""
    out = []
    for r in results["rounds"]:
        m: dict[str, float] = {}
        for task, splits in r.get("accuracy", {}).items():
            for split, v in splits.items():
                if v is not None:
                    m[f"accuracy/{task}/{split}"] = float(v)
        for k in ("loss", "bytes_total", "wall_s"):
            if r.get(k) is not None:
                m[k] = float(r[k])
        for k in ("latency_s", "energy_j"):
            if k in r.get("modeled", {}):
                m[f"modeled/{k}"] = float(r["modeled"][k])
        out.append((int(r["round"]), m))
    return out


def to_tensorboard(results: dict[str, Any], logdir: Path) -> Path:
    """The run's scalars as TensorBoard event files under ``logdir/<run id>`` (step = round)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = logdir / ((results.get("run") or {}).get("id") or "run")
    w = SummaryWriter(log_dir=str(run_dir))
    try:
        for step, metrics in scalars(results):
            for k, v in metrics.items():
                w.add_scalar(k, v, step)
        w.add_text("config", "```\n" + json.dumps(results["config"], indent=1) + "\n```")
    finally:
        w.close()
    return run_dir


def to_mlflow(results: dict[str, Any], tracking_uri: str, experiment: str = "hffm") -> str:
    """The run as an MLflow run (params: the flattened config; metrics per round; tags: the run id,
    version, commit); returns the MLflow run id. ``file:<dir>`` uses MLflow's file store."""
    import os

    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is opt-in
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    run = results.get("run") or {}
    with mlflow.start_run(run_name=run.get("id")) as active:
        params = {k: str(v)[:500] for k, v in _flat(results["config"]).items()}
        keys = sorted(params)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params({k: params[k] for k in keys[i : i + 100]})
        mlflow.set_tags({f"hffm.{k}": str(v) for k, v in run.items()})
        for step, metrics in scalars(results):
            mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step=step)
        return active.info.run_id
