"""A fake specialist caught before anything it serves is relayed (issue 17's goal: in at least 95 % of
seeds; docs/robustness.md).

Each seed is a real hfm-d2d federation (gRPC on loopback, mTLS), one cluster of 6 devices holding
``art``; ``gqa`` is introduced on device-0-1, -3 and -5 at round 2 and relayed to device-0-2 at round 3, to
device-0-4 at round 4 and to device-0-0 at round 5 (``circulation.arrivals``): the first relay comes one
review after the task's first round of training. One of the three gqa devices (by seed) is a fake
specialist (``--attack``: ``fake_specialist``: it trains and aggregates honestly, claims 4x its data and
every answer class, and serves its heads negated and scaled whenever it serves; ``bait_switch``: the same,
but the examination sees its honest heads and only its relays are poisoned). Specialists are on (review
after every round). ``--liars N`` (``--liar``: 1): N of the devices that start without gqa (by seed)
also lie whenever they validate, colluding: they vouch for the fake and frame every other candidate
(``adversary.liars``); ``--quorum`` sets ``specialists.quorum`` (validators whose word flags a candidate;
1 lets one liar's word alone flag an honest one, 2 lets two colluding liars'), ``--appeal`` sets
``specialists.appeal`` (more holders heard before a refusal or an acceptance; a refusal then needs a
majority). Per seed:

- **caught**: the fake is flagged (by a review, or on the spot when a relay of its is refused as not the
  version examined), and no sync (a relay) of it is ever adopted;
- **caught_round**: the review that flagged it (relays of gqa start at round 3);
- **false flags**: honest devices flagged (framed, with liars);
- **disputed**: honest candidates left disputed by an accusation (not appointed, not flagged);
- **served by**: who relayed gqa to each taker (an appointed specialist, or the edge without one).

``python -m benchmarks.specialists --seeds 20 [--attack bait_switch] [--liars N] [--quorum Q] [--appeal A] --out DIR``
writes DIR/specialists.json and DIR/specialists.md.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from rich.console import Console

from hffm.config import load_config
from hffm.methods import SYNC

GQA = ("device-0-1", "device-0-3", "device-0-5")
TAKERS = {3: "device-0-2", 4: "device-0-4", 5: "device-0-0"}
BASE = ["method=hfm-d2d", "e_agg=2", "rounds=6", "topology.edges=1", "topology.devices_per_edge=6",
        "runtime.devices_per_process=6", "tasks=[art,gqa]", "data.train_per_task=240", "train.eval_every=6",
        "specialists.enabled=true",
        "circulation.arrivals=[{task: gqa, round: 2, devices: [device-0-1, device-0-3, device-0-5]},"
        " {task: gqa, round: 3, devices: [device-0-2]}, {task: gqa, round: 4, devices: [device-0-4]},"
        " {task: gqa, round: 5, devices: [device-0-0]}]"]  # fmt: skip


OTHERS = ("device-0-0", "device-0-2", "device-0-4")


def fake_of(seed: int) -> str:
    return GQA[seed % len(GQA)]


def liars_of(seed: int, n: int) -> list[str]:
    """``n`` of the devices that start without gqa, by seed (``n`` = 1: the one lying validator before)."""
    return sorted(OTHERS[(seed + i) % len(OTHERS)] for i in range(n))


def judge_run(results: dict, fake: str, liars: list[str] | tuple[str, ...] = ()) -> dict:
    """What one run's results.json says about the fake (see the module's text)."""
    rounds = {x["round"]: x for x in results["rounds"]}
    flagged = {r: x["specialists"].get("flagged", []) for r, x in rounds.items() if x.get("specialists")}
    caught_round = min((r for r, f in flagged.items() if fake in f), default=None)
    relays = sorted({r for r, x in rounds.items() for h in x["hops"] if h["tag"] == SYNC and h["origin"] == fake})
    served = {}
    for r, taker in TAKERS.items():
        hops = [h for h in rounds.get(r, {}).get("hops", []) if h["tag"] == SYNC and h["destination"] == taker]
        served[taker] = hops[0]["origin"] if hops else None
    false = sorted({n for f in flagged.values() for n in f} - {fake})
    disputed = sorted(
        {v["node"] for x in rounds.values() for v in (x.get("specialists") or {}).get("verdicts", [])
         if v["verdict"] == "disputed"} - {fake}
    )  # fmt: skip
    switched = sorted(r for r, x in rounds.items() if fake in (x.get("specialists") or {}).get("switched", {}))
    verdicts = [v for x in rounds.values() for v in (x.get("specialists") or {}).get("verdicts", [])]
    drops = [(v["node"], v["stats_drop"]) for v in verdicts if v.get("stats_drop") is not None]
    discredited = {r: (x.get("specialists") or {}).get("discredited", []) for r, x in rounds.items()}
    when = {n: min((r for r, d in discredited.items() if n in d), default=None) for n in liars}
    return {
        "liars": list(liars),
        # the review after which the last of them was discredited; None while any of them is still asked
        "liar_discredited": max(when.values()) if liars and None not in when.values() else None,
        "switched_rounds": switched,  # rounds in which a relay of its was refused as not examined
        "fake": fake,
        "caught": caught_round is not None and not relays,
        "caught_round": caught_round,
        "relays_from_fake": relays,
        "false_flags": false,
        "disputed": disputed,
        "served_by": served,
        "complete": bool(results.get("complete")),
        # specialists.stats_cut: the largest nats a served head lost at the federation's answer means, the fake's
        # and the honest candidates' (None: no review held a head to statistics)
        "fake_stats_drop": max((d for n, d in drops if n == fake), default=None),
        "honest_stats_drop": max((d for n, d in drops if n != fake), default=None),
    }


def run_seed(
    out: Path,
    seed: int,
    attack: str = "fake_specialist",
    liars: int = 0,
    quorum: int = 2,
    appeal: int = 0,
    extra: list[str] | None = None,
) -> dict:
    from services.launcher import run

    fake = fake_of(seed)
    sets = [
        *BASE,
        f"seed={seed}",
        f"adversary.nodes=[{fake}]",
        f"adversary.behaviour={attack}",
        f"specialists.quorum={quorum}",
        f"specialists.appeal={appeal}",
        *(extra or []),
    ]
    liar_ids = liars_of(seed, liars)
    cfg = load_config(None, [*sets, f"adversary.liars=[{','.join(liar_ids)}]"] if liars else sets)
    try:
        res = run(cfg, out / f"seed-{seed}", Console(file=io.StringIO()), timeout_s=600)
    except Exception as err:  # noqa: BLE001 - a failed run is reported as one, the others go on
        return {"seed": seed, **judge_run({"rounds": [], "complete": False}, fake, liar_ids), "error": str(err)}
    return {"seed": seed, **judge_run(res, fake, liar_ids)}


def summary(rows: list[dict]) -> dict:
    done = [r for r in rows if r["complete"]]
    honest = sum(5 - len(r.get("liars", ())) for r in done)  # honest devices over the runs (6: a fake, maybe liars)
    false = sum(len(r["false_flags"]) for r in done)
    rate = sum(r["caught"] for r in done) / len(done) if done else 0.0
    return {
        "seeds": len(rows),
        "complete": len(done),
        "no_relay_adopted_rate": sum(not r["relays_from_fake"] for r in done) / len(done) if done else 0.0,
        "switch_tried": sum(bool(r.get("switched_rounds")) for r in done),
        "caught_rate": rate,
        "goal_met": bool(done) and rate >= 0.95,
        "false_flag_rate": false / honest if honest else 0.0,
        "disputed_rate": sum(len(r.get("disputed", [])) for r in done) / honest if honest else 0.0,
        "liar_discredited": sum(r.get("liar_discredited") is not None for r in done if r.get("liars")),
        "liar_discredited_rounds": sorted(r["liar_discredited"] for r in done if r.get("liar_discredited")),
        "caught_rounds": sorted(r["caught_round"] for r in done if r["caught_round"] is not None),
    }


def _nats(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = [
        f"attack: {res.get('attack', 'fake_specialist')}"
        f"{f' with {n} colluding lying validator(s)' if (n := res.get('liars', 0)) else ''}, "
        f"quorum {res.get('quorum', 1)}, appeal {res.get('appeal', 0)}",
        "",
        f"fake specialist caught before any relay: **{s['caught_rate']:.0%}** of {s['complete']} seeds "
        f"(goal 95 %: {'met' if s['goal_met'] else 'not met'}); honest devices flagged: "
        f"{s['false_flag_rate']:.1%}; honest devices left disputed: {s.get('disputed_rate', 0.0):.1%}; "
        f"no relay of its adopted: {s['no_relay_adopted_rate']:.0%}; "
        f"relays refused as not examined (bait and switch): in {s['switch_tried']} seeds; every lying validator "
        f"discredited in {s.get('liar_discredited', 0)} seeds (after rounds {s.get('liar_discredited_rounds', [])})",
        "",
        "| seed | fake | caught (round) | relays from it | false flags | disputed "
        "| gqa served to device-0-2 / -4 / -0 by | stats drop: fake, honest (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        served = " / ".join(str(v) for v in r["served_by"].values())
        lines.append(
            f"| {r['seed']} | {r['fake']} | {'yes' if r['caught'] else 'NO'} ({r['caught_round']}) | "
            f"{r['relays_from_fake'] or '-'} | {', '.join(r['false_flags']) or '-'} | "
            f"{', '.join(r.get('disputed', [])) or '-'} | {served} | {_nats(r.get('fake_stats_drop'))}, "
            f"{_nats(r.get('honest_stats_drop'))} |"
        )
    return "\n".join(lines) + "\n"


def run_seeds(
    out: Path,
    seeds: int,
    log=print,
    attack: str = "fake_specialist",
    liars: int = 0,
    quorum: int = 2,
    appeal: int = 0,
    extra: list[str] | None = None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(seeds):
        rows.append(run_seed(out, seed, attack, liars, quorum, appeal, extra))
        r = rows[-1]
        log(f"seed {seed}: fake {r['fake']} caught={r['caught']} (round {r['caught_round']}), false {r['false_flags']}")
    res = {"rows": rows, "summary": summary(rows), "config": [*BASE, *(extra or [])], "attack": attack}
    res.update(liars=liars, quorum=quorum)
    res["appeal"] = appeal
    (out / "specialists.json").write_text(json.dumps(res, indent=2))
    (out / "specialists.md").write_text(markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.specialists", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("runs/specialists"))
    p.add_argument("--attack", choices=["fake_specialist", "bait_switch"], default="fake_specialist")
    p.add_argument("--liars", type=int, default=0, choices=range(4), help="devices without gqa that lie as validators")
    p.add_argument("--liar", dest="liars", action="store_const", const=1, help="--liars 1")
    p.add_argument("--quorum", type=int, default=2, help="specialists.quorum")
    p.add_argument("--appeal", type=int, default=0, help="specialists.appeal")
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override (repeatable)")
    a = p.parse_args(argv)
    res = run_seeds(a.out, a.seeds, attack=a.attack, liars=a.liars, quorum=a.quorum, appeal=a.appeal, extra=a.sets)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
