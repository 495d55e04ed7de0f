"""Deployment descriptions generated from the one config: docker compose and Prometheus targets.

Every node is its own container, named by its node id (``cloud``, ``edge-1``, ``device-1-3``) on one
network, so devices reach their edge and their D2D peers by name and a restarted container keeps its
identity. Containers run the same entry points as the local launcher (``python -m services.<tier>``).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from hffm.config import HFFMConfig
from hffm.pki import OPERATOR, SCRAPER, issue, make_ca, make_crl, provision, write_node_files
from hffm.topology import CLOUD, Topology

GRPC_PORT = 50051
METRICS_PORT = 9100
PKI_IN_CONTAINER = "/etc/hffm/pki"
CONFIG_IN_CONTAINER = "/etc/hffm/config.yaml"
PROMETHEUS_PKI = "/etc/prometheus/pki"
STATE_IN_CONTAINER = "/state"
# real data sets and checkpoints (data.*, model.backbone paths under /data): the host directory in
# $HFFM_DATA, read-only in every container (edges and the cloud read the questions to size the heads)
DATA_MOUNT = "${HFFM_DATA:-./build/data}:/data:ro"


def _rel(path: Path, base: Path) -> str:
    rel = os.path.relpath(path, base)
    return rel if rel.startswith(".") else f"./{rel}"


def compose_spec(
    cfg: HFFMConfig,
    topo: Topology,
    *,
    repo: Path,
    compose_dir: Path,
    config_path: Path,
    prometheus_config: Path,
    results_dir: str,
    pki_dir: Path | None = None,
) -> dict[str, Any]:
    """Every node a container. With ``pki_dir`` (security on) each container mounts the CA, the
    revocation list and its own key and certificate alone, and Prometheus its scraper's."""
    image = "${HFFM_IMAGE:-hffm:latest}"
    cfg_mount = f"{_rel(config_path, compose_dir)}:{CONFIG_IN_CONTAINER}:ro"
    common = ["--config", CONFIG_IN_CONTAINER, "--metrics-port", str(METRICS_PORT)]
    tls = cfg.security.tls and pki_dir is not None

    def pki_mounts(name: str, target: str) -> list[str]:
        if not tls:
            return []
        assert pki_dir is not None
        files = ["ca.crt", "crl.pem", f"{name}.key", f"{name}.crt"]
        return [f"{_rel(pki_dir / f, compose_dir)}:{target}/{f}:ro" for f in files]

    volumes: dict[str, Any] = {}

    def node(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
        # each node's round ends on a volume of its own: a restarted container rejoins from them
        state = f"{name}-state:{STATE_IN_CONTAINER}"
        volumes[f"{name}-state"] = {}
        svc: dict[str, Any] = {
            "image": image,
            "hostname": name,
            "command": ["python", "-m", *command, *common],
            "volumes": [cfg_mount, DATA_MOUNT, state, *pki_mounts(name, PKI_IN_CONTAINER)],
            # the healthcheck dials this node as itself; HFFM_SET points every process at its credentials
            "environment": [
                f"HFFM_ID={name}",
                f"HFFM_CONFIG={CONFIG_IN_CONTAINER}",
                f"HFFM_STATE_DIR={STATE_IN_CONTAINER}",
                *([f"HFFM_SET=security.dir={PKI_IN_CONTAINER}"] if tls else []),
            ],
            "networks": ["hffm"],
            "restart": "on-failure",  # a crashed node comes back and rejoins (docs/reliability.md)
        }
        svc.update(extra)
        if "volumes" in extra:
            svc["volumes"] = [*extra["volumes"], DATA_MOUNT, state, *pki_mounts(name, PKI_IN_CONTAINER)]
        return svc

    listen = f"0.0.0.0:{GRPC_PORT}"
    services: dict[str, Any] = {
        CLOUD: node(
            CLOUD,
            ["services.cloud", "--listen", listen, "--advertise", f"{CLOUD}:{GRPC_PORT}", "--out", "/results"],
            build={
                "context": _rel(repo, compose_dir),
                "dockerfile": "deploy/Dockerfile",
                "args": {"BASE_IMAGE": "${HFFM_BASE_IMAGE:-hffm-base:bookworm}"},
            },
            volumes=[cfg_mount, f"{results_dir}:/results"],
            restart="on-failure:5",  # it resumes from its checkpoint (a failed run: five more tries); 0 when done
        )
    }
    for e in topo.edges:
        services[e] = node(
            e,
            [
                "services.edge",
                "--id",
                e,
                "--listen",
                listen,
                "--advertise",
                f"{e}:{GRPC_PORT}",
                "--upstream",
                f"{CLOUD}:{GRPC_PORT}",
            ],
        )
    for d in topo.devices:
        services[d.id] = node(
            d.id,
            [
                "services.device",
                "--node",
                f"{d.id}={listen}",
                "--advertise",
                f"{d.id}={d.id}:{GRPC_PORT}",
                "--upstream",
                f"{d.edge}={d.edge}:{GRPC_PORT}",
            ],
        )
    services["prometheus"] = {
        "image": "${HFFM_PROMETHEUS_IMAGE:-hffm-base:bookworm}",
        "entrypoint": ["prometheus"],
        "command": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/tmp/prometheus",
            "--web.listen-address=0.0.0.0:9090",
        ],
        "volumes": [
            f"{_rel(prometheus_config, compose_dir)}:/etc/prometheus/prometheus.yml:ro",
            f"{_rel(repo / 'deploy' / 'prometheus' / 'rules.yml', compose_dir)}:/etc/prometheus/rules.yml:ro",
            *pki_mounts(SCRAPER, PROMETHEUS_PKI),
        ],
        "ports": ["127.0.0.1:${HFFM_PROMETHEUS_PORT:-9090}:9090"],
        "networks": ["hffm"],
    }
    grafana = repo / "deploy" / "grafana"
    services["grafana"] = {
        "image": "${HFFM_GRAFANA_IMAGE:-grafana/grafana:10.4.2}",
        "profiles": ["grafana"],  # needs a registry to pull from: docker compose --profile grafana up
        "environment": ["GF_AUTH_ANONYMOUS_ENABLED=true", "GF_AUTH_ANONYMOUS_ORG_ROLE=Admin"],
        "volumes": [
            f"{_rel(grafana / 'provisioning', compose_dir)}:/etc/grafana/provisioning:ro",
            f"{_rel(grafana / 'dashboards', compose_dir)}:/var/lib/grafana/dashboards:ro",
        ],
        "ports": ["127.0.0.1:${HFFM_GRAFANA_PORT:-3000}:3000"],
        "networks": ["hffm"],
    }
    return {"version": "3.9", "services": services, "networks": {"hffm": {}}, "volumes": volumes}


