"""The run's results: round records in order, results.json rewritten atomically after every round,
the per-round gauges, and the final global modules."""

from __future__ import annotations

from pathlib import Path

from hffm.config import HFFMConfig
from hffm.modules import ModuleSet, save_modules
from hffm.results import RoundRecord, write_results
from services.common.metrics import Metrics


class ResultsWriter:
    def __init__(self, cfg: HFFMConfig, out_dir: Path, metrics: Metrics) -> None:
        self.cfg, self.out_dir, self.metrics = cfg, out_dir, metrics
        self.rounds: list[RoundRecord] = []

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
        write_results(
            self.out_dir / "results.json", self.cfg.model_dump(mode="json"), self.rounds, nodes=nodes, complete=complete
        )

    def finish(self, modules: ModuleSet) -> None:
        """The final global modules (the coordinator's checkpoint of the last round holds the rest)."""
        save_modules(modules, str(self.out_dir / "global_modules.safetensors"))
