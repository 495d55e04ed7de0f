"""Fault scenarios and the chaos soak over real processes (the local launcher): run a federation while
nodes are killed, stopped and restarted, then hold the run to ``hffm.audit`` (every aggregate the
weighted mean of exactly what it counted; nothing lost, nothing counted twice) and to the scenario's
expectations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from hffm.audit import Audit, audit_run
from hffm.scenario import Scenario, check_expectations, failpoints
from services.launcher import FaultPlan, run


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
    results = run(cfg, out, console, timeout_s=timeout_s, faults=FaultPlan(points, restart, stop))
    audit = audit_run(results, out / "trace")
    problems = check_expectations(scenario, results) + audit.lost + audit.double_counted + audit.wrong
    (out / "audit.json").write_text(json.dumps({**audit.as_dict(), "problems": problems}, indent=2))
    return Outcome(results, audit, problems)
