"""Shared pieces: the paper-size module set, timing, and this machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hffm.config import PAPER_MODEL, load_config
from hffm.data import task_labels
from hffm.model import initial_modules
from hffm.modules import ModuleSet
from hffm.topology import Topology


def paper_config(*sets: str):
    """The paper-size module set on one edge and one device; links plaintext unless ``sets`` turn
    security on (the transfer figures measure the module stream itself; a node built from it needs
    no credentials)."""
    sets_ = [*PAPER_MODEL, "topology.edges=1", "topology.devices_per_edge=1", "security.tls=false", *sets]
    return load_config(None, sets_)


def paper_modules(version: int = 1, num_samples: float = 10.0) -> ModuleSet:
    """Double-Adapters of a ViLT-B/32-sized model (bottleneck 256) + two task heads: ~38 MB fp32."""
    cfg = paper_config()
    topo = Topology.from_config(cfg, cfg.model.num_layers)
    mods = initial_modules(cfg, topo.modules_for("cloud"), task_labels(cfg))
    for m in mods.values():
        m.version, m.num_samples = version, num_samples
        for t in m.tensors.values():  # zero-initialised up-projections would be unusually tidy data
            if not t.any():
                t.normal_(0, 0.02)
    return mods


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    return interleaved({"fn": fn}, repeat, warmup)["fn"]


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeat`` times, taking them in turn (a, b, a, b, ...) so that a burst of
    load on this shared machine hits the measurements being compared alike. A function with a
    ``prepare`` attribute has it called, untimed, before each of its runs."""
    for fn in fns.values():
        for _ in range(warmup):
            getattr(fn, "prepare", lambda: None)()
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            prepare = getattr(fn, "prepare", None)
            if prepare is not None:
                prepare()
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def pss_of(marker: str) -> int:
    """Summed proportional set size (PSS) of every process whose command line contains ``marker``: a
    page shared by k processes counts 1/k in each, so the sum is the memory the processes take
    together (summed RSS would count a shared library or a forked parent's pages once per process)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
        except OSError:
            continue
        total += pss_of_pid(int(d.name))
    return total


def pss_of_pid(pid: int) -> int:
    """One process's proportional set size (bytes; 0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryWatch:
    """Samples, while in the ``with`` block, the peak summed PSS of the processes whose command line
    contains ``marker``; every ``period_s`` it checks the machine's MemAvailable and, when it drops below
    ``floor_bytes``, calls ``on_low`` once (the caller stops what it started) and sets ``low``.

    Reading PSS makes the kernel walk every page table of every process measured (≈ 70 ms of CPU for a
    300-device run's processes, ≈ 115 ms at 1,000): sampled every 0.25 s it took a tenth to a fifth of
    this two-core machine from the run it measured. So a PSS sample is taken at most every ``period_s`` and no more
    often than keeps its CPU at ``duty`` of one core (its own thread's CPU time, measured per sample);
    ``samples`` and ``cpu_s`` say what it took."""

    def __init__(
        self,
        marker: str,
        floor_bytes: int = 0,
        on_low: Callable[[], None] | None = None,
        period_s: float = 0.25,
        duty: float = 0.02,
    ) -> None:
        self.marker, self.floor, self.on_low, self.period, self.duty = marker, floor_bytes, on_low, period_s, duty
        self.peak = 0
        self.low = False
        self.samples = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        due = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= due:
                c0 = time.thread_time()
                self.peak = max(self.peak, pss_of(self.marker))
                cost = time.thread_time() - c0
                self.samples += 1
                self.cpu_s += cost
                due = time.monotonic() + cost / self.duty
            if self.floor and not self.low and mem_available() < self.floor:
                self.low = True
                if self.on_low is not None:
                    self.on_low()
            self._stop.wait(self.period)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
