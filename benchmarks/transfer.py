"""Module transfer device -> edge through hffm's real path vs a plain loopback TCP socket.

Every receiver runs in its own process. hffm: the sender encodes the module set (safetensors), and
pushes it in <= 1 MiB chunks over gRPC to a real node server, which checks order and SHA-256,
validates and decodes every tensor and folds it into its inbox (FedAvg of one sender). Socket: the
same number of bytes with sendall() to a process that recv_into()s them into a buffer.

Two more baselines on the same bytes, to show what bounds the figure on this machine:
- ``grpc_bare``: a bare Python gRPC stream of the same bytes in 1 MiB messages to an empty handler
  (no protobuf, no work): the most any gRPC-based push can reach here;
- ``socket_sha256``: the socket with SHA-256 computed by the sender and checked by the receiver:
  the least a verified transfer costs.

With security on (the default of every run) the same push goes over mTLS with a signed header; its
limit is a raw TLS socket of Python's ``ssl`` (OpenSSL) between the same certificates with the cipher
gRPC's BoringSSL picks on a machine with AES instructions, AES-128-GCM (TLS 1.2
ECDHE-ECDSA-AES128-GCM-SHA256: Python cannot choose a TLS 1.3 suite, and the record cipher is the same),
random bytes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from benchmarks.common import interleaved, median, paper_config, paper_modules, timeit
from hffm.methods import Collect
from hffm.modules import encode_modules
from hffm.wire import ModuleHeader, PushHeader, push_id_for
from services.common.client import CHANNEL_OPTIONS, push_callable, push_requests
from services.common.convert import step_to_pb
from services.common.security import Security
from services.launcher import REPO_ROOT, free_ports
from services.rpc import pb, pb_grpc

SOCKET_RECEIVER = r"""
import socket, ssl, sys
n = int(sys.argv[2]); buf = bytearray(n); view = memoryview(buf)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept()
if len(sys.argv) > 3:  # TLS: PKI directory, cipher; edge-0's certificate, the client's verified
    d, cipher = sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d + "/edge-0.crt", d + "/edge-0.key"); ctx.load_verify_locations(d + "/ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED; ctx.maximum_version = ssl.TLSVersion.TLSv1_2; ctx.set_ciphers(cipher)
    conn = ctx.wrap_socket(conn, server_side=True)
while True:
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0: sys.exit(0)
        got += k
    conn.sendall(b"k")
"""

SHA_RECEIVER = r"""
import hashlib, socket, sys
n = int(sys.argv[2]); chunk = 1 << 20; buf = bytearray(n); view = memoryview(buf)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept()
while True:
    want = conn.recv(32, socket.MSG_WAITALL)
    if len(want) < 32: sys.exit(0)
    h = hashlib.sha256(); got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(chunk, n - got))
        if k == 0: sys.exit(0)
        h.update(view[got:got + k]); got += k
    conn.sendall(b"k" if h.digest() == want else b"x")
"""

GRPC_SINK = r"""
import sys, time
from concurrent import futures
import grpc
def push(it, ctx):
    n = 0
    for m in it:
        n += len(m)
    return n.to_bytes(8, "little")
srv = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 8 << 20)])
srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)}),))
srv.add_insecure_port("127.0.0.1:" + sys.argv[1]); srv.start(); print("ready", flush=True)
while True:
    time.sleep(3600)
"""

TLS_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"

NODE_RECEIVER = r"""
import sys, time
from benchmarks.common import paper_config
from services.common.bootstrap import node_modules, topology
from services.common.node import NodeRuntime
from services.common.server import NodeServer
cfg = paper_config("wire.dtype=" + sys.argv[2], *sys.argv[3:])
topo = topology(cfg)
spec, mods = node_modules(cfg, topo, "edge-0")
class Edge(NodeRuntime):
    role = "edge"
node = Edge("edge-0", cfg, spec, mods, "")
srv = NodeServer(node, "127.0.0.1:" + sys.argv[1], max_workers=4)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


