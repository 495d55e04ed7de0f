"""Local launcher: the cloud, edges and devices as separate OS processes on loopback ports.

It writes the resolved config once (every process reads that same file), starts the processes
(several device servers per process: ``runtime.devices_per_process``), follows the cloud's
progress stream, and stops every process it started — on success, on failure (showing the failing
process's log) and on Ctrl-C. Results land in the run directory.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from rich.console import Console

from hffm.adversary import adversaries
from hffm.circulation import Circulation, describe
from hffm.config import ConfigError, HFFMConfig, load_config, resolve_torch_device, write_config
from hffm.ids import CLOUD, role_of
from hffm.pki import OPERATOR, SCRAPER, provision
from hffm.results import plot_results
from hffm.topology import Topology, final
from services import spawn
from services.common.security import Security
from services.launcher_ui import RunView

REPO_ROOT = Path(__file__).resolve().parent.parent


class RunFailed(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: spawn.Process
    log: Path
    argv: list[str] | None = None
    restarts: int = 0
    died_at: float | None = None  # when it was found dead (a restart is due after the delay)
    stopped_at: float | None = None  # when it was found stopped (SIGSTOP)


@dataclass
class FaultPlan:
    """Faults injected into a run (hffm chaos, the fault scenarios): failpoints every process gets at
    its first start (``node:point:round:action``, services/common/faults.py), how long after its death
    each process is restarted (default ``faults.restart_delay_s``; None: never) and how long a process
    that stopped itself stays stopped before it is sent SIGCONT."""

    failpoints: list[str]
    restart_after_s: dict[str, float | None]
    stop_s: dict[str, float]


class Supervisor:
    """Keeps the run's processes going, as compose's ``restart: on-failure`` and Kubernetes do: a process
    that dies (non-zero exit or a signal) is started again with the same command line, its log appended,
    after ``faults.restart_delay_s`` (at most ``faults.max_restarts`` times); one that stopped (SIGSTOP)
    is continued after its scenario's stop time. With ``faults.restart: false`` a lost device process is
    tolerated and any other ends the run (as before)."""

    def __init__(
        self,
        cfg: HFFMConfig,
        procs: list[Proc],
        env: dict[str, str],
        view: RunView,
        plan: FaultPlan,
        zygote: spawn.Zygote | None = None,
    ) -> None:
        self.cfg, self.procs, self.env, self.view, self.plan, self.zygote = cfg, procs, env, view, plan, zygote
        self.lost: set[str] = set()
        self.restarts = 0

    def poll(self, running: bool) -> None:
        now = time.monotonic()
        for p in self.procs:
            rc = p.popen.poll()
            if rc is None:
                self._check_stopped(p, now)
                continue
            if rc == 0 or p.name in self.lost:
                continue
            restart_after = self.plan.restart_after_s.get(p.name, self.cfg.faults.restart_delay_s)
            if self.cfg.faults.restart and restart_after is not None and p.restarts < self.cfg.faults.max_restarts:
                if p.died_at is None:
                    p.died_at = now
                    self.view.process_died(p.name, rc, restart_after)
                if now - p.died_at >= restart_after:
                    self._restart(p)
                continue
            if running and role_of(p.name) != "cloud" and not p.name.startswith("edge") and not self.cfg.faults.restart:
                self.lost.add(p.name)  # the federation survives losing devices: left out of the next rounds
                self.view.device_process_lost(p.name, rc, p.log)
                continue
            tail = _tail(p.log)
            self.view.process_failed(p.name, rc, p.log, tail)
            err = RunFailed(f"{p.name} exited with code {rc}")
            err.add_note(f"the end of {p.log}:\n{tail}")  # in a traceback (a test's), not the CLI's one line
            raise err

    def _check_stopped(self, p: Proc, now: float) -> None:
        try:
            state = Path(f"/proc/{p.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state != "T":
            p.stopped_at = None
            return
        if p.stopped_at is None:
            p.stopped_at = now
        if now - p.stopped_at >= self.plan.stop_s.get(p.name, self.cfg.faults.restart_delay_s):
            os.killpg(p.popen.pid, signal.SIGCONT)
            self.view.process_continued(p.name, now - p.stopped_at)
            p.stopped_at = None

    def _restart(self, p: Proc) -> None:
        assert p.argv is not None
        env = {k: v for k, v in self.env.items() if k != "HFFM_FAILPOINTS"}  # a failpoint fires once a run
        if self.zygote is not None and not self.zygote.alive():  # it died: a new one (its orphans run on)
            self.zygote = spawn.zygote_for(self.env, REPO_ROOT)
        p.popen = _start(p.argv, p.log, env, self.zygote)
        p.restarts += 1
        p.died_at = None
        self.restarts += 1
        self.view.process_restarted(p.name, p.restarts)


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


class PortLease:
    """Ports one launcher has handed out, reserved among the hffm launchers of this machine (this user's)
    until ``close``: each is a lock file (``flock``) under ``<tmp>/hffm-ports-<uid>/``, and ``free_ports``
    skips a port another open lease holds. Picked ports are free until their processes bind them,
    seconds later (Python and torch load first); a process that dies and is restarted frees its port
    again for a while. Without leases two runs at once (tests on two workers) could pick the same port
    then. The kernel drops a dead launcher's locks: nothing goes stale."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.gettempdir()) / f"hffm-ports-{os.getuid()}"
        self._held: dict[int, object] = {}

    def hold(self, port: int) -> bool:
        """Reserve ``port``; False when another open lease holds it."""
        if port in self._held:
            return True
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fh = open(self.dir / str(port), "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._held[port] = fh
        return True

    def release(self, port: int) -> None:
        fh = self._held.pop(port, None)
        if fh is not None:
            fh.close()

    def close(self) -> None:
        for port in list(self._held):
            self.release(port)

    def __enter__(self) -> PortLease:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def free_ports(n: int, host: str, lease: PortLease | None = None) -> list[int]:
    """``n`` distinct ports nothing holds now, for processes that will listen on them, reserved in
    ``lease`` (PortLease) until it closes; without one only while they are picked (a caller that binds
    them at once). Below the kernel's ephemeral range where it is known: a port the kernel hands out for
    ``bind(0)`` is one it may hand to an outgoing connection next, before the process that is to listen
    on it binds it (README's manual run failed in CI that way, on a port in that range). Scanned from a
    random start, skipping ports another launcher's lease holds; each port is held until all ``n`` are
    found."""
    span = _ephemeral_range()
    socks, ports = [], []
    own = lease is None
    lease = lease or PortLease()
    try:
        if span is None or span[0] <= 2048 + n:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)
                ports.append(s.getsockname()[1])
                lease.hold(ports[-1])
            return ports
        top = span[0]
        low = 10000 if top > 12000 + n else 1024  # [low, top): below the range, above the well-known ports
        start = random.randrange(low, top)
        for i in range(top - low):
            port = low + (start - low + i) % (top - low)
            if not lease.hold(port):
                continue  # another run's, bound or about to be
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                lease.release(port)
                continue
            socks.append(s)
            ports.append(port)
            if len(ports) == n:
                return ports
        raise RunFailed(f"no {n} free ports on {host} below the ephemeral range ({top})")
    finally:
        for s in socks:
            s.close()
        if own:
            lease.close()


def plan_processes(
    cfg: HFFMConfig, topo: Topology, cfg_path: Path, out: Path, lease: PortLease | None = None
) -> list[tuple[str, list[str]]]:
    """(name, argv) of every process of the run, with loopback ports assigned (gRPC, metrics, and with
    wire.transport=bulk each node's bulk listener), reserved in ``lease`` (free_ports)."""
    host = cfg.runtime.host
    n_dev_procs = -(-len(topo.devices) // cfg.runtime.devices_per_process)
    nodes = 1 + len(topo.edges) + len(topo.devices)
    bulk = cfg.wire.transport == "bulk"  # each node's bulk listener too, picked with the others (no races)
    ports = iter(free_ports(nodes * (2 if bulk else 1) + 1 + len(topo.edges) + n_dev_procs, host, lease))
    py = [sys.executable, "-m"]
    common = ["--config", str(cfg_path)]
    cloud_addr = f"{host}:{next(ports)}"
    procs = [("cloud", [*py, "services.cloud", *common, "--listen", cloud_addr, "--out", str(out)])]
    if bulk:
        procs[0][1].extend(["--bulk-port", str(next(ports))])
    edge_addr = {}
    for e in topo.edges:
        edge_addr[e] = f"{host}:{next(ports)}"
        procs.append(
            (e, [*py, "services.edge", *common, "--id", e, "--listen", edge_addr[e], "--upstream", cloud_addr])
        )
        if bulk:
            procs[-1][1].extend(["--bulk-port", str(next(ports))])
    # Devices in global order, k per process (a process may host devices of several edges).
    k = cfg.runtime.devices_per_process
    devices = list(topo.devices)
    for g in range(0, len(devices), k):
        group = devices[g : g + k]
        argv = [*py, "services.device", *common]
        for e in dict.fromkeys(d.edge for d in group):
            argv += ["--upstream", f"{e}={edge_addr[e]}"]
        for d in group:
            argv += ["--node", f"{d.id}={host}:{next(ports)}"]
            if bulk:
                argv += ["--bulk-port", f"{d.id}={next(ports)}"]
        name = group[0].id if len(group) == 1 else f"devices-{g // k}"
        procs.append((name, argv))
    for _, argv in procs:
        argv += ["--metrics-port", str(next(ports)), "--metrics-addr", host]
    return procs


def _plan_ports(plan: list[tuple[str, list[str]]]) -> list[int]:
    """Every port a plan's processes listen on (their --listen, --node, --bulk-port, --metrics-port)."""
    ports = []
    for _, argv in plan:
        for flag, value in itertools.pairwise(argv):
            if flag in ("--listen", "--node", "--bulk-port", "--metrics-port"):
                tail = value.rsplit(":", 1)[-1].rsplit("=", 1)[-1]
                if tail.isdigit():
                    ports.append(int(tail))
    return ports


def metrics_targets(plan: list[tuple[str, list[str]]], host: str) -> list[dict]:
    """Prometheus file_sd target groups for the planned processes."""
    groups = []
    for name, argv in plan:
        port = argv[argv.index("--metrics-port") + 1]
        tier = role_of(name) if role_of(name) != "unknown" else "device"  # a process hosting devices
        groups.append({"targets": [f"{host}:{port}"], "labels": {"process": name, "tier": tier}})
    return groups


def write_prometheus_dir(out: Path, targets: list[dict], pki: Path | None = None) -> Path:
    """DIR/prometheus/{prometheus.yml, rules.yml, targets/hffm.json} from deploy/prometheus/; with
    ``pki`` (security on) Prometheus scrapes over HTTPS with the run's scraper certificate."""
    d = out / "prometheus"
    (d / "targets").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "deploy" / "prometheus" / "rules.yml", d / "rules.yml")
    prom = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    if pki is not None:
        for job in prom["scrape_configs"]:
            job["scheme"] = "https"
            job["tls_config"] = {
                "ca_file": str(pki / "ca.crt"),
                "cert_file": str(pki / f"{SCRAPER}.crt"),
                "key_file": str(pki / f"{SCRAPER}.key"),
            }
    (d / "prometheus.yml").write_text(yaml.safe_dump(prom, sort_keys=False))
    tmp = d / "targets" / "hffm.json.tmp"
    tmp.write_text(json.dumps(targets, indent=2))
    tmp.replace(d / "targets" / "hffm.json")
    return d


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def start_prometheus(prom_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real Prometheus scraping the run (Debian's `prometheus` binary). Returns (process, URL). It
    listens on ``port``, else $HFFM_PROMETHEUS_PORT or 9090 (the same URL run after run, for a Grafana
    pointed at it) when free, else on a free port."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RunFailed("--prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
    if port is None:
        wanted = int(os.environ.get("HFFM_PROMETHEUS_PORT", "9090"))
        port = wanted if _port_free(host, wanted) else free_ports(1, host)[0]
    log = open(prom_dir / "prometheus.log", "wb")
    p = subprocess.Popen(
        [
            binary,
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address={host}:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while True:  # ready when its HTTP API answers
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return p, url
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            _stop_all([Proc("prometheus", p, prom_dir / "prometheus.log")])
            raise RunFailed(f"Prometheus did not start; see {prom_dir / 'prometheus.log'}")
        time.sleep(0.2)


def _start(
    argv: list[str], log: Path, env: dict[str, str], zygote: spawn.Zygote | None, append: bool = True
) -> spawn.Process:
    """One of the run's processes, started in the repository root (forked by ``zygote`` when given)."""
    try:
        return spawn.start(argv, log, env, REPO_ROOT, zygote, append=append)
    except spawn.ZygoteError as err:
        raise RunFailed(f"{err}\n(runtime.start_method: exec starts fresh interpreters instead)") from None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_groups(popens: list[spawn.Process], grace_s: float = 5.0) -> None:
    """Stop processes started with ``start_new_session``: SIGTERM each one's process group, wait up to
    ``grace_s``, then SIGKILL every group (children that outlived their leader included) and reap."""

    def signal_groups(sig: signal.Signals) -> None:
        for p in popens:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in popens:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_groups(signal.SIGKILL)
    for p in popens:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _stop_all(procs: list[Proc], grace_s: float = 5.0) -> None:
    stop_process_groups([p.popen for p in procs], grace_s)


def run(
    cfg: HFFMConfig,
    out: Path,
    console: Console | None = None,
    timeout_s: float | None = None,
    prometheus: bool = False,
    hold_s: float | None = 0.0,
    resume: bool = False,
    faults: FaultPlan | None = None,
    on_start: Callable[[Supervisor], None] | None = None,
    force: bool = False,
    run_id: str | None = None,
) -> dict:
    """Run a federation of local processes in the run folder ``out``; return the parsed results.json.

    ``out`` is this run's alone: locked while it runs; refused when it holds an earlier run unless
    ``force`` (that run's files are removed) or ``resume``. DIR/run.json says which run it is (``run_id``,
    default a new one), when it started and ended, with what code, and how it ended (``status``:
    running, complete, failed with ``reason``, interrupted)."""
    from hffm.runinfo import RunDirError, claim_run_dir, new_run_id, now_iso, provenance, write_run_json

    out = out.absolute()  # processes start in the repository root: every path they get is absolute
    try:
        lock = claim_run_dir(out, force=force, resume=resume)
    except RunDirError as err:
        raise RunFailed(str(err)) from None
    info: dict = {}
    if resume and (out / "run.json").is_file():
        try:
            info = json.loads((out / "run.json").read_text())
        except ValueError:
            info = {}
    info.update(
        id=info.get("id") or run_id or new_run_id(cfg.method),
        method=info.get("method") or cfg.method,
        started=info.get("started") or now_iso(),
        status="running",
        pid=os.getpid(),
        argv=sys.argv,
        **provenance(),
    )
    info.pop("reason", None)
    write_run_json(out, info)
    # SIGTERM (kill, a CI timeout) stops the run like Ctrl-C, whoever called run() (hffm run sets the
    # same; a benchmark or a script calling run() does not): without it the interpreter dies without
    # its finally blocks and every process the run started is left running
    sigterm = (
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        else None
    )
    try:
        results = _run(cfg, out, info, console, timeout_s, prometheus, hold_s, resume, faults, on_start)
        info["status"] = "complete"
        return results
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM
        info["status"] = "interrupted"
        raise
    except BaseException as err:
        info["status"], info["reason"] = "failed", str(err) or type(err).__name__
        raise
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        info["finished"] = now_iso()
        write_run_json(out, info)
        lock.release()


def _run(
    cfg: HFFMConfig,
    out: Path,
    info: dict,
    console: Console | None,
    timeout_s: float | None,
    prometheus: bool,
    hold_s: float | None,
    resume: bool,
    faults: FaultPlan | None,
    on_start: Callable[[Supervisor], None] | None,
) -> dict:
    """The run itself (``run``'s docstring):

    Every process serves /metrics; DIR/prometheus/ holds a Prometheus config and the file_sd target
    list. With ``prometheus`` a real Prometheus scrapes the run; it stays up ``hold_s`` seconds after
    the run (None: until Ctrl-C). Every node saves its round ends under DIR/state; with ``resume`` the
    run in DIR continues from its last complete round (same config, same ports). ``faults``: failpoints
    and restart timing (fault scenarios, ``hffm chaos``); ``on_start`` gets the supervisor once every
    process started (``hffm chaos`` kills processes through it). ``results["restarts"]``: processes
    restarted."""
    from hffm.data import DataError, preflight
    from hffm.model import backbone_dims

    view = RunView(console or Console())
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    cfg_path = out / "config.yaml"
    results_path = out / "results.json"
    state_dir = out / "state"
    if resume:
        if not (state_dir / CLOUD).is_dir():
            raise RunFailed(f"--resume: {out} holds no saved state ({state_dir / CLOUD})")
        cfg = load_config(cfg_path)
        from hffm.persist import Persistor

        saved = Persistor(state_dir / CLOUD).available()
        # said here, from the cloud's checkpoints (the cloud says it too, once the watcher reaches it)
        view.console.print(
            f"resuming {out}: the cloud's last saved round end is round {saved[-1][0]} (attempt {saved[-1][1]})"
            if saved
            else f"resuming {out}: no complete round saved, starting from round 1"
        )
    else:
        shutil.rmtree(state_dir, ignore_errors=True)  # a new run starts from round 0
        if results_path.exists():
            results_path.unlink()
    if not cfg.checkpoint.dir:
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": str(state_dir.resolve())})})
    write_config(cfg, cfg_path)
    import services.rpc  # noqa: F401 - build the generated code once, before the children start

    if prometheus and cfg.runtime.linger_s < 5:  # let the last scrape see the final values
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"linger_s": 5.0})})
        write_config(cfg, cfg_path)
    try:  # every input that can fail, each a one-line error before any process starts
        device = resolve_torch_device(cfg.runtime.device, cfg.runtime.precision)
        try:
            layers = backbone_dims(cfg)[1]
        except OSError as err:  # a backbone directory that holds no ViLT checkpoint
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(first if first.startswith("model.backbone") else f"model.backbone: {first}") from None
        topo = Topology.from_config(cfg, layers)
        check_capacity(cfg, topo)
        try:
            attackers = adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if attackers:
            view.console.print(f"[yellow]adversaries (config adversary): {sorted(attackers)}[/]")
        try:  # the rules meet the modules (a pattern that matches none is a typo)
            policy = Circulation.from_config(cfg, final(topo, cfg).modules_for(CLOUD))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if cfg.circulation.rules:
            view.console.print("circulation: " + "; ".join(describe(policy)))
        view.console.print(preflight(cfg))
    except DataError as err:
        raise RunFailed(f"data error: {err}") from None
    except ConfigError as err:
        raise RunFailed(str(err)) from None
    view.console.print(
        f"torch device: {device}"
        + (" (runtime.device: auto)" if cfg.runtime.device == "auto" else "")
        + (
            " · [yellow]e_agg > rounds: no cloud aggregation in this run[/yellow]"
            if cfg.e_agg > cfg.rounds and cfg.method in ("hfm", "hfm-d2d")
            else ""
        )
    )
    if cfg.security.tls and not cfg.security.dir:  # a throwaway CA for this run
        cfg = cfg.model_copy(
            update={"security": cfg.security.model_copy(update={"dir": str(provision_pki(cfg, topo, out / "pki"))})}
        )
        write_config(cfg, cfg_path)
    plan_file = out / "processes.json"
    lease = PortLease()  # the run's ports, reserved against other launchers until it ends
    if resume and plan_file.is_file():  # the same ports: every saved address stays right
        plan = [(n, list(a)) for n, a in json.loads(plan_file.read_text())]
        for port in _plan_ports(plan):
            lease.hold(port)
    else:
        plan = plan_processes(cfg, topo, cfg_path, out, lease)
        plan_file.write_text(json.dumps(plan, indent=1))
    pki_dir = Path(cfg.security.dir) if cfg.security.tls and cfg.security.dir else None
    prom_dir = write_prometheus_dir(out, metrics_targets(plan, cfg.runtime.host), pki_dir)
    prom: subprocess.Popen | None = None
    if prometheus and shutil.which("prometheus") is None:
        view.prometheus_missing(prom_dir / "targets")
    elif prometheus:
        prom, url = start_prometheus(prom_dir, cfg.runtime.host)
        view.prometheus_started(url, prom_dir / "prometheus.yml")
        # a Grafana on this machine finds this Prometheus with this file in its provisioning/datasources
        # (the compose testbed's datasource names the prometheus container, which resolves only there)
        datasource = {"apiVersion": 1, "datasources": [{"name": "Prometheus", "uid": "prometheus",
                      "type": "prometheus", "access": "proxy", "url": url, "isDefault": True}]}  # fmt: skip
        (prom_dir / "grafana-datasource.yaml").write_text(yaml.safe_dump(datasource, sort_keys=False))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", str(cfg.runtime.torch_threads))
    env.setdefault("MALLOC_ARENA_MAX", "2")  # many threads per process: bound glibc's per-thread arenas
    env["PYTHONUNBUFFERED"] = "1"
    env["HFFM_RUN_ID"], env["HFFM_RUN_STARTED"] = info["id"], info["started"]  # results.json's run
    fault_plan = faults or FaultPlan([], {}, {})
    if fault_plan.failpoints:
        env["HFFM_FAILPOINTS"] = ",".join(fault_plan.failpoints)
    procs: list[Proc] = []
    cloud_addr = plan[0][1][plan[0][1].index("--listen") + 1]
    deadline = time.monotonic() + (
        timeout_s or (cfg.runtime.register_timeout_s + cfg.rounds * cfg.runtime.round_timeout_s)
    )
    view.header(cfg, topo, len(plan), out, info["id"])
    plotted = False
    zygote: spawn.Zygote | None = None
    try:
        if cfg.runtime.start_method == "zygote":  # one process imports everything once; the rest fork from it
            zygote = spawn.zygote_for(env, REPO_ROOT)  # this process's, kept for its next run
        for name, argv in plan:
            log = out / "logs" / f"{name}.log"
            procs.append(Proc(name, _start(argv, log, env, zygote, append=resume), log, argv))
        supervisor = Supervisor(cfg, procs, env, view, fault_plan, zygote)
        if on_start is not None:
            on_start(supervisor)
        _follow(cfg, topo, cloud_addr, supervisor, view, deadline, Security(cfg.security, OPERATOR))
        # The cloud writes its complete results before it reports the end: plot them while the nodes
        # shut down (the cloud lingers at least a second), not after.
        plotted = _plot_if_complete(results_path, out / "results.png")
        cloud = procs[0].popen
        try:
            cloud.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Nodes were told to shut down by the cloud; give them a moment, then make sure.
        end = time.monotonic() + 10 + cfg.runtime.linger_s
        while time.monotonic() < end and any(p.popen.poll() is None for p in procs):
            time.sleep(0.1)
        if prom is not None:
            _hold(prom, url, hold_s, view)
    except KeyboardInterrupt:
        view.interrupted()
        raise
    finally:
        _stop_all(procs)
        lease.close()
        if prom is not None:
            _stop_all([Proc("prometheus", prom, prom_dir / "prometheus.log")])
    if not results_path.exists():
        raise RunFailed(f"no results were written to {results_path}")
    results = json.loads(results_path.read_text())
    if not results.get("complete"):
        raise RunFailed("the run did not complete; see the cloud's log: " + str(out / "logs" / "cloud.log"))
    results["restarts"] = supervisor.restarts
    if not plotted:
        plot_results(results, out / "results.png")
    view.summary(results)
    view.outputs(results_path, out / "results.png", out / "global_modules.safetensors")
    return results


def _plot_if_complete(results_path: Path, png: Path) -> bool:
    """Plot a complete run's results file, if there is one now; whether it did."""
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return False
    if not results.get("complete"):
        return False
    plot_results(results, png)
    return True


def check_capacity(cfg: HFFMConfig, topo: Topology) -> None:
    """Refuse a federation this machine cannot hold open (a channel per node at the cloud, a log and pipes
    per process here), raising the soft open-files limit to the hard one first (the children inherit it)."""
    import math
    import resource

    nodes = len(topo.node_ids())
    procs = 1 + len(topo.edges) + math.ceil(len(topo.devices) / cfg.runtime.devices_per_process)
    need = 4 * procs + 2 * nodes + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ConfigError(
            f"topology: {nodes:,} nodes in {procs:,} processes need about {need:,} open files; this machine allows "
            f"{soft:,} (ulimit -n): fewer topology.edges x topology.devices_per_edge"
        )


def _hold(prom: subprocess.Popen, url: str, hold_s: float | None, view: RunView) -> None:
    if hold_s is None:
        if not sys.stdin.isatty():
            return
        view.console.print(f"run done; Prometheus still serving at {url} — Ctrl-C to stop it")
        try:
            prom.wait()
        except KeyboardInterrupt:
            return
    elif hold_s > 0:
        view.console.print(f"Prometheus stays up {hold_s:.0f}s at {url}")
        time.sleep(hold_s)


def provision_pki(cfg: HFFMConfig, topo: Topology, directory: Path) -> Path:
    """A CA for this run and a key and certificate for every node, the operator (the launcher, which
    watches the run) and the scraper, under ``directory`` (absolute, returned). Keys are written 0600."""
    members = {n: topo.role(n) for n in topo.node_ids()}
    hosts = [cfg.runtime.host, "localhost"]
    return provision(directory, cfg.security.federation, members, lambda _n: hosts, cfg.security.cert_days)


class _Watcher(threading.Thread):
    """Follows the cloud's progress stream into ``events``, reconnecting while it is not up.

    ``close()`` cancels the open stream and joins the thread, so no gRPC call or channel outlives
    the run (an RPC left blocking in a thread can hold up the interpreter's exit)."""

    def __init__(self, cloud_addr: str, security: Security) -> None:
        super().__init__(name="hffm-watch", daemon=True)
        self.cloud_addr = cloud_addr
        self.security = security
        self.events: queue.Queue = queue.Queue()
        self._stop_ev = threading.Event()
        self._lock = threading.Lock()
        self._call = None

    def run(self) -> None:
        from services.rpc import pb, pb_grpc

        # The cloud is still importing when this starts: retry the connection every 0.1-0.5 s, not
        # with gRPC's default backoff (1 s growing 1.6x), which a short run can end inside.
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        with self.security.channel(self.cloud_addr, CLOUD, opts) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            while True:
                with self._lock:  # close() sets the stop and cancels the call under this lock
                    if self._stop_ev.is_set():
                        return
                    self._call = stub.Watch(
                        pb.WatchRequest(), wait_for_ready=True, timeout=3600, metadata=self.security.call_metadata()
                    )
                try:
                    for ev in self._call:
                        self.events.put(ev)
                        if ev.phase in ("done", "failed"):
                            return
                except grpc.RpcError:
                    pass
                self._stop_ev.wait(0.3)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stop_ev.set()
            if self._call is not None:
                self._call.cancel()
        self.join(timeout_s)


def _follow(
    cfg: HFFMConfig,
    topo: Topology,
    cloud_addr: str,
    supervisor: Supervisor,
    view: RunView,
    deadline: float,
    security: Security,
) -> None:
    """Follow the run until the cloud reports its end, showing progress (the watcher reconnects to a
    restarted cloud); raise RunFailed when a process the run cannot do without is gone for good, the
    cloud reports failure or the time limit passes."""
    running = False  # every node registered: from then on a device process may be lost
    procs = supervisor.procs

    def check_children() -> None:
        supervisor.poll(running)

    watcher = _Watcher(cloud_addr, security)
    events = watcher.events
    watcher.start()
    heartbeat_s = float(os.environ.get("HFFM_HEARTBEAT_S", "30"))  # a line each time a round runs this long
    last_event = round_t0 = time.monotonic()
    round_now = 0
    try:
        with view.progress(len(topo.node_ids()), cfg.rounds) as show:
            while True:
                check_children()
                if time.monotonic() > deadline:
                    raise RunFailed("the run exceeded its time limit")
                now = time.monotonic()
                if running and now - last_event >= heartbeat_s:  # a long round (a real backbone) is not silent
                    view.round_running(round_now + 1, now - round_t0, [p.name for p in procs if p.popen.poll() is None])
                    last_event = now
                try:
                    ev = events.get(timeout=0.5)
                except queue.Empty:
                    if procs[0].popen.poll() == 0 and events.empty():
                        # check_children() raised for a failed cloud; exit 0 with the stream missed
                        # (a short run can end inside the channel's reconnect backoff): the results
                        # file, checked by the caller, says whether the run completed.
                        return
                    continue
                last_event = time.monotonic()
                if ev.phase == "round":
                    running = True
                    round_now, round_t0 = ev.round, last_event
                show(ev)
                if ev.phase == "done":
                    return
                if ev.phase == "failed":
                    raise RunFailed(f"the cloud reported failure: {ev.message}")
    finally:
        watcher.close()


def listen_address(run_dir: Path, node: str) -> str:
    """The address ``node`` of the run in ``run_dir`` listens on (its ``--listen``, from processes.json);
    ``ValueError`` when it is not one of the run's processes."""
    procs = dict((name, argv) for name, argv in json.loads((run_dir / "processes.json").read_text()))
    if node not in procs:
        raise ValueError(f"{node} is not a process of {run_dir}")
    argv = procs[node]
    return argv[argv.index("--listen") + 1]


def place_joiner(run_dir: Path, cfg: HFFMConfig, position: tuple[float, float]) -> str:
    """The id of a device joining the run in ``run_dir`` at ``position`` (m): the nearest edge by the
    run's geometry (the cloud's own draw: the same config and seed), the lowest free index there (above
    the config's devices, none that already joined: a log of that id in the run). ``ValueError``."""
    from hffm.costmodel import CostModel
    from hffm.ids import device_id, parse_node_id
    from services.common.bootstrap import topology

    edge = CostModel(cfg, topology(cfg)).locate(position)
    e = parse_node_id(edge).edge or 0
    i = cfg.topology.devices_per_edge
    while (run_dir / "logs" / f"{device_id(e, i)}.log").exists():
        i += 1
    return device_id(e, i)


def start_joiner(
    run_dir: Path, cfg: HFFMConfig, device: str, position: tuple[float, float] | None = None
) -> tuple[subprocess.Popen, str, str, Path]:
    """Start ``device`` (an id outside the run's starting table) joining the run in ``run_dir``
    (topology.joins), at ``position`` (m) when given: a certificate from the run's CA (when TLS is on
    and it has none), its edge's address from the run's processes, a device process that registers
    there. (process, edge, the edge's address, its log); ``ValueError`` names what is wrong."""
    from hffm.ids import edge_id, parse_node_id
    from hffm.pki import issue_in

    if not cfg.topology.joins:
        raise ValueError(f"{run_dir / 'config.yaml'}: topology.joins is false")
    nid = parse_node_id(device)
    if nid.role != "device":
        raise ValueError(f"{device!r} is not a device id")
    edge = edge_id(nid.edge or 0)
    upstream = listen_address(run_dir, edge)
    ca = Path(cfg.security.dir)
    if cfg.security.tls and not (ca / f"{device}.crt").is_file():
        hosts = [cfg.runtime.host, "localhost"]
        issue_in(ca, cfg.security.federation, "device", device, hosts, cfg.security.cert_days)
    log_path = run_dir / "logs" / f"{device}.log"
    cmd = [sys.executable, "-m", "services.device", "--config", str(run_dir / "config.yaml"),
           "--node", f"{device}={cfg.runtime.host}:0", "--upstream", f"{edge}={upstream}"]  # fmt: skip
    if position is not None:
        cmd += ["--position", f"{position[0]!r},{position[1]!r}"]
    with open(log_path, "ab") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
    return p, edge, upstream, log_path
