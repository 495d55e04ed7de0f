"""Devices per machine: round time and memory of an hfm round for N devices on this machine.

N devices in 10 clusters (N/10 per edge), several device servers per process, training on (one local
epoch of AdamW over each device's samples: about 8 per task whatever N, as the data set grows with N;
testing off), 2 rounds; the second round's wall time is
reported (the first includes start-up effects), and per device. The module set's size is stated with
every figure: the tiny default model (``model: tiny``) or the paper's ViLT-base-size model
(``model: paper``, ``PAPER_MODEL``). Memory: peak of the summed proportional set size (PSS) of every
process of the run, sampled every 0.25 s, and per device.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from rich.console import Console

from benchmarks.common import MemoryWatch
from hffm.config import PAPER_MODEL, HFFMConfig, load_config
from hffm.costmodel import module_sizes
from services.launcher import run

MODELS = {"tiny": [], "paper": PAPER_MODEL}


def sweep_config(n: int, rounds: int, *sets: str, train: bool = False, model: str = "tiny") -> HFFMConfig:
    """An hfm federation of about ``n`` devices in up to 10 clusters, as the device sweeps run it: with
    ``train`` one real local epoch per round, else a no-op local step (every exchange kept)."""
    edges = min(10, n)
    per_edge = max(1, n // edges)
    return load_config(
        None,
        [
            *MODELS[model],
            "method=hfm",
            f"rounds={rounds}",
            "e_agg=1",
            f"topology.edges={edges}",
            f"topology.devices_per_edge={per_edge}",
            f"runtime.devices_per_process={max(10, math.ceil(edges * per_edge / 8))}",
            f"train.noop={str(not train).lower()}",
            "train.eval_every=0",
            f"data.train_per_task={8 * n}",  # about 8 samples per device and task, whatever n
            "data.min_samples_per_device=1",
            "data.global_test_per_task=20",
            "data.local_test_per_device=4",
            "runtime.register_timeout_s=900",
            "runtime.round_timeout_s=900",
            *sets,
        ],
    )


def one(n: int, out: Path, model: str = "tiny", sets: tuple[str, ...] = ()) -> dict:
    cfg = sweep_config(n, 2, *sets, train=True, model=model)
    devices = cfg.topology.edges * cfg.topology.devices_per_edge
    run_dir = out / "-".join([f"devices-{model}-{n}", *(x.replace("=", "_") for x in sets)])
    t0 = time.perf_counter()
    with MemoryWatch(str(run_dir / "config.yaml")) as mem:
        res = run(cfg, run_dir, Console(file=io.StringIO()), timeout_s=3000, force=True)
    last = res["rounds"][-1]
    return {
        "devices": devices,
        "round_s": last["wall_s"],
        "ms_per_device": last["wall_s"] / devices * 1000,
        "run_s": time.perf_counter() - t0,
        "peak_pss_bytes": mem.peak,
        "pss_per_device_bytes": mem.peak / devices,
        "pss_samples": mem.samples,  # PSS samples the peak is taken from (each costs CPU: MemoryWatch)
        "pss_sampling_cpu_s": mem.cpu_s,
        "bytes_per_round": last["bytes_total"],
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


def run_sweep(out: Path, sizes: list[int], log=print, model: str = "tiny") -> dict:
    """``one`` for each size until one fails (the largest that completes is the result)."""
    cfg = sweep_config(1, 1, model=model)
    set_bytes = sum(module_sizes(cfg).values())
    points = []
    error = None
    for n in sizes:
        log(f"  {n} devices, {model} model ({set_bytes / 1e6:.2f} MB module set), training on...")
        try:
            points.append(one(n, out, model))
        except Exception as err:  # noqa: BLE001 - the largest size that completes is the result
            error = f"{n} devices: {type(err).__name__}: {err}"
            log(f"  {n} devices failed: {err}")
            break
    return {
        "model": model,
        "module_set_bytes": set_bytes,
        "points": points,
        "error": error,
        "fit": fit(points) if len(points) >= 2 else None,
        "max_devices": max((p["devices"] for p in points), default=0),
    }
