"""``hffm``: the command line (typer + rich)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from hffm.config import ConfigError, dump_config, load_config, write_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hierarchical Federated Foundation Models")
# Output to a file or a pipe (logs, CI) is not cut at 80 columns: ids, paths and tables keep their width.
console = Console() if Console().is_terminal else Console(width=200, soft_wrap=True)

REPO = Path(__file__).resolve().parent.parent  # defaults name the repository's files: any directory works
SET_HELP = r"Override a config value, e.g. --set topology.edges=3 --set method=star --set tasks=\[art,gqa]"


def _config(config: Path | None, overrides: list[str], device: str | None = None):
    sets = list(overrides)
    if device is not None:
        sets.append(f"runtime.device={device}")
    try:
        return load_config(config, sets)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (default: built-in defaults)"),
    out: Path = typer.Option(
        None, "--out", "-o", help="the run's folder (default: runs/<run id>); refused if it holds an earlier run"
    ),
    force: bool = typer.Option(False, "--force", help="--out holds an earlier run: replace it"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (runtime.device)"),
    prometheus: bool = typer.Option(False, "--prometheus", help="start a real Prometheus scraping the run"),
    hold_s: float = typer.Option(
        None,
        "--hold-s",
        help="with --prometheus: keep it up this long after the run (default: until Ctrl-C when interactive)",
    ),
    resume: Path = typer.Option(
        None,
        "--resume",
        help="continue the stopped run in this directory from its last complete round (its own config)",
    ),
) -> None:
    """Run a federation (cloud, edges, devices) as local processes on loopback and write results."""
    if resume is not None and (config is not None or overrides or device is not None):
        console.print("[red]--resume:[/red] a resumed run keeps its own config (drop --config, --set, --device)")
        raise typer.Exit(2)
    if resume is not None and (out is not None or force):
        console.print("[red]--resume:[/red] continues the run in its own folder (drop --out, --force)")
        raise typer.Exit(2)
    cfg = _config(config, overrides, device)
    from hffm.runinfo import new_run_id
    from services.launcher import RunFailed
    from services.launcher import run as launch

    try:
        if resume is not None:
            launch(cfg, resume, console, prometheus=prometheus, hold_s=hold_s, resume=True)
        else:
            run_id = new_run_id(cfg.method)
            launch(
                cfg,
                out or Path("runs") / run_id,
                console,
                prometheus=prometheus,
                hold_s=hold_s,
                force=force,
                run_id=run_id,
            )
    except RunFailed as err:
        console.print(f"[red]run failed:[/red] {err}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def chaos(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (default: built-in defaults)"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    kills: int = typer.Option(10, "--kills", min=0, help="processes to SIGKILL at seeded random moments"),
    rounds: int = typer.Option(None, "--rounds", min=2, help="rounds (default: the config's)"),
    seed: int = typer.Option(0, "--seed", help="seed of the kill schedule (moments and targets)"),
    scenario: Path = typer.Option(None, "--scenario", help="run this fault scenario file instead (tests/scenarios/)"),
    out: Path = typer.Option(Path("runs/chaos"), "--out", "-o", help="directory for both runs and chaos.json"),
) -> None:
    """Run a federation while killing random nodes (seeded), after the same run without faults; print
    rounds, aggregates, updates left out, lost and double-counted updates (both must be 0) and the
    wall-time overhead (docs/reliability.md)."""
    from rich.table import Table

    from services.launcher import RunFailed

    sets = [*overrides, *([f"rounds={rounds}"] if rounds else [])]
    try:
        if scenario is not None:
            from hffm.scenario import Scenario
            from services.chaos import run_scenario

            sc = Scenario.load(scenario)
            outcome = run_scenario(sc, out, console, sets)
            for p in outcome.problems:
                console.print(f"[red]{p}[/red]")
            console.print(f"audit: {outcome.audit.as_dict()}")
            raise typer.Exit(0 if outcome.ok else 1)
        from services.chaos import soak

        figures = soak(_config(config, sets), kills, seed, out, console)
    except RunFailed as err:
        console.print(f"[red]run failed:[/red] {err}")
        raise typer.Exit(1) from None
    table = Table(title=f"hffm chaos: {figures['nodes']} {figures['method']}, {figures['rounds']} rounds")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        if key not in ("problems", "final_accuracy", "baseline_final_accuracy", "killed"):
            table.add_row(key, str(value))
    console.print(table)
    console.print(f"killed: {', '.join(figures['killed'])}")
    console.print(f"final accuracy {figures['final_accuracy']} (fault-free: {figures['baseline_final_accuracy']})")
    for p in figures["problems"]:
        console.print(f"[red]{p}[/red]")
    console.print(f"figures: {out / 'chaos.json'}")
    if figures["problems"] or not figures["baseline_audit_ok"]:
        raise typer.Exit(1)


@app.command("config")
def show_config(
    config: Path = typer.Option(None, "--config", "-c"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    explain: bool = typer.Option(False, "--explain", help="every key with its value and what it means"),
    out: Path = typer.Option(
        None, "--out", "-o", help="write the resolved config to this file (what every process of a run reads)"
    ),
) -> None:
    """Print the resolved config (defaults + file + overrides), or write it (--out)."""
    cfg = _config(config, overrides)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out)
        from hffm.model import backbone_dims
        from hffm.topology import Topology

        topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
        console.print(f"{out}: {len(topo.node_ids())} nodes: {', '.join(topo.node_ids())}", highlight=False)
        return
    if not explain:
        typer.echo(dump_config(cfg), nl=False)
        return
    from hffm.config import explain_config

    for key, value, description in explain_config(cfg):
        typer.echo(f"{key} = {value}\n    {description}" if value is not None else f"[{key}]  {description}")


@app.command("runs")
def list_runs(
    root: Path = typer.Option(Path("runs"), "--root", help="the folder holding run folders"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per run instead of a table"),
) -> None:
    """The runs under ROOT, oldest first: id, method, data, status, rounds done, final accuracy, bytes, time."""

    from rich.table import Table

    from hffm.runinfo import list_runs as runs_under

    rows = runs_under(root)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    if not rows:
        console.print(f"no runs under {root}")
        return
    table = Table("run", "method", "data", "status", "rounds", "final acc (global)", "MB", "wall s")
    colour = {"complete": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "stopped": "yellow"}
    for r in rows:
        acc = r["final_global_accuracy"]
        st = r["status"]
        table.add_row(
            r["id"],
            r["method"] or "?",
            r["data"],
            f"[{colour.get(st, 'white')}]{st}[/]",
            r["rounds"],
            "—" if acc is None else f"{acc:.3f}",
            f"{r['mb']:.1f}",
            f"{r['wall_s']:.0f}",
        )
    console.print(table)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(None, help="run folders (or their results.json) to compare"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="compare.png, compare.md, compare.json"),
    sweep: str = typer.Option(
        None, "--sweep", help="KEY=V1,V2,...: run one federation per value first (with --config/--set), then compare"
    ),
    config: Path = typer.Option(None, "--config", "-c", help="with --sweep: the base config"),
    overrides: list[str] = typer.Option([], "--set", help="with --sweep: " + SET_HELP),
) -> None:
    """Overlay runs: mean global accuracy, MB sent, modeled latency and energy per round, each run
    labelled by what differs between their configs."""
    from hffm.compare import compare as overlay
    from hffm.compare import load_run

    paths = list(runs or [])
    if sweep:
        if "=" not in sweep or not sweep.split("=", 1)[1]:
            console.print("[red]--sweep:[/red] expected KEY=V1,V2,... e.g. --sweep method=star,hfm")
            raise typer.Exit(2)
        from hffm.runinfo import new_run_id
        from services.launcher import RunFailed
        from services.launcher import run as launch

        key, values = sweep.split("=", 1)
        cfgs = [_config(config, [*overrides, f"{key}={v}"]) for v in values.split(",")]  # all checked first
        for cfg in cfgs:
            rid = new_run_id(cfg.method)
            try:
                launch(cfg, Path("runs") / rid, console, run_id=rid)
            except RunFailed as err:
                console.print(f"[red]run failed:[/red] {err}")
                raise typer.Exit(1) from None
            paths.append(Path("runs") / rid)
    if len(paths) < 2:
        console.print("[red]compare:[/red] name two or more runs (or --sweep)")
        raise typer.Exit(2)
    try:
        results = [load_run(p) for p in paths]
    except ValueError as err:
        console.print(f"[red]compare:[/red] {err}")
        raise typer.Exit(2) from None
    overlay(results, out)
    console.print((out / "compare.md").read_text(), markup=False, highlight=False)
    console.print(f"{out / 'compare.png'}  {out / 'compare.md'}  {out / 'compare.json'}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="a run folder (or its results.json)"),
    tensorboard: Path = typer.Option(None, "--tensorboard", help="write TensorBoard event files under this logdir"),
    mlflow: str = typer.Option(None, "--mlflow", help="log to this MLflow tracking URI (file:<dir> or a server)"),
    experiment: str = typer.Option("hffm", "--experiment", help="MLflow experiment name"),
) -> None:
    """Write a run's per-round metrics to TensorBoard and/or MLflow (pip install 'hffm[tracking]')."""
    from hffm.compare import load_run, to_mlflow, to_tensorboard

    if tensorboard is None and mlflow is None:
        console.print("[red]export:[/red] name --tensorboard DIR and/or --mlflow URI")
        raise typer.Exit(2)
    try:
        results = load_run(run)
    except ValueError as err:
        console.print(f"[red]export:[/red] {err}")
        raise typer.Exit(2) from None
    try:
        if tensorboard is not None:
            console.print(f"TensorBoard: {to_tensorboard(results, tensorboard)}")
        if mlflow is not None:
            console.print(f"MLflow run {to_mlflow(results, mlflow, experiment)} in {mlflow}")
    except ImportError as err:
        console.print(f"[red]export:[/red] {err.name or err} is not installed: pip install 'hffm[tracking]'")
        raise typer.Exit(1) from None


