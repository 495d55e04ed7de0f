"""What the update-shape and echo scores cost a collecting node (``aggregation.params.structure``, ``subspace``,
``echo``; issue 17): one collect of SENDERS uploads of the paper-size module set (ViLT-B/32-sized
Double-Adapters, bottleneck 256, and two heads: ~38 MB fp32 each), aggregated by FedAvg with the whole-update
detection the matrix's best rows use (``update_z``, ``twin_cos``; the baseline), with ``echo`` added (against a
last step: the start minus a previous start, both held), and with ``structure`` and ``subspace`` added. Timed:
the adds and ``result`` (scoring and the aggregate), interleaved, the median of ``--repeat`` runs of each; the
uploads are honest-looking (each a mix of a few directions per matrix that all share, plus a little noise),
so nothing is flagged and the aggregates are the same.

``python -m benchmarks.detection_cost [--senders 5] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import interleaved, machine, median, paper_modules
from hffm.aggregation import make_aggregator
from hffm.modules import Module


def uploads(senders: int, seed: int = 0) -> tuple[dict, list[list[Module]]]:
    """The start and ``senders`` honest-looking uploads: in each matrix, a mix of 3 directions of its short
    side that every sender shares, plus a little independent noise."""
    g = torch.Generator().manual_seed(seed)
    start = paper_modules()
    shared = {
        (n, k): torch.randn(3, min(t.shape), generator=g)
        for n, m in start.items()
        for k, t in m.tensors.items()
        if t.dim() == 2
    }
    out = []
    for _ in range(senders):
        mods = []
        for n, m in start.items():
            tensors = {}
            for k, t in m.tensors.items():
                u = 0.001 * torch.randn(t.shape, generator=g)
                if t.dim() == 2:
                    a, b = t.shape
                    mix = torch.randn(max(a, b), 3, generator=g) @ shared[n, k] * 0.01
                    u += mix if a >= b else mix.T
                tensors[k] = t + u
            mods.append(Module(n, tensors, 1, 10.0))
        out.append(mods)
    return start, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detection_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--senders", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    start, ups = uploads(a.senders)
    names = [f"device-0-{i}" for i in range(a.senders)]
    base = {"update_z": 3.5, "twin_cos": 0.99, "exclude_flagged": 1}
    params = {
        "baseline": base,
        "with echo": {**base, "echo": 0.5},
        "with structure and subspace": {**base, "structure": 3, "subspace": 2},
    }
    g = torch.Generator().manual_seed(1)  # a previous start: the last step a small random one
    previous = {
        n: Module(n, {k: t - 0.01 * torch.randn(t.shape, generator=g) for k, t in m.tensors.items()}, 0, 1.0)
        for n, m in start.items()
    }
    flagged: dict[str, int] = {}

    def collect(label: str):
        def once() -> None:
            agg = make_aggregator("fedavg", names, start, params[label])
            agg.previous = previous
            for n, mods in zip(names, ups, strict=True):
                agg.add(n, mods)
            agg.result(1)
            flagged[label] = sum(sc.flagged for sc in agg.scores)

        return once

    times = interleaved({k: collect(k) for k in params}, a.repeat)
    med = {k: median(v) for k, v in times.items()}
    res = {
        "basis": f"{a.senders} uploads of the paper-size module set; timed: adds + result; median of {a.repeat}",
        "median_s": med,
        "ratio": med["with structure and subspace"] / med["baseline"],
        "ratio_echo": med["with echo"] / med["baseline"],
        "flagged": flagged,
        "machine": machine(),
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
