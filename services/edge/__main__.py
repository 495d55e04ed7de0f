"""``python -m services.edge --id edge-0 --listen HOST:PORT --upstream CLOUD_ADDR``.

Serves ModuleExchange, RoundControl and Registry (its devices register here; it forwards each to
the cloud). Registers itself with the cloud, retrying until the cloud is up.
Environment: HFFM_ID, HFFM_LISTEN, HFFM_UPSTREAM, HFFM_ADVERTISE, HFFM_CONFIG.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import grpc

from hffm.adversary import adversaries, poison
from hffm.ids import CLOUD, joining_edge
from hffm.modules import ModuleSet
from hffm.topology import Topology
from services.common.bootstrap import (
    advertise_address,
    base_parser,
    bulk_port,
    freeze_startup_heap,
    leave,
    load,
    node_modules,
    persistor,
    register,
    server_workers,
    start_metrics,
    state_refs,
    topology,
)
from services.common.node import NodeRuntime, abort_for, authorize
from services.common.server import NodeServer
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.edge")


class EdgeNode(NodeRuntime):
    role = "edge"
    keeps_reference = True  # for joiners after an edge round (JOIN_REF)

    def __init__(self, *args, attacks: bool = False, **kw) -> None:
        super().__init__(*args, **kw)
        # config adversary (tests and benchmarks): this edge poisons the aggregate of its devices
        self.attacks = attacks
        self._last_start: ModuleSet | None = None  # its start when it last poisoned (echo: the step since)
        if attacks:
            log.warning("%s is an adversary: it forwards %s aggregates (config adversary)", self.node_id,
                        self.cfg.adversary.behaviour)  # fmt: skip

    def poison_aggregate(self, tag: str, modules: ModuleSet, round_: int) -> ModuleSet:
        if not self.attacks or tag != "aggregate":  # the devices' updates, not the cloud's broadcast it relays
            return modules
        previous, self._last_start = self._last_start, self.modules
        return poison(self.cfg.adversary, modules, self.modules, self.cfg.seed, self.node_id, round_, previous)


class EdgeRegistry(pb_grpc.RegistryServicer):
    """Accepts registrations of this edge's devices and forwards them to the cloud."""

    def __init__(self, node: EdgeNode, topo: Topology, upstream: str, timeout_s: float) -> None:
        self.node, self.topo, self.upstream, self.timeout_s = node, topo, upstream, timeout_s

    def Register(self, request, context):  # noqa: N802
        try:  # a device registers itself only, and only with its own edge
            authorize(self.node, context, "Register", lambda i: i.role == "device" and i.id == request.id)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        dev = self.topo.device_map.get(request.id)
        edge = dev.edge if dev is not None else joining_edge(request.id) if self.node.cfg.topology.joins else None
        if request.role != "device" or edge is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.id!r} is not a device of this topology")
        if edge != self.node.node_id:  # a joiner's id names its edge; the cloud checks the rest
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.id} belongs to {edge}, not {self.node.node_id}")
        try:
            return register(self.node.security, self.upstream, CLOUD, request, self.timeout_s)
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())
        except TimeoutError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    def Leave(self, request, context):  # noqa: N802
        try:  # a device leaves by itself only, and only through its own edge
            authorize(self.node, context, "Leave", lambda i: i.role == "device" and i.id == request.id)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)
        dev = self.topo.device_map.get(request.id)
        edge = dev.edge if dev is not None else joining_edge(request.id) if self.node.cfg.topology.joins else None
        if edge != self.node.node_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.id} is not a device of {self.node.node_id}")
        try:
            return leave(
                self.node.security, self.upstream, CLOUD, request.id, request.reason, min(30.0, self.timeout_s)
            )
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())


def main(argv: list[str] | None = None) -> int:
    p = base_parser("services.edge")
    p.add_argument("--id", default=os.environ.get("HFFM_ID"))
    p.add_argument("--listen", default=os.environ.get("HFFM_LISTEN", "127.0.0.1:0"))
    p.add_argument("--upstream", default=os.environ.get("HFFM_UPSTREAM"), help="cloud address")
    p.add_argument("--advertise", default=os.environ.get("HFFM_ADVERTISE"))
    args = p.parse_args(argv)
    cfg = load(args)
    topo = topology(cfg)
    if args.id not in topo.edges:
        sys.exit(f"--id: {args.id!r} is not an edge of this topology ({list(topo.edges)})")
    if not args.upstream:
        sys.exit("--upstream: the cloud's address is required")
    spec, modules = node_modules(cfg, topo, args.id)
    node = EdgeNode(
        args.id,
        cfg,
        spec,
        modules,
        args.listen,
        start_metrics(args, cfg, args.id),
        persistor=persistor(args, cfg, args.id),
        attacks=args.id in adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins),
    )
    registry = EdgeRegistry(node, topo, args.upstream, cfg.runtime.register_timeout_s)
    srv = NodeServer(
        node,
        args.listen,
        max_workers=server_workers(cfg, "edge", topo),
        bulk_port=bulk_port(args, args.id),
        extra=[(pb_grpc.add_RegistryServicer_to_server, registry, "Registry")],
    )
    node.address = advertise_address(args.listen, srv.port, args.advertise)
    log.info("%s serving on %s (advertised %s)", args.id, args.listen, node.address)
    freeze_startup_heap()  # set up: what is alive now lives as long as the process
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ack = register(
            node.security,
            args.upstream,
            CLOUD,
            pb.NodeInfo(id=args.id, role="edge", address=node.address, states=state_refs(node.states())),
            cfg.runtime.register_timeout_s,
            stop,
        )
        log.info("%s registered with the cloud (%d/%d)", args.id, ack.registered, ack.expected)
    except Exception as err:  # noqa: BLE001
        log.error("%s: registration failed: %s", args.id, err)
        srv.stop()
        return 1
    while not stop.is_set() and not node.stopped.is_set():
        stop.wait(0.2)
    if node.stopped.is_set():
        stop.wait(cfg.runtime.linger_s)
        if not cfg.runtime.exit_after_run:
            log.info("run over; staying up until terminated (runtime.exit_after_run: false)")
            stop.wait()
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
