"""Writes deploy/grafana/dashboards/*.json (run: python deploy/grafana/make_dashboards.py).

The dashboards are data; this script is how they are kept consistent (one datasource uid, one
variable set, one panel shape). tests/test_metrics.py runs every panel's PromQL against a real
Prometheus scraping a real run.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}
HERE = Path(__file__).resolve().parent


def panel(
    pid: int,
    title: str,
    kind: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    unit: str = "short",
) -> dict:
    return {
        "id": pid,
        "title": title,
        "type": kind,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": lf} for i, (e, lf) in enumerate(targets)
        ],
    }


def variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard(uid: str, title: str, panels: list[dict], variables: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "5s",
        "tags": ["hffm"],
        "templating": {"list": variables},
        "panels": panels,
    }


NODE = 'node=~"$node"'
RUN = dashboard(
    "hffm-run",
    "hffm — a run",
    [
        panel(
            1,
            "Round progress",
            "stat",
            [
                (f"max(hffm_round{{{NODE}}})", "current round"),
                ('sum(hffm_rounds_completed_total{method=~"$method"})', "rounds completed"),
            ],
            0,
            0,
            6,
            5,
        ),
        panel(2, "Cluster heads", "table", [("hffm_cluster_head == 1", "{{edge}}: {{head}}")], 6, 0, 6, 5),
        panel(
            3,
            "Accuracy per task (pooled over devices, last round)",
            "timeseries",
            [
                ('hffm_round_accuracy{method=~"$method"}', "{{task}} {{split}}"),
            ],
            12,
            0,
            12,
            5,
            "percentunit",
        ),
        panel(
            4,
            "Accuracy per task by tier (device modules, mean over devices)",
            "timeseries",
            [
                (f"avg by (task, split) (hffm_accuracy{{{NODE}}})", "device {{task}} {{split}}"),
            ],
            0,
            5,
            12,
            8,
            "percentunit",
        ),
        panel(
            5,
            "Bytes per second by link kind",
            "timeseries",
            [
                (f"sum by (link) (rate(hffm_bytes_sent_total{{{NODE}}}[$__rate_interval]))", "{{link}}"),
            ],
            12,
            5,
            12,
            8,
            "Bps",
        ),
        panel(
            6,
            "Cumulative modeled energy by tier and link kind",
            "timeseries",
            [
                (
                    f"sum by (tier, link) (label_replace(hffm_modeled_energy_joules_total{{{NODE}}}, "
                    '"tier", "$1", "node", "(cloud|edge|device).*"))',
                    "{{tier}} {{link}}",
                ),
            ],
            0,
            13,
            12,
            8,
            "joule",
        ),
        panel(
            7,
            "Modeled vs measured latency per round",
            "timeseries",
            [
                ('hffm_round_modeled_latency_seconds{method=~"$method"}', "modeled {{method}}"),
                ('hffm_round_wall_seconds{method=~"$method"}', "measured {{method}}"),
            ],
            12,
            13,
            12,
            8,
            "s",
        ),
        panel(
            8,
            "RPC p95 by method",
            "timeseries",
            [
                (
                    f"histogram_quantile(0.95, sum by (le, method) (rate(hffm_rpc_duration_seconds_bucket{{{NODE}}}"
                    "[$__rate_interval])))",
                    "{{method}}",
                ),
            ],
            0,
            21,
            12,
            8,
            "s",
        ),
        panel(
            9,
            "Traffic per module",
            "bargauge",
            [
                (f"sum by (module) (hffm_bytes_sent_total{{{NODE}}})", "{{module}}"),
            ],
            12,
            21,
            12,
            8,
            "bytes",
        ),
        panel(
            10,
            "Rejected pushes by reason",
            "timeseries",
            [
                (f"sum by (reason) (hffm_modules_rejected_total{{{NODE}}})", "{{reason}}"),
            ],
            0,
            29,
            12,
            8,
        ),
        panel(
            11,
            "Local training: samples per second, loss",
            "timeseries",
            [
                (f"sum(rate(hffm_train_samples_total{{{NODE}}}[$__rate_interval]))", "samples/s"),
                (f"avg(hffm_train_loss{{{NODE}}})", "mean loss"),
            ],
            12,
            29,
            12,
            8,
        ),
        panel(
            12,
            "Faults: attempts re-run, nodes lost midway, round ends saved (docs/reliability.md)",
            "timeseries",
            [
                ("sum(hffm_round_attempts_aborted_total)", "attempts re-run"),
                ("sum(hffm_nodes_lost_total) or vector(0)", "nodes lost midway"),
                (f"sum(hffm_checkpoints_total{{{NODE}}})", "round ends saved"),
            ],
            0,
            37,
            12,
            8,
        ),
        panel(
            13,
            "Limits: push streams open, module bytes in flight",
            "timeseries",
            [
                (f"sum(hffm_push_streams{{{NODE}}})", "push streams"),
                (f"sum(hffm_push_bytes_in_flight{{{NODE}}})", "bytes in flight"),
            ],
            12,
            37,
            12,
            8,
        ),
    ],
    [
        variable("method", "label_values(hffm_rounds_completed_total, method)"),
        variable("node", "label_values(hffm_round, node)"),
    ],
)

TABLE1 = dashboard(
    "hffm-table1",
    "hffm — Table I view",
    [
        panel(
            1,
            "Modeled latency per round by method",
            "bargauge",
            [
                ('hffm_round_modeled_latency_seconds{method=~"$method"}', "{{method}}"),
            ],
            0,
            0,
            12,
            8,
            "s",
        ),
        panel(
            2,
            "Modeled energy per round by method",
            "bargauge",
            [
                ('hffm_round_modeled_energy_joules{method=~"$method"}', "{{method}}"),
            ],
            12,
            0,
            12,
            8,
            "joule",
        ),
        panel(
            3,
            "Measured wall time per round by method",
            "bargauge",
            [
                ('hffm_round_wall_seconds{method=~"$method"}', "{{method}}"),
            ],
            0,
            8,
            12,
            8,
            "s",
        ),
        panel(
            4,
            "Accuracy by method (global test sets)",
            "bargauge",
            [
                ('avg by (method) (hffm_round_accuracy{method=~"$method", split="global"})', "{{method}}"),
            ],
            12,
            8,
            12,
            8,
            "percentunit",
        ),
    ],
    [variable("method", "label_values(hffm_rounds_completed_total, method)")],
)

K8S_COMPONENT = HERE.parent / "k8s" / "components" / "monitoring" / "dashboards.yaml"


def k8s_configmaps(dashboards: list[dict], prometheus_url: str = "http://hffm-prometheus:9090") -> str:
    """The dashboards and their datasource as ConfigMaps in the Grafana sidecar convention (labels
    grafana_dashboard / grafana_datasource "1"), for deploy/k8s/components/monitoring."""
    import yaml

    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{d['uid']}-dashboard", "labels": {"grafana_dashboard": "1"}},
            "data": {f"{d['uid']}.json": json.dumps(d, indent=2) + "\n"},
        }
        for d in dashboards
    ]
    source = {"apiVersion": 1, "datasources": [{"name": "Prometheus", "uid": DS["uid"], "type": "prometheus",
              "access": "proxy", "url": prometheus_url, "isDefault": True}]}  # fmt: skip
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "hffm-grafana-datasource", "labels": {"grafana_datasource": "1"}},
            "data": {"hffm-datasource.yaml": yaml.safe_dump(source, sort_keys=False)},
        }
    )
    head = "# GENERATED by deploy/grafana/make_dashboards.py (the same dashboards as deploy/grafana/dashboards).\n"
    return head + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


if __name__ == "__main__":
    out = HERE / "dashboards"
    out.mkdir(exist_ok=True)
    for d in (RUN, TABLE1):
        (out / f"{d['uid']}.json").write_text(json.dumps(d, indent=2) + "\n")
        print(out / f"{d['uid']}.json")
    K8S_COMPONENT.write_text(k8s_configmaps([RUN, TABLE1]))
    print(K8S_COMPONENT)
