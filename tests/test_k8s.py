"""Kubernetes manifests proven offline: `kubectl kustomize` renders each overlay and every object
validates against the Kubernetes schema of a pinned version (kubernetes-validate); the credentials a
pod mounts (from `hffm pki k8s` Secrets, or in cert-manager's csi-driver layout) are materialised as
the kubelet would and carry real mTLS links, the exec health probe and an HTTPS scrape."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from hffm.config import load_config
from services.launcher import REPO_ROOT

K8S_VERSION = "1.30.0"  # pinned schema version
OVERLAYS = ("cpu", "gpu", "cert-manager")
CONFIG = REPO_ROOT / "configs" / "k8s.yaml"


def render(overlay: str | Path) -> list[dict]:
    """What `kubectl apply -k` applies: kustomize with its default load restrictor (files only from
    inside each kustomization)."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize); scripts/system-deps.sh installs it")
    path = overlay if isinstance(overlay, Path) else REPO_ROOT / "deploy" / "k8s" / "overlays" / overlay
    r = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _by_kind(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    crds = ["Certificate", "Issuer"] if overlay == "cert-manager" else []
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "Service", "StatefulSet"] + crds
    )
    assert Path(CONFIG).resolve() == REPO_ROOT / "deploy" / "k8s" / "base" / "config.yaml"  # one file, linked
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: no upstream schema
            ep = d["spec"]["endpoints"][0]
            assert ep["port"] == "metrics" and d["spec"]["selector"]["matchLabels"]
            continue
        if d["apiVersion"].startswith("cert-manager.io/"):  # CRDs: checked in test_cert_manager_overlay
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        assert d["metadata"].get("namespace", "hffm") == "hffm"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topology_config_and_identity_match(overlay):
    """Every pod's name is its node id: the cloud's hostname, StatefulSet edge's pods edge-<e>, and one
    StatefulSet device-<e> per edge whose pods are device-<e>-<i>; the config's topology is the manifests'."""
    docs = render(overlay)
    cfg_text = CONFIG.read_text()
    cm = _by_kind(docs, "ConfigMap")[0]
    assert cm["data"]["config.yaml"] == cfg_text  # the ConfigMap is the config file itself
    cfg = load_config(CONFIG)
    assert not cfg.runtime.exit_after_run  # finished pods stay up rather than restarting a run
    assert cfg.security.tls and cfg.security.dir == "/etc/hffm-tls"
    assert _by_kind(docs, "StatefulSet", "edge")[0]["spec"]["replicas"] == cfg.topology.edges
    device_sets = [d for d in _by_kind(docs, "StatefulSet") if d["metadata"]["name"] != "edge"]
    pods = {f"{d['metadata']['name']}-{k}" for d in device_sets for k in range(d["spec"]["replicas"])}
    assert pods == {f"device-{e}-{i}" for e in range(cfg.topology.edges) for i in range(cfg.topology.devices_per_edge)}
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in device_sets]
    assert len(set(selectors)) == len(selectors)  # no two StatefulSets claim each other's pods
    for d in device_sets:
        assert d["spec"]["serviceName"] == "device"
    cloud = _by_kind(docs, "Deployment", "cloud")[0]["spec"]["template"]["spec"]
    assert cloud["hostname"] == "cloud" and cloud["subdomain"] == "cloud"
    for name in ("cloud", "edge", "device"):
        svc = _by_kind(docs, "Service", name)[0]
        assert svc["spec"]["clusterIP"] == "None"  # headless: <id>.<tier> reaches a pod (D2D, scraping)


