"""``hffm bench [--quick] --out DIR``: every benchmark, DIR/bench.json, bench.md and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks import aggregation, transfer
from benchmarks.common import machine

TARGETS = {
    "transfer_ratio": ">= 0.8",
    "aggregation_ratio": ">= 0.5",
    "aggregator_peak_sets": "<= 3",
    "flower_round_ratio": "<= 0.5",
    "max_devices": ">= 1000",
}


def run_all(out: Path, quick: bool = False, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log("transfer: hffm push vs loopback socket (fp32, fp16)...")
    tr = transfer.run(quick)
    log("aggregation: decode + FedAvg vs in-place multiply-add...")
    ag = aggregation.run(quick)
    bench = {
        "machine": machine(),
        "quick": quick,
        "transfer_ratio": tr["fp32"]["ratio"],
        "transfer_ratio_fp16": tr["fp16"]["ratio"],
        "aggregation_ratio": ag["ratio"],
        "aggregator_peak_sets": ag["peak_sets_above_idle"],
        # not measured yet (issue "Benchmarks side by side"): round overhead vs Flower, devices per machine
        "flower_round_ratio": None,
        "max_devices": None,
        "details": {"transfer": tr, "aggregation": ag},
        "targets": TARGETS,
        "elapsed_s": time.time() - t0,
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(markdown(bench))
    plot(bench, out / "transfer.png")
    return bench


def markdown(b: dict) -> str:
    tr, ag = b["details"]["transfer"], b["details"]["aggregation"]
    rows = [
        (
            "transfer_ratio (fp32)",
            f"{b['transfer_ratio']:.3f}",
            f"hffm {tr['fp32']['hffm_gbps']:.3f} GB/s vs socket {tr['fp32']['socket_gbps']:.2f} GB/s, "
            f"{tr['fp32']['bytes'] / 1e6:.1f} MB",
            TARGETS["transfer_ratio"],
        ),
        (
            "transfer_ratio (fp16 wire)",
            f"{b['transfer_ratio_fp16']:.3f}",
            f"hffm {tr['fp16']['hffm_gbps']:.3f} GB/s vs socket {tr['fp16']['socket_gbps']:.2f} GB/s, "
            f"{tr['fp16']['bytes'] / 1e6:.1f} MB",
            "—",
        ),
        (
            "aggregation_ratio",
            f"{b['aggregation_ratio']:.3f}",
            f"{ag['senders']} uploads: hffm {ag['hffm_s']:.2f} s vs in-place add {ag['baseline_s']:.3f} s",
            TARGETS["aggregation_ratio"],
        ),
        (
            "aggregator_peak_sets",
            f"{b['aggregator_peak_sets']:.2f}",
            "module sets above idle (VmHWM)",
            TARGETS["aggregator_peak_sets"],
        ),
        ("flower_round_ratio", "not measured yet", "", TARGETS["flower_round_ratio"]),
        ("max_devices", "not measured yet", "", TARGETS["max_devices"]),
    ]
    lines = ["| figure | value | measured | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {v} | {m} | {t} |" for a, v, m, t in rows]
    return "\n".join(lines) + "\n"


def plot(b: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = b["details"]["transfer"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels, vals = [], []
    for wire in ("fp32", "fp16"):
        labels += [f"hffm {wire}", f"socket ({wire} bytes)"]
        vals += [tr[wire]["hffm_gbps"], tr[wire]["socket_gbps"]]
    ax.bar(labels, vals, color=["C0", "C7", "C0", "C7"])
    ax.set_ylabel("GB/s")
    ax.set_title("module set device -> edge on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
