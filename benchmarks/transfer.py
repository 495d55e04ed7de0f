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
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import grpc

from benchmarks.common import median, paper_config, paper_modules, timeit
from hffm.methods import Collect
from hffm.modules import encode_modules
from hffm.wire import ModuleHeader, PushHeader, push_id_for
from services.common.client import CHANNEL_OPTIONS, push_callable, push_requests
from services.common.convert import step_to_pb
from services.common.identity import identity_metadata
from services.launcher import REPO_ROOT, free_ports
from services.rpc import pb, pb_grpc

SOCKET_RECEIVER = r"""
import socket, sys
n = int(sys.argv[2]); buf = bytearray(n); view = memoryview(buf)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept()
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

NODE_RECEIVER = r"""
import sys, time
from benchmarks.common import paper_config
from services.common.bootstrap import node_modules, topology
from services.common.node import NodeRuntime
from services.common.server import NodeServer
cfg = paper_config("wire.dtype=" + sys.argv[2])
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


def socket_gbps(nbytes: int, repeat: int, sha256: bool = False) -> float:
    """The bytes through a loopback TCP socket; with ``sha256`` the sender hashes them and the receiver
    checks the digest chunk by chunk as they arrive."""
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(SHA_RECEIVER if sha256 else SOCKET_RECEIVER, str(port), str(nbytes))
    try:
        payload = os.urandom(nbytes) if sha256 else bytes(nbytes)
        s = socket.create_connection(("127.0.0.1", port))

        def once() -> None:
            if sha256:
                s.sendall(hashlib.sha256(payload).digest())
            s.sendall(payload)
            assert s.recv(1) == b"k"

        t = median(timeit(once, repeat))
        s.close()
        return nbytes / t / 1e9
    finally:
        p.kill()


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


def hffm_gbps(wire: str, repeat: int) -> tuple[float, int, dict[str, float]]:
    """(GB/s of serialized module bytes, bytes per push, phase times) for full pushes."""
    cfg = paper_config(f"wire.dtype={wire}")
    modules = paper_modules()
    port = free_ports(1, "127.0.0.1")[0]
    p = _spawn(NODE_RECEIVER, str(port), wire)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        ctl, push = pb_grpc.RoundControlStub(ch), push_callable(ch)
        state = {"round": 0}
        phases = {"encode_s": [], "push_s": []}

        def once() -> int:
            state["round"] += 1
            r = state["round"]
            ctl.AssignRound(
                metadata=identity_metadata("cloud"),
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
            header = PushHeader(
                push_id_for("device-0-0", "edge-0", r, "aggregate"),
                "device-0-0",
                "edge-0",
                r,
                "aggregate",
                "device_edge",
                tuple(ModuleHeader.of(e) for e in encoded),
            )
            push(
                push_requests(header, encoded, cfg.wire.chunk_bytes),
                timeout=120,
                metadata=identity_metadata("device-0-0"),
            )
            t2 = time.perf_counter()
            phases["encode_s"].append(t1 - t0)
            phases["push_s"].append(t2 - t1)
            return sum(e.size_bytes for e in encoded)

        nbytes = once()
        times = timeit(once, repeat, warmup=0)
        ch.close()
        return nbytes / median(times) / 1e9, nbytes, {k: median(v) for k, v in phases.items()}
    finally:
        p.kill()


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
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
