"""Process lifecycle: any start order, Ctrl-C and child failures stop everything; CLI errors."""

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

from hffm.config import dump_config, load_config
from hffm_cli.main import app
from services.launcher import REPO_ROOT, RunFailed, free_ports, run
from tests.conftest import processes_with

SMALL = [
    "topology.edges=1",
    "topology.devices_per_edge=2",
    "data.train_per_task=200",
    "data.global_test_per_task=40",
    "model.num_layers=2",
]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def _alive(marker: str) -> list[str]:
    return processes_with(marker)


def _plaintext_operator():
    from services.common.security import Security

    return Security(load_config(None, ["security.tls=false"]).security, "operator")


def test_start_order_does_not_matter(tmp_path):
    """Devices first, then the edge, then the cloud: each waits and retries for its upstream (over
    mTLS, with a CA made for the test as an operator would with hffm pki)."""
    from hffm.model import backbone_dims
    from hffm.topology import Topology
    from services.launcher import provision_pki

    cfg = load_config(None, [*SMALL, "rounds=2"])
    pki = provision_pki(cfg, Topology.from_config(cfg, backbone_dims(cfg)[1]), tmp_path / "pki")
    cfg = cfg.model_copy(update={"security": cfg.security.model_copy(update={"dir": str(pki)})})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(dump_config(cfg))
    cloud_p, edge_p, d0, d1 = free_ports(4, "127.0.0.1")
    py = [sys.executable, "-m"]
    common = ["--config", str(cfg_path)]
    argvs = [
        [
            *py,
            "services.device",
            *common,
            "--upstream",
            f"edge-0=127.0.0.1:{edge_p}",
            "--node",
            f"device-0-0=127.0.0.1:{d0}",
            "--node",
            f"device-0-1=127.0.0.1:{d1}",
        ],
        [
            *py,
            "services.edge",
            *common,
            "--id",
            "edge-0",
            "--listen",
            f"127.0.0.1:{edge_p}",
            "--upstream",
            f"127.0.0.1:{cloud_p}",
        ],
        [
            *py,
            "services.cloud",
            *common,
            "--listen",
            f"127.0.0.1:{cloud_p}",
            "--out",
            str(tmp_path / "out"),
            "--linger-s",
            "0",
        ],
    ]
    procs = []
    try:
        for argv in argvs:  # each starts only once the previous one serves (and so waits for it)
            path = tmp_path / f"{argv[2]}.log"
            procs.append(
                subprocess.Popen(argv, stdout=open(path, "wb"), stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT)
            )
            deadline = time.monotonic() + 120
            while "serving on" not in path.read_text() and time.monotonic() < deadline:
                assert procs[-1].poll() is None, path.read_text()
                time.sleep(0.2)
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0], logs

    # The devices started first and really waited: they registered only once the cloud was up.
    def stamp(log: str, needle: str) -> str:
        return next(line[:23] for line in log.splitlines() if needle in line)

    cloud_up = stamp(logs["services.cloud.log"], "cloud serving on")
    assert stamp(logs["services.device.log"], "serving on") < cloud_up
    assert stamp(logs["services.device.log"], "registered (") >= cloud_up
    import json

    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["complete"] and len(res["rounds"]) == 2


def test_a_federation_trains_in_bf16_and_its_config_says_so(tmp_path):
    """runtime.precision=bf16 end to end: real processes over gRPC, every device training, testing and
    computing under autocast (tests/test_model.py checks what that computes); the run completes with a
    finite training loss and global accuracy every round, and its config records the precision."""
    cfg = load_config(None, [*SMALL, "rounds=2", "runtime.precision=bf16"])
    run(cfg, tmp_path, Console(file=io.StringIO(), width=200), timeout_s=180)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] and len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert r["loss"] is not None and 0 < r["loss"] < 20, r["loss"]
        assert all(0 <= a["global"] <= 1 for a in r["accuracy"].values()), r["accuracy"]
    assert load_config(tmp_path / "config.yaml", []).runtime.precision == "bf16"


def test_a_precision_the_device_cannot_run_is_refused_before_any_process_starts(tmp_path):
    cfg = load_config(None, [*SMALL, "rounds=1", "runtime.device=cpu", "runtime.precision=fp16"])
    with pytest.raises(RunFailed, match="runtime.precision: fp16 needs a CUDA device, not cpu"):
        run(cfg, tmp_path, Console(file=io.StringIO(), width=200), timeout_s=60)
    assert _alive(str(tmp_path / "config.yaml")) == []


@pytest.mark.parametrize("method", ["zygote", "exec"])
def test_failing_child_stops_everything_and_shows_its_log(tmp_path, monkeypatch, method):
    # the launcher checks every input it can before starting anything; a child that fails anyway: its
    # environment gives it an override the launcher never reads
    monkeypatch.setenv("HFFM_SET", "runtime.nosuch_key=1")
    cfg = load_config(None, [*SMALL, "rounds=2", "faults.max_restarts=1", f"runtime.start_method={method}"])
    buf = io.StringIO()
    with pytest.raises(RunFailed, match="exited with code 1") as failed:
        run(cfg, tmp_path, Console(file=buf, width=200), timeout_s=120)
    assert "runtime.nosuch_key: unknown key" in buf.getvalue()  # the failing process's log is shown
    # and is in the error's notes: a test (or a library caller) that ran it shows it in the traceback
    assert any("runtime.nosuch_key: unknown key" in note for note in failed.value.__notes__)
    time.sleep(0.5)
    assert _alive(str(tmp_path / "config.yaml")) == []


