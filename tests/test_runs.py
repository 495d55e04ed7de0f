"""Run folders: one run per folder (refused, --force, locked while a run lives), run identity and
provenance in run.json and results.json, and `hffm runs`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hffm.runinfo import RunDirError, RunLock, claim_run_dir, list_runs, new_run_id
from hffm_cli.main import app

TINY = [
    "method=star",
    "rounds=1",
    "topology.edges=1",
    "topology.devices_per_edge=1",
    "data.train_per_task=32",
    "data.local_test_per_device=8",
    "data.global_test_per_task=8",
]


def _sets(extra=()):
    return [a for s in [*TINY, *extra] for a in ("--set", s)]


def test_a_folder_holds_one_run(tmp_path):
    out = tmp_path / "r"
    lock = claim_run_dir(out)
    with pytest.raises(RunDirError, match="a run is in progress there"):
        claim_run_dir(out, force=True)  # a live run's folder: not even with --force
    (out / "results.json").write_text("{}")
    (out / "logs").mkdir()
    (out / "logs" / "cloud.log").write_text("x")
    lock.release()
    with pytest.raises(RunDirError, match=r"holds an earlier run \(logs, results.json\).*--force"):
        claim_run_dir(out)
    assert (out / "results.json").exists()  # refused: nothing touched
    claim_run_dir(out, force=True).release()
    assert [p.name for p in out.iterdir()] == [".lock"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not an hffm run's \(notes.txt\)"):
        claim_run_dir(out, force=True)  # --force never deletes what hffm did not write
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="exists and is not a folder"):
        claim_run_dir(tmp_path / "file")
    assert new_run_id("hfm").split("-")[2] == "hfm" and new_run_id("hfm") != new_run_id("hfm")


def test_runs_get_their_own_folder_id_and_provenance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["run", *_sets()])
    assert r.exit_code == 0, r.output
    (folder,) = (tmp_path / "runs").iterdir()  # the default: runs/<run id>
    info = json.loads((folder / "run.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    assert info["id"] == folder.name == results["run"]["id"] and info["status"] == "complete"
    assert info["method"] == "star" and info["started"] <= info["finished"]
    assert results["run"]["hffm_version"] and len(results["run"]["commit"] or "x" * 40) == 40
    assert results["totals"]["rounds"] == 1 and results["totals"]["bytes"] == results["rounds"][0]["bytes_total"]
    assert results["totals"]["final_global_accuracy"] is not None
    # the same --out again: refused, the first run's results untouched; --force replaces it
    out = ["--out", str(folder)]
    again = CliRunner().invoke(app, ["run", *out, *_sets(["method=hfm"])])
    assert again.exit_code == 1 and "holds an earlier run" in again.output.replace("\n", "")
    assert json.loads((folder / "results.json").read_text())["run"]["id"] == info["id"]
    forced = CliRunner().invoke(app, ["run", *out, "--force", *_sets(["method=hfm"])])
    assert forced.exit_code == 0, forced.output
    now = json.loads((folder / "results.json").read_text())
    assert now["config"]["method"] == "hfm" and now["run"]["id"] != info["id"]
    rows = list_runs(tmp_path / "runs")
    assert [(x["method"], x["status"], x["rounds"]) for x in rows] == [("hfm", "complete", "1/1")]
    listed = CliRunner().invoke(app, ["runs", "--root", str(tmp_path / "runs"), "--json"])
    assert json.loads(listed.output.splitlines()[0])["id"] == now["run"]["id"]


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path):
    out = tmp_path / "live"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    first = subprocess.Popen(
        [sys.executable, "-m", "hffm_cli", "run", "--out", str(out), *_sets(["rounds=2"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not RunLock.held(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert RunLock.held(out)
        second = CliRunner().invoke(app, ["run", "--out", str(out), "--force", *_sets()])
        assert second.exit_code == 1 and "a run is in progress there" in second.output.replace("\n", "")
        assert list_runs(tmp_path)[0]["status"] == "running"
        assert first.wait(timeout=240) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert list_runs(tmp_path)[0]["status"] == "complete"


@pytest.mark.parametrize(
    "sets, says",
    [
        (["runtime.device=cuda"], "runtime.device: 'cuda' requested but CUDA is not available"),
        (["model.backbone=/nonexistent"], "model.backbone: '/nonexistent' is neither 'tiny' nor a local checkpoint"),
        (["model.backbone=EMPTY"], "holds no config.json: not a checkpoint directory"),
        (["topology.edges=1000", "topology.devices_per_edge=1000"], "topology: 1,001,001 nodes in"),
        (["circulation.rules=[{modules: 'nope.*'}]"], "circulation.rules.0.modules: 'nope.*' matches no module"),
    ],
)
def test_bad_inputs_are_one_line_before_any_process_starts(tmp_path, sets, says):
    import torch

    if "cuda" in sets[0] and torch.cuda.is_available():
        pytest.skip("CUDA is available here: runtime.device=cuda is valid")
    (tmp_path / "empty").mkdir()
    sets = [s.replace("EMPTY", str(tmp_path / "empty")) for s in sets]
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    text = r.output.replace("\n", "")
    assert r.exit_code == 1 and says in text and "Traceback" not in r.output, r.output
    assert not (out / "processes.json").exists()  # nothing started
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and says in info["reason"]


def test_bad_values_and_folders_are_refused_naming_them(tmp_path):
    for sets, says in (
        (["runtime.round_timeout_s=inf"], "runtime.round_timeout_s: Input should be a finite number"),
        (["cost.beta0_db=nan"], "cost.beta0_db: Input should be a finite number"),
    ):
        r = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "x"), *[a for s in sets for a in ("--set", s)]])
        assert r.exit_code == 2 and says in r.output.replace("\n", ""), r.output
    (tmp_path / "file").write_text("")
    for out, says in ((tmp_path / "file" / "run", "cannot make the folder"), (Path("/proc/hffm-run"), "cannot make")):
        r = CliRunner().invoke(app, ["run", "--out", str(out), *_sets()])
        assert r.exit_code == 1 and says in r.output.replace("\n", "") and "Traceback" not in r.output, r.output
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).output
    assert "tasks=[art,gqa]" in help_text  # not eaten as markup


def test_a_long_round_is_not_silent(tmp_path, monkeypatch):
    """While a round runs longer than HFFM_HEARTBEAT_S (30 s by default: a real backbone's rounds take
    minutes), the console says so."""
    import io

    from rich.console import Console

    from hffm.config import load_config
    from services.launcher import FaultPlan, run

    monkeypatch.setenv("HFFM_HEARTBEAT_S", "0.5")
    buf = io.StringIO()
    # round 2 made long for certain: the device's process stops itself as it starts training, for 3 s
    slow = FaultPlan(["device-0-0:train:2:stop"], {}, {"devices-0": 3.0})
    run(load_config(None, [*TINY, "rounds=2"]), tmp_path / "r", Console(file=buf, width=200), faults=slow)
    assert re.search(r"round +2  running for \d+s \(\d processes up\)", buf.getvalue()), buf.getvalue()


def test_prometheus_of_a_run_and_a_grafana_datasource_for_it(tmp_path):
    """hffm run --prometheus: a real Prometheus scrapes the run; the run folder holds a Grafana
    datasource pointing at it (for a Grafana on this machine)."""
    import io
    import shutil

    import yaml
    from rich.console import Console

    from hffm.config import load_config
    from services.launcher import run

    if shutil.which("prometheus") is None:
        pytest.skip("needs Debian's prometheus; scripts/system-deps.sh installs it")
    buf = io.StringIO()
    run(load_config(None, [*TINY, "rounds=2"]), tmp_path / "r", Console(file=buf, width=200), prometheus=True)
    url = re.search(r"Prometheus: (http://127\.0\.0\.1:\d+)", buf.getvalue()).group(1)
    ds = yaml.safe_load((tmp_path / "r" / "prometheus" / "grafana-datasource.yaml").read_text())["datasources"][0]
    assert ds["url"] == url and ds["uid"] == "prometheus"  # the uid every dashboard names
    assert any((tmp_path / "r" / "prometheus" / "data").iterdir())  # it stored what it scraped
