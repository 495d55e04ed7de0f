"""An edge folding 40 uploads of the paper-size module set into its FedAvg as they arrive, vs an
in-place torch multiply-add over the same tensors; and the aggregator's peak memory.

hffm's path per upload, once its bytes have arrived: decode the received safetensors blob (format,
names, shapes, dtype, finiteness, fp32 tensors viewing the received buffer) and ``FedAvg.add`` it.
The SHA-256 of the bytes is computed chunk by chunk as they arrive (``PushAssembler``) and counted in
the transfer benchmark; ``hffm_with_digest_s`` repeats the measurement with the digest computed here
too. Baseline: ``acc.add_(t, alpha=w)`` on tensors already in memory. Peak memory is measured in a
fresh process (VmHWM), in module sets above the process's size once one module set is resident.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.common import median, paper_modules, timeit
from hffm.aggregation import FedAvg
from hffm.modules import decode_module, encode_module, spec_of
from services.launcher import REPO_ROOT

SENDERS = 40


def _uploads(n: int):
    mods = paper_modules()
    return mods, [encode_module(m) for m in mods.values()]


def hffm_time(n: int, repeat: int, digest: bool = False) -> float:
    mods, encoded = _uploads(n)
    spec = spec_of({k: m.tensors for k, m in mods.items()})

    def once() -> None:
        agg = FedAvg()
        for i in range(n):
            decoded = [
                decode_module(
                    e.data,
                    name=e.name,
                    version=e.version,
                    num_samples=e.num_samples,
                    dtype=e.dtype,
                    sha256=e.sha256,
                    spec=spec,
                    computed_sha256=None if digest else e.sha256,  # hashed on arrival
                )
                for e in encoded
            ]
            agg.add(f"d{i}", decoded)
        agg.result(1)

    return median(timeit(once, repeat))


def baseline_time(n: int, repeat: int) -> float:
    mods = paper_modules()
    tensors = [t for m in mods.values() for t in m.tensors.values()]
    acc = [torch.zeros_like(t) for t in tensors]

    def once() -> None:
        for _ in range(n):
            for a, t in zip(acc, tensors, strict=True):
                a.add_(t, alpha=10.0)

    return median(timeit(once, repeat))


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
    repeat = 2 if quick else 3
    t_hffm = hffm_time(n, repeat)
    t_base = baseline_time(n, repeat)
    t_digest = hffm_time(n, repeat, digest=True)
    return {
        "senders": n,
        "hffm_s": t_hffm,
        "baseline_s": t_base,
        "ratio": t_base / t_hffm,
        "hffm_with_digest_s": t_digest,
        "ratio_with_digest": t_base / t_digest,
        "peak_sets_above_idle": peak_sets(n),
        "peak_sets_above_idle_10": peak_sets(10) if n != 10 else None,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
