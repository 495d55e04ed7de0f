"""The golden run: a short hfm-d2d federation (relayed D2D, cluster heads, cloud rounds) recorded
in tests/golden/hfm_d2d.json. On every machine: every round's bytes per link and module, every hop,
the modeled latency and energy, who aggregated what are reproduced exactly, and the learned values
(loss, accuracies, module norms) to within float rounding. On the platform the record was made on
(same CPU model, vector ISA and torch build): all of it bit for bit, final global modules included.
New fields may appear in results.json; none recorded may change.

Reproducible because training and evaluation seed torch's global RNG (ViLT draws its patch order
from it), aggregates fold their senders in a canonical order whatever the arrival order, and the
cost model sums hops in a canonical order. Bit-exact only per platform because MKL, oneDNN and ATen
choose ISA-specific kernels (tests/golden/view.py); the same run twice on one machine is always
bit-exact (tests/test_attacks.py holds an attacked run to this run, on the same machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.golden.view import platform_fingerprint, structural

GOLDEN = Path(__file__).parent / "golden" / "hfm_d2d.json"
LOSS_RTOL = 1e-3  # across platforms the loss agreed to 5e-5 after 4 rounds
ACCURACY_ATOL = 0.05  # a few of 64-384 test questions may flip
NORM_RTOL = 0.01  # module norms: 0.1% apart at most between two kernel paths here


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


def _learned_mismatches(want: dict, got: dict) -> list[str]:
    """Learned values outside float-rounding tolerance."""
    out = []
    for i, (w, g) in enumerate(zip(want["rounds"], got["rounds"], strict=True)):
        if not math.isclose(w["loss"], g["loss"], rel_tol=LOSS_RTOL):
            out.append(f"rounds[{i}].loss: expected {w['loss']}, got {g['loss']}")
        for task, accs in w["accuracy"].items():
            for split, a in accs.items():
                b = g["accuracy"].get(task, {}).get(split)
                if b is None or abs(a - b) > ACCURACY_ATOL:
                    out.append(f"rounds[{i}].accuracy.{task}.{split}: expected {a}, got {b}")
    if set(want["module_norms"]) != set(got["module_norms"]):
        out.append(f"module tensors: expected {sorted(want['module_norms'])}, got {sorted(got['module_norms'])}")
    for k, a in want["module_norms"].items():
        b = got["module_norms"].get(k)
        if b is not None and not math.isclose(a, b, rel_tol=NORM_RTOL, abs_tol=1e-6):
            out.append(f"modules.{k}: norm expected {a}, got {b}")
    return out


def test_golden_run_matches_the_record_on_any_platform(golden_run):
    golden, got, _ = golden_run
    diffs = _mismatches(structural(golden), structural(got))
    assert not diffs, f"{len(diffs)} differences from the golden run, first: {diffs[:10]}"
    diffs = _learned_mismatches(golden, got)
    assert not diffs, f"learned values beyond float rounding: {diffs[:10]}"


def test_golden_run_is_reproduced_bit_for_bit_on_its_platform(golden_run):
    golden, got, _ = golden_run
    if golden["platform"] != platform_fingerprint():
        pytest.skip(f"bit-exact only on the recording platform {golden['platform']}; this is {platform_fingerprint()}")
    want = {k: v for k, v in golden.items() if k not in ("sets", "platform")}
    diffs = _mismatches(want, got)
    assert not diffs, f"{len(diffs)} differences from the golden run, first: {diffs[:10]}"


def test_mismatch_finder_sees_a_changed_value():
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0}], "new": 1}) == []
    assert _mismatches({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2.0000001}]}) == [".a[1].b: expected 2.0, got 2.0000001"]


def test_tolerant_check_sees_a_real_change():
    """The cross-platform check is loose only by float rounding: a loss 1% off or a module's norm 10%
    off is a difference."""
    golden = json.loads(GOLDEN.read_text())
    assert _learned_mismatches(golden, golden) == []
    off = json.loads(GOLDEN.read_text())
    off["rounds"][1]["loss"] *= 1.01
    k = sorted(off["module_norms"])[0]
    off["module_norms"][k] *= 1.1
    diffs = _learned_mismatches(golden, off)
    assert len(diffs) == 2 and diffs[0].startswith("rounds[1].loss") and diffs[1].startswith(f"modules.{k}")


def _documented(section: str) -> set[str]:
    """The keys listed in the first column of the table under ``section`` in docs/results.md."""
    text = (Path(__file__).parent.parent / "docs" / "results.md").read_text()
    body = text.split(section, 1)[1].split("\n#", 1)[0]
    return {line.split("|")[1].strip().strip("`") for line in body.splitlines() if line.startswith("| `")}


def test_results_json_matches_its_documented_schema(golden_run):
    """Every key results.json has is documented in docs/results.md, and every documented key is there."""
    res = json.loads((golden_run[2] / "results.json").read_text())
    rec = res["rounds"][-1]  # a cloud round of hfm-d2d: every link kind, heads, aggregates
    assert set(res) == _documented("## Top level")
    assert set(rec) == _documented("## A round")
    assert {k for h in rec["hops"] for k in h} == _documented("### `hops[j]`")
    assert {k for a in rec["aggregates"] for k in a} == _documented("### `aggregates[j]`")
    assert set(rec["modeled"]) == _documented("### `modeled`")
    assert {a["node"] for a in rec["aggregates"]} >= {"cloud", "edge-0", "edge-1"}
    assert all(a["left_out"] == [] for a in rec["aggregates"])
