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


def test_golden_run_is_reproduced_exactly(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    cfg = load_config(None, golden["sets"])
    run(cfg, tmp_path, Console(file=io.StringIO(), width=120), timeout_s=300)
    got = golden_view(tmp_path)
    want = {k: v for k, v in golden.items() if k != "sets"}
    diffs = _mismatches(want, got)
    assert not diffs, f"{len(diffs)} differences from the golden run, first: {diffs[:10]}"


def test_mismatch_finder_sees_a_changed_value():
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0}], "new": 1}) == []
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0000001}]}) == [".a[1].b: expected 2.0, got 2.0000001"]
