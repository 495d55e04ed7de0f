"""``hffm onboard``: a newcomer onboarded by relayed modules versus one trained from scratch
(issue 16's goal; docs/circulation.md).

**Onboarded** (real): an hfm-d2d run with ``topology.joins`` on (gRPC on loopback, mTLS); once round
``join_after`` is done, ``hffm join``'s code starts ``device-0-<n>`` (a device outside the starting
table). The cloud admits it between rounds; its first round starts with a sync of its cluster's current
modules from the cheapest holder over D2D (the relay), then it trains and takes part like any member.
Its accuracy per round is its own row of results.json's ``node_accuracy``.

**From scratch**: the same device, the same data (its own draw: hffm.data.build_device_data), the
same initial modules, optimiser, local-training loop and per-round seeds, trains alone round after round
(one process, no network) and is evaluated on the same test sets after every round.

**The federation's accuracy** on the newcomer's tasks is its cluster peers' global test accuracy (mean
over its tasks, then over the peers) round by round. Onboarded, the newcomer has reached it in the first
round its own accuracy is within ``tol`` of its peers' in that round; from scratch, in the first round its
accuracy is within ``tol`` of the **target**: the peers' accuracy in the newcomer's first round. Rounds
are counted from its first round (1: reached in it).

**Energy** (the cost model, corrected profile, the paper's module sizes, the newcomer placed by
``CostModel.admit``): onboarded: every hop the newcomer sends, relays or receives in its rounds until it
reaches the target (the sync included), each hop's bytes scaled from the tiny model's module set to the
paper's, plus its local training compute in those rounds; from scratch: its local training compute in the
rounds it needs.

**No relay** (real): the same join with ``circulation.relay: none``: the newcomer starts inside the
federation from its initial modules, its first update aggregated with its peers'.

Writes DIR/onboard.json and DIR/onboard.md.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zlib
from pathlib import Path

from rich.console import Console

from hffm.config import PAPER_MODEL, HFFMConfig, load_config
from hffm.methods import SYNC

BASE = ["method=hfm-d2d", "e_agg=2", "topology.edges=2", "topology.devices_per_edge=3", "rounds=12",
        "train.eval_every=1", "topology.joins=true", "seed=0"]  # fmt: skip
QUICK = ["rounds=10", "data.train_per_task=120", "data.global_test_per_task=64"]
JOIN_AFTER = 3  # rounds done before the newcomer starts (quick: 1)
SCRATCH_ROUNDS = 40  # from scratch: rounds tried before giving up (quick: 4)
TOL = 0.01  # within one point of the target counts as reached


def newcomer(cfg: HFFMConfig) -> str:
    return f"device-0-{cfg.topology.devices_per_edge}"


def mean_global(row: dict, tasks: list[str]) -> float | None:
    vals = [row.get(t, {}).get("global") for t in tasks]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def rounds_to_reach(curve: list[float | None], target: float, tol: float = TOL) -> int | None:
    """1 + the index of the first value within ``tol`` of ``target``; None: never."""
    return next((i + 1 for i, v in enumerate(curve) if v is not None and v >= target - tol), None)


def onboarded_run(cfg: HFFMConfig, out: Path, join_after: int, log=print) -> dict:
    """Run ``cfg`` for real; once ``join_after`` rounds are done, start the newcomer. The results."""
    from services.launcher import run, start_joiner

    box: dict = {}
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's results.json must not start the newcomer

    def go() -> None:
        try:
            box["res"] = run(cfg, out, Console(file=io.StringIO()), timeout_s=1800, force=True)
        except BaseException as err:  # surfaced below, in the caller's thread
            box["err"] = err

    t = threading.Thread(target=go, daemon=True)
    t.start()
    deadline = time.monotonic() + 900
    f = out / "results.json"
    while t.is_alive() and time.monotonic() < deadline:
        if f.is_file() and len(json.loads(f.read_text())["rounds"]) >= join_after:
            start_joiner(out, load_config(out / "config.yaml", []), newcomer(cfg))  # the run's, resolved
            log(f"    {newcomer(cfg)} started after round {join_after}")
            break
        time.sleep(0.2)
    t.join()
    if "err" in box:
        raise box["err"]
    return box["res"]


def onboarded_curve(results: dict, dev: str, tasks: list[str]) -> dict:
    """The newcomer's first round, its own accuracy per round from then on, and its cluster peers' in
    the same rounds (the federation's accuracy on its tasks, as its cluster sees it); the target is the
    peers' accuracy in its first round."""
    rounds = results["rounds"]
    first = next((i for i, r in enumerate(rounds) if dev in r["node_accuracy"]), None)
    if first is None or first == 0:
        raise RuntimeError(f"{dev} never took part after round 1: no onboarding to measure")
    prefix = "device-" + dev.split("-")[1] + "-"

    def peers(row: dict) -> float | None:
        accs = [mean_global(acc, tasks) for n, acc in row.items() if n.startswith(prefix) and n != dev]
        vals = [v for v in accs if v is not None]
        return sum(vals) / len(vals) if vals else None

    later = rounds[first:]
    peer_curve = [peers(r["node_accuracy"]) for r in later]
    return {
        "first_round": rounds[first]["round"],
        "synced_from": rounds[first]["synced"].get(dev),
        "target": peer_curve[0],
        "curve": [mean_global(r["node_accuracy"].get(dev, {}), tasks) for r in later],
        "peer_curve": peer_curve,
        "rounds": [r["round"] for r in later],
    }


def rounds_to_match(curve: list[float | None], peers: list[float | None], tol: float = TOL) -> int | None:
    """1 + the index of the first round in which the newcomer is within ``tol`` of its peers; None: never."""
    return next(
        (
            i + 1
            for i, (v, p) in enumerate(zip(curve, peers, strict=True))
            if v is not None and p is not None and v >= p - tol
        ),
        None,
    )


def scratch_curve(cfg: HFFMConfig, dev: str, tasks: list[str], rounds: int, target: float) -> list[float]:
    """The newcomer alone: its data, the federation's initial modules and training loop, no relay; its
    global accuracy (mean over its tasks) after each round, stopping once it reaches ``target``."""
    import torch

    from hffm.config import resolve_torch_device
    from hffm.data import build_device_data, build_global_test, load_tokenizer, task_labels
    from hffm.ids import task_of
    from hffm.model import backbone_dims, build_model
    from hffm.topology import Topology
    from hffm.training import evaluate, round_lr, train_local

    device = resolve_torch_device(cfg.runtime.device, cfg.runtime.precision)
    torch.set_num_threads(cfg.runtime.torch_threads)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok), task_labels(cfg)).to(device)
    start = Topology.from_config(cfg, backbone_dims(cfg)[1]).holders_by_task()
    data = build_device_data(cfg, dev, start, tok, tuple(tasks))
    test = {t: build_global_test(cfg, t, tok) for t in tasks}
    names = [n for n in model.module_names() if task_of(n) is None or task_of(n) in tasks]
    curve: list[float] = []
    for r in range(1, rounds + 1):
        seed = zlib.crc32(f"{cfg.seed}/{dev}/{r}".encode())
        train_local(model, data.train, names, cfg.train, device, seed=seed, lr=round_lr(cfg.train, r, cfg.rounds))
        scores = evaluate(model, test, device)
        curve.append(sum(scores[t].accuracy for t in tasks) / len(tasks))
        if curve[-1] >= target - TOL:
            break
    return curve