# a script calling services.launcher.run() itself, as the benchmarks do (no CLI, no handler of its own)
_LIBRARY_RUN = """
import sys
from pathlib import Path
from rich.console import Console
from hffm.config import load_config
from services.launcher import run
run(load_config(None, sys.argv[2:]), Path(sys.argv[1]), Console(width=200))
"""


@pytest.mark.parametrize(
    "sig, rc_want, via", [(signal.SIGINT, 130, "cli"), (signal.SIGTERM, 143, "cli"), (signal.SIGTERM, 143, "library")]
)
def test_ctrl_c_and_sigterm_stop_every_process(tmp_path, sig, rc_want, via):
    sets = [*SMALL, "rounds=200"]
    if via == "cli":
        cmd = [
            sys.executable,
            "-m",
            "hffm_cli.main",
            "run",
            "--out",
            str(tmp_path),
            *sum((["--set", s] for s in sets), []),
        ]
    else:  # and its processes exec'd, not forked from the zygote
        cmd = [sys.executable, "-c", _LIBRARY_RUN, str(tmp_path), *sets, "runtime.start_method=exec"]
    # As from a terminal: SIGINT handled by default. A test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python keeps an inherited SIG_IGN: a trampoline
    # sets it back and execs the command (same pid). Not a preexec_fn: it makes Popen fork() instead of
    # vfork(), and gRPC's fork handlers in this test process then restart its poller in the child, whose
    # fds Popen closes: the child can crash before exec ("epoll_wait error: Bad file descriptor",
    # grpc/grpc#43055; seen once in CI).
    trampoline = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", trampoline, *cmd[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=REPO_ROOT,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 180
    try:
        for line in p.stdout:
            seen.append(line)
            if line.startswith("round   1") or time.monotonic() > deadline:
                break
        assert any(x.startswith("round   1") for x in seen), "".join(seen)
        assert _alive(str(tmp_path / "config.yaml"))  # the federation is running
        p.send_signal(sig)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)  # the CLI's faulthandler: every thread's stack, to show the hang
            time.sleep(2)
            p.kill()
            pytest.fail(f"no exit 60 s after {sig.name}; its stacks:\n" + p.stdout.read()[-20000:])
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == rc_want
    time.sleep(0.5)
    assert _alive(str(tmp_path / "config.yaml")) == []
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"


def test_cli_refuses_bad_overrides_naming_the_key():
    r = CliRunner().invoke(app, ["run", "--set", "topology.edgez=3"])
    assert r.exit_code == 2 and "topology.edgez" in r.output
    r = CliRunner().invoke(app, ["run", "--set", "e_agg=zero"])
    assert r.exit_code == 2 and "e_agg" in r.output
    r = CliRunner().invoke(app, ["run", "--config", "/nonexistent.yaml"])
    assert r.exit_code == 2 and "not found" in r.output


