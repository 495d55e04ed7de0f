"""Start-up shared by every tier's ``__main__``: config, logging, topology, registration."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import time

import grpc

from hffm.calibration import with_stats_spec
from hffm.config import ConfigError, HFFMConfig, load_config
from hffm.data import DataError, task_labels
from hffm.model import backbone_dims, initial_modules
from hffm.modules import ModuleSet, ModuleSpec, spec_of
from hffm.persist import Persistor
from hffm.topology import Topology, final
from services.common.metrics import Metrics
from services.common.security import Security, credential_paths
from services.rpc import pb, pb_grpc


def base_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", default=os.environ.get("HFFM_CONFIG"), help="YAML config (env HFFM_CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--log-level", default=os.environ.get("HFFM_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("HFFM_METRICS_PORT", "0")),
        help="serve Prometheus /metrics on this port (0: off; env HFFM_METRICS_PORT)",
    )
    p.add_argument("--metrics-addr", default=os.environ.get("HFFM_METRICS_ADDR", "0.0.0.0"))
    p.add_argument(
        "--bulk-port",
        action="append",
        default=[],
        metavar="[ID=]PORT",
        help="with wire.transport=bulk: the port of a node's bulk listener (ID=PORT for a device process's "
        "devices; default wire.bulk_port). The launcher assigns them with the gRPC ports",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("HFFM_STATE_DIR"),
        help="durable state: <dir>/<node>/ (default: checkpoint.dir; env HFFM_STATE_DIR)",
    )
    return p


def bulk_port(args: argparse.Namespace, node: str) -> int | None:
    """The bulk listener port ``--bulk-port`` gives ``node`` (``ID=PORT``, or a bare ``PORT`` for the
    process's one node); None: ``wire.bulk_port``."""
    for item in args.bulk_port:
        nid, _, port = item.rpartition("=")
        if nid in ("", node):
            try:
                return int(port)
            except ValueError:
                sys.exit(f"--bulk-port: {item!r} is not [ID=]PORT")
    return None


def persistor(args: argparse.Namespace, cfg: HFFMConfig, node: str) -> Persistor | None:
    """The node's checkpoints under --state-dir (or checkpoint.dir), module files shared with the other
    nodes saving there (``<dir>/.blobs``, hffm.persist); None: round ends in memory only."""
    d = args.state_dir or cfg.checkpoint.dir
    return Persistor.in_root(d, node, cfg.checkpoint.keep) if d else None


def state_refs(states: list[tuple[int, int]]) -> list[pb.StateRef]:
    return [pb.StateRef(round=r, attempt=a) for r, a in states]


def start_metrics(args: argparse.Namespace, cfg: HFFMConfig, identity: str) -> Metrics:
    """The process's metrics, served on --metrics-port when it is not 0; with security on over HTTPS
    with ``identity``'s certificate, to scrapers with a certificate of the federation's CA."""
    metrics = Metrics()
    if args.metrics_port:
        tls = None
        if cfg.security.tls and cfg.security.dir:
            tls = {k: str(v) for k, v in credential_paths(cfg.security.dir, identity).items() if k != "crl"}
        port = metrics.serve(args.metrics_port, args.metrics_addr, tls)
        logging.getLogger("hffm.metrics").info("metrics on http://%s:%d/metrics", args.metrics_addr, port)
    return metrics


def load(args: argparse.Namespace) -> HFFMConfig:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env_sets = [s for s in os.environ.get("HFFM_SET", "").split(";") if s.strip()]
    try:
        return load_config(args.config, env_sets + args.overrides)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


def topology(cfg: HFFMConfig) -> Topology:
    return Topology.from_config(cfg, backbone_dims(cfg)[1])


def node_modules(cfg: HFFMConfig, topo: Topology, node: str) -> tuple[ModuleSpec, ModuleSet]:
    try:
        labels = task_labels(cfg)  # a real data set's answer vocabularies size the heads
    except DataError as err:
        sys.exit(f"data error: {err}")
    mods = initial_modules(cfg, final(topo, cfg).modules_for(node), labels)  # tasks arriving later too
    spec = spec_of({n: m.tensors for n, m in mods.items()})
    if cfg.calibration.enabled:  # the feature statistics it sums and forwards (an edge) or calibrates on (the cloud)
        spec = with_stats_spec(spec, labels, cfg.calibration.diagonal, cfg.calibration.pooled)
    return spec, mods


def server_workers(cfg: HFFMConfig, role: str, topo: Topology) -> int:
    """Worker threads of a node's gRPC server: its push streams (``limits.max_streams``) plus what its
    other calls hold at once (round control and health; an edge's devices registering through it; the
    cloud's progress watchers and every node's registration), so no kind of call starves the others."""
    extra = {"cloud": cfg.limits.max_watchers + len(topo.node_ids()), "edge": cfg.topology.devices_per_edge}
    return cfg.limits.max_streams + extra.get(role, 0) + 8


def freeze_startup_heap() -> None:
    """Once a node process is set up: collect, then move every object alive (torch, transformers, the
    model, the data set, the servers: ~390,000 objects in a device process of 13 devices) to the
    interpreter's permanent generation (``gc.freeze``), which the cyclic garbage collector never scans.
    They live as long as the process anyway; without this every full collection walks them all, holding
    the GIL: 0.25-0.29 s of CPU each in a device process of 50 devices, stopping all of them
    (docs/performance.md)."""
    gc.collect()
    gc.freeze()


def advertise_address(listen: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    host = listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def register(
    security: Security, upstream: str, target: str, info: pb.NodeInfo, timeout_s: float, stop=None
) -> pb.RegisterAck:
    """Register ``info`` with the node ``target`` at ``upstream`` as ``security``'s identity, waiting and
    retrying while it is not up yet (any start order)."""
    log = logging.getLogger("hffm.register")
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    with security.channel(upstream, target) as ch:
        stub = pb_grpc.RegistryStub(ch)
        while True:
            try:
                return stub.Register(
                    info,
                    timeout=max(1.0, min(30.0, deadline - time.monotonic())),
                    wait_for_ready=True,
                    metadata=security.call_metadata(),
                )
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                    raise TimeoutError(f"{info.id}: upstream {upstream} not reachable after {timeout_s:.0f}s") from err
                log.info("%s: upstream %s not ready (%s); retrying", info.id, upstream, err.code().name)
                time.sleep(delay)
                delay = min(delay * 2, 3.0)


def leave(security: Security, upstream: str, target: str, device: str, reason: str, timeout_s: float) -> pb.LeaveAck:
    """Tell the node ``target`` at ``upstream`` (a device's edge, or the cloud for an edge forwarding it)
    that ``device`` leaves the federation, as ``security``'s identity; one try within ``timeout_s``."""
    with security.channel(upstream, target) as ch:
        return pb_grpc.RegistryStub(ch).Leave(
            pb.LeaveRequest(id=device, reason=reason), timeout=timeout_s, metadata=security.call_metadata()
        )