def energy(cost_cfg: HFFMConfig, results: dict, dev: str, tasks: list[str], n_rounds: int, first: int) -> dict:
    """The newcomer's modeled energy under ``cost_cfg`` (corrected profile, the paper's module sizes), the
    newcomer admitted by ``CostModel.admit``: ``wire_j`` over its first ``n_rounds`` rounds (every hop it
    sent, relayed or received, bytes scaled from the run's module set to the paper's), ``compute_j`` (one
    round of its local training), ``sync_bytes`` (what the relay delivered, paper size)."""
    from hffm.costmodel import CostModel, module_sizes
    from hffm.data import build_device_data, load_tokenizer
    from hffm.ids import task_of
    from hffm.model import backbone_dims
    from hffm.topology import Topology

    run_cfg = HFFMConfig.model_validate(results["config"])
    topo = Topology.from_config(cost_cfg, backbone_dims(cost_cfg)[1])
    grown = topo.joiner(dev, cost_cfg.topology.tasks_per_device)
    costs = CostModel(cost_cfg, grown)
    costs.admit(grown)

    def own(sizes: dict[str, int]) -> int:
        return sum(b for m, b in sizes.items() if task_of(m) is None or task_of(m) in tasks)

    scale = own(module_sizes(cost_cfg)) / own(module_sizes(run_cfg))
    data = build_device_data(run_cfg, dev, topo.holders_by_task(), load_tokenizer(run_cfg), tuple(tasks))
    compute_j = costs.compute_cost(sum(data.train_samples().values()) * run_cfg.train.local_epochs)[1]
    wire_j, sync_bytes = 0.0, 0
    for r in [r for r in results["rounds"] if r["round"] >= first][:n_rounds]:
        for h in r["hops"]:
            if dev in (h["sender"], h["receiver"]):
                wire_j += costs.hop_cost(h["link"], h["sender"], h["receiver"], h["bytes"] * scale)[1]
                if h["tag"] == SYNC and h["receiver"] == dev:
                    sync_bytes += round(h["bytes"] * scale)
    return {"wire_j": wire_j, "compute_j": compute_j, "sync_bytes": sync_bytes}


