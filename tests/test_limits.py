"""One misbehaving client cannot starve a node (config ``limits``), on a real gRPC server on loopback:
a push stream that never sends its header, or stops between chunks, is cut with DEADLINE_EXCEEDED; one
caller cannot hold more than its streams, nor everyone more than the node's, nor declare more bytes
than it assembles at once (RESOURCE_EXHAUSTED, at once); meanwhile health checks and round control
answer, and once the flood is cut every slot and byte is free again."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hffm.methods import Collect
from services.common.bootstrap import node_modules, topology
from services.common.client import push_callable, push_requests
from services.common.convert import header_to_pb
from services.common.server import NodeServer
from services.rpc import pb
from tests.test_grpc_node import D0, D1, EDGE, Clients, _Edge, _good, _push, _trailed

LIMITS = [
    ("header_timeout_s", 1.0),
    ("chunk_timeout_s", 1.0),
    ("max_streams", 6),
    ("max_streams_per_peer", 2),
]


def _server(small_cfg, tls: bool, **limits):
    lim = small_cfg.limits.model_copy(update={**dict(LIMITS), **limits})
    cfg = small_cfg.model_copy(update={"limits": lim, "security": small_cfg.security.model_copy(update={"tls": tls})})
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=cfg.limits.max_streams + 8)
    node.assign(1, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    return node, srv, Clients(cfg, f"127.0.0.1:{srv.port}", EDGE)


@pytest.fixture(params=["tls", "plaintext"])
def limited(request, small_cfg):
    node, srv, ch = _server(small_cfg, request.param == "tls")
    yield node, ch
    ch.close()
    srv.stop(0)


def _held_stream(ch, caller, first=(), timeout=30):
    """A push from ``caller`` that sends ``first`` and then holds the stream open; returns (future, release)."""
    gate = threading.Event()

    def reqs():
        yield from first
        gate.wait(timeout)

    fut = push_callable(ch.as_(caller)).future(reqs(), timeout=timeout, metadata=ch.meta(caller))
    return fut, gate.set


def _code(fut, timeout=10) -> grpc.StatusCode:
    try:
        fut.result(timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def _healthy(ch) -> bool:
    stub = health_pb2_grpc.HealthStub(ch.as_(D1))
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING


def _wait_free(node, timeout=10):
    deadline = time.monotonic() + timeout
    while node.receiver.admission.snapshot() != {"streams": 0, "bytes": 0} and time.monotonic() < deadline:
        time.sleep(0.05)
    return node.receiver.admission.snapshot()


def test_a_push_without_its_header_is_cut_at_the_header_deadline(limited):
    node, ch = limited
    t0 = time.monotonic()
    fut, release = _held_stream(ch, D0)
    assert _code(fut) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= time.monotonic() - t0 < 8
    assert "within 1s" in fut.exception().details()
    release()
    assert _wait_free(node) == {"streams": 0, "bytes": 0}
    assert node.metrics.modules_rejected.labels(node=EDGE, reason="stream_stalled")._value.get() == 1


def test_a_push_that_stops_between_chunks_is_cut_and_changes_nothing(limited):
    node, ch = limited
    header, ems = _good(node, D0, 1)
    if ch.cfg.security.tls:
        header = ch.security(D0).sign_header(header)
    before = node.inbox.snapshot()
    fut, release = _held_stream(ch, D0, [pb.PushRequest(header=header_to_pb(header))])
    assert _code(fut) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "next chunk" in fut.exception().details()
    release()
    assert node.inbox.snapshot() == before
    assert _wait_free(node) == {"streams": 0, "bytes": 0}


def test_a_push_that_stops_before_its_trailer_is_cut_and_changes_nothing(limited):
    """Digests after the chunks (``wire.digests: trailer``): a sender that sends its header and every
    chunk and then stalls before the trailer meets the same per-message deadline, named for what it
    owes; nothing is kept and its slot and bytes are free again."""
    node, ch = limited
    header, ems = _good(node, D0, 1)
    reqs = _trailed(ch, header, ems)
    assert reqs[-1].WhichOneof("kind") == "trailer" and len(reqs) > 2
    before = node.inbox.snapshot()
    t0 = time.monotonic()
    fut, release = _held_stream(ch, D0, reqs[:-1])
    assert _code(fut) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= time.monotonic() - t0 < 8
    assert "its trailer after its last chunk did not come within 1s" in fut.exception().details()
    release()
    assert node.inbox.snapshot() == before
    assert _wait_free(node) == {"streams": 0, "bytes": 0}
    ack = ch.push(D0)(iter(reqs), timeout=10, metadata=ch.meta(D0))  # the whole push still goes in
    assert not ack.duplicate


def test_one_caller_cannot_hold_more_streams_and_the_node_keeps_answering(small_cfg):
    node, srv, ch = _server(small_cfg, True, header_timeout_s=20.0)
    try:
        held = [_held_stream(ch, D0) for _ in range(2)]
        time.sleep(0.5)
        assert node.receiver.admission.snapshot()["streams"] == 2
        third, release3 = _held_stream(ch, D0)
        assert _code(third, timeout=3) == grpc.StatusCode.RESOURCE_EXHAUSTED  # at once, not at a deadline
        assert "already has 2 push streams" in third.exception().details()
        other, release_other = _held_stream(ch, D1)  # another caller still gets in
        time.sleep(0.3)
        assert node.receiver.admission.snapshot()["streams"] == 3
        assert _healthy(ch)
        for fut, release in [*held, (other, release_other)]:
            fut.cancel()
            release()
        release3()
        assert _wait_free(node) == {"streams": 0, "bytes": 0}
    finally:
        ch.close()
        srv.stop(0)


def test_a_flood_of_half_open_streams_is_capped_then_cut_and_memory_given_back(small_cfg):
    """Plaintext: any caller name is taken on trust, so a flood comes from 40 different "devices"."""
    node, srv, ch = _server(small_cfg, False)
    try:
        flood = [_held_stream(ch, f"device-9-{i}") for i in range(40)]  # streams that never send a header
        time.sleep(0.3)
        assert node.receiver.admission.snapshot()["streams"] <= 6
        assert _healthy(ch)
        codes = [_code(f, timeout=15) for f, _ in flood]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 40 - 6, codes  # never more than max_streams in
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
        for _, release in flood:
            release()
        assert _wait_free(node) == {"streams": 0, "bytes": 0}
        h, ems = _good(node, D0, 2)  # and it still takes a real push
        ack = _push(ch, list(push_requests(h, ems, 1 << 20)))
        assert ack.bytes_received == sum(e.size_bytes for e in ems)
    finally:
        ch.close()
        srv.stop(0)


def test_bytes_in_flight_are_capped_and_released(small_cfg):
    node, srv, ch = _server(small_cfg, False, header_timeout_s=20.0, chunk_timeout_s=20.0)
    try:
        h0, ems0 = _good(node, D0, 1)
        need = sum(e.size_bytes for e in ems0)
        srv.stop(0)
        ch.close()
        node, srv, ch = _server(
            small_cfg, False, header_timeout_s=20.0, chunk_timeout_s=20.0, max_bytes_in_flight=need + need // 2
        )
        h0, ems0 = _good(node, D0, 1)
        h1, ems1 = _good(node, D1, 2)
        first, release = _held_stream(ch, D0, [pb.PushRequest(header=header_to_pb(h0))])
        deadline = time.monotonic() + 5
        while node.receiver.admission.snapshot()["bytes"] != need and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.receiver.admission.snapshot()["bytes"] == need
        second, release2 = _held_stream(ch, D1, [pb.PushRequest(header=header_to_pb(h1))])
        assert _code(second, timeout=3) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes in flight" in second.exception().details()
        assert node.metrics.push_bytes_in_flight.labels(node=EDGE)._value.get() == need
        first.cancel()
        release()
        release2()
        assert _wait_free(node) == {"streams": 0, "bytes": 0}
    finally:
        ch.close()
        srv.stop(0)
