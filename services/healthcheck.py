"""``python -m services.healthcheck HOST:PORT``: exit 0 when the gRPC health service says SERVING.

Used by the image's HEALTHCHECK and by Kubernetes probes (exec). With security on (``HFFM_CONFIG``
and ``HFFM_ID`` in the environment, as the compose testbed sets them) it dials the node as the node
itself: its own certificate, and the node's id as the TLS target name."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(addr: str) -> grpc.Channel:
    node, config = os.environ.get("HFFM_ID"), os.environ.get("HFFM_CONFIG")
    if not node or not config:
        return grpc.insecure_channel(addr)
    from hffm.config import load_config
    from services.common.security import Security

    sets = [s for s in os.environ.get("HFFM_SET", "").split(";") if s.strip()]
    cfg = load_config(config, sets)
    return Security(cfg.security, node).channel(addr, node)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    addr = args[0] if args else "127.0.0.1:50051"
    try:
        with _channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.RpcError as err:
        print(f"{addr}: {err.code().name}", file=sys.stderr)
        return 1
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{addr}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
