"""The launcher's zygote (services/spawn.py): a process it forks is what ``python -m`` would have started
from the same command line — argv, environment, working directory, session, streams, exit codes — and its
handle answers as ``subprocess.Popen`` does. Each case runs the same command both ways and compares."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import spawn
from services.launcher import REPO_ROOT


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    log = tmp_path_factory.mktemp("zygote") / "zygote.log"
    env = dict(os.environ, SPAWN_TEST_ZYGOTE="only in the zygote's own environment", PYTHONUNBUFFERED="1")
    z = spawn.Zygote(env, REPO_ROOT, log)
    yield z
    z.close()


def both(zygote, tmp_path, action: str, cwd: Path | None = None):
    """Start ``python -m tests.spawn_child ACTION`` exec'd and forked (same env and cwd): the two handles."""
    argv = [sys.executable, "-m", "tests.spawn_child", action, "an argument"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "SPAWN_TEST": "x"}
    out = {}
    for how, z in (("exec", None), ("zygote", zygote)):
        log = tmp_path / f"{how}-{action}.log"
        out[how] = (spawn.start(argv, log, env, cwd or REPO_ROOT, z, append=False), log)
    return out


def report(log: Path) -> tuple[dict, list[str]]:
    lines = log.read_text().splitlines()
    return json.loads(lines[0]), lines[1:]


def test_a_forked_child_is_what_python_m_starts(zygote, tmp_path):
    started = both(zygote, tmp_path, "report", cwd=tmp_path)
    (exec_p, exec_log), (fork_p, fork_log) = started["exec"], started["zygote"]
    assert isinstance(exec_p, subprocess.Popen) and isinstance(fork_p, spawn.Forked)
    assert exec_p.wait(30) == 0 and fork_p.wait(30) == 0
    assert fork_p.returncode == 0 and fork_p.poll() == 0
    exec_report, exec_rest = report(exec_log)
    fork_report, fork_rest = report(fork_log)
    assert fork_report == exec_report
    # run as the main module, with the command line's arguments, in the requested directory, with exactly
    # the requested environment (not the zygote's), in a session of its own, stdin empty
    assert fork_report["name"] == "__main__"
    assert fork_report["argv"][1:] == ["report", "an argument"]
    assert fork_report["argv"][0].endswith("spawn_child.py")
    assert fork_report["cwd"] == str(tmp_path)
    assert fork_report["env"] == {"SPAWN_TEST": "x"}
    assert fork_report["own_session"] is True
    assert fork_report["stdin"] == "" and fork_report["main_loaded"] is False
    # and ps shows its own command line, not the zygote's
    assert fork_report["cmdline"] == f"{sys.executable} -m tests.spawn_child report an argument"
    # both streams in the log, and the interpreter's shutdown (atexit) as python -m does it
    assert fork_rest == exec_rest == ["to stderr", "atexit ran"]


@pytest.mark.parametrize(
    "action,code,says",
    [
        ("exit3", 3, None),
        ("exitmsg", 1, "a message from sys.exit"),
        ("raise", 1, "RuntimeError: the child failed"),
        ("killself", -signal.SIGKILL, None),
    ],
)
def test_exit_codes_and_what_a_failing_child_leaves_in_its_log_match(zygote, tmp_path, action, code, says):
    started = both(zygote, tmp_path, action)
    for how, (p, log) in started.items():
        assert p.wait(30) == code, how
        text = log.read_text()
        assert text.startswith("{"), how  # its report, unbuffered: written before it died
        if says:
            assert says in text, how
        assert ("atexit ran" in text) == (action != "killself"), how


def test_the_handle_waits_signals_and_times_out_as_popen_does(zygote, tmp_path):
    for how, (p, log) in both(zygote, tmp_path, "sleep").items():
        assert p.poll() is None and p.returncode is None, how
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(0.3)
        deadline = time.monotonic() + 30
        while not log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGTERM)  # the launcher stops a process by its group
        assert p.wait(30) == -signal.SIGTERM, how
        p.kill()  # after the end: nothing (the pid may be someone else's by now)
        assert p.poll() == -signal.SIGTERM


