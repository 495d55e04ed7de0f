"""An edge folding 40 uploads of the paper-size module set into its FedAvg as they arrive, vs an
in-place torch multiply-add over the same tensors; and the aggregator's peak memory.

hffm's path per upload, once its last byte has arrived: decode the received safetensors blob (format,
names, shapes, dtype, fp32 tensors viewing the received buffer) and ``FedAvg.add`` it. Two checks are
made chunk by chunk while the bytes arrive (``ArrivalCheck``, each chunk while it is in cache): the
SHA-256 and the finiteness of the values; they are part of the transfer benchmark's path.
``hffm_with_arrival_s`` repeats the measurement with both arrival checks run here too, in 1 MiB
pieces, so the ratio with everything a receiver does to the bytes is reported as well. Baseline:
``acc.add_(t, alpha=w)`` on tensors already in memory. Peak memory is measured in a fresh process
(VmHWM), in module sets above the process's size once one module set is resident.
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
from hffm.wire import MAX_CHUNK_BYTES
from services.launcher import REPO_ROOT

SENDERS = 40


def _uploads(n: int):
    mods = paper_modules()
    return mods, [encode_module(m) for m in mods.values()]


def _arrival(e) -> tuple[bytes, bool | None]:
    """The checks a receiver makes as ``e``'s bytes arrive in 1 MiB chunks (the copy itself excluded)."""
    chk = ArrivalCheck(e.dtype, e.size_bytes)
    for end in range(MAX_CHUNK_BYTES, e.size_bytes + MAX_CHUNK_BYTES, MAX_CHUNK_BYTES):
        chk.update(e.data, min(end, e.size_bytes))
    return chk.digest(), chk.finite


def hffm_fn(n: int, arrival: bool = False) -> Callable[[], None]:
    """One pass: n uploads decoded and folded into a fresh FedAvg, then its result."""
    mods, encoded = _uploads(n)
    spec = spec_of({k: m.tensors for k, m in mods.items()})
    done_on_arrival = [(e.sha256, True) for e in encoded]  # what ArrivalCheck found while receiving

    def once() -> None:
        agg = FedAvg()
        for i in range(n):
            checks = [_arrival(e) for e in encoded] if arrival else done_on_arrival
            decoded = [
                decode_module(
                    e.data,
                    name=e.name,
                    version=e.version,
                    num_samples=e.num_samples,
                    dtype=e.dtype,
                    sha256=e.sha256,
                    spec=spec,
                    computed_sha256=digest,
                    finite=finite,
                )
                for e, (digest, finite) in zip(encoded, checks, strict=True)
            ]
            agg.add(f"d{i}", decoded)
        agg.result(1)

    return once


def baseline_fn(n: int) -> Callable[[], None]:
    """One pass: n in-place multiply-adds of the module set's tensors into an accumulator."""
    mods = paper_modules()
    tensors = [t for m in mods.values() for t in m.tensors.values()]
    acc = [torch.zeros_like(t) for t in tensors]

    def once() -> None:
        for _ in range(n):
            for a, t in zip(acc, tensors, strict=True):
                a.add_(t, alpha=10.0)

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
mods, encoded = _uploads(n)           # one module set (and its encoding) resident
set_bytes = sum(e.size_bytes for e in encoded)
spec = spec_of({k: m.tensors for k, m in mods.items()})
idle = hwm()
agg = FedAvg()
for i in range(n):
    agg.add(f"d{i}", [decode_module(bytearray(e.data), name=e.name, version=e.version, num_samples=e.num_samples,
                                     dtype=e.dtype, sha256=e.sha256, spec=spec) for e in encoded])
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