def prometheus_static_config(topo: Topology, scrape_interval_s: float = 2.0, tls: bool = False) -> dict[str, Any]:
    """Prometheus config for the compose testbed: every container's /metrics by name (with ``tls``
    over HTTPS, as the scraper, checking each container's certificate names it)."""

    def group(node: str, tier: str) -> dict[str, Any]:
        return {"targets": [f"{node}:{METRICS_PORT}"], "labels": {"process": node, "tier": tier}}

    groups = [
        group(CLOUD, "cloud"),
        *(group(e, "edge") for e in topo.edges),
        *(group(d.id, "device") for d in topo.devices),
    ]
    return {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {
                "job_name": "hffm",
                "static_configs": groups,
                **(
                    {
                        "scheme": "https",
                        "tls_config": {
                            "ca_file": f"{PROMETHEUS_PKI}/ca.crt",
                            "cert_file": f"{PROMETHEUS_PKI}/{SCRAPER}.crt",
                            "key_file": f"{PROMETHEUS_PKI}/{SCRAPER}.key",
                        },
                    }
                    if tls
                    else {}
                ),
            }
        ],
    }


def provision_compose_pki(cfg: HFFMConfig, topo: Topology, directory: Path, uid: int = 1000) -> Path:
    """The testbed's CA and every container's credentials (reached by container name). The containers
    run as ``uid``: key files are given to it when this process may (root), else made readable."""
    members = {n: topo.role(n) for n in topo.node_ids()}
    d = provision(directory, cfg.security.federation, members, lambda n: [n], cfg.security.cert_days)
    for f in d.iterdir():
        if os.geteuid() == 0:
            os.chown(f, uid, uid)
        elif f.suffix == ".key":
            f.chmod(0o644)  # a local testbed only: docs/security.md
    return d