@app.command()
def centralised(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (default: built-in defaults)"),
    out: Path = typer.Option(Path("runs/centralised"), "--out", "-o", help="directory for results.json"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (runtime.device)"),
) -> None:
    """Train the same modules on all the data in one process (the federation's upper bound): as many
    passes over the training pool as the federation makes, each tested on the same global test sets."""

    from hffm.centralised import run_centralised
    from hffm.data import DataError, preflight

    cfg = _config(config, overrides, device)
    try:
        console.print(preflight(cfg))
        results = run_centralised(cfg, log=console.print)
    except DataError as err:
        console.print(f"[red]data error:[/red] {err}")
        raise typer.Exit(1) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    console.print(f"results: {out / 'results.json'}")


@app.command()
def partition(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (default: built-in defaults)"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    summary: bool = typer.Option(False, "--summary", help="one line per task (and cluster), no device rows"),
    json_out: Path = typer.Option(None, "--json", help="also write the counts and summaries to this JSON file"),
) -> None:
    """Print the training data each device will hold: its samples per answer for every task (the config's
    Dirichlet split of each task's pool over the starting devices), each cluster's coverage, and how skewed
    the split is. Reads labels only: no image, no training; the same split every process makes."""
    from rich.table import Table

    from hffm.data import DataError, partition_counts, skew_summary, task_answers
    from hffm.topology import split_table

    cfg = _config(config, overrides)
    topo = split_table(cfg)
    try:
        counts = partition_counts(cfg, topo.holders_by_task())
        answers = task_answers(cfg)
    except DataError as err:
        console.print(f"[red]data error:[/red] {err}")
        raise typer.Exit(1) from None
    edge_of = {d.id: d.edge for d in topo.devices}
    report: dict = {"source": cfg.data.source, "alpha": cfg.data.alpha, "tasks": {}}
    for task, by_device in counts.items():
        clusters: dict[str, list[int]] = {}
        for d, c in by_device.items():
            acc = clusters.setdefault(edge_of[d], [0] * len(c))
            clusters[edge_of[d]] = [a + b for a, b in zip(acc, c, strict=True)]
        s = skew_summary(by_device)
        report["tasks"][task] = {
            "answers": answers[task],
            "devices": by_device,
            "clusters": clusters,
            "summary": s,
            "cluster_summary": skew_summary(clusters),
        }
        console.print(
            f"[bold]{task}[/bold]: {s['devices']} devices, {len(answers[task])} answers, Dirichlet({cfg.data.alpha}); "
            f"{s['single_answer']} devices hold a single answer; a device's most common answer is "
            f"{s['median_top_share']:.0%} of its samples (median); {s['minority_share']:.0%} of the samples are not of "
            f"their device's most common answer (pooled: {s['pool_minority_share']:.0%})",
            highlight=False,
        )
        table = Table(show_edge=False, pad_edge=False)
        for col in ("holder", "samples", "answers held", "top share", " ".join(answers[task])):
            table.add_column(col, overflow="fold")
        rows = list(clusters.items()) if summary else [*by_device.items(), *clusters.items()]
        for name, c in rows:
            n = sum(c)
            table.add_row(
                name if name in clusters else f"  {name}",
                str(n),
                f"{sum(1 for x in c if x)}/{len(c)}",
                f"{max(c) / n:.2f}" if n else "-",
                " ".join(str(x) for x in c),
            )
        console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"written: {json_out}")


