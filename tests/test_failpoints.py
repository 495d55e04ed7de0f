"""Failpoints (services/common/faults.py): the table's syntax, and a ``stop`` that stops the process before
the thread that hit it can do anything more (what a fault scenario's "mid-stream" relies on)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import faults

REPO_ROOT = Path(__file__).resolve().parent.parent

# A worker thread hits the failpoint, then writes one byte to fd 1; the main thread keeps the (one) CPU
# busy without the GIL, as a node's other threads do on a loaded machine.
CHILD = """
import hashlib, os, sys, threading, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from services.common import faults
def worker():
    time.sleep(0.3)
    faults.hit("device-0-0", "send.aggregate", 1)
    os.write(1, b"x")
threading.Thread(target=worker).start()
data = b"\\0" * (1 << 20)
end = time.monotonic() + 20
while time.monotonic() < end:
    hashlib.sha256(data).digest()
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_table_names_a_bad_item():
    assert faults.parse("edge-0:collect.aggregate:2:kill, device-1-0:train:1:stop,") == {
        ("edge-0", "collect.aggregate", 2): "kill",
        ("device-1-0", "train", 1): "stop",
    }
    for bad in ("edge-0:train:1", "edge-0:train:x:kill", "edge-0:train:1:pause"):
        with pytest.raises(ValueError, match=bad):
            faults.parse(bad)


@pytest.mark.parametrize("attempt", range(3))
def test_a_stop_hit_by_a_thread_stops_the_process_before_that_thread_goes_on(attempt):
    env = dict(os.environ, HFFM_FAILPOINTS="device-0-0:send.aggregate:1:stop", PYTHONPATH=str(REPO_ROOT))
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while _state(p.pid) != "T":
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "the failpoint never stopped the process"
            time.sleep(0.01)
        time.sleep(0.3)
        ready, _, _ = select.select([p.stdout], [], [], 0)
        assert not ready, "the thread that hit the failpoint ran on after it"
        assert b"failpoint device-0-0:send.aggregate:1: stop" in p.stderr.peek()
        os.killpg(p.pid, signal.SIGCONT)  # continued, it carries on from where it stopped
        ready, _, _ = select.select([p.stdout], [], [], 10)
        assert ready and os.read(p.stdout.fileno(), 1) == b"x"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
