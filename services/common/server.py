"""gRPC server construction shared by all tiers: health checking, reflection, node servicers."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.bulk import BulkError, BulkServer
from services.common.chunkwire import parse_push_request
from services.common.client import CHANNEL_OPTIONS
from services.common.metrics import Metrics, MetricsInterceptor
from services.common.node import ModuleExchangeServicer, NodeRuntime, RoundControlServicer
from services.rpc import pb, pb_grpc

# Clients ping every 30 s (keepalive) to notice a dead peer in a long call; gRPC servers answer a ping
# more often than every 5 min with GOAWAY "too_many_pings", which cut round calls longer than that.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC binds with SO_REUSEPORT by default: a second server on a port already served would bind too,
    # silently, and the kernel would split connections between the two (another run's node answering
    # this run's calls). Off: that bind fails and its process says so.
    ("grpc.so_reuseport", 0),
]

SERVICE_NAMES = {
    "ModuleExchange": pb.DESCRIPTOR.services_by_name["ModuleExchange"].full_name,
    "RoundControl": pb.DESCRIPTOR.services_by_name["RoundControl"].full_name,
    "Registry": pb.DESCRIPTOR.services_by_name["Registry"].full_name,
    "Coordinator": pb.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    "Specialist": pb.DESCRIPTOR.services_by_name["Specialist"].full_name,
}


def counted(handle, metrics: Metrics, node: str):
    """``handle`` (a bulk push's Push handler) counted and timed like a gRPC call, by the same
    ``MetricsInterceptor.observe``, as method ``BulkPush``."""
    calls = MetricsInterceptor(metrics, node)

    def inner(frames, context):
        t0 = time.perf_counter()
        code = "OK"
        try:
            return handle(frames, context)
        except BulkError as err:
            code = err.code().name
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            calls.observe("BulkPush", t0, code)

    return inner


class NodeServer:
    """A started gRPC server for one node, with health status SERVING for its services. Its worker
    threads (``max_workers``) exceed the push streams it accepts (``limits.max_streams``) by what
    control calls, health checks and registrations need, so pushes never starve them."""

    def __init__(
        self, node: NodeRuntime, listen: str, *, max_workers: int = 32, extra=(), bulk_port: int | None = None
    ) -> None:
        """``bulk_port``: where the bulk listener binds (wire.transport=bulk), None: ``wire.bulk_port``."""
        self.node = node
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=SERVER_OPTIONS,
            interceptors=[MetricsInterceptor(node.metrics, node.node_id)],
        )
        exchange = self.exchange = ModuleExchangeServicer(node)
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAMES["ModuleExchange"],
                    {
                        # chunks are read as views of the received bytes (chunkwire), not protobuf objects
                        "Push": grpc.stream_unary_rpc_method_handler(
                            exchange.Push,
                            request_deserializer=parse_push_request,
                            response_serializer=pb.PushAck.SerializeToString,
                        ),
                        "BulkEndpoint": grpc.unary_unary_rpc_method_handler(
                            exchange.BulkEndpoint,
                            request_deserializer=pb.Empty.FromString,
                            response_serializer=pb.BulkEndpointInfo.SerializeToString,
                        ),
                    },
                ),
            )
        )
        pb_grpc.add_RoundControlServicer_to_server(RoundControlServicer(node), self.server)
        names = [SERVICE_NAMES["ModuleExchange"], SERVICE_NAMES["RoundControl"]]
        for add, servicer, name in extra:
            add(servicer, self.server)
            names.append(SERVICE_NAMES[name])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        try:
            self.port = node.security.add_port(self.server, listen)
        except RuntimeError as err:  # grpc's "Failed to bind to address ..." (in use: no SO_REUSEPORT)
            raise OSError(f"{node.node_id}: cannot listen on {listen}: {str(err).split(';')[0]}") from None
        if self.port == 0:
            raise OSError(f"{node.node_id}: cannot listen on {listen}")
        self.bulk: BulkServer | None = None
        if node.cfg.wire.transport == "bulk":
            # pushes as length-prefixed frames over TCP/TLS, handled by the very Push handler above
            wire, lim = node.cfg.wire, node.cfg.limits
            self.bulk = BulkServer(
                counted(exchange.Push, node.metrics, node.node_id),
                listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0",
                wire.bulk_port if bulk_port is None else bulk_port,
                tls=node.security.bulk_server_context(),
                max_connections=max(8, 2 * lim.max_streams),
                frame_timeout_s=max(lim.header_timeout_s, lim.chunk_timeout_s),
            )
            exchange.bulk_port = self.bulk.port
        self.server.start()
        for name in ["", *names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.bulk is not None:
            self.bulk.stop()
        self.server.stop(grace_s).wait()
        self.node.close()
