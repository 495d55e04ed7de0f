"""Module transfer device -> edge through hffm's real path vs a plain loopback TCP socket.

Every receiver runs in its own process. hffm: the sender encodes the module set (safetensors, with
its BLAKE3 digest), and pushes it in <= 1 MiB chunks over gRPC to a real node server, which checks
order, digest and finiteness as the chunks arrive, validates and decodes every tensor and folds it
into its inbox (FedAvg of one sender). Socket: the same number of random bytes (``os.urandom``: zero
pages would flatter the copy) with sendall() to a process that recv_into()s them into a buffer, both
ends with ``TCP_NODELAY`` as gRPC and the bulk transport set it (without it the TLS socket ran at 0.55
or 1.5 GB/s from one transfer to the next, Nagle's algorithm holding back record tails). The
two are taken in turn (hffm, socket, hffm, socket, ...) and the ratio is the median of the per-turn
ratios, so that the machine's load bursts hit both alike.

The same push also goes over the bulk transport (``wire.transport: bulk``, services/common/bulk.py: the
push's very messages in length-prefixed frames over TCP, fed to the same receive path), taken in turn
with the gRPC push and the socket.

Two more baselines on the same bytes, taken in turn with the socket, to show what bounds the figure:
- ``grpc_bare``: a bare Python gRPC stream of the same random bytes in 1 MiB messages to an empty
  handler (no protobuf, no work): the most any push over Python gRPC can reach here;
- ``socket_blake3``: the socket with the BLAKE3 digest computed by the sender and checked by the
  receiver chunk by chunk: the least a transfer with integrity checked end to end costs.
Each hffm push also records the CPU time the receiver's process and the sender spent on it: on a
2-core machine the two processes' CPU time per push, not the wire, is what bounds the push.

With security on (the default of every run) the same push goes over mTLS with a signed header; its
limit is a raw TLS socket of Python's ``ssl`` (OpenSSL) between the same certificates with the cipher
gRPC's BoringSSL picks on a machine with AES instructions, AES-128-GCM (TLS 1.2
ECDHE-ECDSA-AES128-GCM-SHA256: Python cannot choose a TLS 1.3 suite, and the record cipher is the same),
random bytes; and its bound with integrity checked end to end, the same TLS socket with BLAKE3 on both
ends.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import blake3
import grpc

from benchmarks.common import interleaved, median, paper_config, paper_modules
from hffm.methods import Collect
from hffm.modules import digest_of, encode_modules
from hffm.wire import ModuleHeader, PushHeader, push_id_for
from services.common.bulk import BulkPush
from services.common.client import CHANNEL_OPTIONS, Channels, push_requests, trailed_push
from services.common.convert import step_to_pb
from services.common.security import Security
from services.launcher import REPO_ROOT, free_ports
from services.rpc import pb, pb_grpc

# The receivers' start: listen, accept one connection and, with a PKI directory and a cipher after the
# port and size, wrap it in TLS as edge-0 (its certificate; the client's verified).
_ACCEPT = r"""
import socket, ssl, sys
n = int(sys.argv[2]); buf = bytearray(n); view = memoryview(buf)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if len(sys.argv) > 3:
    d, cipher = sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d + "/edge-0.crt", d + "/edge-0.key"); ctx.load_verify_locations(d + "/ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED; ctx.maximum_version = ssl.TLSVersion.TLSv1_2; ctx.set_ciphers(cipher)
    conn = ctx.wrap_socket(conn, server_side=True)
"""

SOCKET_RECEIVER = (
    _ACCEPT
    + r"""
while True:
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0: sys.exit(0)
        got += k
    conn.sendall(b"k")
"""
)

DIGEST_RECEIVER = (
    _ACCEPT
    + r"""
import blake3
chunk = 1 << 20
while True:
    want = b""
    while len(want) < 32:
        k = conn.recv(32 - len(want))
        if not k: sys.exit(0)
        want += k
    h = blake3.blake3(); got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(chunk, n - got))
        if k == 0: sys.exit(0)
        h.update(view[got:got + k]); got += k
    conn.sendall(b"k" if h.digest() == want else b"x")
