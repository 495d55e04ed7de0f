"""The gap to centralised training judged over draws (issue 15).

``python -m benchmarks.gap --out DIR --init-seed S [--init-seed S ...] [--set KEY=VALUE ...]`` and any of
``benchmarks.screen``'s remedy options (``--remedy R``, its parameters, ``--calibrate C``); ``--out DIR`` alone
summarises the draws kept there.

One screened federation (``benchmarks.screen``: hfm's round plan in one process) and one centralised bound
(``hffm.centralised``) are each one draw: the same settings with another ``model.init_seed`` (the frozen
backbone's, adapters' and heads' initialisation; the data, its split and every training order stay) move a
task's accuracy by 1-5 points. A goal stated against the bound ("within 3 points on every task") is judged
here on **paired** differences: each draw's federation against the bound made from the same initialisation,
and the medians of those differences per task, not the difference of two single runs.

Each draw lies under DIR/init-<S>: ``screen.json`` (the curve, as ``benchmarks.screen --out`` writes it) and
``centralised.json`` (``run_centralised``'s results); a draw already there with the same settings and code
(``benchmarks.realdata.code_digest``) is kept, not run again. Writes DIR/draws.json and DIR/draws.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.attacks import _same_settings, _spread, draw_dir
from benchmarks.realdata import code_digest
from benchmarks.screen import remedy_info, remedy_kwargs, remedy_options, screen
from hffm.centralised import run_centralised
from hffm.config import load_config

INIT = "model.init_seed="


def _kept(path: Path, key: dict) -> dict | None:
    """The result kept at ``path`` where it was made with ``key`` (settings and code), else None."""
    if not path.exists():
        return None
    got = json.loads(path.read_text())
    return got if all(got.get(k) == v for k, v in key.items()) else None


def run_draw(out: Path, init_seed: int, a: argparse.Namespace, log=print) -> None:
    """One draw: the screened federation (``a``: ``benchmarks.screen``'s remedy options) and the centralised
    bound of ``a.sets`` with ``model.init_seed``."""
    d = draw_dir(out, init_seed)
    d.mkdir(parents=True, exist_ok=True)
    sets = [*(s for s in a.sets if not s.startswith(INIT)), f"{INIT}{init_seed}"]
    code = code_digest()
    key = {"sets": sets, **remedy_info(a), "code": code}
    if _kept(d / "screen.json", key) is None:
        log(f"draw {init_seed}: the federation ({a.remedy}, calibrate {a.calibrate})")
        curve, _ = screen(load_config(a.config, sets), a.remedy, log=log, **remedy_kwargs(a))
        (d / "screen.json").write_text(json.dumps({**key, "curve": curve}, indent=1))
    central = {"sets": sets, "code": code}
    if _kept(d / "centralised.json", central) is None:
        log(f"draw {init_seed}: the centralised bound")
        results = run_centralised(load_config(a.config, sets), log=log)
        (d / "centralised.json").write_text(json.dumps({**central, **results}, indent=1))


def summarise(out: Path) -> dict:
    """Over every draw under OUT (in order of its seed): per task the federation's and the bound's accuracy
    after the last round, and the federation's difference from its own draw's bound in points. Draws of
    other settings (apart from the initialisation) or of another remedy are refused."""
    found = sorted(out.glob("init-*/screen.json"), key=lambda p: int(p.parent.name.removeprefix("init-")))
    if not found:
        raise ValueError(f"no draws under {out} (init-<seed>/screen.json)")

    def what(path: Path) -> tuple[list[str], dict]:
        got = json.loads(path.read_text())
        remedy = {k: v for k, v in got.items() if k not in ("sets", "code", "curve")}
        return [s for s in got["sets"] if not s.startswith(INIT)], remedy

    first = what(found[0])
    summary: dict = {"sets": first[0], "remedy": first[1], "draws": [], "tasks": {}}
    for path in found:
        sets, remedy = what(path)
        if not _same_settings(sets, first[0]) or remedy != first[1]:
            raise ValueError(f"{path} holds a draw of other settings than {found[0]}")
        bound_path = path.parent / "centralised.json"
        if not bound_path.exists():
            raise ValueError(f"{path.parent}: a federation without its centralised bound (centralised.json)")
        fed = json.loads(path.read_text())["curve"][-1]
        bound = json.loads(bound_path.read_text())["rounds"][-1]
        if fed["round"] != bound["round"]:
            ends = f"the federation ends at round {fed['round']}, its bound at {bound['round']}"
            raise ValueError(f"{path.parent}: {ends}")
        summary["draws"].append(int(path.parent.name.removeprefix("init-")))
        for task, acc in sorted(fed["accuracy"].items()):
            b = bound["accuracy"][task]["global"]
            got = summary["tasks"].setdefault(task, {"federation": [], "centralised": [], "gap": []})
            got["federation"].append(acc)
            got["centralised"].append(b)
            got["gap"].append(100 * (acc - b))
    means = [
        statistics.mean(t["federation"][i] for t in summary["tasks"].values())
        - statistics.mean(t["centralised"][i] for t in summary["tasks"].values())
        for i in range(len(summary["draws"]))
    ]
    summary["mean_gap"] = [100 * m for m in means]
    worst = [min(t["gap"][i] for t in summary["tasks"].values()) for i in range(len(summary["draws"]))]
    summary["worst_gap"] = worst
    return summary


def tables(summary: dict) -> str:
    """Per task: the medians (ranges) of the federation's and the bound's accuracy and of their paired
    difference, and of the tasks' mean; the worst task by median difference, and each draw's worst task."""
    lines = [
        f"draws (model.init_seed): {', '.join(map(str, summary['draws']))}; "
        + ", ".join(f"{k} {v}" for k, v in summary["remedy"].items()),
        "",
        "| task | federation, median (range) | centralised, median (range) | federation − centralised, points: "
        "median of the draws' differences (range) |",
        "|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        lines.append(
            f"| {task} | {_spread(t['federation'], '.3f')} | {_spread(t['centralised'], '.3f')} "
            f"| {_spread(t['gap'], '+.1f')} |"
        )
    lines.append(f"| mean of the tasks | | | {_spread(summary['mean_gap'], '+.1f')} |")
    task, t = min(summary["tasks"].items(), key=lambda kv: statistics.median(kv[1]["gap"]))
    lines += [
        "",
        f"worst task by median: {task} {statistics.median(t['gap']):+.1f} points; each draw's worst task: "
        + ", ".join(f"{g:+.1f}" for g in summary["worst_gap"]),
        "",
    ]
    return "\n".join(lines)


def write(out: Path) -> dict:
    summary = summarise(out)
    (out / "draws.json").write_text(json.dumps(summary, indent=1))
    (out / "draws.md").write_text(tables(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gap", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the draws' folder (DIR/init-<seed>/)")
    p.add_argument("--init-seed", type=int, action="append", default=[], help="one draw (repeatable)")
    remedy_options(p)
    a = p.parse_args(argv)
    if len(set(a.init_seed)) != len(a.init_seed):
        p.error(f"--init-seed: each draw once, got {a.init_seed}")
    if any(s.startswith(INIT) for s in a.sets):
        p.error("--set model.init_seed: the draws set it (--init-seed)")
    for s in a.init_seed:
        run_draw(a.out, s, a)
    print(tables(write(a.out)))


if __name__ == "__main__":
    main()
