"""Fault scenarios and the chaos soak over real processes (the local launcher): run a federation while
nodes are killed, stopped and restarted, then hold the run to ``hffm.audit`` (every aggregate the
weighted mean of exactly what it counted; nothing lost, nothing counted twice) and to the scenario's
expectations."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from hffm.audit import Audit, audit_run
from hffm.config import HFFMConfig
from hffm.scenario import Scenario, check_expectations, failpoints
from services.launcher import FaultPlan, Supervisor, run


@dataclass
class Outcome:
    results: dict
    audit: Audit
    problems: list[str]  # unmet expectations and audit findings

    @property
    def ok(self) -> bool:
        return not self.problems


def run_scenario(
    scenario: Scenario, out: Path, console: Console, extra: list[str] | None = None, timeout_s: float = 600
) -> Outcome:
    """Run ``scenario`` in ``out`` (trace in ``out/trace``); RunFailed if the run does not complete."""
    cfg = scenario.config([*(extra or []), f"runtime.trace_dir={out / 'trace'}"])
    points, restart, stop = failpoints(scenario, cfg)
    console.print(f"[bold]{scenario.name}[/bold]: {scenario.description} (failpoints {points})")
    results = run(cfg, out, console, timeout_s=timeout_s, faults=FaultPlan(points, restart, stop), force=True)
    audit = audit_run(results, out / "trace")
    problems = check_expectations(scenario, results) + audit.lost + audit.double_counted + audit.wrong
    (out / "audit.json").write_text(json.dumps({**audit.as_dict(), "problems": problems}, indent=2))
    return Outcome(results, audit, problems)


@dataclass(frozen=True)
class Kill:
    round: int  # it happens while this round runs (once the round before it is recorded)
    delay_s: float  # this long after that
    target: str  # a process of the run (the cloud, an edge, a device process)


def kill_schedule(seed: int, kills: int, rounds: int, targets: list[str], round_s: float) -> list[Kill]:
    """``kills`` kills at seeded random moments: a round in 1..rounds-1, a delay within a fault-free
    round's wall time, a target among ``targets``; in the order they happen."""
    rng = random.Random(seed)
    out = [Kill(rng.randint(1, max(1, rounds - 1)), rng.uniform(0, round_s), rng.choice(targets)) for _ in range(kills)]
    return sorted(out, key=lambda k: (k.round, k.delay_s))


class Killer(threading.Thread):
    """Carries out a kill schedule on a running launcher's processes (SIGKILL to the process group),
    following the rounds in results.json; the supervisor restarts what it kills."""

    def __init__(self, schedule: list[Kill], out: Path, console: Console) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.schedule, self.out, self.console = schedule, out, console
        self.supervisor: Supervisor | None = None
        self.done: list[tuple[Kill, int]] = []  # each kill with the pid it hit
        self.stop = threading.Event()

    def attach(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.start()

    def _rounds(self) -> int:
        try:
            return len(json.loads((self.out / "results.json").read_text())["rounds"])
        except (OSError, ValueError, KeyError):
            return 0

    def run(self) -> None:
        assert self.supervisor is not None
        procs = {p.name: p for p in self.supervisor.procs}
        for k in self.schedule:
            while self._rounds() < k.round - 1 and not self.stop.wait(0.1):
                pass
            if self.stop.wait(k.delay_s):
                return
            p = procs[k.target]
            if p.popen.poll() is not None:  # still down from an earlier kill: it is hit when back
                while p.popen.poll() is not None and not self.stop.wait(0.2):
                    pass
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
                self.done.append((k, p.popen.pid))
                self.console.print(f"[red]chaos: SIGKILL {k.target} in round {self._rounds() + 1}[/red]")
            except ProcessLookupError:
                pass


def soak(cfg: HFFMConfig, kills: int, seed: int, out: Path, console: Console) -> dict:
    """A fault-free run, then the same run under ``kills`` seeded random kills; both audited. Returns
    (and writes to ``out/chaos.json``) the figures: rounds, aggregates, updates counted and left out,
    lost and double-counted updates (both must be 0), attempts re-run, restarts, wall-time overhead."""
    base_cfg = cfg.model_copy(
        update={"runtime": cfg.runtime.model_copy(update={"devices_per_process": 1, "trace_dir": None})}
    )

    def traced(d: Path) -> HFFMConfig:
        return base_cfg.model_copy(update={"runtime": base_cfg.runtime.model_copy(update={"trace_dir": str(d)})})

    console.print("[bold]chaos[/bold]: a fault-free run first (the baseline)")
    t0 = time.perf_counter()
    base = run(traced(out / "baseline" / "trace"), out / "baseline", console, timeout_s=7200, force=True)
    base_wall = time.perf_counter() - t0
    base_audit = audit_run(base, out / "baseline" / "trace")
    names = [n for n, _ in json.loads((out / "baseline" / "processes.json").read_text())]
    schedule = kill_schedule(seed, kills, cfg.rounds, names, max(r["wall_s"] for r in base["rounds"]))
    console.print(f"[bold]chaos[/bold]: the same run under {kills} kills (seed {seed})")
    killer = Killer(schedule, out / "chaos", console)
    t0 = time.perf_counter()
    try:
        res = run(
            traced(out / "chaos" / "trace"), out / "chaos", console, timeout_s=7200, on_start=killer.attach, force=True
        )
    finally:
        killer.stop.set()
    wall = time.perf_counter() - t0
    audit = audit_run(res, out / "chaos" / "trace")
    rounds = res["rounds"]
    figures = {
        "nodes": f"{cfg.topology.edges}x{cfg.topology.devices_per_edge}",
        "method": cfg.method,
        "rounds": cfg.rounds,
        "rounds_completed": len(rounds),
        "kills": len(killer.done),
        "killed": sorted(k.target for k, _ in killer.done),
        "restarts": res.get("restarts", 0),
        "aggregates_formed": audit.aggregates,
        "updates_counted": audit.counted,
        "updates_left_out": audit.left_out,
        "nodes_lost_midround": sum(len(r["lost"]) for r in rounds),
        "sat_out": sum(len(r["left_out"]) for r in rounds),
        "attempts_rerun": sum(len(r["aborted"]) for r in rounds),
        "synced": sum(len(r["synced"]) for r in rounds),
        "lost": len(audit.lost),
        "double_counted": len(audit.double_counted),
        "wrong_aggregates": len(audit.wrong),
        "baseline_audit_ok": base_audit.ok,
        "wall_s": round(wall, 1),
        "baseline_wall_s": round(base_wall, 1),
        "wall_overhead": round(wall / base_wall, 2),
        "final_accuracy": rounds[-1]["accuracy"],
        "baseline_final_accuracy": base["rounds"][-1]["accuracy"],
        "problems": audit.lost + audit.double_counted + audit.wrong,
    }
    (out / "chaos.json").write_text(json.dumps(figures, indent=2))
    return figures
