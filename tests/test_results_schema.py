"""docs/results.md documents results.json: every key a real run writes is in its tables, and every key
in its tables is in the run's file (at the top level, in a round, a hop, an aggregate, `modeled`)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console

from hffm.config import load_config
from services.launcher import run

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
SECTIONS = {"Top level": "top", "A round (`rounds[i]`)": "round", "`hops[j]`": "hop", "`aggregates[j]`": "aggregate",
            "`modeled`": "modeled"}  # fmt: skip


def documented() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            section = SECTIONS.get(line.lstrip("#").strip())
            continue
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if section and m:
            keys.setdefault(section, set()).add(m.group(1))
    return keys


def test_every_results_key_is_documented_and_every_documented_key_is_written(tmp_path):
    cfg = load_config(
        None,
        [
            "method=hfm-d2d",
            "rounds=2",
            "e_agg=2",
            "topology.edges=1",
            "topology.devices_per_edge=2",
            "data.train_per_task=48",
            "data.local_test_per_device=8",
            "data.global_test_per_task=8",
        ],
    )
    run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=600)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    doc = documented()
    assert set(doc) == set(SECTIONS.values())
    r = res["rounds"][-1]
    found = {
        "top": set(res),
        "round": set(r),
        "hop": set(r["hops"][0]),
        "aggregate": set(r["aggregates"][0]),
        "modeled": set(r["modeled"]),
    }
    for section, keys in found.items():
        assert keys - doc[section] == set(), f"written but not documented ({section})"
        assert doc[section] - keys == set(), f"documented but not written ({section})"
