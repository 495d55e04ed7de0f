"""An edge folding 40 uploads of the paper-size module set into its FedAvg as they arrive, vs the
simplest fast primitive: one flat in-place multiply-add per upload; and the aggregator's peak memory.

hffm's path per upload, once its last byte has arrived in its receive buffer: decode the received
safetensors blob of each module (format, names, shapes, dtype, fp32 tensors viewing the buffer) and
``FedAvg.add`` them (one flat multiply-add per module). Two checks are made chunk by chunk while the
bytes arrive (``ArrivalCheck``): the BLAKE3 digest and the finiteness of the values; they are part of
the transfer benchmark's path, and ``ratio`` leaves them out. ``ratio_with_arrival`` repeats the
measurement with both arrival checks run here too, in 1 MiB pieces: everything a receiver does to the
bytes but copy them off the wire. Baseline: ``acc.add_(flat, alpha=w)``, one call over all of an
upload's values (the module set as one tensor already in memory). Peak memory is measured in a fresh
process (VmHWM), in module sets above the process's size once one module set is resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import torch

from benchmarks.common import interleaved, median, paper_modules
from hffm.aggregation import FedAvg
from hffm.modules import ArrivalCheck, decode_module, encode_module, spec_of
from hffm.wire import CHUNK_BYTES
from services.launcher import REPO_ROOT

SENDERS = 40


def _uploads(n: int):
    """The module set, its encodings, and each blob in a receive buffer (a ``bytearray``, as received)."""
    mods = paper_modules()
    encoded = [encode_module(m) for m in mods.values()]
    return mods, encoded, [bytearray(e.data) for e in encoded]


def _arrival(e, buf: bytearray) -> tuple[bytes, bool | None]:
    """The checks a receiver makes as ``e``'s bytes arrive in 1 MiB chunks (the copy itself excluded)."""
    chk = ArrivalCheck(e.dtype, e.size_bytes, e.digest_alg)
    for end in range(CHUNK_BYTES, e.size_bytes + CHUNK_BYTES, CHUNK_BYTES):
        chk.update(buf, min(end, e.size_bytes))
    return chk.digest(), chk.finite


def hffm_fn(n: int, arrival: bool = False) -> Callable[[], None]:
    """One pass: n uploads decoded from their receive buffers and folded into a fresh FedAvg, then its
    result. As in a node's receiver, the first upload's modules are ``owned`` (their receive buffers,
    filled untimed before each pass, become the running sum); the other uploads reuse one set of
    buffers, which the fold only reads."""
    mods, encoded, bufs = _uploads(n)
    spec = spec_of({k: m.tensors for k, m in mods.items()})
    done_on_arrival = [(e.digest, True) for e in encoded]  # what ArrivalCheck found while receiving
    first: list[bytearray] = []

    def prepare() -> None:  # the first upload's fresh receive buffers, as the bytes arrived in them
        first[:] = [bytearray(b) for b in bufs]

    def once() -> None:
        agg = FedAvg()
        for i in range(n):
            mine = first if i == 0 else bufs
            checks = [_arrival(e, b) for e, b in zip(encoded, mine, strict=True)] if arrival else done_on_arrival
            decoded = [
                decode_module(
                    buf,
                    name=e.name,
                    version=e.version,
                    num_samples=e.num_samples,
                    dtype=e.dtype,
                    digest=e.digest,
                    digest_alg=e.digest_alg,
                    spec=spec,
                    computed_digest=digest,
                    finite=finite,
                )
                for e, buf, (digest, finite) in zip(encoded, mine, checks, strict=True)
            ]
            for m in decoded:
                m.owned = i == 0
            agg.add(f"d{i}", decoded)
        agg.result(1)

    once.prepare = prepare  # type: ignore[attr-defined]
    return once


def baseline_fn(n: int) -> Callable[[], None]:
    """One pass: n in-place multiply-adds, one per upload, of the module set's values (one flat
    tensor) into an accumulator."""
    flat = torch.cat([t.reshape(-1) for m in paper_modules().values() for t in m.tensors.values()])
    acc = torch.zeros_like(flat)

    def once() -> None:
        for _ in range(n):
            acc.add_(flat, alpha=10.0)

    return once


CHILD = r"""
import json, sys
from benchmarks.aggregation import _uploads
from hffm.aggregation import FedAvg
from hffm.modules import decode_module, spec_of
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
n = int(sys.argv[1])
mods, encoded, _ = _uploads(n)        # one module set (its encoding, a receive buffer) resident
set_bytes = sum(e.size_bytes for e in encoded)
spec = spec_of({k: m.tensors for k, m in mods.items()})
idle = hwm()
agg = FedAvg()
for i in range(n):
    agg.add(f"d{i}", [decode_module(bytearray(e.data), name=e.name, version=e.version, num_samples=e.num_samples,
                                     dtype=e.dtype, digest=e.digest, spec=spec) for e in encoded])
agg.result(1)
print(json.dumps({"idle": idle, "peak": hwm(), "set_bytes": set_bytes}))
"""


def peak_sets(n: int) -> float:
    r = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    d = json.loads(r.stdout)
    return (d["peak"] - d["idle"]) / d["set_bytes"]


def run(quick: bool = False) -> dict:
    n = 10 if quick else SENDERS
    repeat = 3 if quick else 5
    # hffm, the baseline and hffm with the arrival checks taken in turn, repeat times; each ratio is the
    # median of the ratios of passes run side by side.
    t = interleaved({"hffm": hffm_fn(n), "base": baseline_fn(n), "arrival": hffm_fn(n, arrival=True)}, repeat)
    return {
        "senders": n,
        "repeat": repeat,
        "hffm_s": median(t["hffm"]),
        "baseline_s": median(t["base"]),
        "ratio": median([b / h for b, h in zip(t["base"], t["hffm"], strict=True)]),
        "hffm_with_arrival_s": median(t["arrival"]),
        "ratio_with_arrival": median([b / a for b, a in zip(t["base"], t["arrival"], strict=True)]),
        "peak_sets_above_idle": peak_sets(n),
        "peak_sets_above_idle_10": peak_sets(10) if n != 10 else None,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
