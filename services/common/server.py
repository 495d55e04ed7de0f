"""gRPC server construction shared by all tiers: health checking, reflection, node servicers."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.chunkwire import parse_push_request
from services.common.client import CHANNEL_OPTIONS
from services.common.metrics import MetricsInterceptor
from services.common.node import ModuleExchangeServicer, NodeRuntime, RoundControlServicer
from services.rpc import pb, pb_grpc

# Clients ping every 30 s (keepalive) to notice a dead peer in a long call; gRPC servers answer a ping
# more often than every 5 min with GOAWAY "too_many_pings", which cut round calls longer than that.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

SERVICE_NAMES = {
    "ModuleExchange": pb.DESCRIPTOR.services_by_name["ModuleExchange"].full_name,
    "RoundControl": pb.DESCRIPTOR.services_by_name["RoundControl"].full_name,
    "Registry": pb.DESCRIPTOR.services_by_name["Registry"].full_name,
    "Coordinator": pb.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    "Specialist": pb.DESCRIPTOR.services_by_name["Specialist"].full_name,
}


class NodeServer:
    """A started gRPC server for one node, with health status SERVING for its services. Its worker
    threads (``max_workers``) exceed the push streams it accepts (``limits.max_streams``) by what
    control calls, health checks and registrations need, so pushes never starve them."""

    def __init__(self, node: NodeRuntime, listen: str, *, max_workers: int = 32, extra=()) -> None:
        self.node = node
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=SERVER_OPTIONS,
            interceptors=[MetricsInterceptor(node.metrics, node.node_id)],
        )
        exchange = ModuleExchangeServicer(node)
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
                        )
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
        self.port = node.security.add_port(self.server, listen)
        if self.port == 0:
            raise OSError(f"{node.node_id}: cannot listen on {listen}")
        self.server.start()
        for name in ["", *names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.node.close()
