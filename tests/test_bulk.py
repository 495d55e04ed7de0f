"""The bulk transport (``wire.transport: bulk``): pushes as length-prefixed frames over TCP/TLS, fed
to the node's one Push handler. ``tests/test_grpc_node.py`` runs every bad-input case of a push over it
too (its ``-bulk`` fixtures); here: what only a socket can get wrong (frames too large, garbage, a
refusal while the client still sends, a cancelled push, connections beyond the bound, a receiver
that moved), the fallback to gRPC, its metrics, and a whole federation over it."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from rich.console import Console

from hffm.config import load_config
from hffm.methods import Collect
from services.common.bootstrap import node_modules, topology
from services.common.bulk import MAX_FRAME, MAX_PREFIX, SPLIT, BulkPush, BulkServer
from services.common.chunkwire import chunk_parts, serialize_push_request
from services.common.client import Channels, push_requests, trailed_push
from services.common.identity import identity_metadata
from services.common.node import NodeRuntime
from services.common.server import NodeServer
from services.launcher import run
from services.rpc import pb, pb_grpc
from tests.golden.view import golden_view
from tests.test_grpc_node import D0, D1, EDGE, _good, _header

_U32 = struct.Struct("<I")


class _Edge(NodeRuntime):
    role = "edge"


def _serve(cfg, transport: str = "bulk"):
    cfg = cfg.model_copy(
        update={
            "security": cfg.security.model_copy(update={"tls": False}),
            "wire": cfg.wire.model_copy(update={"transport": transport}),
        }
    )
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    node.assign(1, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    return node, srv


@pytest.fixture
def bulk_edge(small_cfg):
    node, srv = _serve(small_cfg)
    yield node, srv
    srv.stop(0)


def _call(port: int, frames: list[bytes], meta=identity_metadata(D0)) -> tuple[int, bytes]:
    """One bulk call written by hand: metadata, ``frames`` as given (each with its length), the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        m = json.dumps([list(kv) for kv in meta]).encode()
        s.sendall(_U32.pack(len(m)) + m)
        try:
            for f in frames:
                s.sendall(f)
            s.sendall(_U32.pack(0))
        except OSError:
            pass  # refused early: the answer is still there to read
        head = s.recv(5, socket.MSG_WAITALL)
        code, n = struct.unpack("<BI", head)
        return code, s.recv(n, socket.MSG_WAITALL) if n else b""


def _frame(msg: bytes) -> bytes:
    return _U32.pack(len(msg)) + msg


