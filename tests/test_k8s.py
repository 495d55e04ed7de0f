"""Kubernetes manifests proven offline: `kubectl kustomize` renders each overlay and every object
validates against the Kubernetes schema of a pinned version (kubernetes-validate)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from hffm.config import load_config
from services.device.__main__ import device_for_ordinal
from services.launcher import REPO_ROOT

K8S_VERSION = "1.30.0"  # pinned schema version
OVERLAYS = ("cpu", "gpu")


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize); scripts/system-deps.sh installs it")
    r = subprocess.run(
        [
            "kubectl",
            "kustomize",
            "--load-restrictor",
            "LoadRestrictionsNone",
            str(REPO_ROOT / "deploy" / "k8s" / "overlays" / overlay),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _by_kind(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PersistentVolumeClaim",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: no upstream schema
            ep = d["spec"]["endpoints"][0]
            assert ep["port"] == "metrics" and d["spec"]["selector"]["matchLabels"]
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        assert d["metadata"].get("namespace", "hffm") == "hffm"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topology_config_and_identity_match(overlay):
    docs = render(overlay)
    cfg_text = (REPO_ROOT / "configs" / "k8s.yaml").read_text()
    cm = _by_kind(docs, "ConfigMap")[0]
    assert cm["data"]["config.yaml"] == cfg_text  # the ConfigMap is the config file itself
    cfg = load_config(REPO_ROOT / "configs" / "k8s.yaml")
    assert not cfg.runtime.exit_after_run  # finished pods stay up rather than restarting a run
    assert _by_kind(docs, "StatefulSet", "edge")[0]["spec"]["replicas"] == cfg.topology.edges
    n_dev = cfg.topology.edges * cfg.topology.devices_per_edge
    assert _by_kind(docs, "StatefulSet", "device")[0]["spec"]["replicas"] == n_dev
    for name in ("edge", "device"):
        svc = _by_kind(docs, "Service", name)[0]
        assert svc["spec"]["clusterIP"] == "None"  # headless: pods reach each other by name (D2D)
    # the ordinal -> identity mapping covers every device exactly once
    ids = {device_for_ordinal(k, cfg.topology.devices_per_edge) for k in range(n_dev)}
    assert {d for d, _ in ids} == {
        f"device-{e}-{i}" for e in range(cfg.topology.edges) for i in range(cfg.topology.devices_per_edge)
    }
    assert device_for_ordinal(7, 4) == ("device-1-3", "edge-1")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_resources_metrics_and_results(overlay):
    docs = render(overlay)
    workloads = _by_kind(docs, "Deployment") + _by_kind(docs, "StatefulSet")
    assert len(workloads) == 3
    for w in workloads:
        pod = w["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for c in pod["spec"]["containers"]:
            assert c["readinessProbe"]["grpc"]["port"] == 50051 and c["livenessProbe"]["grpc"]["port"] == 50051
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["image"] == ("hffm:gpu" if overlay == "gpu" else "hffm:latest")
    cloud = _by_kind(docs, "Deployment", "cloud")[0]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in cloud["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["hffm-results"] and _by_kind(docs, "PersistentVolumeClaim", "hffm-results")
    device = _by_kind(docs, "StatefulSet", "device")[0]["spec"]["template"]["spec"]
    limits = device["containers"][0]["resources"]["limits"]
    env = {e["name"] for e in device["containers"][0]["env"]}
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1" and device["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"HFFM_POD_NAME", "HFFM_SET"} <= env
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in device and env == {"HFFM_POD_NAME"}


def test_device_entry_point_derives_identity_from_the_pod_name():
    import argparse

    from services.device.__main__ import _from_ordinal

    cfg = load_config(REPO_ROOT / "configs" / "k8s.yaml")
    nodes, ups, adv = _from_ordinal(argparse.Namespace(pod_name="device-13", peer_domain=""), cfg)
    assert nodes == {"device-3-1": "0.0.0.0:50051"}
    assert ups == {"edge-3": "edge-3.edge:50051"}
    assert adv == {"device-3-1": "device-13.device:50051"}
