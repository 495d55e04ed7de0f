"""What starting a run's processes costs, exec'd or forked from the zygote (``runtime.start_method``;
services/spawn.py): a launcher process (``python -m benchmarks.startup --one``) makes ``--runs`` small runs
(the golden run's config: hfm-d2d, 2 edges, 6 devices in 2 device processes, 4 rounds; 5 processes a run)
with one method; the two methods alternate, ``--repeat`` times each, and the medians are compared.

Measured per launcher process: its wall time and the CPU (user + system) of it and every process under it
(``getrusage(RUSAGE_CHILDREN)`` around it: each node is reaped by its parent, the zygote by the launcher);
per run: the time from calling ``run()`` to the cloud's log saying every node registered, and the summed
PSS of the run's node processes at that moment (``benchmarks.common.pss_of``: a page the zygote shares with
its children counts once across them; the zygote's own share is added).

``python -m benchmarks.startup [--repeat 3] [--runs 2]``
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from benchmarks.common import machine, median, pss_of, pss_of_pid

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "hfm_d2d.json"
REGISTERED = re.compile(r"^(\S+ \S+) INFO hffm\.membership: registered .* \((\d+)/(\d+)\)$")


def _registered_at(log: Path) -> float | None:
    """When the cloud's log says the last node registered (epoch seconds), or None yet."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = REGISTERED.match(line)
        if m and m.group(2) == m.group(3):
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def one(method: str, out: Path, runs: int) -> dict:
    """``runs`` runs in this process with ``method``: per run, seconds to every node registered and the PSS."""
    from rich.console import Console

    from hffm.config import load_config
    from services.launcher import run

    sets = json.loads(GOLDEN.read_text())["sets"] + [f"runtime.start_method={method}"]
    registered, pss = [], []
    for i in range(runs):
        d = out / f"run-{i}"
        found: list[int] = []

        def watch(d: Path = d, found: list[int] = found) -> None:
            end = time.monotonic() + 120
            while time.monotonic() < end and _registered_at(d / "logs" / "cloud.log") is None:
                time.sleep(0.05)
            from services import spawn

            # the zygote's share of the pages it shares with its children counts too
            found.append(pss_of(str(d / "config.yaml")) + sum(pss_of_pid(z.pid) for z in spawn.zygotes()))

        t0 = time.time()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        run(load_config(None, sets), d, Console(file=io.StringIO()), timeout_s=300, force=True)
        watcher.join(10)
        at = _registered_at(d / "logs" / "cloud.log")
        registered.append(None if at is None else at - t0)
        pss.append(found[0] / 2**20 if found else None)
    return {"registered_s": registered, "pss_mib": pss}


def measure(method: str, out: Path, runs: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.startup", "--one", method, "--out", str(out), "--runs", str(runs)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, **json.loads(p.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--runs", type=int, default=2, help="runs per launcher process")
    p.add_argument("--out", type=Path, default=Path("runs/bench-startup"))
    p.add_argument("--one", choices=["exec", "zygote"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.out, a.runs)))
        return
    got: dict[str, list[dict]] = {"exec": [], "zygote": []}
    for r in range(a.repeat):  # interleaved: a burst of load hits both alike
        for method in got:
            got[method].append(measure(method, a.out / f"{method}-{r}", a.runs))
    summary = {}
    for method, rows in got.items():
        summary[method] = {
            "wall_s": median([x["wall_s"] for x in rows]),
            "cpu_s": median([x["cpu_s"] for x in rows]),
            "registered_first_s": median([x["registered_s"][0] for x in rows]),
            "registered_later_s": median([s for x in rows for s in x["registered_s"][1:]] or [float("nan")]),
            "pss_mib": median([v for x in rows for v in x["pss_mib"] if v is not None]),
        }
    print(f"{a.runs} runs per launcher process, {a.repeat} launcher processes per method (medians); {machine()}")
    print(f"{'':28s} {'exec':>9s} {'zygote':>9s} {'zygote/exec':>12s}")
    for key, label in [
        ("cpu_s", "CPU, launcher and all (s)"),
        ("wall_s", "wall, launcher process (s)"),
        ("registered_first_s", "first run: all registered (s)"),
        ("registered_later_s", "later runs: all registered (s)"),
        ("pss_mib", "nodes' PSS, registered (MiB)"),
    ]:
        e, z = summary["exec"][key], summary["zygote"][key]
        print(f"{label:28s} {e:9.2f} {z:9.2f} {z / e:12.2f}")
    (a.out / "startup.json").write_text(json.dumps({"runs": a.runs, "rows": got, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
