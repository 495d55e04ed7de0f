"""``hffm``: the command line (typer + rich)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hffm.config import ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hierarchical Federated Foundation Models")
console = Console()

SET_HELP = "Override a config value, e.g. --set topology.edges=3 --set method=star --set tasks=[art,gqa]"


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
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="run directory for results and logs"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (runtime.device)"),
) -> None:
    """Run a federation (cloud, edges, devices) as local processes on loopback and write results."""
    cfg = _config(config, overrides, device)
    from services.launcher import RunFailed
    from services.launcher import run as launch

    try:
        launch(cfg, out, console)
    except RunFailed as err:
        console.print(f"[red]run failed:[/red] {err}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command("config")
def show_config(
    config: Path = typer.Option(None, "--config", "-c"),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the resolved config (defaults + file + overrides)."""
    cfg = _config(config, overrides)
    typer.echo(dump_config(cfg), nl=False)


@app.command()
def plot(results: Path = typer.Argument(..., help="results.json"), out: Path = typer.Option(None, "--out")) -> None:
    """Draw accuracy and bytes per round from a results.json."""
    import json

    from hffm.results import plot_results

    target = out or results.with_name("results.png")
    plot_results(json.loads(results.read_text()), target)
    console.print(str(target))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
