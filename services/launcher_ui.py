"""What ``hffm run`` shows a person: the run's header, live progress (registrations, rounds, a line per
round), what went wrong, and the closing per-round table. The launcher (process management) calls it
and knows nothing of rich."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hffm.config import HFFMConfig
from hffm.topology import Topology


def _fmt(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def round_line(rec: dict) -> str:
    acc = " ".join(f"{t}={_fmt(v.get('global'), 2)}/{_fmt(v.get('local'), 2)}" for t, v in rec["accuracy"].items())
    acc = acc or "— (not evaluated)"
    loss = rec["loss"] if rec["loss"] is not None else float("nan")
    faults = []
    if rec.get("aborted"):
        faults.append(f"{len(rec['aborted'])} attempt(s) aborted")
    if rec.get("lost"):
        faults.append("lost " + ",".join(rec["lost"]))
    if rec.get("synced"):
        faults.append("synced " + ",".join(rec["synced"]))
    modeled = rec.get("modeled") or {}
    model = (
        f"  modeled {modeled['latency_s']:.1f}s {modeled['energy_j']:.1f}J" if "latency_s" in modeled else ""
    )  # the cost model's, on the bytes this round sent (docs/cost-model.md)
    return (
        f"round {rec['round']:>3}  loss {loss:.3f}  acc(global/local) {acc}  "
        f"{rec['bytes_total'] / 1e6:.2f} MB  {rec['wall_s']:.1f}s{model}"
        + ("  [cloud]" if rec["cloud_aggregation"] else "")
        + (f"  [{'; '.join(faults)}]" if faults else "")
    )


class RunView:
    def __init__(self, console: Console) -> None:
        self.console = console

    def header(self, cfg: HFFMConfig, topo: Topology, processes: int, out: Path, run_id: str = "") -> None:
        self.console.print(
            f"[bold]hffm[/bold] {cfg.method} · {len(topo.edges)} edges × {cfg.topology.devices_per_edge} devices · "
            f"{cfg.rounds} rounds (e_agg={cfg.e_agg}) · {cfg.data.source} data · {processes} processes"
        )
        self.console.print(f"run {run_id} · {out}" if run_id else f"out: {out}", soft_wrap=True)

    def prometheus_missing(self, targets: Path) -> None:
        self.console.print(
            "[yellow]--prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus); "
            f"running without it. Targets for your own Prometheus: {targets}[/yellow]"
        )

    def prometheus_started(self, url: str, config: Path) -> None:
        self.console.print(f"Prometheus: {url}  (config {config})")

    @contextmanager
    def progress(self, nodes: int, rounds: int) -> Iterator[Callable]:
        """A live display; yields ``show(event)`` for each progress event of the cloud."""
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),  # from the rounds done so far
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            reg = progress.add_task("registering nodes", total=nodes)
            rnd = progress.add_task("rounds", total=rounds)

            def show(ev) -> None:
                if ev.phase == "waiting":
                    progress.update(reg, completed=ev.registered)
                elif ev.phase == "round":
                    progress.update(reg, completed=nodes)
                    progress.update(rnd, completed=ev.round)
                    if ev.results_json:
                        progress.console.print(round_line(json.loads(ev.results_json)))
                    elif ev.message.startswith("resumed"):
                        progress.console.print(ev.message)

            yield show

    def round_running(self, round_: int, elapsed_s: float, alive: list[str]) -> None:
        self.console.print(
            f"round {round_:>3}  running for {elapsed_s:.0f}s ({len(alive)} processes up)", highlight=False
        )

    def device_process_lost(self, name: str, rc: int, log: Path) -> None:
        self.console.print(
            f"[yellow]device process {name} exited with code {rc}; its devices are "
            f"left out from the next round (log: {log})[/yellow]"
        )

    def process_died(self, name: str, rc: int, restart_after_s: float) -> None:
        self.console.print(f"[yellow]process {name} died (code {rc}); restarting it in {restart_after_s:g}s[/yellow]")

    def process_restarted(self, name: str, restarts: int) -> None:
        self.console.print(f"[yellow]process {name} restarted ({restarts}x); it rejoins from its checkpoint[/yellow]")

    def process_continued(self, name: str, stopped_s: float) -> None:
        self.console.print(f"[yellow]process {name} was stopped {stopped_s:.0f}s; sent SIGCONT[/yellow]")

    def process_failed(self, name: str, rc: int, log: Path, tail: str) -> None:
        self.console.print(f"[red]process {name} exited with code {rc}; last lines of {log}:[/red]")
        self.console.print(tail, markup=False, highlight=False)

    def interrupted(self) -> None:
        self.console.print("[yellow]interrupted: stopping every process[/yellow]")

    def summary(self, results: dict) -> None:
        rounds = results["rounds"]
        if not rounds:
            return
        table = Table(title="per round")
        tasks = sorted({t for r in rounds for t in r["accuracy"]})
        table.add_column("round", justify="right")
        for t in tasks:
            table.add_column(f"{t} global", justify="right")
            table.add_column(f"{t} local", justify="right")
        table.add_column("loss", justify="right")
        table.add_column("MB sent", justify="right")
        table.add_column("wall s", justify="right")
        table.add_column("modeled s", justify="right")  # the cost model's latency and energy, on the bytes sent
        table.add_column("modeled J", justify="right")
        for r in rounds:
            cells = [str(r["round"])]
            for t in tasks:
                a = r["accuracy"].get(t, {})
                cells += [_fmt(a.get("global"), 3), _fmt(a.get("local"), 3)]
            m = r.get("modeled") or {}
            cells += [_fmt(r["loss"], 3), f"{r['bytes_total'] / 1e6:.2f}", f"{r['wall_s']:.1f}"]
            cells += [_fmt(m.get("latency_s"), 1), _fmt(m.get("energy_j"), 1)]
            table.add_row(*cells)
        self.console.print(table)
        self.console.print(
            "modeled: the wireless cost model (cost.profile) charged on the bytes this run sent; hffm table1 "
            "charges paper-size modules (--module-size paper), so its figures are larger for the tiny model"
        )

    def outputs(self, results: Path, plot: Path, modules: Path) -> None:
        self.console.print(f"results: {results}  plot: {plot}  modules: {modules}")
