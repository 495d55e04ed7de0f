"""Faults over real processes: scripted scenarios (tests/scenarios/*.yaml: kill or stop a node at a
named point of a round, restart it), each held to hffm.audit (every aggregate the weighted mean of
exactly the updates it counted; nothing lost, nothing counted twice) and to its expectations; and
resume: a run SIGKILLed after round 3 of 6 and resumed ends bit for bit where an uninterrupted run
ends."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hffm.config import load_config
from hffm.scenario import Scenario
from hffm_cli.main import app
from services.chaos import run_scenario
from services.launcher import run

SCENARIOS = sorted((Path(__file__).parent / "scenarios").glob("*.yaml"))
SMALL = [
    "topology.edges=2",
    "topology.devices_per_edge=2",
    "data.train_per_task=400",
    "data.global_test_per_task=128",
    "data.local_test_per_device=32",
]


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path, tmp_path):
    scenario = Scenario.load(path)
    console = Console(file=io.StringIO(), width=160)
    outcome = run_scenario(scenario, tmp_path, console, SMALL)
    assert outcome.results["complete"]
    assert outcome.ok, (outcome.problems, console.file.getvalue()[-3000:])
    assert outcome.audit.aggregates > 0 and outcome.audit.counted > 0


def _pids_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_run_sigkilled_after_round_3_of_6_resumes_bit_for_bit(tmp_path):
    """hfm-d2d (every tier holds state: cluster heads' aggregates live on devices), 6 rounds, seed 0."""
    sets = [*SMALL, "topology.devices_per_edge=3", "method=hfm-d2d", "rounds=6", "e_agg=2"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = run(load_config(None, sets), ref_out, Console(file=io.StringIO()), timeout_s=600)

    # The interrupted run: the cloud stops itself right after saving round 3; then everything is SIGKILLed.
    script = (
        "import sys; from pathlib import Path; from rich.console import Console; "
        "from hffm.config import load_config; from services.launcher import FaultPlan, run; "
        f"run(load_config(None, {sets!r}), Path({str(out)!r}), Console(), timeout_s=600, "
        "faults=FaultPlan(['cloud:round_end:3:stop'], {}, {'cloud': 1e9}))"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script], cwd=Path(__file__).parent.parent, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while _rounds_done(out) < 3 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert _rounds_done(out) == 3, "the run did not reach round 3"
    victims = [launcher.pid, *_pids_with(str(out / "config.yaml"))]
    assert len(victims) == 1 + len(json.loads((out / "processes.json").read_text()))  # the launcher and its own
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    launcher.wait(10)
    deadline = time.monotonic() + 10
    while _pids_with(str(out / "config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (out / "global_modules.safetensors").exists()

    r = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert "the cloud's last saved round end is round 3" in r.output
    got = json.loads((out / "results.json").read_text())
    assert (out / "global_modules.safetensors").read_bytes() == (ref_out / "global_modules.safetensors").read_bytes()

    def timeless(rec: dict) -> dict:
        return {k: v for k, v in rec.items() if k != "wall_s"}

    assert [timeless(x) for x in got["rounds"]] == [timeless(x) for x in ref["rounds"]]
    assert _pids_with(str(out / "config.yaml")) == []


def test_hffm_chaos_soak_loses_nothing_and_counts_nothing_twice(tmp_path):
    sets = [*SMALL, "aggregation.quorum.min_fraction=0.5", "faults.rejoin_wait_s=30"]
    args = ["chaos", "--kills", "3", "--rounds", "5", "--seed", "1", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, [*args, *(x for s in sets for x in ("--set", s))])
    assert r.exit_code == 0, r.output[-4000:]
    figures = json.loads((tmp_path / "chaos.json").read_text())
    assert figures["rounds_completed"] == 5 and figures["kills"] == 3 and figures["restarts"] >= 3
    assert figures["lost"] == figures["double_counted"] == figures["wrong_aggregates"] == 0
    assert figures["baseline_audit_ok"] and figures["aggregates_formed"] > 0 and figures["wall_overhead"] > 0
    for line in ("rounds_completed", "double_counted", "wall_overhead"):
        assert line in r.output


def test_a_slow_health_check_is_asked_again_before_a_node_sits_a_round_out():
    """The round-start probe over real gRPC health servers: a node answering after the first deadline
    (a loaded host) takes part; one answering after the second deadline, or refusing, sits out."""
    import socket
    import types
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from services.cloud.dispatcher import Dispatcher
    from services.common.client import Channels

    class Slow(health.HealthServicer):
        def __init__(self, delay_s: float) -> None:
            super().__init__()
            self.delay_s = delay_s

        def Check(self, request, context):
            time.sleep(self.delay_s)
            return super().Check(request, context)

    servers, addrs = [], {}
    for name, delay in {"fast": 0.0, "slow": 0.8, "stuck": 3.0}.items():
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(Slow(delay), server)
        addrs[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
    with socket.socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        addrs["gone"] = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = load_config(overrides=["d2d.probe_timeout_s=0.3", "faults.slow_probe_timeout_s=1.5"])
    node = types.SimpleNamespace(channels=Channels(), security=types.SimpleNamespace(call_metadata=lambda: ()))
    members = types.SimpleNamespace(address=lambda n: addrs[n])
    try:
        dispatcher = Dispatcher(cfg, node, members)
        t0 = time.monotonic()
        assert dispatcher.probe(sorted(addrs)) == {"stuck", "gone"}
        assert time.monotonic() - t0 < 0.3 + 1.5 + 1.0  # one second pass, for the slow ones only
        cfg.faults.slow_probe_timeout_s = 0.3  # no second chance worth the name: the slow one sits out
        assert dispatcher.probe(["fast", "slow"]) == {"slow"}
    finally:
        node.channels.close()
        for server in servers:
            server.stop(0)