def test_cli_config_shows_resolved_values():
    r = CliRunner().invoke(
        app,
        [
            "config",
            "--config",
            str(Path(REPO_ROOT) / "configs" / "default.yaml"),
            "--set",
            "rounds=3",
            "--set",
            "tasks=[gqa]",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "rounds: 3" in r.output and "- gqa" in r.output and "- art" not in r.output


def test_table1_command_writes_every_format(tmp_path):
    import json

    r = CliRunner().invoke(
        app,
        [
            "table1",
            "--profile",
            "paper",
            "--skip-training",
            "--format",
            "json",
            "--out",
            str(tmp_path),
            "--config",
            str(Path(REPO_ROOT) / "configs" / "paper.yaml"),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["method"], x["e_agg"]) for x in rows] == [
        ("star", 1),
        ("edge-only", 1),
        ("edge-only-d2d", 1),
        ("hfm", 2),
        ("hfm", 8),
        ("hfm-d2d", 2),
        ("hfm-d2d", 8),
    ]
    for x in rows:
        assert {"method", "e_agg", "latency_s", "energy_j", "accuracy", "paper_latency_s", "paper_energy_j"} <= set(x)
        assert x["accuracy"] is None
    assert rows[0]["latency_s"] == pytest.approx(12.1) and rows[0]["energy_j"] == pytest.approx(387.2)
    for f in ("table1.json", "table1.csv", "table1.md", "table1.png"):
        assert (tmp_path / f).stat().st_size > 100
    assert "| star | 12.10 | 12.10 | 1.000 |" in (tmp_path / "table1.md").read_text()
    bad = CliRunner().invoke(app, ["table1", "--profile", "nope", "--skip-training"])
    assert bad.exit_code == 2 and "--profile" in bad.output


def test_topology_command_prints_and_draws(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "topology",
            "--set",
            "topology.edges=2",
            "--set",
            "topology.devices_per_edge=4",
            "--out",
            str(tmp_path / "t.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "edge-1 at (" in r.output and "uplink" in r.output and "path device-0-" in r.output
    assert "[head]" in r.output
    assert (tmp_path / "t.png").stat().st_size > 10_000


@pytest.mark.parametrize("code", [0, 3])
def test_cloud_that_ends_before_its_progress_stream_is_seen(tmp_path, code):
    """A short run can end while the launcher's Watch channel is still backing off: a cloud that exits
    0 hands the verdict to results.json; one that fails is a RunFailed naming its code."""
    from hffm.model import backbone_dims
    from hffm.topology import Topology
    from services.launcher import FaultPlan, Proc, Supervisor, _follow
    from services.launcher_ui import RunView

    cfg = load_config(None, [*SMALL, "faults.restart=false"])  # (restarted, it would resume: test_faults.py)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    log = tmp_path / "cloud.log"
    with open(log, "wb") as fh:
        cloud = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"], stdout=fh, stderr=fh)
    cloud.wait()
    addr = f"127.0.0.1:{free_ports(1, '127.0.0.1')[0]}"  # nothing ever listens here
    view = RunView(Console(file=io.StringIO()))
    procs = Supervisor(cfg, [Proc("cloud", cloud, log)], {}, view, FaultPlan([], {}, {}))
    t0 = time.monotonic()
    if code == 0:
        _follow(cfg, topo, addr, procs, view, time.monotonic() + 30, _plaintext_operator())
    else:
        with pytest.raises(RunFailed, match="cloud exited with code 3"):
            _follow(cfg, topo, addr, procs, view, time.monotonic() + 30, _plaintext_operator())
    assert time.monotonic() - t0 < 10


def test_progress_watcher_is_cancelled_and_joined(tmp_path):
    """The launcher's watcher holds a stream the cloud never ends (a cloud that sends nothing): closing
    it cancels the stream and the thread ends, so no RPC outlives the run."""
    from concurrent import futures

    import grpc

    from services.launcher import _Watcher
    from services.rpc import pb, pb_grpc

    opened = []

    class Silent(pb_grpc.CoordinatorServicer):
        def Watch(self, request, context):  # noqa: N802
            opened.append(1)
            while context.is_active():
                time.sleep(0.05)
            return
            yield pb.Progress()

    srv = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_CoordinatorServicer_to_server(Silent(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        w = _Watcher(f"127.0.0.1:{port}", _plaintext_operator())
        w.start()
        end = time.monotonic() + 10
        while not opened and time.monotonic() < end:
            time.sleep(0.05)
        assert opened, "the watcher never opened its stream"
        t0 = time.monotonic()
        w.close()
        assert not w.is_alive() and time.monotonic() - t0 < 3
        assert w.events.empty()
    finally:
        srv.stop(0)


def test_free_ports_are_below_the_ephemeral_range_distinct_and_skip_a_held_one(monkeypatch):
    """A port from bind(0) is one the kernel may give the next outgoing connection before the process meant
    to listen binds it: free_ports picks below the kernel's ephemeral range, never a port someone holds."""
    import random
    import socket

    from services import launcher

    span = launcher._ephemeral_range()
    if span is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range on this machine")
    ports = free_ports(40, "127.0.0.1")
    assert len(set(ports)) == 40 and all(10000 <= p < span[0] for p in ports), (ports, span)
    with socket.socket() as held:  # a listener where the scan starts: skipped, the next port taken
        held.bind(("127.0.0.1", ports[0]))
        held.listen()
        monkeypatch.setattr(random, "randrange", lambda a, b: ports[0])
        got = free_ports(2, "127.0.0.1")
    assert ports[0] not in got and len(set(got)) == 2


def test_ports_another_launcher_leased_are_skipped_until_it_is_gone(monkeypatch):
    """Two runs at once (tests on two workers) pick ports before their processes bind them, seconds
    later: a port one launcher leased is never another's, and the kernel frees a dead launcher's lease."""
    import random
    import subprocess
    import sys

    from services.launcher import PortLease

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from services.launcher import PortLease, free_ports\n"
            "lease = PortLease(); print(*free_ports(3, '127.0.0.1', lease), flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        theirs = [int(p) for p in holder.stdout.readline().split()]
        assert len(theirs) == 3
        monkeypatch.setattr(random, "randrange", lambda a, b: min(theirs))  # our scan starts at their ports
        with PortLease() as ours:
            got = free_ports(3, "127.0.0.1", ours)
            assert not set(got) & set(theirs), (got, theirs)
            assert not any(ours.hold(p) for p in theirs)  # still theirs: nothing bound them, yet leased
    finally:
        holder.kill()
        holder.wait(10)
    with PortLease() as after:
        assert all(after.hold(p) for p in theirs)  # the kernel dropped the dead launcher's locks