"""
)

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
    nbytes: int, digest: bool = False, pki: Path | None = None
) -> Iterator[tuple[Callable[[], None], str | None]]:
    """(send once, TLS cipher or None): ``nbytes`` random bytes through a loopback TCP socket to a
    receiver process. With ``digest`` the sender computes their BLAKE3 digest (each time, as an encode
    does) and the receiver checks it chunk by chunk as they arrive; with ``pki`` the socket is TLS
    between edge-0's and device-0-0's certificates (``TLS_CIPHER``), both ends verifying the other."""
    import ssl

    port = free_ports(1, "127.0.0.1")[0]
    tls_args = [str(pki), TLS_CIPHER] if pki else []
    p = _spawn(DIGEST_RECEIVER if digest else SOCKET_RECEIVER, str(port), str(nbytes), *tls_args)
    try:
        payload = os.urandom(nbytes)
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gRPC and the bulk transport do
        if pki:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(pki / "ca.crt")
            ctx.load_cert_chain(pki / "device-0-0.crt", pki / "device-0-0.key")
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(TLS_CIPHER)
            s = ctx.wrap_socket(s, server_hostname="edge-0")
        with s:

            def once() -> None:
                if digest:
                    s.sendall(blake3.blake3(payload).digest())
                s.sendall(payload)
                assert s.recv(1) == b"k"

            yield once, s.cipher()[0] if pki else None
    finally:
        p.kill()


@contextmanager
def grpc_bare_sender(nbytes: int, chunk: int = 1 << 20) -> Iterator[Callable[[], None]]:
    """Send once: ``nbytes`` random bytes as a bare Python gRPC stream of ``chunk``-byte messages to an
    empty handler in another process."""
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(GRPC_SINK, str(port))
    try:
        view = memoryview(os.urandom(nbytes))
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            push = ch.stream_unary("/bench.Sink/Push")

            def once() -> None:
                got = push(bytes(view[o : o + chunk]) for o in range(0, nbytes, chunk))
                assert int.from_bytes(got, "little") == nbytes

            yield once
    finally:
        p.kill()


def bench_pki(directory: Path) -> Path:
    """A throwaway CA with the transfer's three identities (the coordinator assigns the round)."""
    from hffm.pki import provision

    return provision(directory, "hffm", {"cloud": "cloud", "edge-0": "edge", "device-0-0": "device"}, lambda n: [n])


@contextmanager
def hffm_pusher(
    wire: str, pki: Path | None = None, transport: str = "grpc", digests: str = "header"
) -> Iterator[tuple[Callable[[], int], dict[str, list[float]]]]:
    """(push once -> bytes, phase times): full pushes of the module set from device-0-0 to a real edge
    node in another process; with ``pki`` over mTLS with the header signed by the device, as every run
    with security on does. ``digests="trailer"``: the digests computed on another thread while the chunks
    stream and sent after them (``wire.digests: trailer``, as a node's Sender does)."""
    tls = ["security.tls=true", f"security.dir={pki}"] if pki else []
    sets = (*tls, f"wire.transport={transport}")
    cfg = paper_config(f"wire.dtype={wire}", *sets)
    modules = paper_modules()
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(NODE_RECEIVER, str(port), wire, *sets)
    tick = os.sysconf("SC_CLK_TCK")

    def receiver_cpu() -> float:
        stat = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / tick  # utime + stime

    def own_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    try:
        addr = f"127.0.0.1:{port}"
        device, cloud = Security(cfg.security, "device-0-0"), Security(cfg.security, "cloud")
        # the device's push as its Sender makes it: over gRPC, or the edge's bulk endpoint (asked over gRPC)
        channels = Channels(device, bulk=transport == "bulk")
        push = channels.push(addr, "edge-0", device.call_metadata())
        assert (transport == "bulk") == isinstance(push, BulkPush)
        control = cloud.channel(addr, "edge-0", CHANNEL_OPTIONS)
        ctl = pb_grpc.RoundControlStub(control)
        state = {"round": 0}
        chunk = cfg.wire.bulk_chunk_bytes if transport == "bulk" else cfg.wire.chunk_bytes  # as a node's Sender
        digester = ThreadPoolExecutor(max_workers=1)  # a node Sender's digest thread
        phases: dict[str, list[float]] = {"encode_s": [], "push_s": [], "receiver_cpu_s": [], "sender_cpu_s": []}

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
            c_recv, c_own = receiver_cpu(), own_cpu()
            t0 = time.perf_counter()
            for m in modules.values():
                m.version = r
            later = digests == "trailer"
            encoded = encode_modules(list(modules.values()), wire, digest=not later)  # as a node's Send does
            if later:
                futs = [digester.submit(digest_of, e.segments, e.digest_alg) for e in encoded]
            t1 = time.perf_counter()
            header = PushHeader(
                push_id_for("device-0-0", "edge-0", r, "aggregate"),
                "device-0-0",
                "edge-0",
                r,
                "aggregate",
                "device_edge",
                tuple(ModuleHeader.of(e) for e in encoded),
            )
            if later:
                requests = trailed_push(header, encoded, chunk, lambda: [f.result() for f in futs], device.sign_header)
            else:
                requests = push_requests(device.sign_header(header), encoded, chunk)
            push(
                requests,
                timeout=120,
                metadata=device.call_metadata(),
            )
            t2 = time.perf_counter()
            phases["encode_s"].append(t1 - t0)
            phases["push_s"].append(t2 - t1)
            phases["receiver_cpu_s"].append(receiver_cpu() - c_recv)
            phases["sender_cpu_s"].append(own_cpu() - c_own)
            return sum(e.size_bytes for e in encoded)

        with control:
            yield once, phases
        channels.close()
        digester.shutdown()
    finally:
        p.kill()


