"""A real node gRPC server on loopback fed crafted pushes: every bad input gets its status code and
leaves the node's state exactly as it was; a retried push is counted once."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save as st_save

from hffm.aggregation import weighted_mean
from hffm.methods import Collect
from hffm.modules import EncodedModule, Module, digest_of, encode_module
from hffm.wire import ModuleHeader, PushHeader, chunks, push_id_for
from services.common.bootstrap import node_modules, topology
from services.common.bulk import BulkPush
from services.common.client import push_callable, push_requests, trailed_push
from services.common.convert import header_from_pb, header_to_pb, step_to_pb
from services.common.identity import identity_metadata
from services.common.node import NodeRuntime
from services.common.security import Security
from services.common.server import NodeServer
from services.rpc import pb, pb_grpc

D0, D1, EDGE = "device-0-0", "device-0-1", "edge-0"


class _Edge(NodeRuntime):
    role = "edge"


class Clients:
    """Channels to the node under test, one per calling identity (TLS: each presents that identity's
    certificate; plaintext: each call names it in its metadata). ``None``: a caller with no identity."""

    def __init__(self, cfg, address: str, target: str, bulk_port: int = 0) -> None:
        self.cfg, self.address, self.target = cfg, address, target
        self.bulk_port = bulk_port  # the node's bulk listener: pushes go there (wire.transport: bulk)
        self._channels: dict[str | None, grpc.Channel] = {}
        self._bulk: dict[str | None, BulkPush] = {}

    def push(self, name: str | None):
        """``ModuleExchange.Push`` as ``name``: over gRPC, or the bulk transport when the node runs it
        (TLS: ``name``'s certificate; None: the CA only, no certificate)."""
        if not self.bulk_port:
            return push_callable(self.as_(name))
        if name not in self._bulk:
            tls = None
            if self.cfg.security.tls and name is not None:
                tls = Security(self.cfg.security, name).bulk_client_context()
            elif self.cfg.security.tls:
                tls = ssl.create_default_context(cafile=str(Path(self.cfg.security.dir) / "ca.crt"))
            self._bulk[name] = BulkPush("127.0.0.1", self.bulk_port, tls, server_hostname=self.target)
        return self._bulk[name]

    def as_(self, name: str | None) -> grpc.Channel:
        if name not in self._channels:
            if name is not None:
                ch = Security(self.cfg.security, name).channel(self.address, self.target)
            elif self.cfg.security.tls:  # the CA, so it can verify the server, but no certificate of its own
                ca = (Path(self.cfg.security.dir) / "ca.crt").read_bytes()
                ch = grpc.secure_channel(
                    self.address,
                    grpc.ssl_channel_credentials(ca),
                    options=[("grpc.ssl_target_name_override", self.target)],
                )
            else:
                ch = grpc.insecure_channel(self.address)
            self._channels[name] = ch
        return self._channels[name]

    def security(self, name: str) -> Security:
        return Security(self.cfg.security, name)

    def meta(self, name: str | None):
        return None if self.cfg.security.tls or name is None else identity_metadata(name)

    def control(self, name: str = "cloud"):
        """RoundControl as ``name`` (the coordinator by default), metadata included."""
        stub = pb_grpc.RoundControlStub(self.as_(name))
        meta = self.meta(name)
        return lambda rpc, req, **kw: getattr(stub, rpc)(req, metadata=meta, **kw)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        for b in self._bulk.values():
            b.close()


@pytest.fixture(params=["tls", "plaintext", "tls-bulk", "plaintext-bulk"])
def edge(request, small_cfg):
    """The edge under test; ``-bulk``: it runs the bulk transport and every push goes there."""
    if request.param.startswith("plaintext"):
        small_cfg = small_cfg.model_copy(update={"security": small_cfg.security.model_copy(update={"tls": False})})
    if request.param.endswith("bulk"):
        small_cfg = small_cfg.model_copy(update={"wire": small_cfg.wire.model_copy(update={"transport": "bulk"})})
    topo = topology(small_cfg)
    spec, modules = node_modules(small_cfg, topo, EDGE)
    node = _Edge(EDGE, small_cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    ch = Clients(small_cfg, f"127.0.0.1:{srv.port}", EDGE, srv.bulk.port if srv.bulk else 0)
    node.assign(1, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    yield node, ch, topo
    ch.close()
    srv.stop(0)


def _device_modules(node, seed, samples=10.0, version=1):
    g = torch.Generator().manual_seed(seed)
    return {
        n: Module(n, {k: torch.randn(v.shape, generator=g) for k, v in m.tensors.items()}, version, samples)
        for n, m in node.modules.items()
        if n != "head.gqa"
    }


def _header(sender, ems, round_=1, tag="aggregate", link="device_edge", push_id=None):
    return PushHeader(
        push_id or push_id_for(sender, EDGE, round_, tag),
        sender,
        EDGE,
        round_,
        tag,
        link,
        tuple(ModuleHeader.of(e) for e in ems),
    )


def _push(ch, reqs, caller: str | None = "sender"):
    """Push as ``caller`` (default: the header's sender; None: no identity at all). With security on,
    an unsigned header is signed by its sender, as a node's Send does."""
    reqs = list(reqs)
    first = reqs[0] if reqs and isinstance(reqs[0], pb.PushRequest) and reqs[0].HasField("header") else None
    if caller == "sender":
        caller = first.header.sender if first is not None else D0
    if first is not None and ch.cfg.security.tls and not first.header.signature:
        signed = ch.security(first.header.sender).sign_header(header_from_pb(first.header))
        reqs[0] = pb.PushRequest(header=header_to_pb(signed))
    return ch.push(caller)(iter(reqs), timeout=10, metadata=ch.meta(caller))


def _good(node, sender, seed, samples=10.0):
    ems = [encode_module(m) for m in _device_modules(node, seed, samples).values()]
    return _header(sender, ems), ems


def _expect(ch, node, reqs, code, match, caller: str | None = "sender"):
    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        _push(ch, reqs, caller)
    assert e.value.code() == code, e.value.details()
    assert match in e.value.details()
    assert node.inbox.snapshot() == before


def test_health_and_reflection(edge):
    node, ch, _ = edge
    resp = health_pb2_grpc.HealthStub(ch.as_(D0)).Check(health_pb2.HealthCheckRequest(service="hffm.v1.ModuleExchange"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_truncated_stream(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    reqs = list(push_requests(h, ems, 4096))
    _expect(ch, node, reqs[:-1], grpc.StatusCode.INVALID_ARGUMENT, "truncated")


@pytest.mark.parametrize("one_chunk", [True, False])
def test_the_mid_stream_failpoint_fires_while_the_push_is_incomplete(edge, one_chunk):
    """``send.<tag>`` (a failpoint that stops or kills the sender) fires with the push incomplete: before the
    second chunk is yielded, or, for a push of one chunk, before that chunk (the receiver holds the header
    alone). Fired after the only chunk, the push could be whole at the receiver already."""
    node, _, _ = edge
    _, ems = _good(node, D0, 1)
    ems = sorted(ems, key=lambda em: sum(len(s) for s in em.segments))[:1] if one_chunk else ems
    chunk_bytes = 4 << 20 if one_chunk else 4096
    h = _header(D0, ems)
    seen: list[str] = []
    for req in push_requests(h, ems, chunk_bytes, lambda: seen.append("failpoint")):
        seen.append("header" if isinstance(req, pb.PushRequest) else "chunk")
    assert seen.count("failpoint") == 1 and (seen.count("chunk") == 1) == one_chunk
    at = seen.index("failpoint")
    assert seen[:at] == (["header"] if one_chunk else ["header", "chunk"])
    assert "chunk" in seen[at + 1 :]  # data always follows it


def test_out_of_order_chunks(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    reqs = list(push_requests(h, ems, 4096))
    reqs[1], reqs[2] = reqs[2], reqs[1]
    _expect(ch, node, reqs, grpc.StatusCode.INVALID_ARGUMENT, "out-of-order")


def test_missing_header(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    _expect(ch, node, list(push_requests(h, ems, 4096))[1:], grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_digest_mismatch(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    bad = replace(h, modules=(replace(h.modules[0], digest=digest_of(b"x")), *h.modules[1:]))
    _expect(ch, node, push_requests(bad, ems, 4096), grpc.StatusCode.DATA_LOSS, "blake3 digest")


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(digest_alg="md5"), "unknown digest algorithm 'md5'"),
        (dict(digest_alg=""), "unknown digest algorithm ''"),
        (dict(digest=b"\x01" * 16), "digest is 16 B, blake3 digests are 32 B"),
    ],
)
def test_digest_algorithm_checked_before_any_byte(edge, change, why):
    """The digest's algorithm travels in the header: an unknown one, or a digest of the wrong length, is
    INVALID_ARGUMENT from the header alone, and nothing is accepted."""
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    bad = replace(h, modules=(replace(h.modules[0], **change), *h.modules[1:]))
    _expect(ch, node, push_requests(bad, ems, 4096), grpc.StatusCode.INVALID_ARGUMENT, why)


def test_sha256_digests_accepted(edge):
    """A sender configured for SHA-256 (``wire.digest: sha256``) is understood: the receiver hashes with
    the algorithm the header names."""
    node, ch, _ = edge
    mods = _device_modules(node, 1)
    ems = [encode_module(m, digest_alg="sha256") for m in mods.values()]
    assert all(e.digest == hashlib.sha256(e.data).digest() for e in ems)
    ack = _push(ch, push_requests(_header(D0, ems), ems, 4096))
    assert not ack.duplicate and node.inbox.snapshot()["accepted"]["aggregate"]


def test_unknown_module_name(edge):
    node, ch, _ = edge
    m = next(iter(_device_modules(node, 1).values()))
    em = encode_module(Module("adapter.77", m.tensors, 1, 3.0))
    _expect(ch, node, push_requests(_header(D0, [em]), [em], 4096), grpc.StatusCode.INVALID_ARGUMENT, "unknown module")


def _raw(name, tensors, dtype="fp32", version=1):
    data = st_save({k: v.contiguous() for k, v in tensors.items()})

    return EncodedModule(name, version, 5.0, dtype, (memoryview(data),), digest_of(data))


def test_shape_mismatch(edge):
    node, ch, _ = edge
    t = {k: v.clone() for k, v in node.modules["head.art"].tensors.items()}
    key = next(iter(t))
    t[key] = torch.zeros(*[s + 1 for s in t[key].shape])
    em = _raw("head.art", t)
    _expect(ch, node, push_requests(_header(D0, [em]), [em], 4096), grpc.StatusCode.INVALID_ARGUMENT, "shape")


def test_dtype_mismatch(edge):
    node, ch, _ = edge
    em = _raw("head.art", node.modules["head.art"].tensors, dtype="fp16")  # fp32 bytes, header says fp16
    _expect(
        ch, node, push_requests(_header(D0, [em]), [em], 4096), grpc.StatusCode.INVALID_ARGUMENT, "header says fp16"
    )


def test_nan_values(edge):
    node, ch, _ = edge
    t = {k: v.clone() for k, v in node.modules["head.art"].tensors.items()}
    next(iter(t.values())).view(-1)[0] = float("nan")
    em = _raw("head.art", t)
    _expect(ch, node, push_requests(_header(D0, [em]), [em], 4096), grpc.StatusCode.INVALID_ARGUMENT, "NaN")


def test_version_from_wrong_round(edge):
    node, ch, _ = edge
    em = _raw("head.art", node.modules["head.art"].tensors, version=0)
    _expect(ch, node, push_requests(_header(D0, [em]), [em], 4096), grpc.StatusCode.FAILED_PRECONDITION, "version 0")
    em2 = _raw("head.art", node.modules["head.art"].tensors, version=2)
    _expect(
        ch,
        node,
        push_requests(_header(D0, [em2], round_=2), [em2], 4096),
        grpc.StatusCode.FAILED_PRECONDITION,
        "round 2",
    )


def test_unregistered_sender(edge):
    node, ch, _ = edge
    h, ems = _good(node, "device-1-0", 1)
    _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.PERMISSION_DENIED, "not registered")


def test_wrong_collect_step(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    h2 = _header(D0, ems, tag="broadcast")
    _expect(ch, node, push_requests(h2, ems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "collects nothing")


def test_good_pushes_retry_counted_once_and_weighted_mean(edge, small_cfg):
    node, ch, _ = edge
    m0, m1 = _device_modules(node, 1, samples=12.0), _device_modules(node, 2, samples=36.0)
    e0 = [encode_module(m) for m in m0.values()]
    h0 = _header(D0, e0)
    ack = _push(ch, push_requests(h0, e0, 4096))
    assert not ack.duplicate and ack.bytes_received == sum(e.size_bytes for e in e0)
    snap = node.inbox.snapshot()
    ack2 = _push(ch, push_requests(h0, e0, 4096))  # the client retried
    assert ack2.duplicate and node.inbox.snapshot() == snap
    other = [encode_module(m) for m in _device_modules(node, 9).values()]
    _expect(ch, node, push_requests(_header(D0, other), other, 4096), grpc.StatusCode.ALREADY_EXISTS, "already")
    e1 = [encode_module(m) for m in m1.values()]
    # any gRPC client works: the generated stub with protobuf objects throughout (no chunkwire)
    plain = [pb.PushRequest(header=header_to_pb(ch.security(D1).sign_header(_header(D1, e1))))]
    plain += [pb.PushRequest(chunk=pb.Chunk(module_index=i, offset=o, data=bytes(v))) for i, o, v in chunks(e1)]
    pb_grpc.ModuleExchangeStub(ch.as_(D1)).Push(iter(plain), timeout=10, metadata=ch.meta(D1))
    report = ch.control()("AwaitRound", pb.AwaitRequest(round=1), timeout=30)
    assert [(a.tag, list(a.counted), list(a.left_out)) for a in report.aggregates] == [("aggregate", [D0, D1], [])]
    assert report.node == EDGE and report.round == 1
    want = weighted_mean([m0, m1])
    for name, mod in want.items():
        got = node.modules[name]
        assert got.version == 1 and got.num_samples == 48.0
        for k in mod.tensors:
            assert torch.allclose(got.tensors[k], mod.tensors[k], atol=1e-6)
    assert node.modules["head.gqa"].version == 0  # nobody sent it: the edge keeps its own


def test_assign_round_bad_input(edge):
    node, ch, _ = edge
    call = ch.control()
    from hffm.methods import Send

    bad = pb.RoundTask(
        round=5, method="hfm", steps=[step_to_pb(Send("cloud", "edge_cloud", "aggregate", ("adapter.0",)))]
    )
    with pytest.raises(grpc.RpcError) as e:
        call("AssignRound", bad, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no address" in e.value.details()
    old = pb.RoundTask(round=1, method="hfm", steps=[])
    with pytest.raises(grpc.RpcError) as e:
        call("AssignRound", old, timeout=5)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        call("AwaitRound", pb.AwaitRequest(round=9), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_assignment_from_a_round_end_the_node_lacks_is_refused_and_changes_nothing(edge):
    node, ch, _ = edge
    before = (node.inbox.snapshot(), node.rounds.current)
    task = pb.RoundTask(round=2, method="hfm", steps=[], has_base=True, base_round=7, base_attempt=1)
    with pytest.raises(grpc.RpcError) as e:
        ch.control()("AssignRound", task, timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "round 7 attempt 1" in e.value.details()
    assert (node.inbox.snapshot(), node.rounds.current) == before
    task.base_round, task.base_attempt = 0, 0  # its initial modules: always held
    ch.control()("AssignRound", task, timeout=5)
    assert node.rounds.current == 2


def test_a_sync_takes_an_earlier_rounds_modules_and_nothing_else(edge):
    """A sync (a node that missed rounds) carries its tier's current state: a version below the round;
    this round's or a later one is refused."""
    from hffm.methods import SYNC

    node, ch, _ = edge
    node.assign(3, "hfm", [Collect(SYNC, (D0,), "device_edge")], {D0: "127.0.0.1:1"})
    for version in (3, 4):
        mods = _device_modules(node, 5, version=version)
        ems = [encode_module(m) for m in mods.values()]
        _expect(
            ch, node, push_requests(_header(D0, ems, 3, SYNC), ems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "sync"
        )
    ems = [encode_module(m) for m in _device_modules(node, 5, version=1).values()]
    _push(ch, push_requests(_header(D0, ems, 3, SYNC), ems, 4096))
    report = ch.control()("AwaitRound", pb.AwaitRequest(round=3), timeout=10)
    assert [list(a.counted) for a in report.aggregates] == [[D0]]
    # the synced state keeps its round: this node may sync others from it next (an edge synced from the
    # cloud syncs its devices), which only an earlier round's modules may do
    synced = {n: m for n, m in node.modules.items() if n in {e.name for e in ems}}
    assert synced and {m.version for m in synced.values()} == {1}


def test_a_label_reference_takes_an_earlier_rounds_modules_for_the_statistics_alone(edge):
    """The modules a joiner's collector sends it to compute its statistics under (``join-ref``) are an earlier
    round's, like a sync's: this round's or a later version is refused, as is a push from anyone but the
    step's sender, with nothing kept. Taken, they are held for the next statistics (``stats_under``), at their
    version, and not adopted: the node's own modules stay as they were."""
    from hffm.methods import JOIN_REF

    node, ch, _ = edge
    before = {n: m.tensors for n, m in node.modules.items()}
    node.assign(3, "hfm", [Collect(JOIN_REF, (D0,), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    for version in (3, 4):
        ems = [encode_module(m) for m in _device_modules(node, 5, version=version).values()]
        _expect(ch, node, push_requests(_header(D0, ems, 3, JOIN_REF), ems, 4096), grpc.StatusCode.FAILED_PRECONDITION,
                "join-ref")  # fmt: skip
    sent = _device_modules(node, 5, version=2)
    ems = [encode_module(m) for m in sent.values()]
    _expect(ch, node, push_requests(_header(D1, ems, 3, JOIN_REF), ems, 4096), grpc.StatusCode.FAILED_PRECONDITION,
            "not a sender")  # fmt: skip
    _push(ch, push_requests(_header(D0, ems, 3, JOIN_REF), ems, 4096))
    report = ch.control()("AwaitRound", pb.AwaitRequest(round=3), timeout=10)
    assert [list(a.counted) for a in report.aggregates] == [[D0]]
    held = node.stats_under
    assert held is not None and set(held) == set(sent) and {m.version for m in held.values()} == {2}
    assert all(torch.equal(held[n].tensors[k], v) for n, m in sent.items() for k, v in m.tensors.items())
    assert all(node.modules[n].tensors is ts for n, ts in before.items())


def test_header_round_trip_through_protobuf(edge):
    node, _, _ = edge
    h, _ = _good(node, D0, 1)
    from services.common.convert import header_from_pb

    assert header_from_pb(header_to_pb(h)) == h
    assert all(len(c[2]) <= 1 << 20 for c in chunks([encode_module(m) for m in node.modules.values()]))


# ---- identity from the transport, weights from the coordinator, attempts -------------------------
def test_a_push_without_identity_is_refused(edge):
    """TLS: a client without a certificate does not get through the handshake; plaintext: no metadata."""
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    if node.security.enabled:
        _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.UNAVAILABLE, "", caller=None)
    else:
        _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.UNAUTHENTICATED, "identity", caller=None)


def test_a_device_cannot_push_as_another(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)  # the header says device-0-0; the caller is device-0-1
    _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.PERMISSION_DENIED, "may not push as", caller=D1)


def _capped_edge(node, caps_d0: float):
    mods = tuple(sorted(n for n in node.modules if n != "head.gqa"))
    caps = ((D0, tuple((m, caps_d0) for m in mods)), (D1, tuple((m, 100.0) for m in mods)))
    node.assign(
        2,
        "hfm",
        [Collect("aggregate", (D0, D1), "device_edge", weight_caps=caps)],
        {D0: "127.0.0.1:1", D1: "127.0.0.1:2"},
    )
    return mods


def _round2(node, sender, seed, samples, names=None):
    mods = {n: m for n, m in _device_modules(node, seed, samples, version=2).items() if names is None or n in names}
    ems = [encode_module(m) for m in mods.values()]
    return _header(sender, ems, round_=2), ems


def test_a_sender_cannot_claim_more_samples_than_registered(edge):
    node, ch, _ = edge
    _capped_edge(node, caps_d0=12.0)
    h, ems = _round2(node, D0, 1, samples=1e30)
    _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 12 samples")
    h, ems = _round2(node, D0, 1, samples=12.0)
    assert not _push(ch, push_requests(h, ems, 4096)).duplicate


def test_a_claim_above_its_bound_is_accepted_but_counts_only_with_the_bound(edge):
    """aggregation.claim_bound: D0 registered 1000 samples (its cap) but its update counts with 10 (its
    bound, carried by the round task over protobuf); it pushes 1000, which is not refused, and the edge's
    aggregate weighs it 10 against D1's 100 (FedAvg with the bounded weight, the weights summed)."""
    node, ch, _ = edge
    mods = tuple(sorted(n for n in node.modules if n != "head.gqa"))
    collect = Collect(
        "aggregate",
        (D0, D1),
        "device_edge",
        weight_caps=((D0, tuple((m, 1000.0) for m in mods)), (D1, tuple((m, 100.0) for m in mods))),
        weight_bounds=((D0, tuple((m, 10.0) for m in mods)),),
    )
    peers = {D0: "127.0.0.1:1", D1: "127.0.0.1:2"}
    task = pb.RoundTask(round=2, method="hfm", steps=[step_to_pb(collect)], peers=peers)
    ch.control()("AssignRound", task, timeout=5)
    d0, d1 = _device_modules(node, 1, 1000.0, version=2), _device_modules(node, 2, 100.0, version=2)
    h0, e0 = _round2(node, D0, 1, samples=1000.0)
    h1, e1 = _round2(node, D1, 2, samples=100.0)
    _push(ch, push_requests(h0, e0, 4096))
    _push(ch, push_requests(h1, e1, 4096))
    ch.control()("AwaitRound", pb.AwaitRequest(round=2), timeout=10)
    want = weighted_mean([{n: replace(m, num_samples=10.0) for n, m in d0.items()}, d1])
    got = {n: node.modules[n] for n in want}
    assert all(got[n].num_samples == 110.0 for n in want)
    assert all(torch.allclose(got[n].tensors[k], want[n].tensors[k], atol=1e-6) for n in want for k in want[n].tensors)


def test_a_sender_must_push_every_module_its_step_names(edge):
    node, ch, _ = edge
    _capped_edge(node, caps_d0=12.0)
    h, ems = _round2(node, D0, 1, samples=12.0, names={"adapter.0"})
    _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.INVALID_ARGUMENT, "must push exactly")


def test_a_new_attempt_replaces_the_round_and_old_attempt_pushes_are_refused(edge):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    _push(ch, push_requests(h, ems, 4096))
    assert node.inbox.snapshot()["accepted"]["aggregate"]
    call = ch.control()
    collect = step_to_pb(Collect("aggregate", (D0, D1), "device_edge"))
    peers = {D0: "127.0.0.1:1", D1: "127.0.0.1:2"}
    call("AssignRound", pb.RoundTask(round=1, attempt=1, method="hfm", steps=[collect], peers=peers), timeout=5)
    assert node.inbox.snapshot()["attempt"] == 1 and not node.inbox.snapshot()["accepted"]["aggregate"]
    _expect(ch, node, push_requests(h, ems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "attempt 0")
    h1 = replace(h, attempt=1, push_id=push_id_for(D0, EDGE, 1, "aggregate", 1))
    assert not _push(ch, push_requests(h1, ems, 4096)).duplicate
    # the same attempt with other peers is not a retry; an older attempt is refused
    with pytest.raises(grpc.RpcError) as e:
        other = {D0: "10.9.9.9:1", D1: "127.0.0.1:2"}
        call("AssignRound", pb.RoundTask(round=1, attempt=1, method="hfm", steps=[collect], peers=other), timeout=5)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        call("AssignRound", pb.RoundTask(round=1, attempt=0, method="hfm", steps=[collect], peers=peers), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_quorum_aggregates_whoever_came_by_the_deadline(edge):
    from hffm.methods import Quorum

    node, ch, _ = edge
    node.assign(
        2,
        "hfm",
        [Collect("aggregate", (D0, D1), "device_edge", quorum=Quorum(min_fraction=0.5, deadline_s=0.5))],
        {D0: "127.0.0.1:1", D1: "127.0.0.1:2"},
    )
    h, ems = _round2(node, D1, 3, samples=7.0)
    _push(ch, push_requests(h, ems, 4096))
    report = ch.control()("AwaitRound", pb.AwaitRequest(round=2), timeout=30)
    assert [(list(a.counted), list(a.left_out)) for a in report.aggregates] == [([D1], [D0])]
    assert node.modules["adapter.0"].num_samples == 7.0 and node.modules["adapter.0"].version == 2
    # a late push from the left-out sender is stale: never counted, in this round or after it
    late, lems = _round2(node, D0, 4, samples=7.0)
    _expect(ch, node, push_requests(late, lems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "without device-0-0")
    node.assign(3, "hfm", [], {D0: "127.0.0.1:1"})
    _expect(ch, node, push_requests(late, lems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "round 3")


def test_the_coordinators_leave_out_ends_the_wait_and_makes_the_lost_senders_push_stale(edge):
    """A sender lost mid-round: the collect stops waiting for it at once (no deadline), aggregates the
    others, and refuses the lost sender's push if it ever comes; only the coordinator may say so."""
    from hffm.methods import Quorum

    node, ch, _ = edge
    node.assign(
        2,
        "hfm",
        [Collect("aggregate", (D0, D1), "device_edge", quorum=Quorum(min_fraction=0.5))],
        {D0: "127.0.0.1:1", D1: "127.0.0.1:2"},
    )
    h, ems = _round2(node, D1, 3, samples=7.0)
    _push(ch, push_requests(h, ems, 4096))
    req = pb.LeaveOutRequest(round=2, attempt=0, node=D0, reason="died")
    with pytest.raises(grpc.RpcError) as e:
        ch.control(D1)("LeaveOut", req, timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    before = node.inbox.snapshot()
    ch.control()("LeaveOut", req, timeout=5)
    assert node.inbox.snapshot() == before  # nothing counted or dropped from what was accepted
    report = ch.control()("AwaitRound", pb.AwaitRequest(round=2), timeout=10)  # at once: no 600 s deadline
    assert [(list(a.counted), list(a.left_out)) for a in report.aggregates] == [([D1], [D0])]
    late, lems = _round2(node, D0, 4, samples=7.0)
    _expect(ch, node, push_requests(late, lems, 4096), grpc.StatusCode.FAILED_PRECONDITION, "(died)")


def test_a_collect_that_cannot_reach_its_quorum_fails_at_once(edge):
    node, ch, _ = edge
    node.assign(2, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    ch.control()("LeaveOut", pb.LeaveOutRequest(round=2, attempt=0, node=D0, reason="died"), timeout=5)
    h, ems = _round2(node, D1, 3, samples=7.0)
    _push(ch, push_requests(h, ems, 4096))
    with pytest.raises(grpc.RpcError) as e:  # every sender needed (the default): it cannot be formed
        ch.control()("AwaitRound", pb.AwaitRequest(round=2), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "1 of 2 senders" in e.value.details()


# ---- pushes signed end to end ------------------------------------------------------------------------
def _raw_push(ch, header, ems, caller):
    reqs = [pb.PushRequest(header=header_to_pb(header)), *list(push_requests(header, ems, 4096))[1:]]
    return ch.push(caller)(iter(reqs), timeout=10)


@pytest.mark.parametrize("tamper", ["unsigned", "other_key", "changed_after_signing"])
def test_a_push_must_be_signed_by_its_sender_and_unchanged(edge, tamper):
    node, ch, _ = edge
    if not node.security.enabled:
        pytest.skip("signatures need keys: security on")
    h, ems = _good(node, D0, 1)
    if tamper == "unsigned":
        bad, match = h, "not signed"
    elif tamper == "other_key":  # device-0-1 signs a push in device-0-0's name
        bad, match = ch.security(D1).sign_header(h), "carries the certificate of spiffe://hffm/hffm/device/device-0-1"
    else:  # signed, then its weights raised on the way
        signed = ch.security(D0).sign_header(h)
        bad = replace(signed, modules=tuple(replace(m, num_samples=9.0) for m in signed.modules))
        match = "signature does not match"
    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        _raw_push(ch, bad, ems, D0)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and match in e.value.details()
    assert node.inbox.snapshot() == before
    assert not _raw_push(ch, ch.security(D0).sign_header(h), ems, D0).duplicate  # the honest push still goes in


# ---- digests after the chunks (wire.digests: trailer) ---------------------------------------------------
def _signer(ch, name):
    return ch.security(name).sign_header if ch.cfg.security.tls else (lambda h: h)


def _trailed(ch, h, ems, digests=None, sender=D0):
    """A push of ``ems`` with its digests in a trailer, signed by ``sender`` (with security on)."""
    ds = [e.digest for e in ems] if digests is None else digests
    return list(trailed_push(h, ems, 4096, lambda: ds, _signer(ch, sender)))


def test_a_push_whose_digests_follow_its_chunks_is_the_same_push(edge):
    """Digests in a trailer: the header goes with them empty (and signed so, with security on), the
    trailer carries them and the signature over the whole header. The push is taken, and it is the same
    push as with digests in the header: either one repeated is a duplicate, counted once; the same id
    with other modules is ALREADY_EXISTS once the trailer tells them apart."""
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    reqs = _trailed(ch, h, ems)
    assert reqs[0].header.modules[0].digest == b"" and reqs[-1].WhichOneof("kind") == "trailer"
    ack = ch.push(D0)(iter(reqs), timeout=10, metadata=ch.meta(D0))
    assert not ack.duplicate and ack.bytes_received == sum(e.size_bytes for e in ems)
    assert _push(ch, push_requests(h, ems, 4096)).duplicate  # the header-digest push: the same push
    assert ch.push(D0)(iter(_trailed(ch, h, ems)), timeout=10, metadata=ch.meta(D0)).duplicate
    before = node.inbox.snapshot()
    h2, ems2 = _good(node, D0, 2)
    with pytest.raises(grpc.RpcError) as e:
        ch.push(D0)(iter(_trailed(ch, h2, ems2)), timeout=10, metadata=ch.meta(D0))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already pushed different modules" in e.value.details()
    assert node.inbox.snapshot() == before


def _bad_trailer(case, ch, h, ems):
    """(requests, status, part of the details) of a push whose trailer breaks a rule."""
    good = _trailed(ch, h, ems)
    if case == "missing":
        return good[:-1], "INVALID_ARGUMENT", "no trailer"
    if case == "twice":
        return [*good, good[-1]], "INVALID_ARGUMENT", "after the push's trailer"
    if case == "before_the_last_chunk":
        return [*good[:-2], good[-1], good[-2]], "INVALID_ARGUMENT", "after the push's trailer"
    if case == "a_digest_short":
        short = pb.PushTrailer(digests=[e.digest for e in ems][:-1], signature=good[-1].trailer.signature)
        return [*good[:-1], pb.PushRequest(trailer=short)], "INVALID_ARGUMENT", "digests for"
    if case == "a_digest_of_5_bytes":
        return _trailed(ch, h, ems, [b"12345", *[e.digest for e in ems][1:]]), "INVALID_ARGUMENT", "digest is 5 B"
    if case == "a_wrong_digest":  # signed as sent: the sender's own digest does not match its bytes
        wrong = [bytes(32), *[e.digest for e in ems][1:]]
        return _trailed(ch, h, ems, wrong), "DATA_LOSS", "blake3 digest"
    if case == "after_header_digests":
        return [*push_requests(_signer(ch, D0)(h), ems, 4096), good[-1]], "INVALID_ARGUMENT", "with its digests"
    assert case == "some_digests_empty"
    half = replace(h, modules=(replace(h.modules[0], digest=b""), *h.modules[1:]))
    return list(push_requests(_signer(ch, D0)(half), ems, 4096)), "INVALID_ARGUMENT", "digest is 0 B"


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "twice",
        "before_the_last_chunk",
        "a_digest_short",
        "a_digest_of_5_bytes",
        "a_wrong_digest",
        "after_header_digests",
        "some_digests_empty",
    ],
)
def test_a_trailer_that_breaks_the_rules_is_refused_and_nothing_is_kept(edge, case):
    node, ch, _ = edge
    h, ems = _good(node, D0, 1)
    reqs, code, why = _bad_trailer(case, ch, h, ems)
    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        ch.push(D0)(iter(reqs), timeout=10, metadata=ch.meta(D0))
    assert e.value.code() == getattr(grpc.StatusCode, code), e.value.details()
    assert why in e.value.details()
    assert node.inbox.snapshot() == before
    assert not ch.push(D0)(iter(_trailed(ch, h, ems)), timeout=10, metadata=ch.meta(D0)).duplicate


@pytest.mark.parametrize("tamper", ["trailer_unsigned", "trailer_by_another", "weights_raised_after_signing"])
def test_a_trailers_signature_must_be_the_senders_over_the_whole_header(edge, tamper):
    """With security on the header is checked as it comes (signed with its digests empty) and again with
    the trailer's digests and signature: a trailer unsigned, signed by another device, or a header whose
    weights were raised after the sender signed it, is PERMISSION_DENIED and nothing is kept."""
    node, ch, _ = edge
    if not node.security.enabled:
        pytest.skip("signatures need keys: security on")
    h, ems = _good(node, D0, 1)
    reqs = _trailed(ch, h, ems)
    if tamper == "trailer_unsigned":
        reqs[-1] = pb.PushRequest(trailer=pb.PushTrailer(digests=reqs[-1].trailer.digests))
        match = "not signed"
    elif tamper == "trailer_by_another":
        reqs[-1] = _trailed(ch, h, ems, sender=D1)[-1]
        match = "signature does not match"
    else:  # the trailer signed by the sender over other weights than the header's
        raised = replace(h, modules=tuple(replace(m, num_samples=9.0) for m in h.modules))
        reqs[-1] = _trailed(ch, raised, ems)[-1]
        match = "signature does not match"
    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        ch.push(D0)(iter(reqs), timeout=10, metadata=ch.meta(D0))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and match in e.value.details()
    assert node.inbox.snapshot() == before


def test_a_pinned_module_whose_digests_follow_is_held_to_the_pin_once_they_come(edge):
    """A sync pinned to the version the cloud examined (a specialist's relay), pushed with its digests
    in a trailer: the header passes without them, and once the trailer fills them in the push is refused
    FAILED_PRECONDITION as not the version examined, nothing kept; the examined version is taken."""
    from hffm.methods import SYNC

    node, ch, _ = edge
    ems = [encode_module(m) for m in _device_modules(node, 5, version=1).values()]
    peers = {D0: "127.0.0.1:1"}
    node.assign(3, "hfm", [Collect(SYNC, (D0,), "device_edge", pinned=((ems[0].name, bytes(32)),))], peers)
    h = _header(D0, ems, 3, SYNC)
    before = node.inbox.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        ch.push(D0)(iter(_trailed(ch, h, ems)), timeout=10, metadata=ch.meta(D0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not the version examined" in e.value.details()
    assert node.inbox.snapshot() == before
    node.assign(4, "hfm", [Collect(SYNC, (D0,), "device_edge", pinned=((ems[0].name, ems[0].digest),))], peers)
    h = _header(D0, ems, 4, SYNC)
    assert not ch.push(D0)(iter(_trailed(ch, h, ems)), timeout=10, metadata=ch.meta(D0)).duplicate


def test_a_push_before_the_opening_phase_has_ended_is_refused_and_kept_nowhere(edge):
    """calibration.opening: a training push that reaches an edge before its round's opening calibration phase
    has ended (no honest device can send one: it trains from the heads the phase brings down) would be folded
    unchecked, against the uncalibrated start, before its sender's statistics are in: it is refused
    FAILED_PRECONDITION and kept nowhere. Once the phase has ended (``Inbox.rebase``) the same push is taken."""
    from hffm.ids import CLOUD
    from hffm.methods import OPENING_CALIBRATED, OPENING_STATS

    node, ch, _ = edge
    steps = [
        Collect(OPENING_STATS, (D0, D1), "device_edge"),
        Collect(OPENING_CALIBRATED, (CLOUD,), "edge_cloud"),
        Collect("aggregate", (D0, D1), "device_edge"),
    ]
    node.assign(2, "hfm", steps, {D0: "127.0.0.1:1", D1: "127.0.0.1:2", CLOUD: "127.0.0.1:3"})
    ems = [encode_module(m) for m in _device_modules(node, 3, version=2).values()]
    reqs = list(push_requests(_header(D0, ems, round_=2), ems, 4096))
    _expect(ch, node, iter(reqs), grpc.StatusCode.FAILED_PRECONDITION, "opening calibration phase")
    node.inbox.rebase(dict(node.modules))
    assert not _push(ch, iter(reqs)).duplicate
    assert list(node.inbox.snapshot()["accepted"]["aggregate"]) == [D0]


@pytest.fixture
def checked_edge(small_cfg):
    """An edge over gRPC with statistics first and the label and head checks (calibration.opening), its spec
    and a client."""
    sets = {"enabled": True, "label_t": 4.0, "head_check": 0.3, "opening": True}
    cfg = small_cfg.model_copy(update={"calibration": small_cfg.calibration.model_copy(update=sets)})
    spec, modules = node_modules(cfg, topology(cfg), EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    ch = Clients(cfg, f"127.0.0.1:{srv.port}", EDGE)
    yield node, spec, ch
    ch.close()
    srv.stop(0)


def test_a_synced_device_s_statistics_hold_its_first_training_push_to_them(checked_edge):
    """Statistics first for a device synced into a later round (a joiner; calibration.opening with the head
    check): its statistics reach the edge under ``join-stats`` before its training push, which then weighs
    what they claim (not the median of the others' claims, not its registration) and has its heads checked
    against them; a push whose heads contradict them is left out. The push may come before the edge's step
    has waited for the statistics (the device sends them, trains and pushes): they hold from their arrival.
    A training push before its statistics (which no honest device sends) is refused and kept nowhere.
    A statistics collect nobody sent to by its deadline ends empty, where a training collect would fail."""
    from hffm.calibration import FeatureStats, to_module
    from hffm.ids import head_name, stats_name, task_of
    from hffm.methods import JOIN_STATS, Quorum

    node, spec, ch = checked_edge
    start = dict(node.modules)
    tasks = sorted({task_of(n) for n in start} - {None} - {"gqa"})
    g = torch.Generator().manual_seed(5)
    claimed = {t: torch.zeros(spec[stats_name(t)]["count"]) for t in tasks}  # answer 0: 12, answer 1: 5
    for c in claimed.values():
        c[:2] = torch.tensor([12.0, 5.0])

    def stats(r: int) -> list:
        out = []
        for t in tasks:
            d = spec[stats_name(t)]["total"][1]
            mean = torch.randn(len(claimed[t]), d, generator=g).double()
            total = mean * claimed[t][:, None].double()
            squares = torch.einsum("ci,cj->cij", mean, mean) * claimed[t][:, None, None].double()
            out.append(to_module(stats_name(t), FeatureStats(claimed[t].double(), total, squares), r))
        return out

    def trained(r: int, lie: bool) -> dict:
        """The start's modules pushed back (honest: its heads unchanged, a drop of 0), each head made to
        answer 2, an answer it reported no sample of, with ``lie``."""
        out = {}
        for n, m in start.items():
            if n == head_name("gqa"):
                continue
            tensors = dict(m.tensors)
            if lie and task_of(n) is not None:
                last = sorted(k for k in tensors if k.endswith(".bias"))[-1]
                tensors[last.replace(".bias", ".weight")] = torch.zeros_like(tensors[last.replace(".bias", ".weight")])
                bias = torch.full_like(tensors[last], -10.0)
                bias[2] = 10.0
                tensors[last] = bias
            out[n] = Module(n, tensors, r, 30.0)
        return out

    for r, lie in ((2, False), (3, True)):
        held = (("defer", 1.0), ("label_t", 4.0))
        steps = [
            Collect(JOIN_STATS, (D1,), "device_edge", rule="label_check", params=held),
            Collect("aggregate", (D0, D1), "device_edge"),
        ]
        node.assign(r, "hfm", steps, {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
        node.inbox.claims = {D0: {}}  # D0's: none here; the median of nobody's would be no bound at all
        sems = [encode_module(m) for m in stats(r)]
        ems = [encode_module(m) for m in trained(r, lie).values()]
        # its training push before its statistics (an honest device never sends one): refused, nothing kept
        early = push_requests(_header(D1, ems, round_=r), ems, 4096)
        _expect(ch, node, early, grpc.StatusCode.FAILED_PRECONDITION, "before its statistics")
        assert not _push(ch, push_requests(_header(D1, sems, round_=r, tag=JOIN_STATS), sems, 4096)).duplicate
        assert not _push(ch, push_requests(_header(D1, ems, round_=r), ems, 4096)).duplicate  # before any wait
        d0 = [encode_module(m) for m in _device_modules(node, 4, version=r).values()]
        assert not _push(ch, push_requests(_header(D0, d0, round_=r), d0, 4096)).duplicate
        got = node.inbox.wait(JOIN_STATS, 10)
        assert got.counted == (D1,) and set(node.inbox.claims[D1]) == set(tasks)
        agg = node.inbox.wait("aggregate", 10)
        mine = [sc for sc in agg.scores if sc.sender == D1]
        if lie:  # its heads find the answers it reported far less likely than the start's: all of it left out
            assert {sc.module for sc in mine} == set(ems_names(ems)), agg.scores
            assert all(sc.flagged and sc.head_drop > 5 for sc in mine)
            theirs = _device_modules(node, 4, version=r)  # the aggregate is D0's alone
            assert all(
                torch.equal(agg.modules[n].tensors[k], t) for n, m in theirs.items() for k, t in m.tensors.items()
            )
        else:  # checked, and scored on its heads
            assert {sc.module for sc in mine} == {head_name(t) for t in tasks}, agg.scores
            assert all(not sc.flagged and sc.head_drop == pytest.approx(0, abs=1e-6) for sc in mine)
            weights = {s: dict(w) for s, w in agg.weights}  # 17 samples a task claimed, 30 registered
            want = {n: (17.0 * len(tasks) if task_of(n) is None else 17.0) for n in ems_names(ems)}
            assert weights == {D1: want}, weights
    # nobody sends statistics by the deadline: the step ends empty, where a training collect would fail
    quick = Quorum(deadline_s=0.2)
    steps = [
        Collect(JOIN_STATS, (D1,), "device_edge", quorum=quick),
        Collect("aggregate", (D1,), "device_edge", quorum=quick),
    ]
    node.assign(4, "hfm", steps, {D1: "127.0.0.1:2"})
    empty = node.inbox.wait(JOIN_STATS, 10)
    assert empty.modules == {} and empty.counted == () and empty.left_out == (D1,)
    with pytest.raises(TimeoutError):
        node.inbox.wait("aggregate", 10)


def test_a_joiner_s_labels_are_checked_as_its_statistics_arrive(checked_edge):
    """A device synced into the round after a cloud round (a joiner) has its labels checked the moment its
    ``join-stats`` arrive: against what the edge's deferred label check of that cloud round's statistics judged
    its devices by (the statistics of the four it kept, and the federation's sums less theirs), computed under
    the modules the joiner was synced to. A joiner whose statistics put each answer's mean where another
    answer's samples lie (trained on flipped labels) is flagged there: its training push, in the same round, is
    counted and left out; an honest joiner passes and is folded. Where an edge round came between (the
    reference is not of the last round) a joiner's statistics are checked on arrival only where the edge sent it
    the reference's modules to compute them under (``JOIN_REF``; ``Inbox.refer``): the others wait for the next
    phase, as before."""
    from hffm.calibration import stats_of, to_module
    from hffm.ids import CLOUD, stats_name
    from hffm.methods import FEDERATION, JOIN_STATS, STATS

    node, spec, ch = checked_edge
    peers = tuple(f"device-0-{i}" for i in range(4))
    honest, flipper, late, referred, unreferred = (f"device-0-{i}" for i in range(4, 9))
    joiners = (honest, flipper, late, referred, unreferred)
    addr = {d: f"127.0.0.1:{10 + i}" for i, d in enumerate((*peers, *joiners))} | {CLOUD: "127.0.0.1:9"}
    classes, hidden = spec[stats_name("art")]["count"][0], spec[stats_name("art")]["total"][1]
    g = torch.Generator().manual_seed(11)
    means = 4 * torch.randn(classes, hidden, generator=g)

    def data(n: int, flip: bool = False):  # n samples of every answer around the shared answer means
        y = torch.arange(classes).repeat_interleave(n)
        x = means[y] + torch.randn(len(y), hidden, generator=g)
        return stats_of(x, classes - 1 - y if flip else y, classes)

    def push(sender, mods, r, tag, link="device_edge"):
        ems = [encode_module(m) for m in mods]
        assert not _push(ch, push_requests(_header(sender, ems, round_=r, tag=tag, link=link), ems, 4096)).duplicate

    held = (("defer", 1.0), ("label_t", 4.0))
    # round 2, a cloud round's closing phase: the four peers' statistics, then the federation's sums
    node.assign(2, "hfm", [Collect(STATS, peers, "device_edge", rule="label_check", params=held),
                           Collect(FEDERATION, (CLOUD,), "edge_cloud")], addr)  # fmt: skip
    mine = [data(6) for _ in peers]
    for d, fs in zip(peers, mine, strict=True):
        push(d, [to_module(stats_name("art"), fs, 2)], 2, STATS)
    node.inbox.wait(STATS, 10)
    federation = sum([data(6) for _ in range(4)], sum(mine[1:], mine[0]))  # another cluster's four as well
    push(CLOUD, [to_module(stats_name("art"), federation, 2)], 2, FEDERATION, "edge_cloud")
    checked = node.inbox.wait(FEDERATION, 10)
    assert checked.scores and not any(sc.flagged for sc in checked.scores)  # the phase's own check: all honest
    assert node.inbox.label_reference.round == 2 and node.inbox.label_reference.peers == 4

    def join_round(r: int, joiners: tuple[str, ...], flipped: set[str], refer: dict | None = None):
        node.assign(r, "hfm", [Collect(JOIN_STATS, joiners, "device_edge", rule="label_check", params=held),
                               Collect("aggregate", joiners, "device_edge")], addr)  # fmt: skip
        for j, under in (refer or {}).items():  # what the edge's JOIN_REF sends would tell it
            node.inbox.refer([j], under)
        for j in joiners:
            push(j, [to_module(stats_name("art"), data(5, flip=j in flipped), r)], r, JOIN_STATS)
        for j in joiners:  # before the edge waits on its statistics: the check held from their arrival
            mods = [Module(n, dict(m.tensors), r, 15.0 * classes) for n, m in node.modules.items() if n != "head.gqa"]
            push(j, mods, r, "aggregate")
        return node.inbox.wait(JOIN_STATS, 10), node.inbox.wait("aggregate", 10)

    stats, agg = join_round(3, (honest, flipper), {flipper})
    t = {sc.sender: (sc.label_t, sc.flagged) for sc in stats.scores}
    assert t[flipper][1] and t[flipper][0] > 4 and not t[honest][1] and t[honest][0] < 4, stats.scores
    assert node.inbox.mislabelled == {flipper: t[flipper][0]}
    assert set(agg.counted) == {honest, flipper}
    left = {sc.sender for sc in agg.scores if sc.excluded}
    assert left == {flipper} and all(sc.label_t > 4 for sc in agg.scores if sc.sender == flipper), agg.scores
    assert all(sc.head_drop == pytest.approx(0, abs=1e-6) for sc in agg.scores if sc.sender == honest)
    # round 5: the reference is round 2's, an edge round (4) between: a flipper joining now is checked on arrival
    # where the edge sent it round 2's modules (``referred``), not where it sent none or nothing (it is then under
    # round 4's)
    node.assign(4, "hfm", [Collect("aggregate", peers[:1], "device_edge")], addr)
    three = (late, referred, unreferred)
    stats, agg = join_round(5, three, set(three), {referred: 2, unreferred: None})
    assert [(sc.sender, sc.flagged) for sc in stats.scores] == [(referred, True)], stats.scores
    assert set(node.inbox.mislabelled) == {flipper, referred}
    assert set(agg.counted) == set(three)
    assert {sc.sender for sc in agg.scores if sc.excluded} == {referred}, agg.scores


def ems_names(ems) -> list[str]:
    return [e.name for e in ems]


def test_with_statistics_first_a_device_without_statistics_weighs_as_a_typical_one(checked_edge):
    """calibration.opening with the head check: every device sends statistics before its first push, so one
    that pushes with none at this edge (a joiner since the last statistics, or one whose statistics missed
    their deadline) is weighed at most the median of the other devices' claims of each task, whatever it
    registered; without statistics first it kept its registered weight until its statistics came."""
    from hffm.calibration import Claim
    from hffm.ids import task_of

    node, spec, ch = checked_edge
    pushed = _device_modules(node, 3, samples=30.0)
    tasks = sorted({task_of(n) for n in pushed} - {None})

    def claim(n: float) -> Claim:
        return Claim(torch.tensor([n, 0.0]), torch.zeros(2, 4))

    # what the devices with statistics here claimed: 6, 8 and 40 samples of each task (median 8)
    others = {f"device-1-{i}": {t: claim(n) for t in tasks} for i, n in enumerate((6.0, 8.0, 40.0))}
    want = {n: (8.0 * len(tasks) if task_of(n) is None else 8.0) for n in pushed}
    for r, first in ((2, True), (3, False)):
        node.inbox.statistics_first = first  # the config's calibration.opening
        node.assign(r, "hfm", [Collect("aggregate", (D1,), "device_edge")], {D1: "127.0.0.1:2"})
        node.inbox.claims = dict(others)
        ems = [encode_module(replace(m, version=r)) for m in pushed.values()]
        assert not _push(ch, push_requests(_header(D1, ems, round_=r), ems, 4096)).duplicate
        agg = node.inbox.wait("aggregate", 10)
        weights = {s: dict(w) for s, w in agg.weights}
        if first:
            assert weights == {D1: want}, weights
            assert all(agg.modules[n].num_samples == pytest.approx(w) for n, w in want.items())
        else:
            assert weights == {} and all(m.num_samples == 30.0 for m in agg.modules.values())


def test_a_second_server_on_a_served_port_fails_loudly_and_the_first_keeps_serving(edge):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server on a port would bind too and
    the kernel would split connections between them (another run's node answering this one's calls).
    Off: the second node says it cannot listen there, and the first goes on answering."""
    node, ch, topo = edge
    port = int(ch.address.rsplit(":", 1)[1])
    spec, modules = node_modules(node.cfg, topo, EDGE)
    other = _Edge(EDGE, node.cfg, spec, modules, "127.0.0.1:0")
    with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
        NodeServer(other, f"127.0.0.1:{port}", max_workers=2)
    for _ in range(8):  # a new connection each time: every one reaches the first server
        with Security(node.cfg.security, "cloud").channel(ch.address, EDGE) as fresh:
            status = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
