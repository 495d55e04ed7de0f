"""Trust on every link, over real TLS on loopback: the federation's PKI, and what an outsider or a
compromised node gets when it tries. Every refusal has its status and changes nothing."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from hffm.config import load_config
from hffm.methods import Collect
from hffm.pki import (
    Identity,
    PKIError,
    identity_of,
    issue,
    load_cert,
    make_ca,
    make_crl,
    make_csr,
    revoked_serials,
    sign_csr,
    write_node_files,
)
from services.cloud.coordinator import CloudNode, CloudRegistry, Coordinator, CoordinatorServicer
from services.cloud.progress import ProgressEvent
from services.common.bootstrap import node_modules, server_workers, topology
from services.common.node import NodeRuntime
from services.common.security import Security
from services.common.server import NodeServer
from services.rpc import pb, pb_grpc

D0, D1, EDGE = "device-0-0", "device-0-1", "edge-0"


# ---- the PKI -------------------------------------------------------------------------------------
def test_issued_certificate_names_one_identity_as_uri_and_dns():
    ca_key, ca_cert = make_ca("lab")
    key, cert = issue(ca_key, ca_cert, "lab", "device", D0, ["127.0.0.1", "node7.example"])
    c = load_cert(cert)
    assert identity_of(c) == Identity("lab", "device", D0)
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {D0, "node7.example"}
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert c.issuer == load_cert(ca_cert).subject


def test_signing_request_enrollment_keeps_the_key_and_checks_the_request():
    ca_key, ca_cert = make_ca("lab")
    key, csr = make_csr("lab", "edge", "edge-3")
    cert = sign_csr(ca_key, ca_cert, csr, "lab")
    assert identity_of(load_cert(cert)).id == "edge-3"
    with pytest.raises(PKIError, match="federation 'lab'"):
        sign_csr(ca_key, ca_cert, csr, "other")
    tampered = csr.replace(csr[200:204], b"AAAA") if csr[200:204] != b"AAAA" else csr.replace(csr[200:204], b"BBBB")
    with pytest.raises(PKIError):
        sign_csr(ca_key, ca_cert, tampered, "lab")
    for role, node, match in (
        ("edge", D0, "is a device"),
        ("device", "cloud-2", "not a node id"),
        ("root", D0, "role"),
    ):
        with pytest.raises(PKIError, match=match):
            make_csr("lab", role, node)


def test_a_revocation_list_is_checked_against_the_ca():
    ca_key, ca_cert = make_ca("lab")
    _, other_ca = make_ca("lab")
    crl = make_crl(ca_key, ca_cert, [7, 11])
    assert revoked_serials(crl, ca_cert) == {7, 11}
    with pytest.raises(PKIError, match="not signed"):
        revoked_serials(crl, other_ca)


# ---- a node's server under attack ------------------------------------------------------------------
class _Edge(NodeRuntime):
    role = "edge"


def _with_dir(cfg, directory: Path):
    return cfg.model_copy(update={"security": cfg.security.model_copy(update={"dir": str(directory)})})


def _channel(directory: Path, name: str, address: str, target: str) -> grpc.Channel:
    cfg = load_config(None, [f"security.dir={directory}"])
    return Security(cfg.security, name).channel(address, target)


@pytest.fixture
def edge_server(small_cfg, pki_dir, tmp_path):
    """edge-0 serving with the federation's credentials plus a CRL revoking device-1-1."""
    d = tmp_path / "pki"
    shutil.copytree(pki_dir, d)
    revoked = load_cert((d / "device-1-1.crt").read_bytes()).serial_number
    (d / "crl.pem").write_bytes(make_crl((d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes(), [revoked]))
    cfg = _with_dir(small_cfg, d)
    topo = topology(cfg)
    spec, modules = node_modules(cfg, topo, EDGE)
    node = _Edge(EDGE, cfg, spec, modules, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8)
    node.assign(1, "hfm", [Collect("aggregate", (D0, D1), "device_edge")], {D0: "127.0.0.1:1", D1: "127.0.0.1:2"})
    yield node, f"127.0.0.1:{srv.port}", d
    srv.stop(0)


def _assign_as(ch: grpc.Channel) -> None:
    pb_grpc.RoundControlStub(ch).AssignRound(pb.RoundTask(round=2, method="hfm"), timeout=5)


def _status(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_the_coordinator_may_assign(edge_server):
    node, addr, d = edge_server
    _assign_as(_channel(d, "cloud", addr, EDGE))
    assert node.rounds.current == 2


def test_a_certificate_from_another_ca_does_not_get_in(edge_server, tmp_path):
    node, addr, d = edge_server
    rogue = tmp_path / "rogue"
    ca_key, ca_cert = make_ca("hffm")  # same federation name, another CA
    write_node_files(rogue, "ca", ca_key, ca_cert)
    write_node_files(rogue, "cloud", *issue(ca_key, ca_cert, "hffm", "cloud", "cloud", ["127.0.0.1"]))
    assert _status(lambda: _assign_as(_channel(rogue, "cloud", addr, EDGE))) == grpc.StatusCode.UNAVAILABLE
    assert node.rounds.current == 1


def test_an_expired_certificate_does_not_get_in(edge_server, tmp_path):
    node, addr, d = edge_server
    old = tmp_path / "old"
    shutil.copytree(d, old)
    ca_key, ca_cert = (d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    write_node_files(old, "cloud", *issue(ca_key, ca_cert, "hffm", "cloud", "cloud", [], days=30, issued_at=past))
    assert _status(lambda: _assign_as(_channel(old, "cloud", addr, EDGE))) == grpc.StatusCode.UNAVAILABLE
    assert node.rounds.current == 1


def test_a_revoked_certificate_is_unauthenticated(edge_server):
    node, addr, d = edge_server
    ch = _channel(d, "device-1-1", addr, EDGE)
    assert _status(lambda: _assign_as(ch)) == grpc.StatusCode.UNAUTHENTICATED
    assert node.metrics.denied.labels(node=EDGE, rpc="AssignRound", reason="bad_identity")._value.get() == 1


@pytest.mark.parametrize("rpc", ["AssignRound", "AwaitRound", "Shutdown"])
def test_a_device_may_not_control_an_edge(edge_server, rpc):
    node, addr, d = edge_server
    stub = pb_grpc.RoundControlStub(_channel(d, D0, addr, EDGE))
    req = {"AssignRound": pb.RoundTask(round=2, method="hfm"), "AwaitRound": pb.AwaitRequest(round=1)}.get(
        rpc, pb.Empty()
    )
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, rpc)(req, timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "device device-0-0 may not" in e.value.details()
    assert node.rounds.current == 1 and not node.stopped.is_set()


def test_a_server_must_prove_it_is_the_node_dialed(edge_server):
    """A client that dials edge-0's address expecting edge-1 refuses the connection: edge-0's certificate
    names edge-0 (an address taken over by another member is not that member)."""
    node, addr, d = edge_server
    ch = _channel(d, "cloud", addr, "edge-1")
    assert _status(lambda: _assign_as(ch)) == grpc.StatusCode.UNAVAILABLE
    assert node.rounds.current == 1


# ---- the cloud's registry and progress stream ------------------------------------------------------
@pytest.fixture
def cloud_server(small_cfg, tmp_path):
    topo = topology(small_cfg)
    spec, modules = node_modules(small_cfg, topo, "cloud")
    node = CloudNode("cloud", small_cfg, spec, modules, "127.0.0.1:0")
    coord = Coordinator(small_cfg, topo, node, tmp_path)
    srv = NodeServer(
        node,
        "127.0.0.1:0",
        max_workers=server_workers(small_cfg, "cloud", topo),
        extra=[
            (pb_grpc.add_RegistryServicer_to_server, CloudRegistry(coord), "Registry"),
            (pb_grpc.add_CoordinatorServicer_to_server, CoordinatorServicer(coord), "Coordinator"),
        ],
    )
    node.address = coord.members.addresses["cloud"] = f"127.0.0.1:{srv.port}"
    yield coord, node.address, Path(small_cfg.security.dir)
    srv.stop(0)


def _register(d: Path, caller: str, addr: str, info: pb.NodeInfo) -> pb.RegisterAck:
    return pb_grpc.RegistryStub(_channel(d, caller, addr, "cloud")).Register(info, timeout=5)


@pytest.mark.parametrize(
    "caller, info",
    [
        (D0, pb.NodeInfo(id="cloud", role="cloud", address="10.6.6.6:1")),  # a device as the cloud
        (D0, pb.NodeInfo(id="edge-0", role="edge", address="10.6.6.6:1")),  # ... as an edge
        (D0, pb.NodeInfo(id=D1, role="device", address="10.6.6.6:1", edge="edge-0")),  # ... as another device
        ("edge-1", pb.NodeInfo(id=D0, role="device", address="10.6.6.6:1", edge="edge-0")),  # not its device
    ],
)
def test_nobody_registers_as_another_node(cloud_server, caller, info):
    coord, addr, d = cloud_server
    before = coord.members.snapshot()
    assert _status(lambda: _register(d, caller, addr, info)) == grpc.StatusCode.PERMISSION_DENIED
    assert coord.members.snapshot() == before


def test_registration_cannot_move_an_edge(cloud_server):
    coord, addr, d = cloud_server
    _register(d, "edge-0", addr, pb.NodeInfo(id="edge-0", role="edge", address="127.0.0.1:5000"))
    _register(d, "edge-1", addr, pb.NodeInfo(id="edge-1", role="edge", address="127.0.0.1:5001"))
    moved = pb.NodeInfo(id="edge-0", role="edge", address="10.6.6.6:1")
    assert _status(lambda: _register(d, "edge-0", addr, moved)) == grpc.StatusCode.PERMISSION_DENIED
    assert coord.members.address("edge-0") == "127.0.0.1:5000"
    # an edge forwards its own device; a device re-registers (a restart) with a new address
    dev = pb.NodeInfo(id=D0, role="device", address="127.0.0.1:6000", edge="edge-0", train_samples={"art": 5})
    _register(d, "edge-0", addr, dev)
    dev.address = "127.0.0.1:6001"
    _register(d, D0, addr, dev)
    assert coord.members.address(D0) == "127.0.0.1:6001" and coord.members.samples[D0] == {"art": 5}


@pytest.mark.parametrize("caller, allowed", [("operator", True), (D0, False), ("edge-0", False)])
def test_only_the_operator_watches_the_run(cloud_server, caller, allowed):
    coord, addr, d = cloud_server
    coord.progress.publish(ProgressEvent("done"))
    stream = pb_grpc.CoordinatorStub(_channel(d, caller, addr, "cloud")).Watch(pb.WatchRequest(), timeout=5)
    if allowed:
        assert [ev.phase for ev in stream] == ["done"]
    else:
        assert _status(lambda: list(stream)) == grpc.StatusCode.PERMISSION_DENIED


def test_progress_streams_are_capped(cloud_server):
    """Each watcher holds a server thread: beyond limits.max_watchers the cloud refuses at once."""
    coord, addr, d = cloud_server
    stub = pb_grpc.CoordinatorStub(_channel(d, "operator", addr, "cloud"))
    cap = coord.cfg.limits.max_watchers
    coord.progress.publish(ProgressEvent("waiting"))
    streams = [stub.Watch(pb.WatchRequest(), timeout=20) for _ in range(cap)]
    firsts = [next(s) for s in streams]  # every one is being served
    assert len(firsts) == cap
    assert _status(lambda: list(stub.Watch(pb.WatchRequest(), timeout=5))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for s in streams:
        s.cancel()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # a cancelled watcher gives its slot back
        try:
            coord.progress.publish(ProgressEvent("done"))
            assert [ev.phase for ev in stub.Watch(pb.WatchRequest(), timeout=5)][-1] == "done"
            break
        except grpc.RpcError:
            time.sleep(0.2)
    else:
        raise AssertionError("the watcher slots were not given back")


def test_hffm_pki_commands_enroll_a_node_without_moving_its_key(tmp_path):
    from typer.testing import CliRunner

    from hffm_cli.main import app

    ca, node = tmp_path / "ca", tmp_path / "node"

    def run(*args: str):
        return CliRunner().invoke(app, ["pki", *args])

    assert run("init", "--dir", str(ca), "--federation", "lab").exit_code == 0
    assert run("init", "--dir", str(ca)).exit_code == 2  # one CA per directory
    r = run("csr", "--out-dir", str(node), "--role", "edge", "--id", "edge-2", "--federation", "lab")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in node.iterdir()) == ["edge-2.csr", "edge-2.key"]
    assert oct((node / "edge-2.key").stat().st_mode & 0o777) == "0o600"
    crt = node / "edge-2.crt"
    r = run("sign", "--dir", str(ca), "--csr", str(node / "edge-2.csr"), "--out", str(crt), "--federation", "lab")
    assert r.exit_code == 0 and "spiffe://hffm/lab/edge/edge-2" in r.output
    assert not (ca / "edge-2.key").exists()  # the CA never saw the key
    assert run("sign", "--dir", str(ca), "--csr", str(node / "edge-2.csr"), "--out", str(crt)).exit_code == 2
    assert run("revoke", "--dir", str(ca), "--cert", str(crt)).exit_code == 0
    serial = load_cert(crt.read_bytes()).serial_number
    assert revoked_serials((ca / "crl.pem").read_bytes(), (ca / "ca.crt").read_bytes()) == {serial}
    bad = run("issue", "--dir", str(ca), "--role", "edge", "--id", "device-0-1", "--federation", "lab")
    assert bad.exit_code == 2 and "is a device, not a edge" in bad.output


def test_the_health_check_dials_a_node_as_itself_and_stays_light(edge_server, tmp_path):
    """The image's HEALTHCHECK runs every few seconds: over mTLS it presents the node's own certificate,
    and it must start fast (no torch: a slow check times out, and checks pile up)."""
    import subprocess
    import sys

    from hffm.config import dump_config

    node, addr, d = edge_server
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(dump_config(node.cfg))
    env = {"HFFM_ID": EDGE, "HFFM_CONFIG": str(cfg_file), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "services.healthcheck", addr],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stdout + r.stderr
    light = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, services.healthcheck, services.common.security; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert light.stdout.strip() == "False", light.stderr
    r = subprocess.run(  # without the node's identity: no certificate, no way in
        [sys.executable, "-m", "services.healthcheck", addr],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 1


def test_a_joiner_is_forwarded_only_by_the_edge_its_id_names_and_only_when_joins_are_on(cloud_server):
    """topology.joins over real gRPC and mTLS: device-0-9 is outside the 2 x 2 table. Joins off: no edge
    may forward it. Joins on: edge-1 may not (the id names edge-0), edge-0 may, not with a position outside
    the area or nearer another edge, and the table grows by it alone; every refusal leaves the membership
    as it was."""
    coord, addr, d = cloud_server
    joiner = pb.NodeInfo(id="device-0-9", role="device", address="127.0.0.1:6009", edge="edge-0",
                         train_samples={"art": 5})  # fmt: skip
    before = coord.members.snapshot()
    assert _status(lambda: _register(d, "edge-0", addr, joiner)) == grpc.StatusCode.PERMISSION_DENIED
    coord.cfg = coord.cfg.model_copy(update={"topology": coord.cfg.topology.model_copy(update={"joins": True})})
    coord.members.joins = True
    assert _status(lambda: _register(d, "edge-1", addr, joiner)) == grpc.StatusCode.PERMISSION_DENIED
    wrong = pb.NodeInfo(id="device-0-9", role="device", address="1.2.3.4:1", edge="edge-0", train_samples={"vqa": 5})
    assert _status(lambda: _register(d, "edge-0", addr, wrong)) == grpc.StatusCode.INVALID_ARGUMENT
    servers = coord.costs.geo.servers  # a position must be in the area and nearest to the id's edge
    for x, y in (servers["edge-1"], (-5.0, 1.0), (float("nan"), 1.0)):
        lying = pb.NodeInfo()
        lying.CopyFrom(joiner)
        lying.position.x_m, lying.position.y_m = x, y
        assert _status(lambda m=lying: _register(d, "edge-0", addr, m)) == grpc.StatusCode.INVALID_ARGUMENT
    assert coord.members.snapshot() == before and "device-0-9" not in coord.topo.device_map
    assert not coord.members.positions
    joiner.position.x_m, joiner.position.y_m = servers["edge-0"]
    _register(d, "edge-0", addr, joiner)
    assert coord.topo.device_map["device-0-9"].edge == "edge-0" and coord.members.address("device-0-9")
    assert len(coord.topo.devices) == 5 and coord.members.positions == {"device-0-9": servers["edge-0"]}


def test_a_device_leaves_only_by_itself_or_through_its_own_edge(cloud_server):
    """Leave over real gRPC and mTLS: another device may not make D1 leave, nor may edge-1 (D1 is edge-0's);
    with joins off (a fixed membership) nobody leaves; a device not in the table is NOT_FOUND. Each
    refusal leaves the table as it was; D1's own leave, forwarded by edge-0, takes it off."""
    coord, addr, d = cloud_server

    def leave(caller: str, device: str) -> pb.LeaveAck:
        stub = pb_grpc.RegistryStub(_channel(d, caller, addr, "cloud"))
        return stub.Leave(pb.LeaveRequest(id=device, reason="test"), timeout=5)

    before = set(coord.topo.device_map)
    assert D1 in before
    assert _status(lambda: leave("edge-0", D1)) == grpc.StatusCode.FAILED_PRECONDITION  # joins off
    coord.members.joins = True
    assert _status(lambda: leave(D0, D1)) == grpc.StatusCode.PERMISSION_DENIED
    assert _status(lambda: leave("edge-1", D1)) == grpc.StatusCode.PERMISSION_DENIED
    assert _status(lambda: leave("edge-0", "device-0-9")) == grpc.StatusCode.PERMISSION_DENIED  # not edge-0's (yet)
    assert set(coord.topo.device_map) == before
    assert leave("edge-0", D1).round == 0  # no round running: none more
    assert set(coord.topo.device_map) == before - {D1} and coord.members.departed == {D1}
    assert _status(lambda: leave(D1, D1)) == grpc.StatusCode.NOT_FOUND  # itself, but it has left already
    assert coord.members.departed == {D1}


def test_only_the_operator_evicts_a_device_and_an_evicted_one_never_registers_again(cloud_server, tmp_path):
    """Coordinator.Evict over real gRPC and mTLS, through ``hffm evict``: with joins off nobody is evicted;
    a device, an edge or the cloud's own certificate may not evict; a device not in the table is NOT_FOUND.
    Each refusal leaves the table as it was. The operator's eviction takes D1 off the table for good: its
    own registration (even forwarded by its edge) is refused afterwards."""
    import json

    from typer.testing import CliRunner

    from hffm.config import write_config
    from hffm_cli.main import app

    coord, addr, d = cloud_server
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(coord.cfg, run_dir / "config.yaml")
    (run_dir / "processes.json").write_text(
        json.dumps([["cloud", ["python", "-m", "services.cloud", "--listen", addr]]])
    )

    def evict(caller: str, device: str) -> pb.LeaveAck:
        stub = pb_grpc.CoordinatorStub(_channel(d, caller, addr, "cloud"))
        return stub.Evict(pb.LeaveRequest(id=device, reason="test"), timeout=5)

    before = set(coord.topo.device_map)
    assert _status(lambda: evict("operator", D1)) == grpc.StatusCode.FAILED_PRECONDITION  # joins off
    coord.cfg = coord.cfg.model_copy(update={"topology": coord.cfg.topology.model_copy(update={"joins": True})})
    coord.members.joins = True
    for caller in (D0, D1, "edge-0", "cloud"):
        assert _status(lambda c=caller: evict(c, D1)) == grpc.StatusCode.PERMISSION_DENIED
    assert _status(lambda: evict("operator", "device-0-9")) == grpc.StatusCode.NOT_FOUND
    assert set(coord.topo.device_map) == before and not coord.members.departed
    r = CliRunner().invoke(app, ["evict", "--run", str(run_dir), "--id", D1, "--reason", "flagged"])
    assert r.exit_code == 0 and f"{D1} evicted" in r.output, r.output
    assert set(coord.topo.device_map) == before - {D1} and coord.members.evicted == {D1}
    back = pb.NodeInfo(id=D1, role="device", address="127.0.0.1:6001", edge="edge-0", train_samples={"art": 5})
    for caller in (D1, "edge-0"):  # itself, or its edge forwarding it as a newcomer
        with pytest.raises(grpc.RpcError) as e:
            _register(d, caller, addr, back)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "evicted" in e.value.details()
    assert D1 not in coord.topo.device_map
    r = CliRunner().invoke(app, ["evict", "--run", str(run_dir), "--id", D1])  # twice: NOT_FOUND, exit 1
    assert r.exit_code == 1 and "NOT_FOUND" in r.output


def test_a_switched_relay_is_flagged_on_the_senders_signed_header_alone(cloud_server):
    """Coordinator.ReportSwitch over real gRPC and mTLS: a taker's proof that a specialist relayed a
    version other than the one examined is the push header it refused, signed by the sender. The cloud
    flags the sender on that alone; a report from anyone but a device, about a push to someone else, on a
    header the sender did not sign (unsigned, or signed by the reporter), of another round, not a relay,
    or matching what was examined, is refused and flags nobody."""
    from types import SimpleNamespace

    from hffm.wire import ModuleHeader, PushHeader
    from services.common.convert import header_to_pb

    coord, addr, d = cloud_server
    coord.cfg = coord.cfg.model_copy(update={"specialists": coord.cfg.specialists.model_copy(update={"enabled": True})})
    examined, switched = b"\x01" * 32, b"\x02" * 32
    coord.board.pins = {(D0, "head.art"): examined}
    coord._running = SimpleNamespace(plan=SimpleNamespace(round=4))

    def header(digest=switched, receiver=D1, round_=4, tag="sync", signer=D0) -> pb.PushHeader:
        h = PushHeader(
            "p", D0, receiver, round_, tag, "d2d", (ModuleHeader("head.art", 3, 10.0, 64, digest, "fp32", "blake3"),)
        )
        if signer is not None:
            h = Security(load_config(None, [f"security.dir={d}"]).security, signer).sign_header(h)
        return header_to_pb(h)

    def report(caller: str, h: pb.PushHeader):
        return pb_grpc.CoordinatorStub(_channel(d, caller, addr, "cloud")).ReportSwitch(h, timeout=5)

    refused = [
        ("edge-0", header(receiver="edge-0"), grpc.StatusCode.PERMISSION_DENIED),  # not a device
        ("device-1-0", header(), grpc.StatusCode.PERMISSION_DENIED),  # a push to D1, reported by another
        (D1, header(signer=None), grpc.StatusCode.PERMISSION_DENIED),  # unsigned: the taker's word
        (D1, header(signer=D1), grpc.StatusCode.PERMISSION_DENIED),  # forged by the taker itself
        (D1, header(round_=3), grpc.StatusCode.FAILED_PRECONDITION),  # not the round running
        (D1, header(tag="aggregate"), grpc.StatusCode.INVALID_ARGUMENT),  # not a relay
        (D1, header(digest=examined), grpc.StatusCode.INVALID_ARGUMENT),  # what was examined
    ]
    for caller, h, code in refused:
        assert _status(lambda c=caller, h=h: report(c, h)) == code, (caller, code)
        assert not coord.board.flagged and coord.board.pins
    report(D1, header())
    assert coord.board.flagged == {D0} and "signed push header" in coord.board._switched[D0]
    assert not coord.board.pins  # no longer a specialist: nothing of it is pinned
    report(D1, header())  # the same proof again (or another taker's): nothing more to do
    assert coord.board.flagged == {D0}