def run_onboard(out: Path, quick: bool = False, sets: list[str] | None = None, seeds: int = 1, log=print) -> dict:
    from hffm.model import backbone_dims
    from hffm.topology import Topology

    base = [*BASE, *(QUICK if quick else []), *(sets or [])]
    join_after, scratch_max = (1, 4) if quick else (JOIN_AFTER, SCRATCH_ROUNDS)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"sets": base, "join_after": join_after, "scratch_max": scratch_max, "tol": TOL, "seeds": []}
    for seed in range(seeds):
        cfg = load_config(None, [*base, f"seed={seed}"])
        cost_cfg = load_config(None, [*base, f"seed={seed}", "cost.profile=corrected", *PAPER_MODEL])
        dev = newcomer(cfg)
        tasks = list(Topology.from_config(cfg, backbone_dims(cfg)[1]).joiner(dev, cfg.topology.tasks_per_device)
                     .device_map[dev].tasks)  # fmt: skip
        log(f"  seed {seed}: {dev} ({', '.join(tasks)}) joins an hfm-d2d run after round {join_after}...")
        results = onboarded_run(cfg, out / f"run-s{seed}", join_after, log)
        on = onboarded_curve(results, dev, tasks)
        on_rounds = rounds_to_match(on["curve"], on["peer_curve"])
        log(f"    target {on['target']:.3f}; onboarded: {on['curve']} -> {on_rounds} round(s)")
        bare_cfg = cfg.model_copy(update={"circulation": cfg.circulation.model_copy(update={"relay": "none"})})
        log(f"  seed {seed}: the same join without relay (circulation.relay=none)...")
        bare = onboarded_curve(onboarded_run(bare_cfg, out / f"norelay-s{seed}", join_after, log), dev, tasks)
        bare_rounds = rounds_to_match(bare["curve"], bare["peer_curve"])
        log(f"    no relay: {bare['curve']} (peers {bare['peer_curve']}) -> {bare_rounds} round(s)")
        scratch = scratch_curve(cfg, dev, tasks, scratch_max, on["target"])
        s_rounds = rounds_to_reach(scratch, on["target"])
        log(f"    from scratch: {[round(v, 3) for v in scratch]} -> {s_rounds or f'> {scratch_max}'} round(s)")
        e = energy(cost_cfg, results, dev, tasks, on_rounds or len(on["curve"]), on["first_round"])
        res["seeds"].append(
            {
                "seed": seed,
                "device": dev,
                "tasks": tasks,
                **on,
                "onboarded_rounds": on_rounds,
                "norelay": {**bare, "rounds_to_match": bare_rounds},
                "scratch_curve": scratch,
                "scratch_rounds": s_rounds,
                "onboarded_energy_j": e["wire_j"] + e["compute_j"] * (on_rounds or len(on["curve"])),
                "onboarded_wire_j": e["wire_j"],
                "scratch_energy_j": e["compute_j"] * (s_rounds or len(scratch)),
                "compute_j_per_round": e["compute_j"],
                "sync_bytes_paper": e["sync_bytes"],
                "sync_bytes_run": sum(
                    h["bytes"]
                    for r in results["rounds"]
                    if r["round"] == on["first_round"]
                    for h in r["hops"]
                    if h["tag"] == SYNC and h["receiver"] == dev
                ),
            }
        )
    res["goal"] = goal(res)
    (out / "onboard.json").write_text(json.dumps(res, indent=2))
    (out / "onboard.md").write_text(markdown(res))
    return res


def goal(res: dict) -> dict:
    """Issue 16's goal: onboarded in at least 5x fewer rounds than from scratch, in every seed (from
    scratch never reaching the target counts as more than ``scratch_max`` rounds)."""
    ratios = []
    for s in res["seeds"]:
        scratch = s["scratch_rounds"] or res["scratch_max"] + 1
        ratios.append(scratch / s["onboarded_rounds"] if s["onboarded_rounds"] else 0.0)
    return {"ratios": ratios, "at_least": min(ratios), "met": min(ratios) >= 5}


def markdown(res: dict) -> str:
    lines = [
        "| seed | newcomer (tasks) | synced from | target (global acc.) | onboarded: rounds | from scratch: rounds "
        "| rounds ratio | onboarded energy (J) | from scratch energy (J) | relay bytes (paper size) "
        "| no relay: rounds | its peers in its first round, relay / no relay |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, ratio in zip(res["seeds"], res["goal"]["ratios"], strict=True):
        never = s["scratch_rounds"] is None
        lines.append(
            f"| {s['seed']} | {s['device']} ({', '.join(s['tasks'])}) | {s['synced_from']} | "
            f"{100 * s['target']:.1f} % | "
            f"{s['onboarded_rounds']} | {'> ' + str(res['scratch_max']) if never else s['scratch_rounds']} | "
            f"{'> ' if never else ''}{ratio:.0f}x | {s['onboarded_energy_j']:.1f} | "
            f"{'> ' if never else ''}{s['scratch_energy_j']:.1f} | {s['sync_bytes_paper'] / 1e6:.1f} MB | "
            f"{s['norelay']['rounds_to_match']} | {100 * s['peer_curve'][0]:.1f} / "
            f"{100 * s['norelay']['peer_curve'][0]:.1f} % |"
        )
    return "\n".join(lines) + "\n"
