"""Prometheus metrics of a process (prometheus-client), and the gRPC interceptor that times RPCs.

One registry per process, served on ``--metrics-port`` (0: off). Labels are bounded: ``node``
(grows with the number of nodes), ``link`` (uplink, downlink, d2d, backhaul, device_cloud),
``peer_tier``, ``module`` (layers + tasks), ``method`` (RPC or federation method), ``code``,
``reason``, ``task``, ``split``, ``tag``. No round number, digest or push id is ever a label.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hffm.ids import D2D, DEVICE_CLOUD, DEVICE_EDGE, EDGE_CLOUD

# Every reason a push can be rejected for (ModuleError.reason); bounded.
REJECT_REASONS = (
    "no_header",
    "out_of_order",
    "truncated",
    "overflow",
    "chunk_too_large",
    "not_placed",  # a chunk a transport marked as read into place that is not (a transport's bug: INTERNAL)
    "unexpected_trailer",
    "digest_mismatch",
    "bad_digest",
    "unknown_module",
    "duplicate_module",
    "empty_push",
    "bad_size",
    "bad_dtype",
    "dtype_mismatch",
    "shape_mismatch",
    "non_finite",
    "bad_stats",  # feature statistics (calibration) no sum could hold
    "bad_weight",
    "not_examined",
    "bad_encoding",
    "wrong_receiver",
    "unregistered_sender",
    "no_round",
    "wrong_round",
    "unexpected_push",
    "unexpected_sender",
    "before_statistics",
    "wrong_link",
    "wrong_version",
    "conflicting_push",
    "duplicate_sender",
    "already_aggregated",
    "no_route",
    "relay_failed",
    "relay_aborted",
    "too_many_streams",
    "bytes_in_flight",
    "stream_stalled",
    "no_identity",
    "sender_mismatch",
    "unregistered_caller",
    "wrong_attempt",
    "incomplete_push",
    "stale_push",
    "bad_signature",
)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def link_label(link: str, sender_role: str) -> str:
    """The metric's link kind: the wire's link split by direction where it has one."""
    if link == DEVICE_EDGE:
        return "uplink" if sender_role == "device" else "downlink"
    if link == EDGE_CLOUD:
        return "backhaul"
    if link == DEVICE_CLOUD:
        return "device_cloud"
    if link == D2D:
        return "d2d"
    return link


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.bytes_sent = Counter(
            "hffm_bytes_sent", "Module bytes sent, per hop", ["node", "link", "peer_tier", "module"], registry=r
        )
        self.bytes_received = Counter(
            "hffm_bytes_received",
            "Module bytes received and accepted (or relayed), per hop",
            ["node", "link", "peer_tier", "module"],
            registry=r,
        )
        self.rpc_handled = Counter(
            "hffm_rpc_handled", "RPCs handled by method and status", ["node", "method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "hffm_rpc_duration_seconds",
            "RPC handling time",
            ["node", "method", "code"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.modules_received = Counter("hffm_modules_received", "Modules accepted", ["node", "module"], registry=r)
        self.modules_rejected = Counter(
            "hffm_modules_rejected", "Pushes rejected, by reason", ["node", "reason"], registry=r
        )
        self.denied = Counter(
            "hffm_rpc_denied",
            "Calls refused before any state changed: no or a bad identity, or not allowed",
            ["node", "rpc", "reason"],
            registry=r,
        )
        self.aggregations = Counter("hffm_aggregations", "Collect steps aggregated", ["node", "tag"], registry=r)
        self.flagged = Counter(
            "hffm_flagged", "Senders' modules flagged as outliers (aggregation.params.flag_z)",
            ["node", "sender", "module"], registry=r,
        )  # fmt: skip
        self.round = Gauge("hffm_round", "Round the node is in", ["node"], registry=r)
        self.train_seconds = Counter("hffm_train_seconds", "Local training time", ["node"], registry=r)
        self.train_samples = Counter("hffm_train_samples", "Samples processed in local training", ["node"], registry=r)
        self.train_loss = Gauge("hffm_train_loss", "Mean training loss of the last round", ["node"], registry=r)
        self.accuracy = Gauge("hffm_accuracy", "Accuracy of the node's modules", ["node", "task", "split"], registry=r)
        # the coordinator's view (cloud)
        self.modeled_latency = Counter(
            "hffm_modeled_transfer_latency_seconds",
            "Modeled transmit time, summed over hops",
            ["node", "link", "module"],
            registry=r,
        )
        self.modeled_energy = Counter(
            "hffm_modeled_energy_joules",
            "Modeled energy (link=compute: local training)",
            ["node", "link", "module"],
            registry=r,
        )
        self.round_modeled_latency = Gauge(
            "hffm_round_modeled_latency_seconds",
            "Modeled latency (critical path) of the last round",
            ["method"],
            registry=r,
        )
        self.round_modeled_energy = Gauge(
            "hffm_round_modeled_energy_joules", "Modeled energy of the last round", ["method"], registry=r
        )
        self.round_wall = Gauge(
            "hffm_round_wall_seconds", "Measured wall time of the last round", ["method"], registry=r
        )
        self.rounds_done = Counter("hffm_rounds_completed", "Rounds completed", ["method"], registry=r)
        self.round_accuracy = Gauge(
            "hffm_round_accuracy",
            "Accuracy pooled over devices after the last round",
            ["method", "task", "split"],
            registry=r,
        )
        self.cluster_head = Gauge(
            "hffm_cluster_head", "1 for the current cluster head of an edge", ["edge", "head"], registry=r
        )
        self.attempts_aborted = Counter(
            "hffm_round_attempts_aborted", "Round attempts aborted (a node the round needed was lost)", registry=r
        )
        self.nodes_lost = Counter(
            "hffm_nodes_lost",
            "Nodes left out of a round midway (died, stalled or missed a deadline)",
            ["node"],
            registry=r,
        )
        self.push_streams = Gauge("hffm_push_streams", "Push streams being received", ["node"], registry=r)
        self.push_bytes_in_flight = Gauge(
            "hffm_push_bytes_in_flight", "Module bytes being assembled (as push headers declare)", ["node"], registry=r
        )
        self.checkpoints = Counter("hffm_checkpoints", "Round ends saved to durable state", ["node"], registry=r)
        self.checkpoint_bytes = Counter(
            "hffm_checkpoint_bytes_written",
            "Module (and claim) bytes written to disk by round-end saves (a file shared with another node or an "
            "earlier round end is written once)",
            ["node"],
            registry=r,
        )
        self._heads: dict[str, str] = {}

    def round_end_saved(self, node: str, written: int) -> None:
        """A round end saved to durable state; ``written``: the module bytes that save wrote to disk."""
        self.checkpoints.labels(node=node).inc()
        self.checkpoint_bytes.labels(node=node).inc(written)

    def init_node(self, node: str) -> None:
        """Series that must exist from the start at 0 (a clean run still shows 'no rejections')."""
        for reason in REJECT_REASONS:
            self.modules_rejected.labels(node=node, reason=reason)
        self.round.labels(node=node).set(0)
        self.push_streams.labels(node=node).set(0)
        self.push_bytes_in_flight.labels(node=node).set(0)

    def serve(self, port: int, addr: str = "0.0.0.0", tls: dict[str, str] | None = None) -> int:
        """Serve /metrics; with ``tls`` (paths ``ca``, ``cert``, ``key``) over HTTPS, and only to
        clients with a certificate of the federation's CA (the scraper's)."""
        if tls is None:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
        else:
            server, _ = start_http_server(
                port,
                addr=addr,
                registry=self.registry,
                certfile=tls["cert"],
                keyfile=tls["key"],
                client_cafile=tls["ca"],
                client_auth_required=True,
            )
        return server.server_port

    def set_head(self, edge: str, head: str) -> None:
        old = self._heads.get(edge)
        if old and old != head:
            self.cluster_head.labels(edge=edge, head=old).set(0)
        self.cluster_head.labels(edge=edge, head=head).set(1)
        self._heads[edge] = head


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC of a server by method and final status code."""

    def __init__(self, metrics: Metrics, node: str) -> None:
        self.m, self.node = metrics, node

    def observe(self, method: str, t0: float, code: str) -> None:
        """One call of ``method`` that began at ``t0`` (perf_counter) and ended with ``code``."""
        self.m.rpc_handled.labels(node=self.node, method=method, code=code).inc()
        self.m.rpc_seconds.labels(node=self.node, method=method, code=code).observe(time.perf_counter() - t0)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def code_of(context) -> str:
            c = context.code() if hasattr(context, "code") else None
            return c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"

        def wrap_unary(behavior: Callable):
            def inner(request, context):
                t0 = time.perf_counter()
                try:
                    resp = behavior(request, context)
                except BaseException:
                    self.observe(method, t0, code_of(context))
                    raise
                self.observe(method, t0, code_of(context) if context.code() else "OK")
                return resp

            return inner

        def wrap_stream(behavior: Callable):
            def inner(request, context):
                t0 = time.perf_counter()
                try:
                    yield from behavior(request, context)
                except BaseException:
                    self.observe(method, t0, code_of(context))
                    raise
                self.observe(method, t0, code_of(context) if context.code() else "OK")

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