def _in_turn(pushers: dict, repeat: int) -> tuple[int, dict[str, list[float]], dict[str, dict]]:
    """(bytes, times, phases): each of ``pushers`` (name -> an ``hffm_pusher``) started and pushed once,
    then taken in turn with a socket carrying as many random bytes (``"socket"``), ``repeat`` times."""
    with ExitStack() as stack:
        fns, phases = {}, {}
        for name, pusher in pushers.items():
            fns[name], phases[name] = stack.enter_context(pusher)
        nbytes = [f() for f in fns.values()][0]
        with socket_sender(nbytes) as (sock, _):
            t = interleaved({**fns, "socket": sock}, repeat)
    return nbytes, t, phases


def _vs_socket(t: dict[str, list[float]], name: str) -> float:
    return median([s / h for h, s in zip(t[name], t["socket"], strict=True)])


def plain_transfer(wire: str, repeat: int) -> dict:
    """hffm's push of the module set in ``wire`` dtype over gRPC and over the bulk transport, and a
    socket carrying as many random bytes, in turn; each ratio is the median of the per-turn ratios."""
    nbytes, t, ph = _in_turn({"hffm": hffm_pusher(wire), "bulk": hffm_pusher(wire, transport="bulk")}, repeat)
    return {
        "bytes": nbytes,
        "hffm_gbps": nbytes / median(t["hffm"]) / 1e9,
        "bulk_gbps": nbytes / median(t["bulk"]) / 1e9,
        "socket_gbps": nbytes / median(t["socket"]) / 1e9,
        "ratio": _vs_socket(t, "hffm"),  # gRPC
        "bulk_ratio": _vs_socket(t, "bulk"),
        **{k: median(v[2:]) for k, v in ph["hffm"].items()},  # the timed pushes, not the first two
        **{f"bulk_{k}": median(v[2:]) for k, v in ph["bulk"].items()},
    }


def bounds(nbytes: int, repeat: int) -> dict:
    """What bounds a push here, on ``nbytes`` random bytes, each taken in turn with the socket."""
    with socket_sender(nbytes) as (sock, _), socket_sender(nbytes, digest=True) as (sock_digest, _):
        with grpc_bare_sender(nbytes) as bare:
            t = interleaved({"socket": sock, "socket_blake3": sock_digest, "grpc_bare": bare}, repeat)

    def vs_socket(k: str) -> float:
        return median([s / x for x, s in zip(t[k], t["socket"], strict=True)])

    return {
        "socket_gbps": nbytes / median(t["socket"]) / 1e9,
        "grpc_bare_gbps": nbytes / median(t["grpc_bare"]) / 1e9,
        "socket_blake3_gbps": nbytes / median(t["socket_blake3"]) / 1e9,
        "grpc_bare_ratio": vs_socket("grpc_bare"),  # the ceiling of any push over Python gRPC, vs the socket
        "socket_blake3_ratio": vs_socket("socket_blake3"),  # the ceiling of any transfer with integrity
    }