@contextmanager
def socket_sender(
    nbytes: int, sha256: bool = False, pki: Path | None = None
) -> Iterator[tuple[Callable[[], None], str | None]]:
    """(send once, TLS cipher or None): the bytes through a loopback TCP socket to a receiver process.
    With ``sha256`` the sender hashes them and the receiver checks the digest chunk by chunk as they
    arrive; with ``pki`` the socket is TLS between edge-0's and device-0-0's certificates (``TLS_CIPHER``),
    both ends verifying the other."""
    import ssl

    assert not (sha256 and pki), "the SHA-256 receiver speaks plain TCP"
    port = free_ports(1, "127.0.0.1")[0]
    tls_args = [str(pki), TLS_CIPHER] if pki else []
    p = _spawn(SHA_RECEIVER if sha256 else SOCKET_RECEIVER, str(port), str(nbytes), *tls_args)
    try:
        payload = os.urandom(nbytes) if sha256 or pki else bytes(nbytes)
        s = socket.create_connection(("127.0.0.1", port))
        if pki:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(pki / "ca.crt")
            ctx.load_cert_chain(pki / "device-0-0.crt", pki / "device-0-0.key")
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(TLS_CIPHER)
            s = ctx.wrap_socket(s, server_hostname="edge-0")
        with s:

            def once() -> None:
                if sha256:
                    s.sendall(hashlib.sha256(payload).digest())
                s.sendall(payload)
                assert s.recv(1) == b"k"

            yield once, s.cipher()[0] if pki else None
    finally:
        p.kill()


def socket_gbps(nbytes: int, repeat: int, sha256: bool = False) -> float:
    """GB/s of the bytes through a loopback TCP socket (``socket_sender``)."""
    with socket_sender(nbytes, sha256) as (once, _):
        return nbytes / median(timeit(once, repeat)) / 1e9


def grpc_bare_gbps(nbytes: int, repeat: int, chunk: int = 1 << 20) -> float:
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(GRPC_SINK, str(port))
    try:
        payload = bytes(nbytes)
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        push = ch.stream_unary("/bench.Sink/Push")
        view = memoryview(payload)

        def once() -> None:
            got = push(bytes(view[o : o + chunk]) for o in range(0, nbytes, chunk))
            assert int.from_bytes(got, "little") == nbytes

        t = median(timeit(once, repeat))
        ch.close()
        return nbytes / t / 1e9
    finally:
        p.kill()


def bench_pki(directory: Path) -> Path:
    """A throwaway CA with the transfer's three identities (the coordinator assigns the round)."""
    from hffm.pki import provision

    return provision(directory, "hffm", {"cloud": "cloud", "edge-0": "edge", "device-0-0": "device"}, lambda n: [n])


@contextmanager
def hffm_pusher(wire: str, pki: Path | None = None) -> Iterator[tuple[Callable[[], int], dict[str, list[float]]]]:
    """(push once -> bytes, phase times): full pushes of the module set from device-0-0 to a real edge
    node in another process; with ``pki`` over mTLS with the header signed by the device, as every run
    with security on does."""
    tls = ["security.tls=true", f"security.dir={pki}"] if pki else []
    cfg = paper_config(f"wire.dtype={wire}", *tls)
    modules = paper_modules()
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(NODE_RECEIVER, str(port), wire, *tls)
    try:
        addr = f"127.0.0.1:{port}"
        device, cloud = Security(cfg.security, "device-0-0"), Security(cfg.security, "cloud")
        ch, control = device.channel(addr, "edge-0", CHANNEL_OPTIONS), cloud.channel(addr, "edge-0", CHANNEL_OPTIONS)
        ctl, push = pb_grpc.RoundControlStub(control), push_callable(ch)
        state = {"round": 0}
        phases: dict[str, list[float]] = {"encode_s": [], "push_s": []}

        def once() -> int:
            state["round"] += 1
            r = state["round"]
            ctl.AssignRound(
                metadata=cloud.call_metadata(),
                request=pb.RoundTask(
                    round=r,
                    method="bench",
                    peers={"device-0-0": "x"},
                    steps=[step_to_pb(Collect("aggregate", ("device-0-0",), "device_edge"))],
                ),
            )
            t0 = time.perf_counter()
            for m in modules.values():
                m.version = r
            encoded = encode_modules(list(modules.values()), wire)  # as a node's Send does
            t1 = time.perf_counter()
            header = device.sign_header(
                PushHeader(
                    push_id_for("device-0-0", "edge-0", r, "aggregate"),
                    "device-0-0",
                    "edge-0",
                    r,
                    "aggregate",
                    "device_edge",
                    tuple(ModuleHeader.of(e) for e in encoded),
                )
            )
            push(
                push_requests(header, encoded, cfg.wire.chunk_bytes),
                timeout=120,
                metadata=device.call_metadata(),
            )
            t2 = time.perf_counter()
            phases["encode_s"].append(t1 - t0)
            phases["push_s"].append(t2 - t1)
            return sum(e.size_bytes for e in encoded)

        with ch, control:
            yield once, phases
    finally:
        p.kill()


