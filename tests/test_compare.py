"""hffm compare (a sweep run for real, then overlaid and labelled by what differs) and hffm export
(TensorBoard event files and an MLflow store, read back with the libraries' own readers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hffm.compare import labels, load_run, scalars
from hffm_cli.main import app

TINY = [
    "rounds=2",
    "e_agg=2",
    "topology.edges=1",
    "topology.devices_per_edge=1",
    "data.train_per_task=32",
    "data.local_test_per_device=8",
    "data.global_test_per_task=8",
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = CliRunner().invoke(
            app, ["compare", "--sweep", "method=star,hfm", "--out", "cmp", *[a for s in TINY for a in ("--set", s)]]
        )
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return root, r.output


def test_a_sweep_runs_each_value_and_overlays_them_labelled_by_what_differs(swept):
    root, output = swept
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 2 and all((p / "results.json").is_file() for p in runs)
    doc = json.loads((root / "cmp" / "compare.json").read_text())
    assert [x["run"] for x in doc["runs"]] == ["method=star", "method=hfm"]
    for name, s in doc["series"].items():
        assert [x for x, _ in s["mb"]] == [1, 2] and s["mb"][1][1] > s["mb"][0][1] > 0, name
        assert s["modeled_latency_s"][1][1] > s["modeled_latency_s"][0][1] > 0
    assert (root / "cmp" / "compare.png").stat().st_size > 0
    assert "| method=star | 2 |" in (root / "cmp" / "compare.md").read_text() and "| method=hfm | 2 |" in output


def test_labels_say_what_differs_or_fall_back_to_run_ids():
    a = {"config": {"method": "hfm", "e_agg": 2, "checkpoint": {"dir": "/a"}}, "run": {"id": "r1"}, "rounds": []}
    b = {"config": {"method": "hfm", "e_agg": 4, "checkpoint": {"dir": "/b"}}, "run": {"id": "r2"}, "rounds": []}
    assert labels([a, b]) == ["e_agg=2", "e_agg=4"]  # the checkpoint folders differ too: noise
    assert labels([a, dict(a, run={"id": "r3"})]) == ["r1", "r3"]
    c = dict(b, run={"id": "r4"})
    assert labels([a, b, c]) == ["e_agg=2", "e_agg=4 (r2)", "e_agg=4 (r4)"]


def test_export_to_tensorboard_and_mlflow_reads_back(swept, tmp_path):
    root, _ = swept
    run = sorted((root / "runs").iterdir())[0]
    results = load_run(run)
    want = dict(scalars(results))
    r = CliRunner().invoke(
        app, ["export", str(run), "--tensorboard", str(tmp_path / "tb"), "--mlflow", f"file:{tmp_path / 'ml'}"]
    )
    assert r.exit_code == 0, r.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / run.name))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want[2])
    for tag in acc.Tags()["scalars"]:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx({s: m[tag] for s, m in want.items() if tag in m}, rel=1e-6)
    import mlflow

    client = mlflow.tracking.MlflowClient(f"file:{tmp_path / 'ml'}")
    (exp_run,) = client.search_runs([client.get_experiment_by_name("hffm").experiment_id])
    assert exp_run.data.params["method"] == results["config"]["method"]
    assert exp_run.data.tags["hffm.id"] == run.name
    hist = client.get_metric_history(exp_run.info.run_id, "modeled.latency_s")
    assert {m.step: m.value for m in hist} == pytest.approx({s: m["modeled/latency_s"] for s, m in want.items()})


def test_compare_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no results.json (not a run folder)" in r.output.replace("\n", "")
    assert CliRunner().invoke(app, ["compare", str(Path("x"))]).exit_code == 2  # one run is no comparison
    assert CliRunner().invoke(app, ["compare", "--sweep", "method"]).exit_code == 2
