"""Round overhead vs Flower: one hfm round vs one Flower FedAvg round, same clients, same payload.

hffm: an ``hfm`` round (E_agg = 1, so devices -> edges -> cloud -> edges -> devices) of N devices in
N/4 clusters, the paper-size modules, ``train.noop`` (no optimisation step, every exchange kept) and
``train.eval_every=0`` (no testing), all as separate processes on loopback.

Flower: its real deployment — a SuperLink (Fleet API over gRPC) and N SuperNodes as processes on
loopback, each SuperNode running the ClientApp in its own subprocess — doing FedAvg with the same
arrays (the paper-size module set, fp32) and a no-op fit (``benchmarks/flower_app``). The round is
timed inside the ServerApp from ``configure_train`` to the end of ``aggregate_train``.

Both run 2 rounds and report the second (the first includes start-up: ClientApp processes, channels).
Flower is installed into its own virtual environment (``build/flower-venv``): its pins (protobuf 6)
differ from hffm's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from benchmarks.common import MemoryWatch, paper_modules
from hffm.config import PAPER_MODEL, load_config
from services.launcher import REPO_ROOT, free_ports, run, stop_process_groups

FLWR_VERSION = "1.39.0"  # the newest release whose Fleet API is gRPC (1.40 moved it to HTTP)
APP_DIR = REPO_ROOT / "benchmarks" / "flower_app"
VENV = REPO_ROOT / "build" / "flower-venv"
ROUNDS = 2
MEMORY_FLOOR = 3 << 30  # stop Flower when the machine has less than this available


class FlowerUnavailable(RuntimeError):
    """Flower could not be installed or started here (the figure is then reported as missing)."""


def flower_env(log=print) -> Path:
    """The bin/ folder of a virtual environment with flwr==FLWR_VERSION (created on first use)."""
    bin_dir = VENV / "bin"
    probe = [str(bin_dir / "python"), "-c", "import flwr, sys; sys.exit(flwr.__version__ != sys.argv[1])"]
    if (bin_dir / "python").exists() and subprocess.run([*probe, FLWR_VERSION], capture_output=True).returncode == 0:
        return bin_dir
    log(f"  installing flwr=={FLWR_VERSION} into {VENV} ...")
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    r = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", f"flwr=={FLWR_VERSION}", "numpy"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise FlowerUnavailable(f"pip install flwr=={FLWR_VERSION} failed: {r.stderr.strip()[-500:]}")
    return bin_dir


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerUnavailable(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FlowerUnavailable(f"{what} did not listen on {port} within {timeout_s:.0f}s")


def write_payload(path: Path) -> int:
    """The paper-size module set as the arrays Flower exchanges; returns their size in bytes."""
    arrays = {f"{n}/{k}": t.numpy() for n, m in sorted(paper_modules().items()) for k, t in sorted(m.tensors.items())}
    np.savez(path, **arrays)
    return sum(a.nbytes for a in arrays.values())


def flower_round(n: int, out: Path, log=print, timeout_s: float = 900.0) -> dict:
    """Time Flower FedAvg rounds with ``n`` SuperNodes; returns the ServerApp's measurements."""
    bin_dir = flower_env(log)
    out = out.resolve()  # the processes run in ``out``: every path handed to them is absolute
    out.mkdir(parents=True, exist_ok=True)
    payload = out / "payload.npz"
    write_payload(payload)
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    fleet, http, *node_ports = free_ports(2 + n, "127.0.0.1")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{http}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        f = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process's end
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True)
        f.close()
        procs.append(p)
        return p

    result_file = out / "flower.json"
    result_file.unlink(missing_ok=True)
    with MemoryWatch(str(VENV), MEMORY_FLOOR, on_low=lambda: stop_process_groups(procs)) as watch:
        try:
            link = start(
                "superlink",
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--fleet-api-address",
                f"127.0.0.1:{fleet}",
                "--port",
                str(http),
                "--disable-runtime-dependency-installation",
            )
            _wait_port(http, link, "flower-superlink")
            _wait_port(fleet, link, "flower-superlink (Fleet API)")
            for i, port in enumerate(node_ports):
                start(
                    f"supernode-{i}",
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{fleet}",
                    "--port",
                    str(port),
                )
            run_config = f'num-clients={n} rounds={ROUNDS} payload="{payload}" out="{result_file}"'
            t0 = time.perf_counter()
            r = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(APP_DIR), "bench", "--run-config", run_config, "--stream"],
                env=env,
                cwd=out,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            (logs / "flwr-run.log").write_text(r.stdout + r.stderr)
            if watch.low:
                raise FlowerUnavailable(
                    f"out of memory: {n} SuperNodes reached {watch.peak / 2**30:.1f} GiB and the machine fell below "
                    f"{MEMORY_FLOOR / 2**30:.1f} GiB available; the run was stopped"
                )
            if not result_file.exists():
                why = f"the Flower run wrote no result (rc {r.returncode}); see {logs / 'flwr-run.log'}"
                raise FlowerUnavailable(why)
            res = json.loads(result_file.read_text())
            res["run_s"] = time.perf_counter() - t0
            res["flwr"] = FLWR_VERSION
            res["peak_rss_bytes"] = watch.peak
            return res
        finally:
            stop_process_groups(procs)


