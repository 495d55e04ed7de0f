"""Devices per machine: round time and memory of an hfm round for N devices on this machine.

N devices in 10 clusters (N/10 per edge), several device servers per process, a no-op local step
(every exchange kept), 2 rounds; the second round's wall time is reported (the first includes
start-up effects). Memory: peak of the summed RSS of every process of the run, sampled every 0.25 s.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from rich.console import Console

from benchmarks.common import MemoryWatch
from hffm.config import HFFMConfig, load_config
from services.launcher import run


def sweep_config(n: int, rounds: int, *sets: str) -> HFFMConfig:
    """An hfm federation of about ``n`` devices in up to 10 clusters with a no-op local step (every
    exchange kept), as the device sweeps run it."""
    edges = min(10, n)
    per_edge = max(1, n // edges)
    return load_config(
        None,
        [
            "method=hfm",
            f"rounds={rounds}",
            "e_agg=1",
            f"topology.edges={edges}",
            f"topology.devices_per_edge={per_edge}",
            f"runtime.devices_per_process={max(10, math.ceil(edges * per_edge / 8))}",
            "train.noop=true",
            f"data.train_per_task={max(400, 4 * n)}",
            "data.min_samples_per_device=1",
            "data.global_test_per_task=20",
            "data.local_test_per_device=4",
            "runtime.register_timeout_s=900",
            "runtime.round_timeout_s=900",
            *sets,
        ],
    )


def one(n: int, out: Path) -> dict:
    cfg = sweep_config(n, 2)
    edges, per_edge = cfg.topology.edges, cfg.topology.devices_per_edge
    run_dir = out / f"devices-{n}"
    t0 = time.perf_counter()
    with MemoryWatch(str(run_dir / "config.yaml")) as mem:
        res = run(cfg, run_dir, Console(file=io.StringIO()), timeout_s=3000, force=True)
    return {
        "devices": edges * per_edge,
        "round_s": res["rounds"][-1]["wall_s"],
        "run_s": time.perf_counter() - t0,
        "peak_rss_bytes": mem.peak,
        "bytes_per_round": res["rounds"][-1]["bytes_total"],
    }


def fit(points: list[dict]) -> dict:
    """Least-squares round_s = a + b * devices, and R^2."""
    xs = [p["devices"] for p in points]
    ys = [p["round_s"] for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": a, "slope_s_per_device": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def run_sweep(out: Path, sizes: list[int], log=print) -> dict:
    points = []
    error = None
    for n in sizes:
        log(f"  {n} devices...")
        try:
            points.append(one(n, out))
        except Exception as err:  # noqa: BLE001 - the largest size that completes is the result
            error = f"{n} devices: {type(err).__name__}: {err}"
            log(f"  {n} devices failed: {err}")
            break
    return {
        "points": points,
        "error": error,
        "fit": fit(points) if len(points) >= 2 else None,
        "max_devices": max((p["devices"] for p in points), default=0),
    }
