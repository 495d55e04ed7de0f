"""``python -m services.cloud --listen HOST:PORT --out DIR``: coordinate a run, exit 0 when done.

Waits for every node of the configured topology to register (any start order), runs
``rounds`` rounds of ``method``, writes DIR/results.json and DIR/global_modules.safetensors,
tells every node to shut down and exits (0 on success, 1 on failure).
Environment: HFFM_LISTEN, HFFM_ADVERTISE, HFFM_OUT, HFFM_CONFIG.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from hffm.config import write_config
from hffm.topology import CLOUD
from services.cloud.coordinator import CloudNode, CloudRegistry, Coordinator, CoordinatorServicer
from services.common.bootstrap import (
    advertise_address,
    base_parser,
    bulk_port,
    freeze_startup_heap,
    load,
    node_modules,
    server_workers,
    start_metrics,
    topology,
)
from services.common.server import NodeServer
from services.rpc import pb_grpc

log = logging.getLogger("hffm.cloud")


def main(argv: list[str] | None = None) -> int:
    p = base_parser("services.cloud")
    p.add_argument("--listen", default=os.environ.get("HFFM_LISTEN", "127.0.0.1:50051"))
    p.add_argument("--advertise", default=os.environ.get("HFFM_ADVERTISE"))
    p.add_argument("--out", default=os.environ.get("HFFM_OUT", "runs/latest"))
    p.add_argument(
        "--linger-s", type=float, default=None, help="serve this long after the run (default: runtime.linger_s, >= 1 s)"
    )
    args = p.parse_args(argv)
    cfg = load(args)
    topo = topology(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out / "config.yaml")
    spec, modules = node_modules(cfg, topo, CLOUD)
    node = CloudNode(CLOUD, cfg, spec, modules, args.listen, start_metrics(args, cfg, CLOUD))
    coord = Coordinator(cfg, topo, node, out)
    srv = NodeServer(
        node,
        args.listen,
        max_workers=server_workers(cfg, "cloud", topo),
        bulk_port=bulk_port(args, CLOUD),
        extra=[
            (pb_grpc.add_RegistryServicer_to_server, CloudRegistry(coord), "Registry"),
            (pb_grpc.add_CoordinatorServicer_to_server, CoordinatorServicer(coord), "Coordinator"),
        ],
    )
    node.address = coord.members.addresses[CLOUD] = advertise_address(args.listen, srv.port, args.advertise)
    log.info(
        "cloud serving on %s (advertised %s); method %s, %d rounds, %d nodes expected",
        args.listen,
        node.address,
        cfg.method,
        cfg.rounds,
        coord.members.expected,
    )
    freeze_startup_heap()  # set up: what is alive now lives as long as the process
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=coord.run, name="coordinator", daemon=True).start()
    while not stop.is_set() and not coord.done.is_set():
        stop.wait(0.2)
    if coord.done.is_set():
        stop.wait(args.linger_s if args.linger_s is not None else max(1.0, cfg.runtime.linger_s))
        if not cfg.runtime.exit_after_run:
            log.info("run over; staying up until terminated (runtime.exit_after_run: false)")
            stop.wait()
    else:
        log.warning("interrupted before the run finished")
        coord.shutdown_nodes()
    srv.stop()
    return 0 if coord.ok else 1


if __name__ == "__main__":
    sys.exit(main())
