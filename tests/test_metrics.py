"""Metrics and dashboards proven against a real Prometheus scraping a real run.

Every panel of every dashboard in deploy/grafana/dashboards runs its PromQL through Prometheus'
HTTP API and must return data; bytes per link kind must equal results.json exactly and the modeled
energy to float tolerance; promtool checks the config, the rules and each service's /metrics."""

from __future__ import annotations

import io
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
from rich.console import Console

from hffm.config import load_config
from hffm.model import backbone_dims
from hffm.topology import Topology
from services.common.metrics import REJECT_REASONS
from services.launcher import (
    REPO_ROOT,
    Proc,
    _stop_all,
    free_ports,
    provision_pki,
    run,
    start_prometheus,
    write_prometheus_dir,
)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Debian's prometheus package (scripts/test.sh installs it)",
)

DASHBOARDS = sorted((REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
ROUNDS = 3


def _get(url: str, timeout: float = 10, context=None) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as r:  # noqa: S310 - loopback only
        return r.read()


def _client_tls(pki) -> ssl.SSLContext:
    """What a scraper needs for /metrics with security on: the CA, and a certificate of its own."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "prometheus.crt"), str(pki / "prometheus.key"))
    return ctx


def query(prom: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    doc = json.loads(_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode(params)))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(query function, results, one /metrics text per process, prometheus dir).

    Queries are evaluated at a moment after Prometheus scraped every process's final values and
    before the processes (lingering after the run) exit: after that their series go stale."""
    out = tmp_path_factory.mktemp("metrics")
    cfg = load_config(
        None,
        [
            "method=hfm-d2d",
            f"rounds={ROUNDS}",
            "e_agg=2",
            "topology.edges=2",
            "topology.devices_per_edge=2",
            "data.train_per_task=300",
            "data.global_test_per_task=60",
            "runtime.linger_s=15",
        ],
    )
    # the run's CA made up front, so Prometheus starts with the scraper's certificate (security on)
    pki = provision_pki(cfg, Topology.from_config(cfg, backbone_dims(cfg)[1]), out / "pki")
    cfg = cfg.model_copy(update={"security": cfg.security.model_copy(update={"dir": str(pki)})})
    prom_dir = write_prometheus_dir(out, [], pki)
    prom, url = start_prometheus(prom_dir, port=free_ports(1, "127.0.0.1")[0])
    tls = _client_tls(pki)
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(results=run(cfg, out, Console(file=io.StringIO()), 600)))
    t.start()
    scrapes: dict[str, str] = {}
    refused: dict[str, bool] = {}
    at = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and t.is_alive():
            if query(url, f"sum(hffm_rounds_completed_total) == {ROUNDS}"):
                time.sleep(5)  # two more scrape intervals: every process's final values are in
                at = time.time()
                targets = json.loads((prom_dir / "targets" / "hffm.json").read_text())
                for g in targets:
                    scrapes[g["labels"]["process"]] = _get(f"https://{g['targets'][0]}/metrics", 5, tls).decode()
                first = targets[0]["targets"][0]
                for ctx, name in ((ssl.create_default_context(cafile=str(pki / "ca.crt")), "no_client_cert"),):
                    try:
                        _get(f"https://{first}/metrics", 5, ctx)
                        refused[name] = False
                    except OSError:
                        refused[name] = True
                up = query(url, "up", at)
                assert len(up) == len(targets) and all(x["value"][1] == "1" for x in up), up
                break
            time.sleep(0.5)
        t.join(600)
        assert at is not None and "results" in box, "the run did not complete while Prometheus watched"
        yield SimpleNamespace(
            q=lambda expr: query(url, expr, at),
            results=box["results"],
            scrapes=scrapes,
            prom_dir=prom_dir,
            url=url,
            at=at,
            out=out,
            refused=refused,
        )
    finally:
        _stop_all([Proc("prometheus", prom, prom_dir / "prometheus.log")])


def test_metrics_are_served_over_tls_to_certified_scrapers_only(scraped):
    """Prometheus scraped every process over HTTPS with the run's scraper certificate (up == 1 for
    each); a client without a certificate of the federation is refused."""
    assert scraped.refused == {"no_client_cert": True}
    prom_cfg = (scraped.prom_dir / "prometheus.yml").read_text()
    assert "scheme: https" in prom_cfg and "prometheus.crt" in prom_cfg


def _panels():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$node", ".*").replace("$method", ".*")


def test_dashboards_exist_and_are_valid_grafana_json():
    assert {p.name for p in DASHBOARDS} == {"hffm-run.json", "hffm-table1.json"}
    for p in DASHBOARDS:
        d = json.loads(p.read_text())
        assert d["uid"] and d["panels"] and all(t["expr"] for pn in d["panels"] for t in pn["targets"])
        names = {v["name"] for v in d["templating"]["list"]}
        assert "method" in names


@pytest.mark.parametrize("dashboard, title, expr", list(_panels()), ids=lambda x: str(x)[:40])
def test_every_panel_returns_data(scraped, dashboard, title, expr):
    result = scraped.q(_substitute(expr))
    assert result, f"{dashboard} / {title}: no data for {expr}"


def test_variables_queries_resolve(scraped):
    q = scraped.q
    for p in DASHBOARDS:
        for v in json.loads(p.read_text())["templating"]["list"]:
            m = re.match(r"label_values\((\w+), (\w+)\)", v["query"]["query"])
            assert m, v
            assert {x["metric"].get(m.group(2)) for x in q(m.group(1))} - {None}, v


def test_bytes_per_link_equal_results_exactly(scraped):
    q, results = scraped.q, scraped.results
    want = {"device_edge": 0, "edge_cloud": 0, "device_cloud": 0, "d2d": 0}
    for r in results["rounds"]:
        for k, v in r["bytes_by_link"].items():
            want[k] += v
    got = {x["metric"]["link"]: int(float(x["value"][1])) for x in q("sum by (link) (hffm_bytes_sent_total)")}
    assert got.get("uplink", 0) + got.get("downlink", 0) == want["device_edge"]
    assert got.get("backhaul", 0) == want["edge_cloud"]
    assert got.get("d2d", 0) == want["d2d"] > 0
    assert got.get("device_cloud", 0) == want["device_cloud"]
    # every accepted or relayed byte was also received somewhere
    recv = sum(float(x["value"][1]) for x in q("sum(hffm_bytes_received_total)"))
    assert recv == sum(want.values())


def test_modeled_energy_and_rounds_agree_with_results(scraped):
    q, results = scraped.q, scraped.results
    energy = float(q("sum(hffm_modeled_energy_joules_total)")[0]["value"][1])
    assert energy == pytest.approx(sum(r["modeled"]["energy_j"] for r in results["rounds"]), rel=1e-9)
    last = results["rounds"][-1]
    lat = float(q('hffm_round_modeled_latency_seconds{method="hfm-d2d"}')[0]["value"][1])
    assert lat == pytest.approx(last["modeled"]["latency_s"], rel=1e-9)
    for x in q("hffm_round_accuracy"):
        m = x["metric"]
        assert float(x["value"][1]) == pytest.approx(last["accuracy"][m["task"]][m["split"]])
    heads = {x["metric"]["edge"]: x["metric"]["head"] for x in q("hffm_cluster_head == 1")}
    assert heads == last["modeled"]["heads"]


def test_checkpoint_bytes_count_what_was_written_once(scraped):
    """Every node saved every round end; the bytes each wrote are at most its round ends' files, and
    together less: nodes ending a round with the same modules (a cluster after its edge's broadcast, every
    node after a cloud round) share one file (hffm.persist)."""
    q, state = scraped.q, scraped.out / "state"
    saves = {x["metric"]["node"]: float(x["value"][1]) for x in q("hffm_checkpoints_total")}
    written = {x["metric"]["node"]: float(x["value"][1]) for x in q("hffm_checkpoint_bytes_written_total")}
    assert set(written) == set(saves) and set(saves) >= {"cloud", "edge-0", "device-1-1"}
    assert all(n == ROUNDS for n in saves.values())
    size = {n: (state / n / f"round-{ROUNDS}-attempt-0" / "modules.safetensors").stat().st_size for n in saves}
    assert all(0 <= written[n] <= saves[n] * size[n] for n in saves)
    assert 0 < sum(written.values()) < 0.75 * sum(saves[n] * size[n] for n in saves)
    files = list(state.glob(f"*/round-{ROUNDS}-attempt-0/modules.safetensors"))
    assert len({f.stat().st_ino for f in files}) < len(files)  # the last round end: shared files


def test_promtool_checks(scraped):
    scrapes, prom_dir = scraped.scrapes, scraped.prom_dir
    assert {"cloud", "edge-0", "edge-1"} <= set(scrapes) and any(k.startswith("device") for k in scrapes)
    r = subprocess.run(
        ["promtool", "check", "config", str(prom_dir / "prometheus.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        ["promtool", "check", "rules", str(REPO_ROOT / "deploy" / "prometheus" / "rules.yml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for name, text in scrapes.items():
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"


def test_labels_are_bounded(scraped):
    for text in scraped.scrapes.values():
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            assert "round=" not in line and "sha256" not in line and "push_id" not in line, line


def test_every_rejection_reason_is_preinitialised():
    src = "\n".join(p.read_text() for p in [*REPO_ROOT.glob("hffm/*.py"), *REPO_ROOT.glob("services/**/*.py")])
    reasons = set(re.findall(r'ModuleError\(\s*"[A-Z_]+",\s*"([a-z_]+)"', src))
    # not_allowed: refused before a push is read, counted in hffm_rpc_denied_total (reason label); the
    # others fail a node's round, not a push (an assignment, a collect below quorum, a sender's push)
    rounds = {"bad_step", "bad_task", "missing_module", "no_base_state", "quorum_lost", "push_failed"}
    specialist = {"not_held", "bad_module"}  # Specialist.Serve/Validate refusals, in the cloud's review
    # Coordinator.ReportSwitch refusals: a taker's report that proves nothing, answered to the taker
    specialist |= {"no_specialists", "no_signatures", "not_the_receiver", "not_a_relay", "not_pinned", "as_examined"}
    assert reasons - {*rounds, *specialist, "not_allowed"} <= set(REJECT_REASONS)


def test_report_from_prometheus_draws_every_panel(scraped, tmp_path):
    from hffm.report import from_prometheus

    start = scraped.at - 120
    drawn = from_prometheus(scraped.url, start, scraped.at, tmp_path, step_s=2.0)
    assert set(drawn) == {"hffm-run", "hffm-table1"}
    for uid, counts in drawn.items():
        assert all(n > 0 for n in counts.values()), (uid, counts)
        assert (tmp_path / f"report-{uid}.png").stat().st_size > 20_000


def test_report_from_results(scraped, tmp_path):
    from typer.testing import CliRunner

    from hffm_cli.main import app

    r = CliRunner().invoke(app, ["report", "--out", str(tmp_path), "--results", str(scraped.out / "results.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report-run.png").stat().st_size > 20_000
    assert (tmp_path / "report-table1.png").stat().st_size > 10_000
    keys = {k for r in scraped.results["rounds"] for k in r["modeled"]["by_tier_link"]}
    assert keys >= {"device/d2d", "device/compute", "edge/backhaul", "cloud/backhaul", "device/uplink"}
    assert sum(sum(r["modeled"]["by_tier_link"].values()) for r in scraped.results["rounds"]) == pytest.approx(
        sum(r["modeled"]["energy_j"] for r in scraped.results["rounds"])
    )
    bad = CliRunner().invoke(app, ["report", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--results or --prometheus" in bad.output