def test_committed_device_statefulsets_are_generated_from_the_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_devices", REPO_ROOT / "deploy" / "k8s" / "make_devices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = (REPO_ROOT / "deploy" / "k8s" / "base" / "devices.yaml").read_text()
    assert committed == mod.render(CONFIG), "run: python deploy/k8s/make_devices.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_resources_metrics_and_results(overlay):
    docs = render(overlay)
    workloads = _by_kind(docs, "Deployment") + _by_kind(docs, "StatefulSet")
    cfg = load_config(CONFIG)
    assert len(workloads) == 2 + cfg.topology.edges
    for w in workloads:
        pod = w["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for c in pod["spec"]["containers"]:
            # kubelet's grpc probe has no client certificate: the probe dials the node as itself
            for probe in (c["readinessProbe"], c["livenessProbe"]):
                assert probe["exec"]["command"] == ["python", "-m", "services.healthcheck", "127.0.0.1:50051"]
            env = {e["name"]: e for e in c["env"]}
            assert env["HFFM_CONFIG"]["value"] == "/etc/hffm/config.yaml" and "HFFM_ID" in env
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["image"] == ("hffm:gpu" if overlay == "gpu" else "hffm:latest")
    cloud = _by_kind(docs, "Deployment", "cloud")[0]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in cloud["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["hffm-results"] + (["hffm-data"] if overlay == "gpu" else [])
    assert _by_kind(docs, "PersistentVolumeClaim", "hffm-results")
    if overlay == "gpu":  # the checkpoint and real data sets: one read-only volume at /data in every pod
        assert _by_kind(docs, "PersistentVolumeClaim", "hffm-data")[0]["spec"]["accessModes"] == ["ReadOnlyMany"]
        for w in workloads:
            c = w["spec"]["template"]["spec"]["containers"][0]
            assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"]
            sets = next(e["value"] for e in c["env"] if e["name"] == "HFFM_SET").split(";")
            assert "model.backbone=/data/vilt-b32-mlm" in sets
    device = _by_kind(docs, "StatefulSet", "device-0")[0]["spec"]["template"]["spec"]
    limits = device["containers"][0]["resources"]["limits"]
    env = {e["name"] for e in device["containers"][0]["env"]}
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1" and device["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"HFFM_ID", "HFFM_SET"} <= env
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in device
        assert env == {"HFFM_ID", "HFFM_CONFIG", "HFFM_STATE_DIR"}
    # every edge and device pod keeps its round ends on a claim of its own (a StatefulSet's template)
    for sts in _by_kind(docs, "StatefulSet"):
        assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["state"]
        c = sts["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "state", "mountPath": "/state"} in c["volumeMounts"]
        assert {"name": "HFFM_STATE_DIR", "value": "/state"} in c["env"]


COMPONENTS = REPO_ROOT / "deploy" / "k8s" / "components"


def _with_components(tmp_path: Path, overlay: str, *components: str) -> list[dict]:
    """An overlay as an operator writes one: an existing overlay plus optional components."""
    import os

    rel = Path(os.path.relpath(REPO_ROOT / "deploy" / "k8s", tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(rel / "overlays" / overlay)],
                "components": [str(rel / "components" / c) for c in components],
            }
        )
    )
    return render(tmp_path)


