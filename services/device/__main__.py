"""``python -m services.device``: one or more device servers in this process.

Each ``--node ID=HOST:PORT`` is a device with its own gRPC server and identity; devices registered
here share one frozen backbone (memory) and take turns training on it. ``--upstream EDGE=ADDR``
gives each edge's address; a device registers with its own edge (retrying until it is up).
Environment: HFFM_CONFIG, HFFM_NODES (comma-separated ID=HOST:PORT), HFFM_UPSTREAMS, HFFM_ADVERTISE.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import grpc

from hffm.data import DataError
from services.common.bootstrap import (
    advertise_address,
    base_parser,
    bulk_port,
    freeze_startup_heap,
    leave,
    load,
    persistor,
    register,
    server_workers,
    start_metrics,
    state_refs,
    topology,
)
from services.common.client import Channels
from services.common.server import NodeServer
from services.device import specialist
from services.device.node import DeviceNode, ModelHost
from services.rpc import pb


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        for item in v.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                sys.exit(f"{what}: expected ID=HOST:PORT, got {item!r}")
            k, a = item.split("=", 1)
            out[k] = a
    return out


def _from_pod_name(args, topo) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Kubernetes: the pod's name is the device's id (StatefulSet ``device-<e>`` names its pods
    ``device-<e>-<i>``); its edge is ``<edge>.edge``, and peers reach it at ``<id>.device``."""
    name = args.pod_name
    if name not in topo.device_map:
        sys.exit(f"--pod-name: {name!r} is not a device of this topology ({len(topo.devices)} devices)")
    edge = topo.device_map[name].edge
    suffix = f".{args.peer_domain}" if args.peer_domain else ""
    return (
        {name: "0.0.0.0:50051"},
        {edge: f"{edge}.edge{suffix}:50051"},
        {name: f"{name}.device{suffix}:50051"},
    )


def _position(text: str, nodes: dict[str, str], topo, joins: bool) -> tuple[float, float]:
    """``--position X,Y``: one joining device's position in m (the cloud checks it against the area and
    the edge its id names)."""
    if len(nodes) != 1 or not joins or next(iter(nodes)) in topo.device_map:
        sys.exit("--position: only for one device joining mid-run (topology.joins, an id outside the table)")
    from hffm.geometry import parse_point  # only here: a device process does not load networkx otherwise

    try:
        return parse_point(text)
    except ValueError as err:
        sys.exit(f"--position: {err}")