def test_a_node_entry_point_runs_forked_and_reports_a_config_error(zygote, tmp_path):
    """The node modules run as they would with python -m: a bad config is their one-line error, exit 1."""
    argv = [sys.executable, "-m", "services.edge", "--config", str(tmp_path / "missing.yaml")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for how, z in (("exec", None), ("zygote", zygote)):
        log = tmp_path / f"{how}.log"
        p = spawn.start(argv, log, env, REPO_ROOT, z, append=False)
        assert p.wait(60) == 1, how
        assert "missing.yaml" in log.read_text(), how


def test_a_dead_zygote_is_a_clear_error_not_a_hang(tmp_path):
    log = tmp_path / "zygote.log"
    z = spawn.Zygote(dict(os.environ), REPO_ROOT, log)
    try:
        z._proc.kill()  # the test's one reach inside: the zygote dying under the launcher
        z._proc.wait(10)
        with pytest.raises(spawn.ZygoteError, match="the zygote .* exited with code -9"):
            z.start([sys.executable, "-m", "tests.spawn_child"], dict(os.environ), REPO_ROOT, tmp_path / "c.log")
    finally:
        z.close()


def test_argv_that_is_not_python_m_is_exec_d(zygote, tmp_path):
    p = spawn.start(["/bin/sh", "-c", "echo plain; exit 4"], tmp_path / "sh.log", dict(os.environ), tmp_path, zygote)
    assert isinstance(p, subprocess.Popen) and p.wait(10) == 4
    assert (tmp_path / "sh.log").read_text() == "plain\n"


def test_one_zygote_serves_a_process_s_runs_until_its_environment_changes(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", SPAWN_TEST_KEY="a")
    first = spawn.zygote_for(dict(env, HFFM_RUN_ID="run-1"), REPO_ROOT)
    try:
        assert spawn.zygote_for(dict(env, HFFM_RUN_ID="run-2", HFFM_FAILPOINTS="x:y:1:kill"), REPO_ROOT) is first
        p = spawn.start(
            [sys.executable, "-m", "tests.spawn_child", "sleep"], tmp_path / "a.log", env, REPO_ROOT, first, False
        )
        # another environment: a zygote of its own; the first still runs a process, so it stays
        other = spawn.zygote_for(dict(env, SPAWN_TEST_KEY="b"), REPO_ROOT)
        assert other is not first and first.alive()
        p.kill()
        p.wait(30)
        # idle now: the next request for another environment ends it
        assert spawn.zygote_for(dict(env, SPAWN_TEST_KEY="b"), REPO_ROOT) is other
        assert not first.alive()
        # a zygote that died is replaced, not handed out
        other._proc.kill()
        other._proc.wait(10)
        again = spawn.zygote_for(dict(env, SPAWN_TEST_KEY="b"), REPO_ROOT)
        assert again is not other and again.alive()
    finally:
        spawn.close_zygotes()


def test_a_run_whose_zygote_dies_goes_on_and_restarts_a_lost_node_from_a_new_one(tmp_path):
    """The launcher over real processes: once round 1 is done the zygote is SIGKILLed, then edge-0. The nodes
    the zygote had forked run on; the supervisor starts edge-0 again from a new zygote; the run completes."""
    import io
    import threading

    from rich.console import Console

    from hffm.config import load_config
    from services.launcher import run

    sets = ["topology.edges=2", "topology.devices_per_edge=2", "data.train_per_task=200", "rounds=4",
            "data.global_test_per_task=64", "faults.restart_delay_s=0.5", "faults.rejoin_wait_s=60"]  # fmt: skip
    hit: dict = {}

    def on_start(sup) -> None:
        def go() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "round 1 done" not in _read(tmp_path / "logs" / "cloud.log"):
                time.sleep(0.1)
            hit["zygote"] = sup.zygote
            os.kill(sup.zygote.pid, signal.SIGKILL)
            sup.zygote._proc.wait(10)
            edge = next(p for p in sup.procs if p.name == "edge-0")
            hit["edge"] = edge.popen.pid
            os.killpg(edge.popen.pid, signal.SIGKILL)

        threading.Thread(target=go, daemon=True).start()
        hit["sup"] = sup

    try:
        res = run(load_config(None, sets), tmp_path, Console(file=io.StringIO()), timeout_s=300, on_start=on_start)
        assert res["complete"] and len(res["rounds"]) == 4 and res["restarts"] == 1
        sup = hit["sup"]
        assert sup.zygote is not hit["zygote"] and not hit["zygote"].alive()
        edge = next(p for p in sup.procs if p.name == "edge-0")
        assert edge.popen.pid != hit["edge"] and edge.restarts == 1
        assert edge.popen.returncode == 0  # the restarted edge ran to the end, its exit seen by the new zygote
    finally:
        spawn.close_zygotes()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def test_a_zygote_whose_launcher_is_gone_ends_quietly_and_leaves_no_log(tmp_path):
    """Its launcher closed both pipes right after a request (died, say): the zygote forks the child, finds
    nobody reading its reply (a broken pipe), and exits 0 without a traceback, its empty log removed."""
    log = tmp_path / "zygote.log"
    with open(log, "ab") as err:
        z = subprocess.Popen(
            [sys.executable, "-m", "services.spawn", str(log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=dict(os.environ),
            cwd=REPO_ROOT,
        )
    child_log = tmp_path / "child.log"
    request = {"argv": [sys.executable, "-m", "tests.spawn_child", "exit3"], "env": dict(os.environ),
               "cwd": str(REPO_ROOT), "log": str(child_log)}  # fmt: skip
    z.stdout.close()  # nobody reads its replies
    z.stdin.write(json.dumps(request).encode() + b"\n")
    z.stdin.close()
    assert z.wait(120) == 0
    assert not log.exists()  # empty: removed; a traceback would have kept it
    deadline = time.monotonic() + 60
    while "atexit ran" not in (child_log.read_text() if child_log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "atexit ran" in child_log.read_text()  # the child it forked ran on, to its end


def test_a_pid_the_kernel_gives_a_later_child_is_not_taken_for_the_earlier_child_s_exit(tmp_path, monkeypatch):
    """pid_max wraps in a long benchmark (hundreds of runs from one zygote): a child may get the pid of one
    that exited before. Its handle must not read the earlier child's exit code (a new cloud taken for one
    that exited 0 ends the run at once, "the run did not complete"); the earlier handle keeps its own. The
    zygote's side is played through its pipes, in the zygote's order (started, exited, started again)."""
    r, w = os.pipe()

    class Pipes:  # the zygote process: its request pipe to nowhere, its replies written by the test
        def __init__(self, *a, **k):
            self.stdin = open(os.devnull, "wb")  # noqa: SIM115 (closed by Zygote.close)
            self.stdout = os.fdopen(r, "rb")
            self.pid = 1

        def poll(self):
            return None

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(spawn.subprocess, "Popen", Pipes)
    z = spawn.Zygote({}, tmp_path, tmp_path / "zygote.log")
    replies = os.fdopen(w, "wb", buffering=0)
    pid = 2**22 + 7  # above any pid_max: no process of this machine has it
    argv = [sys.executable, "-m", "services.cloud"]

    def say(msg: dict) -> None:
        replies.write(json.dumps(msg).encode() + b"\n")

    say({"started": pid})
    first = z.start(argv, {}, tmp_path, tmp_path / "a.log")
    assert first.poll() is None and not z.idle()
    say({"exited": pid, "code": 0})
    assert first.wait(5) == 0 and z.idle()
    say({"started": pid})  # the kernel gave the pid to the next child
    second = z.start(argv, {}, tmp_path, tmp_path / "b.log")
    assert second.poll() is None and second.returncode is None and first.poll() == 0
    assert not z.idle()
    with pytest.raises(subprocess.TimeoutExpired):
        second.wait(0.3)
    say({"exited": pid, "code": -signal.SIGTERM})
    assert second.wait(5) == -signal.SIGTERM and first.poll() == 0 and z.idle()
    replies.close()
    z.close()
