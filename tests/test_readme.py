"""README's "Running the services yourself" block runs as written: three processes started by hand,
security on, a two-round run that ends on its own with results."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _block(title: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {title}") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a TIME_WAIT left is no hold
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_free_here(block: str) -> str:
    """The block's ports are outside Linux's ephemeral range, as the README says, so no outgoing connection
    can hold one; a port another program on this shared machine listens on is swapped for a free one below
    the range (the only change to the block), never a failure of the block."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", block)})
    assert len(ports) == 4 and all(p < low for p in ports), (ports, low)
    spare = (p for p in range(low - 1, 1024, -1) if p not in ports and _bindable(p))
    for port in ports:
        if not _bindable(port):
            block = block.replace(f"127.0.0.1:{port}", f"127.0.0.1:{next(spare)}")
    return block


def test_running_the_services_yourself_works_as_written(tmp_path):
    block = _block("Running the services yourself")
    assert "W=runs/manual" in block
    block = _ports_free_here(block)
    # as written, in a copy of the layout it expects (the repository root): the checkout's .venv, its
    # code, and runs/ of its own
    root = tmp_path / "repo"
    root.mkdir()
    for name in (".venv", "hffm", "hffm_cli", "services", "proto", "configs", "deploy"):
        (root / name).symlink_to(REPO / name)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((root / "runs" / "manual" / "results.json").read_text())
    assert results["complete"] and [x["round"] for x in results["rounds"]] == [1, 2]
    assert "runs/manual/global_modules.safetensors" in r.stdout
    shutil.rmtree(root / "runs")


def test_a_config_naming_nodes_never_started_fails_in_one_line(tmp_path, pki_dir):
    """The cloud alone with a topology of two devices that never come: it names them while waiting and
    fails in one line when runtime.register_timeout_s is up."""
    import sys

    cfg = tmp_path / "c.yaml"
    sets = [
        f"security.dir={pki_dir}",
        "topology.edges=1",
        "topology.devices_per_edge=2",
        "runtime.register_timeout_s=12",
    ]
    subprocess.run(
        [sys.executable, "-m", "hffm_cli", "config", "--out", str(cfg), *[a for s in sets for a in ("--set", s)]],
        check=True,
        cwd=REPO,
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cloud",
            "--config",
            str(cfg),
            "--listen",
            "127.0.0.1:0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = r.stderr
    assert "waiting for 3 node(s) to register: device-0-0, device-0-1, edge-0" in log
    assert "3 of the topology's nodes did not register within runtime.register_timeout_s=12s" in log
    assert "Traceback" not in log