def hffm_gbps(wire: str, repeat: int) -> tuple[float, int, dict[str, float]]:
    """(GB/s of serialized module bytes, bytes per push, median phase times) for full pushes."""
    with hffm_pusher(wire) as (once, phases):
        nbytes = once()
        times = timeit(once, repeat, warmup=0)
        return nbytes / median(times) / 1e9, nbytes, {k: median(v[1:]) for k, v in phases.items()}


def tls_transfer(repeat: int) -> dict:
    """The push over mTLS against its limit, the raw TLS socket, and against the plaintext push: the
    three taken in turn (a, b, c, a, b, c, ...) so that load bursts hit them alike; each ratio is the
    median of the per-turn ratios."""
    with tempfile.TemporaryDirectory(prefix="hffm-bench-pki-") as d:
        pki = bench_pki(Path(d))
        with hffm_pusher("fp32", pki) as (tls_push, phases), hffm_pusher("fp32") as (plain_push, _):
            nbytes = tls_push()
            with socket_sender(nbytes, pki=pki) as (sock_send, cipher):
                t = interleaved({"tls": tls_push, "socket": sock_send, "plain": plain_push}, repeat)
    return {
        "bytes": nbytes,
        "hffm_gbps": nbytes / median(t["tls"]) / 1e9,
        "tls_socket_gbps": nbytes / median(t["socket"]) / 1e9,
        "plaintext_gbps": nbytes / median(t["plain"]) / 1e9,
        "cipher": cipher,
        "ratio": median([s / h for h, s in zip(t["tls"], t["socket"], strict=True)]),  # vs its limit
        "vs_plaintext": median([p / h for h, p in zip(t["tls"], t["plain"], strict=True)]),  # security's cost
        **{k: median(v[2:]) for k, v in phases.items()},  # the timed pushes, not the first two
    }


def run(quick: bool = False) -> dict:
    repeat = 3 if quick else 8
    out: dict = {}
    for wire in ("fp32", "fp16"):
        gbps, nbytes, phases = hffm_gbps(wire, repeat)
        sock = socket_gbps(nbytes, repeat)  # the same bytes, measured right after
        out[wire] = {"bytes": nbytes, "hffm_gbps": gbps, "socket_gbps": sock, "ratio": gbps / sock, **phases}
    nbytes = out["fp32"]["bytes"]
    bare, sha = grpc_bare_gbps(nbytes, repeat), socket_gbps(nbytes, repeat, sha256=True)
    sock = out["fp32"]["socket_gbps"]
    out["bounds"] = {
        "grpc_bare_gbps": bare,
        "socket_sha256_gbps": sha,
        "grpc_bare_ratio": bare / sock,  # the ceiling of any push over Python gRPC, vs the socket
        "socket_sha256_ratio": sha / sock,  # the ceiling of any verified transfer, vs the socket
        "hffm_vs_grpc_bare": out["fp32"]["hffm_gbps"] / bare,
    }
    out["tls"] = tls_transfer(repeat)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
