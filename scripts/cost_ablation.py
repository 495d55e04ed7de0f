"""From the seed code's cost model to hffm's corrected one, one correction at a time.

    .venv/bin/python scripts/cost_ablation.py [--config configs/paper.yaml]

Prints Table I's latency / energy per round for each step (docs/cost-model.md quotes it).
"""

from __future__ import annotations

import sys

from hffm.config import PAPER_MODEL, load_config
from hffm.table1 import PAPER_ROWS, label, modeled_row

SEED_LIKE = [
    "cost.module_bytes_override=6000000",
    "cost.uplink.energy_power_w=0.6",
    "cost.downlink.energy_power_w=0.6",
    "cost.d2d.energy_power_w=0.6",
    "cost.compute.cycles_per_sample=0",
]
STEPS = [
    ("A seed code (profile paper)", ["cost.profile=paper"]),
    ("B + noise in W/Hz x Hz, E|h|^2=1, critical path, downlinks", SEED_LIKE),
    ("C + energy at the transmit power", [s for s in SEED_LIKE if "energy_power" not in s]),
    ("D + local training compute", ["cost.module_bytes_override=6000000"]),
    ("E + real module size (ViLT-B/32: 38.1 MB) = corrected", PAPER_MODEL),
]


def main() -> None:
    config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "configs/paper.yaml"
    header = "| step | " + " | ".join(label_of(m, e) for m, e, *_ in PAPER_ROWS) + " |"
    print(header)
    print("|---" * (len(PAPER_ROWS) + 1) + "|")
    for name, sets in STEPS:
        cfg = load_config(config, sets)
        cells = []
        for method, e_agg, *_ in PAPER_ROWS:
            lat, en = modeled_row(cfg, method, e_agg, rounds=8)
            cells.append(f"{lat:.2f} s / {en:.1f} J")
        print(f"| {name} | " + " | ".join(cells) + " |")


def label_of(method: str, e_agg: int) -> str:
    from hffm.table1 import Row

    return label(Row(method, e_agg, 0, 0, None, 1, 1, 0))


if __name__ == "__main__":
    main()