# ---- Kubernetes ---------------------------------------------------------------------------------------
# Every pod's name is its node id: the cloud's pod sets hostname "cloud", StatefulSet `edge` names its
# pods edge-<e>, and StatefulSet `device-<e>` (one per edge) names its pods device-<e>-<i>. Each tier has
# a headless Service named after its role, so node N of role R is reached at N.R (N.R.<namespace>.svc).
K8S_NAMESPACE = "hffm"
K8S_TLS_DIR = "/etc/hffm-tls"  # beside, not inside, the read-only config mount /etc/hffm
K8S_CA_SECRET = "hffm-ca"  # ca.crt, crl.pem
K8S_SCRAPER_SECRET = "hffm-tls-prometheus"  # kubernetes.io/tls: the scraper's tls.crt and tls.key
K8S_CA_KEYPAIR_SECRET = "hffm-ca-keypair"  # kubernetes.io/tls: the CA itself, for cert-manager's CA Issuer


def k8s_node_secret(role: str) -> str:
    """The Secret that holds every key and certificate of one role's nodes (``<id>.key``, ``<id>.crt``);
    a pod mounts its own two files alone (``subPathExpr``)."""
    return f"hffm-tls-{role}"


def k8s_hosts(node: str, role: str, namespace: str = K8S_NAMESPACE) -> list[str]:
    """The names node ``node`` is reached at in the cluster: its id (the TLS target name of every gRPC
    link) and its pod's DNS names under its tier's headless Service (what Prometheus scrapes)."""
    fqdn = f"{node}.{role}.{namespace}.svc"
    return [node, f"{node}.{role}", fqdn, f"{fqdn}.cluster.local"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret(name: str, namespace: str, files: dict[str, bytes], kind: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "hffm"}},
        "type": kind,
        "data": {k: _b64(v) for k, v in sorted(files.items())},
    }


def k8s_secrets(
    topo: Topology, pki_dir: Path, namespace: str = K8S_NAMESPACE, cert_manager: bool = False
) -> list[dict[str, Any]]:
    """The Secrets the manifests mount, from a provisioned directory (``provision_k8s_pki``): the CA
    and revocation list, one Secret per role with its nodes' credentials, the scraper's. With
    ``cert_manager`` only the CA (public part and, for the CA Issuer, the key pair): cert-manager's
    csi-driver makes each pod's key inside the pod and has it signed."""
    read = lambda name: (pki_dir / name).read_bytes()  # noqa: E731
    docs = [_secret(K8S_CA_SECRET, namespace, {"ca.crt": read("ca.crt"), "crl.pem": read("crl.pem")})]
    if cert_manager:
        pair = {"tls.crt": read("ca.crt"), "tls.key": read("ca.key")}
        return [*docs, _secret(K8S_CA_KEYPAIR_SECRET, namespace, pair, "kubernetes.io/tls")]
    by_role: dict[str, dict[str, bytes]] = {}
    for n in topo.node_ids():
        files = by_role.setdefault(topo.role(n), {})
        files[f"{n}.key"], files[f"{n}.crt"] = read(f"{n}.key"), read(f"{n}.crt")
    docs += [_secret(k8s_node_secret(role), namespace, files) for role, files in sorted(by_role.items())]
    scraper = {"tls.crt": read(f"{SCRAPER}.crt"), "tls.key": read(f"{SCRAPER}.key")}
    return [*docs, _secret(K8S_SCRAPER_SECRET, namespace, scraper, "kubernetes.io/tls")]


def provision_k8s_pki(
    cfg: HFFMConfig, topo: Topology, directory: Path, namespace: str = K8S_NAMESPACE, cert_manager: bool = False
) -> Path:
    """The cluster's CA and (unless cert-manager issues them) every node's and the scraper's credentials,
    each certificate naming the node's id and its pod's DNS names. An existing CA in ``directory`` is
    kept: only what is missing is issued (a topology that grew, a rotated node whose files were removed)."""
    directory = directory.resolve()
    fed, days = cfg.security.federation, cfg.security.cert_days
    if not (directory / "ca.key").is_file():
        write_node_files(directory, "ca", *make_ca(fed, max(days, 365)))
    ca_key, ca_cert = (directory / "ca.key").read_bytes(), (directory / "ca.crt").read_bytes()
    if not (directory / "crl.pem").is_file():
        (directory / "crl.pem").write_bytes(make_crl(ca_key, ca_cert, []))
    if cert_manager:
        return directory
    members = {n: topo.role(n) for n in topo.node_ids()}
    for name, role, hosts in [
        *((n, r, k8s_hosts(n, r, namespace)) for n, r in members.items()),
        (SCRAPER, OPERATOR, [SCRAPER]),
    ]:
        if not (directory / f"{name}.crt").is_file():
            write_node_files(directory, name, *issue(ca_key, ca_cert, fed, role, name, hosts, days))
    return directory
