"""Round overhead vs Flower: hffm rounds vs a Flower FedAvg round, same clients, same payload.

hffm, two ways, each with the paper-size modules, ``train.noop`` (no optimisation step, every
exchange kept), ``train.eval_every=0`` (no testing), plaintext links (Flower runs ``--insecure``; what
mTLS costs is the transfer and security benchmarks' subject), all nodes separate servers on loopback:
- ``star`` (the headline): the cloud and N devices, Flower's own topology: the same 2N transfers.
- ``hfm``: E_agg = 1, N devices in N/4 clusters (devices -> edges -> cloud -> edges -> devices): the
  paper's hierarchy, 2N + 2N/4 transfers.
- ``star`` again over the bulk transport (``wire.transport: bulk``: the same pushes as framed messages
  over TCP instead of gRPC streams, every check kept): hffm's fastest configuration.
Every hffm node also checkpoints its modules every round (written and fsynced); Flower keeps nothing.

Flower, in two configurations, both doing FedAvg with the same arrays (the paper-size module set,
fp32) and a no-op fit that returns what it received:
- ``legacy`` (the fastest Flower 1.39 offers, and the one the headline ratio is against):
  ``start_server`` and N ``NumPyClient`` processes connected by ``start_client`` over one gRPC stream
  each for the whole run (``benchmarks/flower_app/legacy.py``); a round is timed from
  ``configure_fit`` to the end of ``aggregate_fit``.
- ``superlink``: its current deployment, a SuperLink (Fleet API over gRPC) and N SuperNodes as
  processes, each SuperNode running the ClientApp in a subprocess per round; timed inside the
  ServerApp from ``configure_train`` to the end of ``aggregate_train``. Its rounds include Flower's
  own poll sleeps and a process per SuperNode per round: that is how it runs, but not the fastest.

Each side runs several rounds; the first is left out (start-up: processes, channels) and the median
of the others is reported. Memory is the peak summed PSS of each side's processes. The headline is
the median over client counts of hffm star's round / Flower legacy's round. Flower is installed into
its own virtual environment (``build/flower-venv``): its pins (protobuf 6) differ from hffm's.
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

from benchmarks.common import MemoryWatch, median, paper_modules
from hffm.config import PAPER_MODEL, load_config
from services.launcher import REPO_ROOT, free_ports, run, stop_process_groups

FLWR_VERSION = "1.39.0"  # the newest release whose Fleet API is gRPC (1.40 moved it to HTTP)
APP_DIR = REPO_ROOT / "benchmarks" / "flower_app"
VENV = REPO_ROOT / "build" / "flower-venv"
ROUNDS = 4  # hffm and Flower legacy: rounds 2-4 timed (--quick: 3)
SUPERLINK_ROUNDS = 3  # ~3 s of Flower's poll sleeps and a ClientApp process per SuperNode each round (quick: 2)
SUPERLINK_MAX_CLIENTS = 10  # its rounds grow to minutes beyond (240 s at 20 clients): measured up to here
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


def flower_round(n: int, out: Path, log=print, timeout_s: float = 900.0, rounds: int = SUPERLINK_ROUNDS) -> dict:
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
    procs = _Processes(out, env)
    start, logs = procs.start, procs.logs
    result_file = out / "flower.json"
    result_file.unlink(missing_ok=True)
    with MemoryWatch(str(VENV), MEMORY_FLOOR, on_low=procs.stop) as watch:
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
            run_config = f'num-clients={n} rounds={rounds} payload="{payload}" out="{result_file}"'
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
            res["peak_pss_bytes"] = watch.peak
            return res
        finally:
            procs.stop()


class _Processes:
    """The processes of one Flower run: each logs to ``<out>/logs/<name>.log``, in a session of its own."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.out, self.env = out, env
        self.logs = out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        f = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process's end
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.out, start_new_session=True
        )
        f.close()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        stop_process_groups(self.procs)


