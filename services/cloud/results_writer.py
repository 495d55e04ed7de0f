"""The run's results: round records in order, results.json rewritten atomically after every round,
the per-round gauges, and the final global modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hffm.config import HFFMConfig
from hffm.modules import ModuleSet, save_modules
from hffm.results import RoundRecord, detection_summary, write_results
from hffm.runinfo import new_run_id, now_iso, run_record, totals
from services.common.metrics import Metrics


def run_identity(cfg: HFFMConfig, out_dir: Path) -> tuple[str, str]:
    """(run id, start time): what the launcher set (HFFM_RUN_ID, HFFM_RUN_STARTED); else what an earlier
    life of this cloud wrote (a restarted cloud keeps its run's id); else new ones."""
    if os.environ.get("HFFM_RUN_ID"):
        return os.environ["HFFM_RUN_ID"], os.environ.get("HFFM_RUN_STARTED") or now_iso()
    try:
        run = json.loads((out_dir / "results.json").read_text()).get("run") or {}
        if run.get("id") and run.get("started"):
            return run["id"], run["started"]
    except (OSError, ValueError):
        pass
    return new_run_id(cfg.method), now_iso()


class ResultsWriter:
    def __init__(
        self, cfg: HFFMConfig, out_dir: Path, metrics: Metrics, adversaries: frozenset[str] = frozenset()
    ) -> None:
        self.cfg, self.out_dir, self.metrics = cfg, out_dir, metrics
        self.adversaries = adversaries  # config adversary: what detection is measured against
        self.rounds: list[RoundRecord] = []
        self.run = run_record(*run_identity(cfg, out_dir))

    def add(self, rec: RoundRecord) -> None:
        self.rounds.append(rec)
        self._observe(rec)

    def _observe(self, rec: RoundRecord) -> None:
        m, method = self.metrics, rec.method
        m.round_modeled_latency.labels(method=method).set(rec.modeled["latency_s"])
        m.round_modeled_energy.labels(method=method).set(rec.modeled["energy_j"])
        m.round_wall.labels(method=method).set(rec.wall_s)
        for task, splits in rec.accuracy.items():
            for split, v in splits.items():
                if v is not None:
                    m.round_accuracy.labels(method=method, task=task, split=split).set(v)
        m.rounds_done.labels(method=method).inc()

    def write(self, nodes: dict[str, str], complete: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rounds = [r.to_dict() for r in self.rounds]  # once: the file and its totals
        write_results(
            self.out_dir / "results.json",
            self.cfg.model_dump(mode="json"),
            rounds,
            nodes=nodes,
            complete=complete,
            run=self.run,
            totals=totals(rounds),
            detection=detection_summary(rounds, self.adversaries),
        )

    def finish(self, modules: ModuleSet) -> None:
        """The final global modules (the coordinator's checkpoint of the last round holds the rest)."""
        save_modules(modules, str(self.out_dir / "global_modules.safetensors"))
