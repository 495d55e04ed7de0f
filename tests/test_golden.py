"""The golden run: a short hfm-d2d federation (relayed D2D, cluster heads, cloud rounds) recorded
before the groundwork refactor (tests/golden/hfm_d2d.json) is reproduced exactly: every round's
accuracies, loss, bytes per link and module, every hop, the modeled latency and energy, and the
final global modules bit for bit. New fields may appear in results.json; none recorded may change.

Reproducible because training and evaluation seed torch's global RNG (ViLT draws its patch order
from it), aggregates fold their senders in a canonical order whatever the arrival order, and the
cost model sums hops in a canonical order."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hffm.config import load_config
from services.launcher import run
from tests.golden.view import golden_view

GOLDEN = Path(__file__).parent / "golden" / "hfm_d2d.json"


def _mismatches(want: Any, got: Any, path: str = "") -> list[str]:
    """Every place where ``got`` differs from ``want`` (extra keys in ``got`` are allowed)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected a mapping, got {got!r}"]
        out = []
        for k, v in want.items():
            if k not in got:
                out.append(f"{path}.{k}: missing")
            else:
                out.extend(_mismatches(v, got[k], f"{path}.{k}"))
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: expected {len(want)} items, got {got!r:.200}"]
        return [m for i, (a, b) in enumerate(zip(want, got, strict=True)) for m in _mismatches(a, b, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: expected {want!r}, got {got!r}"]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    golden = json.loads(GOLDEN.read_text())
    out = tmp_path_factory.mktemp("golden")
    run(load_config(None, golden["sets"]), out, Console(file=io.StringIO(), width=120), timeout_s=300)
    return golden, out


def test_golden_run_is_reproduced_exactly(golden_run):
    golden, out = golden_run
    got = golden_view(out)
    want = {k: v for k, v in golden.items() if k != "sets"}
    diffs = _mismatches(want, got)
    assert not diffs, f"{len(diffs)} differences from the golden run, first: {diffs[:10]}"


def test_mismatch_finder_sees_a_changed_value():
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0}], "new": 1}) == []
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0000001}]}) == [".a[1].b: expected 2.0, got 2.0000001"]


def _documented(section: str) -> set[str]:
    """The keys listed in the first column of the table under ``section`` in docs/results.md."""
    text = (Path(__file__).parent.parent / "docs" / "results.md").read_text()
    body = text.split(section, 1)[1].split("\n#", 1)[0]
    return {line.split("|")[1].strip().strip("`") for line in body.splitlines() if line.startswith("| `")}


def test_results_json_matches_its_documented_schema(golden_run):
    """Every key results.json has is documented in docs/results.md, and every documented key is there."""
    _, out = golden_run
    res = json.loads((out / "results.json").read_text())
    rec = res["rounds"][-1]  # a cloud round of hfm-d2d: every link kind, heads, aggregates
    assert set(res) == _documented("## Top level")
    assert set(rec) == _documented("## A round")
    assert {k for h in rec["hops"] for k in h} == _documented("### `hops[j]`")
    assert {k for a in rec["aggregates"] for k in a} == _documented("### `aggregates[j]`")
    assert set(rec["modeled"]) == _documented("### `modeled`")
    assert {a["node"] for a in rec["aggregates"]} >= {"cloud", "edge-0", "edge-1"}
    assert all(a["left_out"] == [] for a in rec["aggregates"])