def flower_legacy_round(n: int, out: Path, log=print, timeout_s: float = 900.0, rounds: int = ROUNDS) -> dict:
    """Time Flower FedAvg rounds with ``start_server`` and ``n`` persistent ``NumPyClient`` processes."""
    bin_dir = flower_env(log)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    payload = out / "payload.npz"
    write_payload(payload)
    result_file = out / "flower.json"
    result_file.unlink(missing_ok=True)
    script = str(APP_DIR / "legacy.py")
    (port,) = free_ports(1, "127.0.0.1")
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "GRPC_VERBOSITY": "ERROR"}
    env.pop("VIRTUAL_ENV", None)
    procs = _Processes(out, env)
    logs = procs.logs

    def start(name: str, *args: str) -> subprocess.Popen:
        return procs.start(name, str(bin_dir / "python"), script, *args)

    with MemoryWatch(script, MEMORY_FLOOR, on_low=procs.stop) as watch:
        try:
            srv = start("server", "server", str(port), str(n), str(rounds), str(payload), str(result_file))
            _wait_port(port, srv, "flwr start_server")
            for i in range(n):
                start(f"client-{i}", "client", str(port))
            try:
                srv.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise FlowerUnavailable(f"start_server did not finish {rounds} rounds in {timeout_s:.0f}s") from None
            if watch.low:
                raise FlowerUnavailable(
                    f"out of memory: {n} clients reached {watch.peak / 2**30:.1f} GiB (PSS) and the machine fell "
                    f"below {MEMORY_FLOOR / 2**30:.1f} GiB available; the run was stopped"
                )
            if not result_file.exists():
                raise FlowerUnavailable(f"start_server wrote no result (rc {srv.returncode}); see {logs}")
            res = json.loads(result_file.read_text())
            res["flwr"] = FLWR_VERSION
            res["peak_pss_bytes"] = watch.peak
            return res
        finally:
            procs.stop()