def _rpc_count(node, method: str, code: str) -> float:
    want = f'hffm_rpc_handled_total{{code="{code}",method="{method}",node="{node.node_id}"}}'
    for line in generate_latest(node.metrics.registry).decode().splitlines():
        if line.startswith(want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_frame_above_the_limit_is_refused_with_its_size_and_nothing_is_kept(bulk_edge):
    node, srv = bulk_edge
    h, ems = _good(node, D0, 1)
    msgs = [serialize_push_request(r) for r in push_requests(h, ems, 4096)]
    before = node.inbox.snapshot()
    # the header, then a length prefix announcing more than a frame may hold (its bytes never follow)
    code, body = _call(srv.bulk.port, [_frame(msgs[0]), _U32.pack(MAX_FRAME + 1)])
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == code, body
    assert f"a frame of {MAX_FRAME + 1} bytes" in body.decode()
    assert node.inbox.snapshot() == before
    assert _rpc_count(node, "BulkPush", "RESOURCE_EXHAUSTED") == 1


def test_garbage_is_invalid_argument_and_the_listener_keeps_serving(bulk_edge):
    node, srv = bulk_edge
    before = node.inbox.snapshot()
    code, body = _call(srv.bulk.port, [_frame(b"\xff" * 64)])  # not a protobuf PushRequest
    assert code in (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.INTERNAL.value[0]), body
    with socket.create_connection(("127.0.0.1", srv.bulk.port), timeout=10) as s:  # metadata that is not JSON
        s.sendall(_U32.pack(3) + b"{{{")
        code, n = struct.unpack("<BI", s.recv(5, socket.MSG_WAITALL))
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert b"bulk call metadata" in s.recv(n, socket.MSG_WAITALL)
    assert node.inbox.snapshot() == before
    h, ems = _good(node, D0, 1)  # a good push after all that is taken
    ack = BulkPush("127.0.0.1", srv.bulk.port)(push_requests(h, ems, 4096), timeout=10, metadata=identity_metadata(D0))
    assert not ack.duplicate and ack.bytes_received == sum(e.size_bytes for e in ems)
    assert _rpc_count(node, "BulkPush", "OK") == 1


def test_a_push_refused_at_its_header_answers_while_the_client_still_sends(bulk_edge):
    """The receiver refuses after the header (wrong round) while the client has 64 MiB left to write:
    the client still reads the status (the receiver drains what follows instead of resetting)."""
    node, srv = bulk_edge
    h, ems = _good(node, D0, 1)
    h2 = _header(D0, ems, round_=7)

    def requests():
        yield from list(push_requests(h2, ems, 4096))[:1]
        chunk = b"\x00" * (1 << 20)
        for _ in range(64):
            yield chunk

    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        BulkPush("127.0.0.1", srv.bulk.port)(requests(), timeout=30, metadata=identity_metadata(D0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert "round 7" in e.value.details()
    assert node.inbox.snapshot() == before


def test_a_cancelled_push_ends_as_cancelled_and_changes_nothing(bulk_edge):
    node, srv = bulk_edge
    h, ems = _good(node, D0, 1)
    started = threading.Event()

    def slow():
        for i, r in enumerate(push_requests(h, ems, 4096)):
            if i == 2:
                started.set()
                time.sleep(1.0)
            yield r

    before = node.inbox.snapshot()
    call = BulkPush("127.0.0.1", srv.bulk.port).future(slow(), timeout=30, metadata=identity_metadata(D0))
    assert started.wait(10)
    assert call.cancel() and call.cancelled()
    err = call.exception(timeout=10)
    assert err is not None and err.code() == grpc.StatusCode.CANCELLED
    time.sleep(0.5)
    assert node.inbox.snapshot() == before


def test_chunk_frames_are_read_straight_into_the_modules_buffers(bulk_edge, monkeypatch):
    """Over the bulk transport a chunk's data is read into its module's receive buffer (the frame's
    prefix first names the chunk): every chunk after the first three (which may be read before the
    handler has checked the header and made their places) arrives placed, and the push is taken whole."""
    from hffm.wire import PushAssembler

    node, srv = bulk_edge
    placed: list[bool] = []
    add = PushAssembler.add_chunk

    def spy(self, module_index, offset, data, placed_=False):
        placed.append(placed_)
        return add(self, module_index, offset, data, placed_)

    monkeypatch.setattr(PushAssembler, "add_chunk", spy)
    h, ems = _good(node, D0, 1)
    ack = BulkPush("127.0.0.1", srv.bulk.port)(push_requests(h, ems, 1024), timeout=10, metadata=identity_metadata(D0))
    assert not ack.duplicate and ack.bytes_received == sum(e.size_bytes for e in ems)
    assert len(placed) == sum(-(-e.size_bytes // 1024) for e in ems) > 10
    assert all(placed[3:])  # at most three are read ahead of the header's checks (a queue of two, one in hand)
    assert node.inbox.snapshot()["accepted"]


def _chunk_frame(index: int, offset: int, data: bytes) -> bytes:
    """A chunk frame as ``BulkPush`` writes it: the prefix's length, the prefix, the data."""
    parts = chunk_parts(index, offset, data)
    return _U32.pack(SPLIT | len(parts.prefix)) + parts.prefix + data


def _run_past(blob: bytes, n: int) -> list[bytes]:
    """A module's chunks in order, the last one 100 bytes longer than what is left of the module."""
    offs = range(0, len(blob), n)
    return [_chunk_frame(0, o, blob[o : o + n] if o + n < len(blob) else blob[o:] + b"x" * 100) for o in offs]


@pytest.mark.parametrize(
    "frames, code, why",
    [
        (lambda ems: [_U32.pack(SPLIT)], "INVALID_ARGUMENT", "a 0-byte prefix"),
        (lambda ems: [_U32.pack(SPLIT | (MAX_PREFIX + 1))], "INVALID_ARGUMENT", f"a {MAX_PREFIX + 1}-byte prefix"),
        (lambda ems: [_U32.pack(SPLIT | 4) + b"\xff" * 4], "INVALID_ARGUMENT", "not a chunk message's"),
        (
            lambda ems: [(lambda p: _U32.pack(SPLIT | len(p)) + p)(chunk_parts(0, 0, bytes(MAX_FRAME)).prefix)],
            "RESOURCE_EXHAUSTED",
            "a frame of",
        ),
        (lambda ems: _run_past(ems[0].data, 1024), "INVALID_ARGUMENT", "runs past"),
        (lambda ems: [_chunk_frame(99, 0, b"x")], "INVALID_ARGUMENT", "module 99"),
        (
            lambda ems: [_chunk_frame(0, 0, ems[0].data[:4096]), _chunk_frame(0, 0, b"\0" * 4096)],
            "INVALID_ARGUMENT",
            "out-of-order",
        ),
        (lambda ems: [_chunk_frame(0, 4096, ems[0].data[4096:8192])], "INVALID_ARGUMENT", "out-of-order"),
    ],
    ids=[
        "prefix-empty",
        "prefix-too-long",
        "prefix-garbage",
        "data-too-large",
        "overflow",
        "no-such-module",
        "region-twice",
        "region-ahead",
    ],
)
def test_a_chunk_frame_that_breaks_the_rules_is_refused_and_nothing_is_kept(bulk_edge, frames, code, why):
    """Chunk frames written by hand: a prefix of a bad length or that is no chunk message's, data beyond
    a frame, a chunk outside its module or the push, a region written twice or ahead of its turn. Each
    is refused with its status and reason; the inbox is unchanged and the listener takes a good push."""
    node, srv = bulk_edge
    h, ems = _good(node, D0, 1)
    before = node.inbox.snapshot()
    header = serialize_push_request(next(iter(push_requests(h, ems, 4096))))
    got, body = _call(srv.bulk.port, [_frame(header), *frames(ems)])
    assert got == getattr(grpc.StatusCode, code).value[0], body
    assert why in body.decode()
    assert node.inbox.snapshot() == before
    ack = BulkPush("127.0.0.1", srv.bulk.port)(push_requests(h, ems, 4096), timeout=10, metadata=identity_metadata(D0))
    assert not ack.duplicate


def test_at_its_bound_a_listener_drops_the_connection_idle_longest_or_else_the_new_one():
    """A listener holds at most ``max_connections``: at the bound a new connection takes the place of
    the one idle longest (waiting for its next push), and when every one is inside a push the new one
    is closed at once."""
    inside = threading.Event()
    release = threading.Event()

    def handle(frames, ctx):
        inside.set()
        release.wait(10)
        list(frames)
        return pb.PushAck()

    srv = BulkServer(handle, "127.0.0.1", 0, max_connections=2)
    try:
        first = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        time.sleep(0.2)
        second = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        time.sleep(0.2)
        third = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # the first was idle longest
        assert first.recv(1) == b""
        third.sendall(_U32.pack(2) + b"[]")  # third: inside a push (held by the handler)
        second.sendall(_U32.pack(2) + b"[]")  # second too
        assert inside.wait(5)
        time.sleep(0.2)
        fourth = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        assert fourth.recv(1) == b""  # nobody idle: closed at once
        release.set()
        for s in (first, second, third, fourth):
            s.close()
    finally:
        release.set()
        srv.stop()


def test_a_sender_falls_back_to_grpc_where_no_bulk_endpoint_is_served_and_asks_again_after_a_move(small_cfg):
    """``Channels(bulk=True)``: a receiver without a bulk listener (port 0) is pushed to over gRPC; a
    receiver whose bulk listener moved (restarted elsewhere) fails the push UNAVAILABLE once, the retry
    goes over gRPC, and the push after asks again and goes to the new listener."""
    node, srv = _serve(small_cfg, transport="grpc")
    try:
        ch = Channels(bulk=True)
        push = ch.push(f"127.0.0.1:{srv.port}", EDGE, identity_metadata(D0))
        assert not isinstance(push, BulkPush)
        h, ems = _good(node, D0, 1)
        assert not push(push_requests(h, ems, 4096), timeout=10, metadata=identity_metadata(D0)).duplicate
        ch.close()
    finally:
        srv.stop(0)
    node, srv = _serve(small_cfg)
    try:
        ch = Channels(bulk=True)
        addr, meta = f"127.0.0.1:{srv.port}", identity_metadata(D0)
        first = ch.push(addr, EDGE, meta)
        assert isinstance(first, BulkPush) and first.port == srv.bulk.port
        assert ch.push(addr, EDGE, meta) is first  # asked once
        srv.bulk.stop()  # the listener goes; a new one elsewhere, named by the same gRPC server
        moved = srv.bulk = BulkServer(srv.bulk.handle, "127.0.0.1", 0)
        srv.exchange.bulk_port = moved.port
        h, ems = _good(node, D0, 1)
        with pytest.raises(grpc.RpcError) as e:
            first(push_requests(h, ems, 4096), timeout=10, metadata=meta)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and first.broken
        fallback = ch.push(addr, EDGE, meta)  # the retry goes over gRPC
        assert not isinstance(fallback, BulkPush)
        assert not fallback(push_requests(h, ems, 4096), timeout=10, metadata=meta).duplicate
        again = ch.push(addr, EDGE, meta)  # and the next push asks again
        assert isinstance(again, BulkPush) and again.port == moved.port
        assert again(push_requests(h, ems, 4096), timeout=10, metadata=meta).duplicate  # the same push, counted once
        ch.close()
    finally:
        srv.stop(0)


def test_a_node_takes_chunks_up_to_the_bulk_chunk_size_over_either_transport_and_none_larger(small_cfg):
    """Chunks of up to ``wire.bulk_chunk_bytes`` are taken over gRPC too (a D2D relay passes a bulk push's
    chunks on as they came); a chunk above both sizes is INVALID_ARGUMENT and leaves nothing, on both."""
    wire = small_cfg.wire.model_copy(update={"chunk_bytes": 1024, "bulk_chunk_bytes": 2048})
    cfg = small_cfg.model_copy(update={"wire": wire})
    for transport in ("grpc", "bulk"):
        node, srv = _serve(cfg, transport)
        try:
            ch = Channels(bulk=transport == "bulk")
            push = ch.push(f"127.0.0.1:{srv.port}", EDGE, identity_metadata(D0))
            assert isinstance(push, BulkPush) == (transport == "bulk")
            h, ems = _good(node, D0, 1)
            before = node.inbox.snapshot()
            with pytest.raises(grpc.RpcError) as e:
                push(push_requests(h, ems, 2049), timeout=10, metadata=identity_metadata(D0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds 2048" in e.value.details()
            assert node.inbox.snapshot() == before
            assert not push(push_requests(h, ems, 2048), timeout=10, metadata=identity_metadata(D0)).duplicate
            ch.close()
        finally:
            srv.stop(0)


def test_a_whole_federation_over_the_bulk_transport_is_the_grpc_run_bit_for_bit(tmp_path, golden_run):
    """The golden hfm-d2d run (mTLS, D2D relays through cluster heads, edge and cloud rounds) with
    ``wire.transport=bulk`` and ``wire.digests=trailer``: every tier pushes over it (each process's log
    names the bulk endpoints it pushed to), with each new module set's digests after its chunks (relays
    pass the trailer on), and the run's results and final modules are the gRPC run's, bit for bit."""
    golden, grpc_view, _ = golden_run
    out = tmp_path / "bulk"
    run(
        load_config(None, [*golden["sets"], "wire.transport=bulk", "wire.digests=trailer"]),
        out,
        Console(file=io.StringIO(), width=120),
        timeout_s=300,
    )
    for log in sorted(Path(out / "logs").glob("*.log")):
        text = log.read_text()
        assert "bulk, port" in text, f"{log.name} pushed nothing over the bulk transport"
        assert ": gRPC" not in text, log.name
        assert "digests follow the chunks" in text, log.name
    assert golden_view(out) == grpc_view


def test_the_bulk_endpoint_needs_an_identity(bulk_edge):
    _, srv = bulk_edge

    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.ModuleExchangeStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.BulkEndpoint(pb.Empty(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.BulkEndpoint(pb.Empty(), timeout=5, metadata=identity_metadata(D1)).port == srv.bulk.port


def test_the_launcher_picks_every_bulk_port_with_the_others(tmp_path):
    """With wire.transport=bulk every node's bulk listener gets a port picked with the gRPC and metrics
    ports (a listener binding any free port while others still start could take one of theirs), all
    distinct; without it no process is given one."""
    from services.launcher import plan_processes

    for transport, want in (("bulk", True), ("grpc", False)):
        cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=3", f"wire.transport={transport}"])
        plan = plan_processes(cfg, topology(cfg), tmp_path / "c.yaml", tmp_path)
        ports, bulk = [], {}
        for _, argv in plan:
            for i, a in enumerate(argv):
                if a in ("--listen", "--node", "--metrics-port", "--bulk-port"):
                    ports.append(argv[i + 1].rsplit(":", 1)[-1].rsplit("=", 1)[-1])
                if a == "--bulk-port":
                    bulk[argv[i + 1].rsplit("=", 1)[0] if "=" in argv[i + 1] else argv[argv.index("--listen") + 1]] = 1
        assert len(ports) == len(set(ports))
        assert (len(bulk) == 1 + 2 + 6) is want and (not bulk) is (not want)


def test_over_tls_the_bulk_listener_must_prove_it_is_the_node_dialled(small_cfg):
    """A bulk push over TLS checks the listener's certificate names the node the sender means to reach
    (as gRPC's target name override does): dialled as edge-1, edge-0's listener fails the handshake, and
    nothing is pushed; a client with no certificate of the CA is not let in at all."""
    import ssl

    from services.common.security import Security

    cfg = small_cfg.model_copy(update={"wire": small_cfg.wire.model_copy(update={"transport": "bulk"})})
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    node.assign(1, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    try:
        dev = Security(cfg.security, D0)
        h, ems = _good(node, D0, 1)
        h = dev.sign_header(h)
        before = node.inbox.snapshot()
        wrong = BulkPush("127.0.0.1", srv.bulk.port, dev.bulk_client_context(), server_hostname="edge-1")
        with pytest.raises(grpc.RpcError) as e:
            wrong(push_requests(h, ems, 4096), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "certificate" in e.value.details().lower()
        anon = ssl.create_default_context(cafile=str(Path(cfg.security.dir) / "ca.crt"))
        with pytest.raises(grpc.RpcError) as e:
            BulkPush("127.0.0.1", srv.bulk.port, anon, server_hostname=EDGE)(push_requests(h, ems, 4096), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert node.inbox.snapshot() == before
        right = BulkPush("127.0.0.1", srv.bulk.port, dev.bulk_client_context(), server_hostname=EDGE)
        assert not right(push_requests(h, ems, 4096), timeout=10).duplicate
    finally:
        srv.stop(0)


def _same(header):
    return header


def test_a_client_that_stalls_inside_a_push_gets_deadline_exceeded_and_leaves_nothing(small_cfg):
    """A bulk client that sends its header and then nothing (or announces a frame and sends part of it,
    or sends every chunk of a push whose digests follow and then no trailer) is answered
    DEADLINE_EXCEEDED within ``limits.chunk_timeout_s``, as a stalled gRPC stream is, and the node
    keeps nothing of it."""
    cfg = small_cfg.model_copy(update={"limits": small_cfg.limits.model_copy(update={"chunk_timeout_s": 1.0})})
    node, srv = _serve(cfg)
    try:
        h, ems = _good(node, D0, 1)
        msgs = [serialize_push_request(r) for r in push_requests(h, ems, 4096)]
        digests = [e.digest for e in ems]
        trailed = [serialize_push_request(r) for r in trailed_push(h, ems, 4096, lambda: digests, _same)]
        before = node.inbox.snapshot()
        cases = [
            (_frame(msgs[0]), "next chunk"),  # nothing after the header
            (_frame(msgs[0]) + _U32.pack(len(msgs[1])) + msgs[1][:100], "next chunk"),  # half a frame
            (b"".join(map(_frame, trailed[:-1])), "its trailer after its last chunk"),  # no trailer
        ]
        for sent, owed in cases:
            with socket.create_connection(("127.0.0.1", srv.bulk.port), timeout=10) as s:
                m = json.dumps([list(kv) for kv in identity_metadata(D0)]).encode()
                s.sendall(_U32.pack(len(m)) + m + sent)
                t0 = time.monotonic()
                code, n = struct.unpack("<BI", s.recv(5, socket.MSG_WAITALL))
                details = s.recv(n, socket.MSG_WAITALL).decode()
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], details
                assert owed in details and time.monotonic() - t0 < 5
        assert node.inbox.snapshot() == before
    finally:
        srv.stop(0)