def test_optional_components_servicemonitor_prometheus_and_dashboards(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _with_components(tmp_path, "cpu", "servicemonitor", "monitoring")
    for d in docs:
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "hffm", d["metadata"]
        if d["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: no upstream schema
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    monitor = _by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert monitor["port"] == "metrics" and monitor["scheme"] == "https"
    assert monitor["tlsConfig"]["cert"]["secret"]["name"] == monitor["tlsConfig"]["keySecret"]["name"]
    # the in-cluster Prometheus: its config is the component's file, its credentials hffm pki k8s's Secrets
    from hffm.deploy import K8S_CA_SECRET, K8S_SCRAPER_SECRET

    (cm,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("hffm-prometheus-config")]
    assert cm["data"]["prometheus.yml"] == (COMPONENTS / "monitoring" / "prometheus.yml").read_text()
    prom = _by_kind(docs, "Deployment", "hffm-prometheus")[0]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in prom["volumes"] if "secret" in v}
    assert secrets == {K8S_CA_SECRET, K8S_SCRAPER_SECRET} and prom["serviceAccountName"] == "hffm-prometheus"
    # the Grafana sidecar's ConfigMaps hold exactly the dashboards tests/test_metrics.py proves
    boards = {
        k: v for d in _by_kind(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for k, v in d["data"].items()
    }  # fmt: skip
    on_disk = {p.name: p.read_text() for p in (REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")}
    assert boards == on_disk
    (ds,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_datasource")]
    source = yaml.safe_load(ds["data"]["hffm-datasource.yaml"])["datasources"][0]
    assert source["url"] == "http://hffm-prometheus:9090" and source["uid"] == "prometheus"
    # the base alone carries no CRD: a cluster without the Prometheus Operator accepts it
    assert not _by_kind(render("cpu"), "ServiceMonitor")


def test_in_cluster_prometheus_rewrites_each_pod_to_its_certificate_name(tmp_path, pki_dir):
    """The monitoring component's relabelling run by a real Prometheus: pods as Kubernetes service
    discovery gives them (here from a file: Debian's Prometheus is built without the Kubernetes SD),
    targets at <node>.<service>.hffm.svc:9100 over HTTPS, the cloud's Deployment pod as `cloud`, pods
    without the scrape annotation dropped."""
    import json
    import urllib.request

    from services.launcher import Proc, _stop_all, free_ports, start_prometheus

    if shutil.which("prometheus") is None:
        pytest.skip("needs Debian's prometheus; scripts/system-deps.sh installs it")
    cfg = yaml.safe_load((COMPONENTS / "monitoring" / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    job["tls_config"] = {
        "ca_file": str(pki_dir / "ca.crt"),
        "cert_file": str(pki_dir / "cloud.crt"),
        "key_file": str(pki_dir / "cloud.key"),
    }
    job.pop("kubernetes_sd_configs")
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]

    def pod(name: str, app: str, scrape: str = "true") -> dict:
        return {
            "targets": [f"10.0.0.{len(name)}:9100"],
            "labels": {
                "__meta_kubernetes_pod_name": name,
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
                "__meta_kubernetes_namespace": "hffm",
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
            },
        }

    pods = [pod("cloud-7d9f8b6c5d-x2x4q", "cloud"), pod("edge-1", "edge"), pod("device-1-2", "device")]
    (tmp_path / "pods.json").write_text(json.dumps([*pods, pod("busybox", "other", "false")]))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom, url = start_prometheus(tmp_path, port=free_ports(1, "127.0.0.1")[0])
    try:
        deadline = time.monotonic() + 30
        got: dict = {}
        while time.monotonic() < deadline and len(got) < 3:
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as r:  # noqa: S310 - loopback
                active = json.loads(r.read())["data"]["activeTargets"]
            got = {t["labels"]["process"]: t["scrapeUrl"] for t in active}
            time.sleep(0.5)
    finally:
        _stop_all([Proc("prometheus", prom, tmp_path / "prometheus.log")])
    assert got == {
        "cloud": "https://cloud.cloud.hffm.svc:9100/metrics",
        "edge-1": "https://edge-1.edge.hffm.svc:9100/metrics",
        "device-1-2": "https://device-1-2.device.hffm.svc:9100/metrics",
    }


def test_device_entry_point_takes_its_identity_from_the_pod_name():
    import argparse

    from services.common.bootstrap import topology
    from services.device.__main__ import _from_pod_name

    topo = topology(load_config(CONFIG))
    nodes, ups, adv = _from_pod_name(argparse.Namespace(pod_name="device-3-1", peer_domain=""), topo)
    assert nodes == {"device-3-1": "0.0.0.0:50051"}
    assert ups == {"edge-3": "edge-3.edge:50051"}
    assert adv == {"device-3-1": "device-3-1.device:50051"}
    with pytest.raises(SystemExit, match="not a device of this topology"):
        _from_pod_name(argparse.Namespace(pod_name="device-13", peer_domain=""), topo)


# ---- credentials, as a pod sees them -------------------------------------------------------------
def _pod(docs: list[dict], workload: str) -> tuple[dict, dict]:
    w = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == workload][0]
    spec = w["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def _env(container: dict, pod_name: str) -> dict[str, str]:
    out = {}
    for e in container["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
            out[e["name"]] = pod_name
    return out


def materialise(docs: list[dict], secrets: list[dict], workload: str, pod_name: str, root: Path) -> Path:
    """What the kubelet puts at security.dir in pod ``pod_name`` of ``workload``: each secret volume
    mount under it, with ``subPath``/``subPathExpr`` resolved from the container's environment."""
    import base64
    import re

    from hffm.deploy import K8S_TLS_DIR

    spec, c = _pod(docs, workload)
    env = _env(c, pod_name)
    volumes = {v["name"]: v for v in spec["volumes"]}
    data = {s["metadata"]["name"]: s["data"] for s in secrets}
    out = root / pod_name
    out.mkdir(parents=True)
    for m in c["volumeMounts"]:
        if not m["mountPath"].startswith(K8S_TLS_DIR + "/"):
            continue
        sub = m.get("subPath") or re.sub(r"\$\((\w+)\)", lambda g: env[g.group(1)], m["subPathExpr"])
        secret = volumes[m["name"]]["secret"]["secretName"]
        (out / Path(m["mountPath"]).name).write_bytes(base64.b64decode(data[secret][sub]))
    return out


@pytest.fixture(scope="module")
def k8s_creds(tmp_path_factory):
    """The cpu overlay, and the Secrets `hffm pki k8s` makes for it (every node of configs/k8s.yaml)."""
    from hffm.deploy import k8s_secrets, provision_k8s_pki
    from services.common.bootstrap import topology

    cfg = load_config(CONFIG)
    topo = topology(cfg)
    d = provision_k8s_pki(cfg, topo, tmp_path_factory.mktemp("k8s-pki"))
    return render("cpu"), k8s_secrets(topo, d), cfg


def _health_server(cfg, name: str, creds_dir: Path):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from services.common.security import Security

    sec = Security(cfg.security.model_copy(update={"dir": str(creds_dir)}), name)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = sec.add_port(server, "127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _check(cfg, name: str, creds_dir: Path, addr: str, target: str):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.security import Security

    sec = Security(cfg.security.model_copy(update={"dir": str(creds_dir)}), name)
    with sec.channel(addr, target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_each_pod_mounts_its_own_credentials_alone_and_they_carry_mtls(k8s_creds, tmp_path):
    """From the rendered manifests and the Secrets: device-3-1's pod gets its own key (no other node's),
    and with it dials edge-3's pod over mTLS; a pod's files are its identity, not another's."""
    import grpc

    from hffm.pki import NodeCredentials

    docs, secrets, cfg = k8s_creds
    dev = materialise(docs, secrets, "device-3", "device-3-1", tmp_path)
    edge = materialise(docs, secrets, "edge", "edge-3", tmp_path)
    cloud = materialise(docs, secrets, "cloud", "cloud-7d9f8-x2x1q", tmp_path)  # a Deployment's pod name
    assert sorted(p.name for p in dev.iterdir()) == ["ca.crt", "crl.pem", "node.crt", "node.key"]
    for d, ident in ((dev, "device-3-1"), (edge, "edge-3"), (cloud, "cloud")):
        assert NodeCredentials.from_files(d / "ca.crt", d / "node.key", d / "node.crt").identity.id == ident
    device_secret = [s for s in secrets if s["metadata"]["name"] == "hffm-tls-device"][0]
    assert len(device_secret["data"]) == 2 * cfg.topology.edges * cfg.topology.devices_per_edge
    server, addr = _health_server(cfg, "edge-3", edge)
    try:
        assert _check(cfg, "device-3-1", dev, addr, "edge-3").status == 1  # SERVING
        with pytest.raises(grpc.RpcError):  # the server is edge-3, not edge-4: the client refuses it
            _check(cfg, "device-3-1", dev, addr, "edge-4")
    finally:
        server.stop(None)


def test_the_exec_probe_and_an_https_scrape_work_with_a_pods_mounts(k8s_creds, tmp_path):
    """The probe command of the manifests, run with the pod's environment, reports SERVING; Prometheus,
    with the scraper's Secret, scrapes /metrics at the name the ServiceMonitor rewrites the target to
    (<id>.<tier>.hffm.svc), and a client without a certificate gets nothing."""
    import base64
    import socket
    import ssl
    import subprocess
    import sys

    from hffm.config import dump_config
    from services.common.bootstrap import credential_paths
    from services.common.metrics import Metrics

    docs, secrets, cfg = k8s_creds
    edge = materialise(docs, secrets, "edge", "edge-3", tmp_path)
    server, addr = _health_server(cfg, "edge-3", edge)
    _, c = _pod(docs, "edge")
    env = _env(c, "edge-3")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    probe = c["readinessProbe"]["exec"]["command"]
    env.update(HFFM_CONFIG=str(cfg_file), HFFM_SET=f"security.dir={edge}", PATH="/usr/bin:/bin")
    try:
        r = subprocess.run(
            [sys.executable, *probe[1:-1], addr], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
        assert r.returncode == 0 and "SERVING" in r.stdout, r.stdout + r.stderr
    finally:
        server.stop(None)

    port = Metrics().serve(0, "127.0.0.1", {k: str(v) for k, v in credential_paths(edge, "edge-3").items()})
    scraper = {s["metadata"]["name"]: s["data"] for s in secrets}["hffm-tls-prometheus"]
    (tmp_path / "s.crt").write_bytes(base64.b64decode(scraper["tls.crt"]))
    (tmp_path / "s.key").write_bytes(base64.b64decode(scraper["tls.key"]))
    ctx = ssl.create_default_context(cafile=str(edge / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="edge-3.edge.hffm.svc") as tls:
            tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: edge-3.edge.hffm.svc\r\n\r\n")
            body = b"".join(iter(lambda: tls.recv(65536), b""))
    assert body.startswith(b"HTTP/1.0 200") and b"hffm_" in body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # the pod's IP is not its name
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="10.1.2.3")
    bare = ssl.create_default_context(cafile=str(edge / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # no client certificate
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            with bare.wrap_socket(raw, server_hostname="edge-3.edge.hffm.svc") as tls:
                tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                assert not tls.recv(65536)


def test_cert_manager_overlay_issues_the_identities_hffm_checks(tmp_path):
    """The csi-driver volume of each tier asks for exactly the names hffm checks (the identity URI of
    the pod's node, its id and pod DNS names); base Secret mounts are gone; the Issuer is the
    federation's CA and the scraper's Certificate lands in the Secret the ServiceMonitor reads. A
    certificate shaped like csi-driver's (SEC1 key, ca.crt/node.crt/node.key, no CRL) carries mTLS."""
    from cryptography.hazmat.primitives import serialization

    from hffm.deploy import K8S_CA_KEYPAIR_SECRET, K8S_SCRAPER_SECRET, K8S_TLS_DIR, k8s_hosts
    from hffm.pki import SCRAPER, Identity, issue, load_key, make_ca, write_node_files

    docs = render("cert-manager")
    cfg = load_config(CONFIG)
    fed = cfg.security.federation
    for workload, role, pod in (
        ("cloud", "cloud", "cloud-5c4f-abcde"),
        ("edge", "edge", "edge-2"),
        ("device-2", "device", "device-2-3"),
    ):
        spec, c = _pod(docs, workload)
        node = "cloud" if role == "cloud" else pod
        assert [m for m in c["volumeMounts"] if m["mountPath"].startswith(K8S_TLS_DIR)] == [
            {"name": "certs", "mountPath": K8S_TLS_DIR, "readOnly": True}
        ]
        assert {v["name"] for v in spec["volumes"]} & {"ca", "tls"} == set()
        attrs = {
            k.split("/")[1]: v for v in spec["volumes"] if "csi" in v for k, v in v["csi"]["volumeAttributes"].items()
        }

        def sub(v: str, pod: str = pod) -> str:
            return v.replace("${POD_NAME}", pod).replace("${POD_NAMESPACE}", "hffm")

        assert sub(attrs["uri-sans"]) == Identity(fed, role, node).uri
        assert sub(attrs["dns-names"]).split(",") == k8s_hosts(node, role)
        assert (attrs["ca-file"], attrs["certificate-file"], attrs["privatekey-file"]) == (
            "ca.crt",
            "node.crt",
            "node.key",
        )
        assert (attrs["key-algorithm"], attrs["key-size"]) == ("ECDSA", "256")  # hffm's node keys are P-256
        assert {"server auth", "client auth"} <= set(attrs["key-usages"].split(","))
    issuer = _by_kind(docs, "Issuer")[0]
    assert issuer["spec"]["ca"]["secretName"] == K8S_CA_KEYPAIR_SECRET
    cert = _by_kind(docs, "Certificate")[0]["spec"]
    assert cert["secretName"] == K8S_SCRAPER_SECRET and cert["uris"] == [Identity(fed, "operator", SCRAPER).uri]

    ca_key, ca_cert = make_ca(fed)
    for node, role in (("edge-2", "edge"), ("device-2-3", "device")):
        key, crt = issue(ca_key, ca_cert, fed, role, node, k8s_hosts(node, role))
        sec1 = load_key(key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        write_node_files(tmp_path / node, "node", sec1, crt)
        (tmp_path / node / "ca.crt").write_bytes(ca_cert)
    server, addr = _health_server(cfg, "edge-2", tmp_path / "edge-2")
    try:
        assert _check(cfg, "device-2-3", tmp_path / "device-2-3", addr, "edge-2").status == 1
    finally:
        server.stop(None)


def test_hffm_pki_k8s_makes_applies_revokes_and_rotates(tmp_path):
    """`hffm pki k8s` writes the Secrets (mode 0600); run again it keeps the CA and every existing key,
    carries a revocation made with `hffm pki revoke`, and issues anew only what was removed (rotation)."""
    import base64

    import yaml
    from typer.testing import CliRunner

    from hffm.pki import load_cert, revoked_serials
    from hffm_cli.main import app

    d, out = tmp_path / "pki", tmp_path / "secrets.yaml"

    def k8s(*extra: str):
        r = CliRunner().invoke(app, ["pki", "k8s", "-c", str(CONFIG), "--dir", str(d), "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return {s["metadata"]["name"]: s for s in yaml.safe_load_all(out.read_text()) if s}

    first = k8s()
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert sorted(first) == ["hffm-ca", "hffm-tls-cloud", "hffm-tls-device", "hffm-tls-edge", "hffm-tls-prometheus"]
    assert first["hffm-tls-prometheus"]["type"] == "kubernetes.io/tls"
    ca = (d / "ca.crt").read_bytes()
    old = (d / "device-0-1.crt").read_bytes()
    assert (
        CliRunner().invoke(app, ["pki", "revoke", "--dir", str(d), "--cert", str(d / "device-0-1.crt")]).exit_code == 0
    )
    (d / "device-0-2.crt").unlink()
    (d / "device-0-2.key").unlink()
    second = k8s()
    assert (d / "ca.crt").read_bytes() == ca and (d / "device-0-1.crt").read_bytes() == old
    crl = base64.b64decode(second["hffm-ca"]["data"]["crl.pem"])
    assert revoked_serials(crl, ca) == {load_cert(old).serial_number}
    dev = second["hffm-tls-device"]["data"]
    assert dev["device-0-2.crt"] != first["hffm-tls-device"]["data"]["device-0-2.crt"]  # rotated
    assert dev["device-0-3.crt"] == first["hffm-tls-device"]["data"]["device-0-3.crt"]  # kept
    cm = CliRunner().invoke(
        app, ["pki", "k8s", "-c", str(CONFIG), "--dir", str(tmp_path / "cm"), "--out", str(out), "--cert-manager"]
    )
    assert cm.exit_code == 0, cm.output
    names = {s["metadata"]["name"]: s for s in yaml.safe_load_all(out.read_text()) if s}
    assert sorted(names) == ["hffm-ca", "hffm-ca-keypair"] and not (tmp_path / "cm" / "cloud.key").exists()
    plaintext = tmp_path / "plain.yaml"
    plaintext.write_text(CONFIG.read_text().replace("tls: true", "tls: false"))
    plain = CliRunner().invoke(app, ["pki", "k8s", "-c", str(plaintext), "--dir", str(d), "--out", str(out)])
    assert plain.exit_code == 2 and "security.tls is false" in plain.output