def hffm_config(n: int, rounds: int = ROUNDS, method: str = "star", transport: str = "grpc"):
    """``star``: the cloud and ``n`` devices; ``hfm``: ``n`` devices in ``n/4`` clusters, E_agg = 1;
    pushes over ``transport`` (``wire.transport``: grpc, or bulk)."""
    edges = 1 if method == "star" else max(1, n // 4)
    return load_config(
        None,
        [
            *PAPER_MODEL,
            f"method={method}",
            f"rounds={rounds}",
            "e_agg=1",
            f"topology.edges={edges}",
            f"topology.devices_per_edge={n // edges}",
            "runtime.devices_per_process=10",
            "security.tls=false",
            f"wire.transport={transport}",
            "train.noop=true",
            "train.eval_every=0",
            "data.global_test_per_task=20",
            "data.local_test_per_device=4",
        ],
    )


def hffm_round(n: int, out: Path, rounds: int = ROUNDS, method: str = "star", transport: str = "grpc") -> dict:
    cfg = hffm_config(n, rounds, method, transport)
    with MemoryWatch(str(out / "config.yaml")) as mem:
        res = run(cfg, out, Console(file=io.StringIO()), timeout_s=1800, force=True)
    last = res["rounds"][-1]
    return {
        "method": method,
        "transport": transport,
        "peak_pss_bytes": mem.peak,
        "rounds_s": [r["wall_s"] for r in res["rounds"]],
        "devices": cfg.topology.edges * cfg.topology.devices_per_edge,
        "edges": cfg.topology.edges if method != "star" else 0,
        "bytes_per_round": last["bytes_total"],
    }


def round_s(rounds: list[float]) -> float:
    """The median round, the first (start-up) left out."""
    return median(rounds[1:] or rounds)


FLOWER_ERRORS = (FlowerUnavailable, subprocess.TimeoutExpired, OSError, subprocess.CalledProcessError)


def compare(out: Path, n: int, log=print, superlink: bool = True, quick: bool = False) -> dict:
    """hffm (star and hfm) and both Flower configurations side by side with ``n`` clients; ``ratio`` =
    hffm star round / Flower legacy round, ``ratio_hfm`` = hffm hfm round / Flower legacy round,
    ``ratio_bulk`` = hffm star round over the bulk transport / Flower legacy round, ``ratio_superlink`` =
    hffm star round / SuperLink round."""
    rounds = ROUNDS - 1 if quick else ROUNDS
    log(f"  hffm: star rounds, {n} devices, paper-size modules, no-op step ...")
    h = hffm_round(n, out / f"hffm-star-{n}", rounds, "star")
    h["round_s"] = round_s(h["rounds_s"])
    hh = hb = None
    if not quick:  # --quick (the test suite) measures the headline's configuration alone
        log(f"  hffm: hfm rounds (E_agg = 1), {n} devices in {max(1, n // 4)} clusters ...")
        hh = hffm_round(n, out / f"hffm-hfm-{n}", rounds, "hfm")
        hh["round_s"] = round_s(hh["rounds_s"])
        log(f"  hffm: star rounds, {n} devices, over the bulk transport ...")
        hb = hffm_round(n, out / f"hffm-star-bulk-{n}", rounds, "star", "bulk")
        hb["round_s"] = round_s(hb["rounds_s"])
    point: dict = {
        "clients": n,
        "hffm": h,
        "hffm_hfm": hh,
        "hffm_bulk": hb,
        "ratio_bulk": None,
        "flower": None,
        "ratio": None,
        "ratio_hfm": None,
        "superlink": None,
        "ratio_superlink": None,
    }

    def measure(key: str, ratio: str, error: str, what: str, fn) -> None:
        log(f"  Flower {FLWR_VERSION} {what}, {n} clients, same payload, no-op fit ...")
        try:
            f = fn()
            f["round_s"] = round_s(f["rounds_s"])
            point.update({key: f, ratio: h["round_s"] / f["round_s"]})
            if key == "flower" and hh is not None:
                point["ratio_hfm"] = hh["round_s"] / f["round_s"]
            if key == "flower" and hb is not None:
                point["ratio_bulk"] = hb["round_s"] / f["round_s"]
        except FLOWER_ERRORS as err:
            log(f"  Flower {what} could not be measured: {err}")
            point[error] = str(err)

    measure(
        "flower",
        "ratio",
        "error",
        "legacy (start_server + persistent NumPyClients)",
        lambda: flower_legacy_round(n, out / f"flower-legacy-{n}", log, rounds=rounds),
    )
    if superlink:
        measure(
            "superlink",
            "ratio_superlink",
            "superlink_error",
            "SuperLink + SuperNodes",
            lambda: flower_round(
                n, out / f"flower-{n}", log, rounds=SUPERLINK_ROUNDS - 1 if quick else SUPERLINK_ROUNDS
            ),
        )
    return point


def run_sweep(out: Path, sizes: list[int], log=print, quick: bool = False) -> dict:
    """``compare`` for each size (SuperLink up to ``SUPERLINK_MAX_CLIENTS``, and until the first size it
    cannot run). ``ratio``: the median over sizes of hffm star's round / Flower legacy's round
    (``ratio_hfm``: the same of hffm's hfm round)."""
    points = []
    superlink = True
    for n in sizes:
        p = compare(out, n, log, superlink and n <= SUPERLINK_MAX_CLIENTS, quick)
        points.append(p)
        superlink = superlink and (p["superlink"] is not None or n > SUPERLINK_MAX_CLIENTS)
    done = [p["ratio"] for p in points if p["ratio"] is not None]
    hfm = [p["ratio_hfm"] for p in points if p["ratio_hfm"] is not None]
    sl = [p["ratio_superlink"] for p in points if p["ratio_superlink"] is not None]
    bulk = [p["ratio_bulk"] for p in points if p.get("ratio_bulk") is not None]
    return {
        "points": points,
        "ratio": median(done) if done else None,
        "ratio_hfm": median(hfm) if hfm else None,
        "ratio_bulk": median(bulk) if bulk else None,  # hffm star over the bulk transport / Flower legacy
        "ratio_superlink": median(sl) if sl else None,
        "clients": [p["clients"] for p in points if p["ratio"] is not None],
        "flower_failed_at": next((p["clients"] for p in points if p["flower"] is None), None),
    }


if __name__ == "__main__":
    sizes = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [10, 20, 40]
    print(json.dumps(run_sweep(REPO_ROOT / "runs" / "flower-bench", sizes), indent=2))