def main(argv: list[str] | None = None) -> int:
    p = base_parser("services.device")
    p.add_argument("--node", action="append", default=[], help="ID=HOST:PORT to listen on (repeatable)")
    p.add_argument("--upstream", action="append", default=[], help="EDGE_ID=HOST:PORT (repeatable)")
    p.add_argument("--advertise", default=os.environ.get("HFFM_ADVERTISE"), help="ID=HOST:PORT others dial")
    p.add_argument(
        "--pod-name",
        default=os.environ.get("HFFM_POD_NAME"),
        help="Kubernetes: the pod's name, which is the device's id (device-<e>-<i>)",
    )
    p.add_argument(
        "--peer-domain",
        default=os.environ.get("HFFM_PEER_DOMAIN", ""),
        help="with --pod-name: DNS suffix of the headless services, e.g. hffm.svc.cluster.local",
    )
    p.add_argument(
        "--position",
        default=None,
        help="X,Y in m: a device joining mid-run says where it is (its id must name the nearest edge)",
    )
    args = p.parse_args(argv)
    cfg = load(args)
    nodes = _pairs(args.node or [os.environ.get("HFFM_NODES", "")], "--node")
    upstreams = _pairs(args.upstream or [os.environ.get("HFFM_UPSTREAMS", "")], "--upstream")
    adverts = _pairs([args.advertise] if args.advertise else [], "--advertise")
    topo = topology(cfg)
    if not nodes and args.pod_name:  # Kubernetes: the pod's name is the device's id
        nodes, upstreams, adverts = _from_pod_name(args, topo)
    if not nodes:
        sys.exit("--node: at least one device ID=HOST:PORT is required")
    position = _position(args.position, nodes, topo, cfg.topology.joins) if args.position else None
    for nid in nodes:
        if nid not in topo.device_map and cfg.topology.joins:  # joining mid-run: admitted by the cloud
            try:
                topo = topo.joiner(nid, cfg.topology.tasks_per_device)
            except ValueError as err:
                sys.exit(f"--node: {err}")
        if nid not in topo.device_map:
            sys.exit(f"--node: {nid!r} is not a device of this topology ({len(topo.devices)} devices)")
        if topo.device_map[nid].edge not in upstreams:
            sys.exit(f"--upstream: no address for {topo.device_map[nid].edge}, the edge of {nid}")
    log = logging.getLogger("hffm.device")
    try:
        host = ModelHost(cfg)
    except DataError as err:
        sys.exit(f"data error: {err}")
    metrics = start_metrics(args, cfg, next(iter(nodes)))  # one /metrics per process, with its first device's identity
    # plaintext: the process's devices share one channel per peer; TLS: each device's channels carry its certificate
    shared = None if cfg.security.tls else Channels(bulk=cfg.wire.transport == "bulk")
    servers: list[NodeServer] = []
    for nid, listen in nodes.items():
        try:
            node = DeviceNode(nid, cfg, topo, host, listen, metrics, shared, persistor(args, cfg, nid))
        except DataError as err:
            sys.exit(f"data error: {nid}: {err}")
        srv = NodeServer(
            node,
            listen,
            max_workers=server_workers(cfg, "device", topo),
            extra=[specialist.extra(node)],
            bulk_port=bulk_port(args, nid),
        )
        node.address = advertise_address(listen, srv.port, adverts.get(nid))
        servers.append(srv)
        log.info(
            "%s serving on %s (advertised %s), tasks %s, train samples %s",
            nid,
            listen,
            node.address,
            list(node.info.tasks),
            node.train_samples(),
        )
    freeze_startup_heap()  # set up: what is alive now lives as long as the process
    stop = threading.Event()
    failed = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def _register(srv: NodeServer) -> None:
        n: DeviceNode = srv.node  # type: ignore[assignment]
        info = pb.NodeInfo(
            id=n.node_id,
            role="device",
            address=n.address,
            edge=n.info.edge,
            tasks=list(n.info.tasks),
            train_samples=n.train_samples(),
            label_coverage=n.label_coverage(),
            states=state_refs(n.states()),
            position=pb.Point(x_m=position[0], y_m=position[1]) if position else None,
        )
        try:
            ack = register(n.security, upstreams[n.info.edge], n.info.edge, info, cfg.runtime.register_timeout_s, stop)
            log.info("%s registered (%d/%d)", n.node_id, ack.registered, ack.expected)
            registered.add(n.node_id)
        except Exception as err:  # noqa: BLE001
            log.error("%s: registration failed: %s", n.node_id, err)
            failed.set()
            stop.set()

    registered: set[str] = set()
    for srv in servers:
        threading.Thread(target=_register, args=(srv,), daemon=True).start()
    while not stop.is_set() and not all(s.node.stopped.is_set() for s in servers):
        stop.wait(0.2)
    if cfg.topology.joins and not all(s.node.stopped.is_set() for s in servers):
        leave_cleanly([s.node for s in servers if s.node.node_id in registered], upstreams, cfg)
    if all(s.node.stopped.is_set() for s in servers):
        stop.wait(cfg.runtime.linger_s)
        if not cfg.runtime.exit_after_run:
            log.info("run over; staying up until terminated (runtime.exit_after_run: false)")
            stop.wait()
    for srv in servers:
        srv.stop()
    return 1 if failed.is_set() else 0


def leave_cleanly(nodes: list, upstreams: dict[str, str], cfg) -> None:
    """Stopped (SIGTERM, SIGINT) while the run goes on, with topology.joins (membership may change): each
    device tells its edge it leaves, finishes the round it is in, and waits for the coordinator to shut it
    down (at the next round's planning), at most topology.leave_timeout_s."""
    log = logging.getLogger("hffm.device")
    for n in nodes:
        try:
            ack = leave(n.security, upstreams[n.info.edge], n.info.edge, n.node_id, "stopped", 30.0)
            log.info("%s left the federation (its last round: %s)", n.node_id, ack.round or "none")
        except grpc.RpcError as err:
            log.warning("%s: leaving failed (%s: %s); stopping anyway", n.node_id, err.code().name, err.details())
    deadline = time.monotonic() + cfg.topology.leave_timeout_s
    for n in nodes:
        n.stopped.wait(max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