@app.command()
def plot(results: Path = typer.Argument(..., help="results.json"), out: Path = typer.Option(None, "--out")) -> None:
    """Draw accuracy and bytes per round from a results.json."""

    from hffm.results import plot_results

    target = out or results.with_name("results.png")
    plot_results(json.loads(results.read_text()), target)
    console.print(str(target))


@app.command()
def topology(
    config: Path = typer.Option(None, "--config", "-c"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path = typer.Option(Path("runs/topology.png"), "--out", "-o", help="PNG drawing"),
    round_: int = typer.Option(1, "--round", help="round whose cluster heads are shown"),
) -> None:
    """Print node positions, link rates and D2D paths; draw them to a PNG."""
    from hffm.costmodel import CostModel
    from hffm.model import backbone_dims
    from hffm.topology import Topology
    from hffm.topoview import draw_topology, topology_report

    cfg = _config(config, overrides)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    costs = CostModel(cfg, topo)
    ctx = costs.d2d_context(topo, round_)
    console.print(topology_report(topo, costs, ctx), highlight=False, markup=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_topology(topo, costs, ctx, out)
    console.print(f"drawing: {out}")


@app.command()
def table1(
    config: Path = typer.Option(REPO / "configs" / "paper.yaml", "--config", "-c", show_default="configs/paper.yaml"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    profile: str = typer.Option("corrected", "--profile", help="paper | corrected"),
    skip_training: bool = typer.Option(False, "--skip-training", help="cost model only, no accuracy runs"),
    fmt: str = typer.Option("table", "--format", help="table | json | md"),
    out: Path = typer.Option(Path("runs/table1"), "--out", "-o"),
    rounds: int = typer.Option(8, "--rounds", help="rounds per method (averaged; accuracy from the last)"),
    module_size: str = typer.Option(
        "paper", "--module-size", help="paper: charge ViLT-B/32-sized modules (37.8 MB); config: the config's"
    ),
) -> None:
    """The paper's Table I: all seven rows, modeled latency and energy, accuracy from real runs."""
    import json as _json

    from rich.table import Table

    from hffm.circulation import NAMED_POLICIES, with_policy
    from hffm.config import PAPER_MODEL
    from hffm.table1 import PAPER_ROWS, POLICY_ROWS, as_json, as_markdown, build_rows, label, num, write_outputs

    if profile not in ("paper", "corrected"):
        console.print(f"[red]--profile: {profile!r} is not one of paper, corrected[/red]")
        raise typer.Exit(2)
    if fmt not in ("table", "json", "md"):
        console.print(f"[red]--format: {fmt!r} is not one of table, json, md[/red]")
        raise typer.Exit(2)
    if module_size not in ("paper", "config"):
        console.print(f"[red]--module-size: {module_size!r} is not one of paper, config[/red]")
        raise typer.Exit(2)
    cfg = _config(config, [*overrides, f"cost.profile={profile}", f"rounds={rounds}"])
    cost_cfg = _config(
        config, [*overrides, f"cost.profile={profile}", *(PAPER_MODEL if module_size == "paper" else [])]
    )
    accuracy = None
    if not skip_training:
        from services.launcher import RunFailed
        from services.launcher import run as launch

        accuracy = {}
        runs = [((m, e), with_policy(cfg, m, e, []), f"{m}-e{e}") for m, e, *_ in PAPER_ROWS]
        if profile != "paper":  # the non-uniform policies' rows (the paper's formulas know methods only)
            runs += [(n, with_policy(cfg, *NAMED_POLICIES[n]), n.replace(" ", "-")) for n in POLICY_ROWS]
        for key, run_cfg, name in runs:
            console.print(f"[bold]training run[/bold] {name}")
            try:
                res = launch(run_cfg, out / name, console, force=True)
            except RunFailed as err:
                console.print(f"[red]run failed:[/red] {err}")
                raise typer.Exit(1) from None
            last = res["rounds"][-1]["accuracy"]
            accuracy[key] = sum(v["global"] for v in last.values()) / len(last)
    rows = build_rows(cost_cfg, rounds, accuracy)
    paths = write_outputs(rows, out, profile)
    if fmt == "json":
        typer.echo(_json.dumps(as_json(rows), indent=2))
    elif fmt == "md":
        typer.echo(as_markdown(rows, profile), nl=False)
    else:
        t = Table(title=f'Table I — profile {profile} (paper\'s "kJ" are joules)')
        for col in ("method", "latency s", "paper", "ratio", "energy J", "paper", "ratio", "accuracy %", "paper"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for r in rows:
            acc = f"{100 * r.accuracy:.2f}" if r.accuracy is not None else "—"
            t.add_row(
                label(r),
                f"{r.latency_s:.2f}",
                num(r.paper_latency_s),
                num(r.latency_ratio, ".3f"),
                f"{r.energy_j:.2f}",
                num(r.paper_energy_j),
                num(r.energy_ratio, ".3f"),
                acc,
                num(r.paper_accuracy),
            )
        console.print(t)
        console.print(" ".join(str(p) for p in paths.values()))


@app.command()
def report(
    out: Path = typer.Option(..., "--out", "-o", help="directory for the PNGs"),
    results: list[Path] = typer.Option([], "--results", "-r", help="results.json (repeat for a Table I view)"),
    prometheus: str = typer.Option(None, "--prometheus", help="Prometheus URL: draw every dashboard panel from it"),
    since: str = typer.Option("30m", "--since", help="with --prometheus: window ending now, e.g. 30m, 2h"),
) -> None:
    """Render the dashboards' panels to PNG from results.json files or from Prometheus."""
    import json as _json
    import time as _time

    from hffm import report as rep

    if not results and not prometheus:
        console.print("[red]--results or --prometheus: give at least one source[/red]")
        raise typer.Exit(2)
    for r in results:
        if not r.is_file():
            console.print(f"[red]--results: {r} not found[/red]")
            raise typer.Exit(2)
    if results:
        for name, path in rep.from_results([_json.loads(r.read_text()) for r in results], out).items():
            console.print(f"{name}: {path}")
    if prometheus:
        m = __import__("re").fullmatch(r"(\d+)([smh])", since)
        if not m:
            console.print(f"[red]--since: {since!r} is not like 30m, 2h, 90s[/red]")
            raise typer.Exit(2)
        window = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
        end = _time.time()
        drawn = rep.from_prometheus(prometheus.rstrip("/"), end - window, end, out, step_s=max(2.0, window / 300))
        for uid, counts in drawn.items():
            empty = [t for t, n in counts.items() if n == 0]
            console.print(
                f"report-{uid}.png: {len(counts) - len(empty)}/{len(counts)} panels with data"
                + (f" (no data: {', '.join(empty)})" if empty else "")
            )


@app.command()
def compose(
    config: Path = typer.Option(
        REPO / "configs" / "compose.yaml", "--config", "-c", show_default="configs/compose.yaml"
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path = typer.Option(
        REPO / "docker-compose.yml", "--out", "-o", help="compose file to write", show_default="docker-compose.yml"
    ),
    prometheus_out: Path = typer.Option(
        REPO / "deploy" / "prometheus" / "compose.yml",
        "--prometheus-out",
        help="Prometheus config for the testbed",
        show_default="deploy/prometheus/compose.yml",
    ),
    results_dir: str = typer.Option("./runs/compose", "--results-dir", help="host directory for results"),
    pki_dir: Path = typer.Option(
        None,
        "--pki-dir",
        help="the testbed's CA and credentials (security on; default: build/compose-pki beside --out)",
    ),
) -> None:
    """Generate docker-compose.yml (every node a container), its Prometheus config and (security on) the
    testbed's CA and every container's credentials, from a config."""
    import yaml

    from hffm.deploy import compose_spec, prometheus_static_config, provision_compose_pki
    from hffm.model import backbone_dims
    from hffm.topology import Topology

    cfg = _config(config, overrides)
    if overrides:  # the containers must read the same config the file was generated from
        config = out.with_name(out.stem + ".config.yaml")
        write_config(cfg, config)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    repo = Path(__file__).resolve().parent.parent
    pki = None
    if cfg.security.tls:
        pki = provision_compose_pki(cfg, topo, pki_dir or out.resolve().parent / "build" / "compose-pki")
    spec = compose_spec(
        cfg,
        topo,
        repo=repo,
        compose_dir=out.resolve().parent,
        config_path=config.resolve(),
        prometheus_config=prometheus_out.resolve(),
        results_dir=results_dir,
        pki_dir=pki,
    )
    header = (
        f"# Generated by `hffm compose --config {config}`; edit the config, not this file.\n"
        f"# {len(topo.edges)} edges x {cfg.topology.devices_per_edge} devices, method {cfg.method}.\n"
    )
    out.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    prometheus_out.write_text(
        "# Generated by `hffm compose`: the testbed's containers, scraped by name.\n"
        + yaml.safe_dump(prometheus_static_config(topo, tls=pki is not None), sort_keys=False)
    )
    console.print(
        f"{out} ({len(spec['services'])} services), {prometheus_out}" + (f", credentials in {pki}" if pki else "")
    )


@app.command()
def bench(
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="fewer repeats and senders (under 3 minutes)"),
    devices: str = typer.Option(None, "--devices", help="device counts to sweep, e.g. 10,100,1000"),
    flower_clients: str = typer.Option(None, "--flower-clients", help="client counts vs Flower, e.g. 10,20,40"),
) -> None:
    """Benchmarks side by side: transfer vs a loopback socket, aggregation vs in-place add, round time vs
    Flower, devices per machine, time to accuracy."""
    from benchmarks.run import markdown, run_all

    b = run_all(
        out,
        quick,
        log=console.print,
        sizes=_int_list("--devices", devices),
        flower_clients=_int_list("--flower-clients", flower_clients),
    )
    console.print(markdown(b), markup=False)
    console.print(f"{out / 'bench.json'}  {out / 'bench.md'}  {out / 'transfer.png'}  {out / 'devices.png'}")


@app.command()
def attacks(
    out: Path = typer.Option(Path("runs/attacks"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="2 rounds, small pools"),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE over the matrix's settings (repeatable)"),
    rules: list[str] = typer.Option([], "--rule", help="rows to (re)run, the rest kept from OUT (repeatable)"),
    attack: list[str] = typer.Option([], "--attack", help="columns to (re)run, the rest kept from OUT (repeatable)"),
    init_seeds: list[int] = typer.Option(
        [],
        "--init-seed",
        help="draws: the matrix once per initialisation (model.init_seed), each under OUT/init-<seed>, and the "
        "cells' medians and differences from the same draw's clean run (repeatable)",
    ),
    summary: bool = typer.Option(False, "--summary", help="only summarise the draws kept under OUT"),
) -> None:
    """The rule x attack matrix: every aggregation rule against every poisoning behaviour at 20 %
    attackers (real federations), with the detection's TPR/FPR per cell (docs/robustness.md)."""
    from benchmarks.attacks import ATTACKS, RULES, draw_tables, run_draws, run_matrix, tables, write_draws

    for flag, given, known in (("--rule", rules, RULES), ("--attack", attack, ATTACKS)):
        if unknown := [x for x in given if x not in known]:
            raise typer.BadParameter(f"unknown {unknown}; known: {list(known)}", param_hint=flag)
    if summary or init_seeds:
        try:
            got = (
                write_draws(out)
                if summary
                else run_draws(out, init_seeds, quick, sets, console.print, rules or None, attack or None)
            )
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--summary" if summary else "--init-seed") from None
        console.print(draw_tables(got), markup=False)
        console.print(f"{out / 'draws.json'}  {out / 'draws.md'}")
        return
    res = run_matrix(out, quick, sets, log=console.print, rules=rules or None, attacks=attack or None)
    console.print(tables(res), markup=False)
    console.print(f"{out / 'attacks.json'}  {out / 'attacks.md'}")


@app.command()
def join(
    run_dir: Path = typer.Option(..., "--run", help="the running run's folder (hffm run --out)"),
    device: str | None = typer.Option(None, "--id", help="the new device's id, device-<e>-<i> (edge e must exist)"),
    position: str | None = typer.Option(
        None, "--position", help="X,Y in m: where the device is; without --id it joins the nearest edge"
    ),
    wait: bool = typer.Option(False, "--wait", help="stay until the device's process exits"),
) -> None:
    """Start a device that joins a running run (topology.joins: true): a certificate from the run's CA,
    its edge's address from the run's processes, a device process that registers; the cloud admits it
    between rounds and it catches up by a sync from its cheapest holder (docs/circulation.md). With
    --position, its edge is the nearest by the run's geometry (the cloud checks it) and its links are
    computed from there."""
    from hffm.geometry import parse_point
    from services.launcher import place_joiner, start_joiner

    cfg = _config(run_dir / "config.yaml", [])
    try:
        point = parse_point(position) if position is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--position") from None
    if device is None and point is None:
        raise typer.BadParameter(
            "give the device's --id, or its --position to join the nearest edge", param_hint="--id"
        )
    try:
        if device is None:
            device = place_joiner(run_dir, cfg, point)
        p, edge, upstream, log_path = start_joiner(run_dir, cfg, device, point)
    except ValueError as err:
        hint = "--run" if "topology.joins" in str(err) else "--position" if "position" in str(err) else "--id"
        raise typer.BadParameter(str(err), param_hint=hint) from None
    where = f" at ({point[0]:.1f}, {point[1]:.1f}) m" if point else ""
    console.print(f"{device} started (pid {p.pid}), joining {edge}{where} at {upstream}; log: {log_path}")
    if wait:
        raise typer.Exit(p.wait())


@app.command()
def evict(
    run_dir: Path = typer.Option(..., "--run", help="the running run's folder (hffm run --out)"),
    device: str = typer.Option(..., "--id", help="the device to take off the federation"),
    reason: str = typer.Option("", "--reason", help="logged by the cloud"),
) -> None:
    """Take a device off a running federation (topology.joins: true), as the operator (its certificate):
    the round it is in finishes, then it is shut down and planned around, and it may not register again."""
    import grpc

    from hffm.ids import CLOUD
    from hffm.pki import OPERATOR
    from services.common.security import Security
    from services.launcher import listen_address
    from services.rpc import pb, pb_grpc

    cfg = _config(run_dir / "config.yaml", [])
    try:
        cloud = listen_address(run_dir, CLOUD)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--run") from None
    sec = Security(cfg.security, OPERATOR)
    with sec.channel(cloud, CLOUD) as ch:
        try:
            ack = pb_grpc.CoordinatorStub(ch).Evict(
                pb.LeaveRequest(id=device, reason=reason), timeout=30, metadata=sec.call_metadata()
            )
        except grpc.RpcError as err:
            console.print(f"[red]{err.code().name}[/red]: {err.details()}")
            raise typer.Exit(1) from None
    last = f"its last round is {ack.round}" if ack.round else "no round running: it takes part in none more"
    console.print(f"{device} evicted ({last}); it may not register again")


@app.command()
def sweep(
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="2 edges x 2 devices, 2 rounds, small pools"),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE over the sweep's settings (repeatable)"),
    policy: list[str] = typer.Option([], "--policy", help="policies to run (repeatable; default: all)"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="seeds per policy (accuracy averaged)"),
) -> None:
    """Circulation policies side by side: real runs for accuracy, the cost model (paper-size modules) for
    energy and latency; prints the table and the Pareto front, writes OUT/sweep.{json,md,png}."""
    from benchmarks.circulation import markdown, run_sweep
    from hffm.circulation import NAMED_POLICIES

    if unknown := [x for x in policy if x not in NAMED_POLICIES]:
        raise typer.BadParameter(f"unknown {unknown}; known: {list(NAMED_POLICIES)}", param_hint="--policy")
    res = run_sweep(out, quick, sets, policy or None, seeds, log=console.print)
    console.print(markdown(res), markup=False)
    console.print(f"Pareto front: {', '.join(res['pareto'])}")
    if "goal" in res:
        g = res["goal"]
        console.print(
            f"goal (>= 30 % less energy than uniform hfm-d2d E_agg=2, within 1 point): "
            f"{'met by ' + g['policy'] if g['met'] else 'not met'}"
        )
    console.print(f"{out / 'sweep.json'}  {out / 'sweep.md'}  {out / 'sweep.png'}")


@app.command()
def onboard(
    out: Path = typer.Option(Path("runs/onboard"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="10 rounds, small pools, the newcomer after round 1"),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE over the benchmark's settings (repeatable)"),
    seeds: int = typer.Option(1, "--seeds", min=1),
) -> None:
    """A newcomer onboarded by relay versus trained from scratch: a real hfm-d2d run that a device joins
    mid-run, and the same device alone; rounds and modeled energy until it reaches the federation's
    accuracy on its tasks. Writes OUT/onboard.{json,md} (docs/circulation.md)."""
    from benchmarks.onboarding import markdown, run_onboard

    res = run_onboard(out, quick, sets, seeds, log=console.print)
    console.print(markdown(res), markup=False)
    g = res["goal"]
    console.print(
        f"goal (>= 5x fewer rounds onboarded): {'met' if g['met'] else 'not met'} (at least {g['at_least']:.1f}x)"
    )
    console.print(f"{out / 'onboard.json'}  {out / 'onboard.md'}")


# ---- hffm pki: the federation's certificate authority ------------------------------------------------
pki_app = typer.Typer(
    no_args_is_help=True,
    help="The federation's CA: init, issue (key+cert in one step), csr + sign (keys stay where made), revoke.",
)
app.add_typer(pki_app, name="pki")


def _pki_fail(err: Exception) -> None:
    console.print(f"[red]pki:[/red] {err}")
    raise typer.Exit(2)


@pki_app.command("init")
def pki_init(
    directory: Path = typer.Option(..., "--dir", help="where ca.key and ca.crt go (ca.key: keep it offline)"),
    federation: str = typer.Option("hffm", "--federation"),
    days: int = typer.Option(365, "--days"),
) -> None:
    """Create a federation CA."""
    from hffm.pki import PKIError, make_ca, write_node_files

    if (directory / "ca.key").exists():
        _pki_fail(FileExistsError(f"{directory / 'ca.key'} exists: one CA per directory"))
    try:
        key, cert = make_ca(federation, days)
    except PKIError as err:
        _pki_fail(err)
    write_node_files(directory, "ca", key, cert)
    console.print(f"CA of federation {federation!r}: {directory / 'ca.crt'} (key {directory / 'ca.key'})")


@pki_app.command("issue")
def pki_issue(
    directory: Path = typer.Option(..., "--dir", help="the CA's directory; <id>.key and <id>.crt go here"),
    role: str = typer.Option(..., "--role", help="cloud | edge | device | operator"),
    node_id: str = typer.Option(..., "--id", help="node id (cloud, edge-<e>, device-<e>-<i>) or operator name"),
    hosts: list[str] = typer.Option([], "--host", help="a host name or IP it is reached at (repeatable)"),
    federation: str = typer.Option("hffm", "--federation"),
    days: int = typer.Option(30, "--days"),
) -> None:
    """Key and certificate in one step (local runs, tests)."""
    from hffm.pki import PKIError, issue_in

    try:
        k, c = issue_in(directory, federation, role, node_id, hosts, days)
    except (PKIError, OSError) as err:
        _pki_fail(err)
    console.print(f"{c} ({k})")


@pki_app.command("csr")
def pki_csr(
    out_dir: Path = typer.Option(..., "--out-dir", help="where <id>.key (stays here) and <id>.csr go"),
    role: str = typer.Option(..., "--role"),
    node_id: str = typer.Option(..., "--id"),
    hosts: list[str] = typer.Option([], "--host"),
    federation: str = typer.Option("hffm", "--federation"),
) -> None:
    """Make a key and a signing request where the node runs; send only the .csr to the CA."""
    from hffm.pki import PKIError, make_csr, write_node_files

    try:
        key, csr = make_csr(federation, role, node_id, hosts)
    except PKIError as err:
        _pki_fail(err)
    k, _ = write_node_files(out_dir, node_id, key, b"")
    (out_dir / f"{node_id}.crt").unlink()
    (out_dir / f"{node_id}.csr").write_bytes(csr)
    console.print(f"{out_dir / (node_id + '.csr')} (key {k})")


@pki_app.command("sign")
def pki_sign(
    directory: Path = typer.Option(..., "--dir", help="the CA's directory"),
    csr: Path = typer.Option(..., "--csr"),
    out: Path = typer.Option(..., "--out", help="the certificate to write"),
    federation: str = typer.Option("hffm", "--federation"),
    days: int = typer.Option(30, "--days"),
) -> None:
    """Sign a node's request (checked: its signature, one identity of this federation)."""
    from hffm.pki import PKIError, identity_of, load_cert, sign_csr

    try:
        cert = sign_csr(
            (directory / "ca.key").read_bytes(), (directory / "ca.crt").read_bytes(), csr.read_bytes(), federation, days
        )
    except (PKIError, OSError) as err:
        _pki_fail(err)
    out.write_bytes(cert)
    console.print(f"{out}: {identity_of(load_cert(cert)).uri}")


@pki_app.command("revoke")
def pki_revoke(
    directory: Path = typer.Option(..., "--dir", help="the CA's directory; crl.pem is rewritten here"),
    cert: list[Path] = typer.Option([], "--cert", help="a certificate to revoke (repeatable)"),
    serial: list[str] = typer.Option([], "--serial", help="a serial (hex) to revoke (repeatable)"),
) -> None:
    """Add certificates to the revocation list every server honours (at its next start)."""
    from hffm.pki import PKIError, load_cert, make_crl, revoked_serials

    ca_key, ca_cert = (directory / "ca.key").read_bytes(), (directory / "ca.crt").read_bytes()
    crl_path = directory / "crl.pem"
    try:
        serials = set(revoked_serials(crl_path.read_bytes(), ca_cert)) if crl_path.is_file() else set()
        serials |= {load_cert(c.read_bytes()).serial_number for c in cert}
        serials |= {int(s, 16) for s in serial}
    except (PKIError, OSError, ValueError) as err:
        _pki_fail(err)
    crl_path.write_bytes(make_crl(ca_key, ca_cert, sorted(serials)))
    console.print(f"{crl_path}: {len(serials)} revoked")


@pki_app.command("k8s")
def pki_k8s(
    config: Path = typer.Option(Path("configs/k8s.yaml"), "--config", "-c", help="the cluster's config (its topology)"),
    directory: Path = typer.Option(
        Path("build/k8s-pki"), "--dir", help="the cluster's CA and credentials (an existing CA is kept)"
    ),
    out: Path = typer.Option(Path("build/k8s-secrets.yaml"), "--out", help="the Secrets to kubectl apply"),
    namespace: str = typer.Option("hffm", "--namespace"),
    cert_manager: bool = typer.Option(
        False, "--cert-manager", help="the CA alone (and its key pair for cert-manager's CA Issuer)"
    ),
) -> None:
    """Credentials for the Kubernetes manifests: a CA, every node's key and certificate (naming its id and
    pod DNS names) and the scraper's, as Secrets (one per role; each pod mounts its own files alone)."""
    import yaml

    from hffm.deploy import k8s_secrets, provision_k8s_pki
    from hffm.model import backbone_dims
    from hffm.pki import PKIError
    from hffm.results import atomic_write_bytes
    from hffm.topology import Topology

    cfg = _config(config, [])
    if not cfg.security.tls:
        _pki_fail(ValueError(f"{config}: security.tls is false; the manifests would not use credentials"))
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    try:
        d = provision_k8s_pki(cfg, topo, directory, namespace, cert_manager)
        docs = k8s_secrets(topo, d, namespace, cert_manager)
    except (PKIError, OSError) as err:
        _pki_fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated by `hffm pki k8s` from {d}: private keys; apply, do not commit.\n"
    atomic_write_bytes(out, (header + yaml.safe_dump_all(docs, sort_keys=False)).encode(), mode=0o600)
    names = ", ".join(doc["metadata"]["name"] for doc in docs)
    console.print(f"{out}: {names}\n  kubectl apply -f {out}")


def _int_list(option: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        console.print(f"[red]{option}: {text!r} is not a comma-separated list of positive integers[/red]")
        raise typer.Exit(2)
    return vals


def main() -> None:
    import faulthandler
    import signal
    import sys

    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck run waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # SIGTERM (kill, systemd, a CI timeout) stops a run like Ctrl-C: every process it started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app()


if __name__ == "__main__":
    main()
