"""The docker compose testbed with real containers: dockerd (started here when it is not running),
the image built offline, a small topology run to completion with `up -d` while an edge container
crashes mid-run (Docker restarts it; it rejoins from its state volume), results checked in the mounted
directory, Prometheus seen scraping every container; always torn down.
Traffic stays on the containers' own network (and Prometheus' port published on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from hffm.config import load_config
from hffm.deploy import compose_spec, prometheus_static_config
from hffm.topology import CLOUD, Topology
from services.launcher import REPO_ROOT, free_ports

COMPOSE = shutil.which("docker-compose")
TIME_LIMIT_S = 900


def _sh(*cmd: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _docker_ready() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    )


@pytest.fixture(scope="module")
def docker():
    if shutil.which("docker") is None or COMPOSE is None:
        pytest.skip(
            "needs docker and docker-compose (scripts/system-deps.sh installs Debian's docker.io, docker-compose)"
        )
    if not _docker_ready():
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            pytest.skip("dockerd is not running and cannot be started here (needs root and dockerd)")
        log = open("/tmp/hffm-dockerd.log", "ab")
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _docker_ready():
            if time.monotonic() > deadline:
                pytest.fail("dockerd did not start; see /tmp/hffm-dockerd.log")
            time.sleep(1)
    return True


@pytest.fixture(scope="module")
def image(docker):
    """hffm:latest built offline: local base image, wheels prepared on the host."""
    if (
        shutil.which("debootstrap") is None
        and subprocess.run(["docker", "image", "inspect", "hffm-base:bookworm"], capture_output=True).returncode != 0
    ):
        pytest.skip("needs debootstrap to make the base image (no registry here)")
    _sh("bash", "deploy/make-base-image.sh", timeout=900)
    _sh("bash", "deploy/prepare-wheels.sh", timeout=900)
    t0 = time.monotonic()
    _build(timeout=1200)
    return time.monotonic() - t0


def _build(timeout: float) -> subprocess.CompletedProcess:
    return _sh(
        "docker",
        "build",
        "-f",
        "deploy/Dockerfile",
        "--build-arg",
        "BASE_IMAGE=hffm-base:bookworm",
        "-t",
        "hffm:latest",
        ".",
        timeout=timeout,
    )


def test_rebuild_reuses_the_cache(image):
    t0 = time.monotonic()
    r = _build(timeout=600)
    out = r.stdout + r.stderr
    assert "Using cache" in out or "CACHED" in out, out[-2000:]  # the dependency layer is reused
    assert time.monotonic() - t0 < 120


def test_image_runs_non_root_with_a_grpc_healthcheck(image):
    info = json.loads(_sh("docker", "image", "inspect", "hffm:latest").stdout)[0]["Config"]
    assert info["User"] == "hffm"
    assert "services.healthcheck" in " ".join(info["Healthcheck"]["Test"])


def test_committed_compose_file_matches_its_config():
    cfg = load_config(REPO_ROOT / "configs" / "compose.yaml")
    topo = Topology.from_config(cfg, cfg.model.num_layers)
    want = compose_spec(
        cfg,
        topo,
        repo=REPO_ROOT,
        compose_dir=REPO_ROOT,
        config_path=REPO_ROOT / "configs" / "compose.yaml",
        prometheus_config=REPO_ROOT / "deploy" / "prometheus" / "compose.yml",
        results_dir="./runs/compose",
        pki_dir=REPO_ROOT / "build" / "compose-pki",
    )
    assert yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text()) == want
    assert yaml.safe_load(
        (REPO_ROOT / "deploy" / "prometheus" / "compose.yml").read_text()
    ) == prometheus_static_config(topo, tls=True)
    # security on: each container mounts its own key alone
    dev = want["services"]["device-0-1"]
    keys = [v for v in dev["volumes"] if v.split(":")[0].endswith(".key")]
    assert keys == ["./build/compose-pki/device-0-1.key:/etc/hffm/pki/device-0-1.key:ro"]
    assert "HFFM_SET=security.dir=/etc/hffm/pki" in dev["environment"]
    nodes = [n for n in want["services"] if n not in ("prometheus", "grafana")]
    assert len(nodes) == 1 + cfg.topology.edges * (1 + cfg.topology.devices_per_edge)


def _prom(url: str, expr: str) -> list[dict]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=3) as r:
            return json.loads(r.read())["data"]["result"]
    except OSError:
        return []


def _rounds(results) -> int:
    try:
        return len(json.loads((results / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_compose_testbed_survives_a_crashed_edge_and_runs_to_completion(image, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)  # the containers write as uid 1000
    compose_file = tmp_path / "docker-compose.yml"
    _sh(
        str(REPO_ROOT / ".venv" / "bin" / "hffm"),
        "compose",
        "--config",
        "configs/compose.yaml",
        "--out",
        str(compose_file),
        "--prometheus-out",
        str(tmp_path / "prometheus.yml"),
        "--results-dir",
        str(results),
    )
    project = f"hffmtest{os.getpid()}"
    port = free_ports(1, "127.0.0.1")[0]
    env = {**os.environ, "HFFM_PROMETHEUS_PORT": str(port)}
    base = [COMPOSE, "-f", str(compose_file), "-p", project]
    _sh(*base, "config", "-q", env=env)
    cfg = load_config(REPO_ROOT / "configs" / "compose.yaml")
    n_nodes = 1 + cfg.topology.edges * (1 + cfg.topology.devices_per_edge)
    _sh(*base, "up", "-d", env=env, timeout=300)
    seen_up: set[str] = set()
    killed_pid = None
    try:
        cloud = _sh(*base, "ps", "-q", CLOUD, env=env).stdout.strip()
        edge = _sh(*base, "ps", "-q", "edge-1", env=env).stdout.strip()
        deadline = time.monotonic() + TIME_LIMIT_S
        while time.monotonic() < deadline:
            for x in _prom(f"http://127.0.0.1:{port}", 'up{job="hffm"} == 1'):
                seen_up.add(x["metric"]["process"])
            if killed_pid is None and _rounds(results) >= 1:
                # A crash: SIGKILL to the container's process from the host. (`docker kill` is an
                # operator's stop, which Docker never restarts whatever the restart policy.)
                killed_pid = int(_sh("docker", "inspect", "-f", "{{.State.Pid}}", edge).stdout)
                os.kill(killed_pid, signal.SIGKILL)
            state = _sh("docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", cloud).stdout.split()
            if state[0] == "exited":
                break
            time.sleep(1)
        else:
            pytest.fail(
                f"the testbed did not finish in {TIME_LIMIT_S}s:\n"
                + _sh(*base, "logs", "--tail", "30", check=False, env=env).stdout
            )
        logs = _sh(*base, "logs", "--tail", "40", CLOUD, "edge-1", check=False, env=env).stdout
        assert state == ["exited", "0"], logs[-4000:]
        assert killed_pid is not None, "the run ended before edge-1 could be killed"
        restarts = int(_sh("docker", "inspect", "-f", "{{.RestartCount}}", edge).stdout)
        assert restarts >= 1, logs[-4000:]  # Docker restarted the crashed edge (restart: on-failure)
    finally:
        _sh(*base, "down", "-v", "--remove-orphans", check=False, env=env, timeout=300)
    # Prometheus scraped every node container
    assert len(seen_up) == n_nodes, sorted(seen_up)
    res = json.loads((results / "results.json").read_text())
    assert res["complete"] and len(res["rounds"]) == cfg.rounds
    # the edge's crash shows: an attempt re-run, its cluster sitting a round out while it restarted, or
    # (lost between its steps) the edge left out of a round it had nothing left to do in
    assert any(r["aborted"] or "edge-1" in r["left_out"] or "edge-1" in r["lost"] for r in res["rounds"]), [
        (r["round"], r["aborted"], r["left_out"], r["lost"]) for r in res["rounds"]
    ]
    assert set(res["nodes"]) == {"cloud", "edge-0", "edge-1", "device-0-0", "device-0-1", "device-1-0", "device-1-1"}
    assert all(addr == f"{n}:50051" for n, addr in res["nodes"].items())  # reached by container name
    origins = {h["origin"] for r in res["rounds"] for h in r["hops"]}
    devices = {n for n in res["nodes"] if n.startswith("device")}
    assert devices <= origins  # every device trained and sent its modules (heads included)
    for r in res["rounds"]:
        assert r["train_samples"] > 0
        assert any(
            h["link"] == "d2d" and h["sender"].startswith("device") and h["receiver"].startswith("device")
            for h in r["hops"]
        )  # D2D hops between device containers
        assert (r["bytes_by_link"]["edge_cloud"] > 0) == (r["round"] % cfg.e_agg == 0)  # edges <-> cloud
    assert (results / "global_modules.safetensors").stat().st_size > 0
    assert (
        subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        == ""
    )
