"""Shared pieces: the paper-size module set, timing, and this machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

from hffm.config import PAPER_MODEL, load_config
from hffm.data import TASK_LABELS
from hffm.model import initial_modules
from hffm.modules import ModuleSet
from hffm.topology import Topology


def paper_config(*sets: str):
    return load_config(None, [*PAPER_MODEL, "topology.edges=1", "topology.devices_per_edge=1", *sets])


def paper_modules(version: int = 1, num_samples: float = 10.0) -> ModuleSet:
    """Double-Adapters of a ViLT-B/32-sized model (bottleneck 256) + two task heads: ~38 MB fp32."""
    cfg = paper_config()
    topo = Topology.from_config(cfg, cfg.model.num_layers)
    mods = initial_modules(cfg, topo.modules_for("cloud"), {t: len(TASK_LABELS[t]) for t in cfg.tasks})
    for m in mods.values():
        m.version, m.num_samples = version, num_samples
        for t in m.tensors.values():  # zero-initialised up-projections would be unusually tidy data
            if not t.any():
                t.normal_(0, 0.02)
    return mods


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