def hffm_config(n: int):
    edges = max(1, n // 4)
    return load_config(
        None,
        [
            *PAPER_MODEL,
            "method=hfm",
            f"rounds={ROUNDS}",
            "e_agg=1",
            f"topology.edges={edges}",
            f"topology.devices_per_edge={n // edges}",
            "runtime.devices_per_process=10",
            "train.noop=true",
            "train.eval_every=0",
            "data.global_test_per_task=20",
            "data.local_test_per_device=4",
        ],
    )


def hffm_round(n: int, out: Path) -> dict:
    cfg = hffm_config(n)
    with MemoryWatch(str(out / "config.yaml")) as mem:
        res = run(cfg, out, Console(file=io.StringIO()), timeout_s=1800, force=True)
    last = res["rounds"][-1]
    return {
        "peak_rss_bytes": mem.peak,
        "rounds_s": [r["wall_s"] for r in res["rounds"]],
        "devices": cfg.topology.edges * cfg.topology.devices_per_edge,
        "edges": cfg.topology.edges,
        "bytes_per_round": last["bytes_total"],
    }


def compare(out: Path, n: int, log=print) -> dict:
    """hffm and Flower side by side with ``n`` clients; ``ratio`` = hffm round / Flower round."""
    log(f"  hffm: hfm round, {n} devices, paper-size modules, no-op step ...")
    h = hffm_round(n, out / f"hffm-{n}")
    log(f"  Flower {FLWR_VERSION}: SuperLink + {n} SuperNodes, FedAvg round, same payload, no-op fit ...")
    try:
        f = flower_round(n, out / f"flower-{n}", log)
    except (FlowerUnavailable, subprocess.TimeoutExpired, OSError, subprocess.CalledProcessError) as err:
        log(f"  Flower could not be measured: {err}")
        return {"clients": n, "hffm": h, "flower": None, "ratio": None, "error": str(err)}
    return {"clients": n, "hffm": h, "flower": f, "ratio": h["rounds_s"][-1] / f["rounds_s"][-1]}


def run_sweep(out: Path, sizes: list[int], log=print) -> dict:
    """``compare`` for each size, stopping after the first size Flower cannot run. ``ratio``: at the
    largest size both completed."""
    points = []
    for n in sizes:
        p = compare(out, n, log)
        points.append(p)
        if p["flower"] is None:
            break
    done = [p for p in points if p["ratio"] is not None]
    return {
        "points": points,
        "ratio": done[-1]["ratio"] if done else None,
        "clients": done[-1]["clients"] if done else None,
        "flower_failed_at": points[-1]["clients"] if points and points[-1]["flower"] is None else None,
    }


if __name__ == "__main__":
    sizes = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [10, 20, 40]
    print(json.dumps(run_sweep(REPO_ROOT / "runs" / "flower-bench", sizes), indent=2))