def tls_transfer(repeat: int) -> dict:
    """The push over mTLS against its limit, the raw TLS socket, and against the plaintext push, with the
    TLS socket whose sender digests the bytes (BLAKE3) and whose receiver checks them as they arrive (the
    most a push with its integrity checked end to end can reach over TLS): taken in turn (a, b, c, a, b,
    c, ...) so that load bursts hit them alike; each ratio is the median of the per-turn ratios
    (``--tls``: this part alone, about half a minute)."""
    with tempfile.TemporaryDirectory(prefix="hffm-bench-pki-") as d:
        pki = bench_pki(Path(d))
        with (
            hffm_pusher("fp32", pki) as (tls_push, phases),
            hffm_pusher("fp32") as (plain_push, _),
            hffm_pusher("fp32", pki, transport="bulk") as (bulk_push, _),
        ):
            nbytes = tls_push()
            bulk_push()
            with (
                socket_sender(nbytes, pki=pki) as (sock_send, cipher),
                socket_sender(nbytes, digest=True, pki=pki) as (digest_send, _),
            ):
                fns = {
                    "tls": tls_push,
                    "bulk": bulk_push,
                    "socket": sock_send,
                    "plain": plain_push,
                    "socket_blake3": digest_send,
                }
                t = interleaved(fns, repeat)
    return {
        "bytes": nbytes,
        "hffm_gbps": nbytes / median(t["tls"]) / 1e9,
        "tls_socket_gbps": nbytes / median(t["socket"]) / 1e9,
        "plaintext_gbps": nbytes / median(t["plain"]) / 1e9,
        "cipher": cipher,
        "bulk_gbps": nbytes / median(t["bulk"]) / 1e9,
        "socket_blake3_gbps": nbytes / median(t["socket_blake3"]) / 1e9,
        "ratio": _vs_socket(t, "tls"),  # vs its limit
        "bulk_ratio": _vs_socket(t, "bulk"),
        "socket_blake3_ratio": _vs_socket(t, "socket_blake3"),  # the bound of any push checked end to end
        "vs_plaintext": median([p / h for h, p in zip(t["tls"], t["plain"], strict=True)]),  # security's cost
        **{k: median(v[2:]) for k, v in phases.items()},  # the timed pushes, not the first two
    }


def run(quick: bool = False) -> dict:
    repeat = 3 if quick else 10
    out: dict = {wire: plain_transfer(wire, repeat) for wire in ("fp32", "fp16")}
    out["bounds"] = b = bounds(out["fp32"]["bytes"], repeat)
    b["hffm_vs_grpc_bare"] = out["fp32"]["hffm_gbps"] / b["grpc_bare_gbps"]
    out["tls"] = tls_transfer(repeat)
    return out


def message_sizes(
    nbytes: int = 38_055_600, sizes: tuple[int, ...] = (256 << 10, 1 << 20, 4 << 20, 7 << 20), repeat: int = 7
) -> dict:
    """The bare Python gRPC stream at several message sizes, each taken in turn with the socket: whether
    a larger ``wire.chunk_bytes`` could lift the gRPC ceiling (it does not: ``docs/performance.md``)."""
    with ExitStack() as stack:
        fns = {"socket": stack.enter_context(socket_sender(nbytes))[0]}
        for c in sizes:
            fns[f"grpc_{c >> 10}k"] = stack.enter_context(grpc_bare_sender(nbytes, c))
        t = interleaved(fns, repeat)
    return {
        k: {
            "gbps": nbytes / median(v) / 1e9,
            "of_socket": median([s / x for x, s in zip(v, t["socket"], strict=True)]),
        }
        for k, v in t.items()
    }


def bulk_only(repeat: int = 10) -> dict:
    """The fp32 push over the bulk transport, with its digests in the header and in a trailer, and the
    socket, taken in turn (about a minute): the quick check of the transfer figure's best path (``--bulk``)."""
    pushers = {
        "bulk": hffm_pusher("fp32", transport="bulk"),
        "trailer": hffm_pusher("fp32", transport="bulk", digests="trailer"),
    }
    nbytes, t, ph = _in_turn(pushers, repeat)
    out: dict = {"bytes": nbytes, "socket_gbps": nbytes / median(t["socket"]) / 1e9}
    for name in pushers:
        out[f"{name}_gbps"] = nbytes / median(t[name]) / 1e9
        out[f"{name}_ratio"] = _vs_socket(t, name)
        out.update({f"{name}_{k}": median(v[2:]) for k, v in ph[name].items()})
    return out


if __name__ == "__main__":
    import json

    if "--message-sizes" in sys.argv:
        print(json.dumps(message_sizes(), indent=2))
    elif "--bulk" in sys.argv:
        print(json.dumps(bulk_only(), indent=2))
    elif "--tls" in sys.argv:
        print(json.dumps(tls_transfer(10), indent=2))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
