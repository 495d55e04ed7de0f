"""The structure score (``aggregation.params.structure``) offline, on a traced run: every push a collecting
node received from a device, scored as the node scores it (issue 17; docs/robustness.md "A free rider hiding
in noise, caught by its update's structure").

``python -m benchmarks.structure RUN_DIR TRACE_DIR``

Takes a finished run made with ``runtime.trace_dir=TRACE_DIR``. For each round and each device's push that a
collecting node traced (``r<round>-aggregate-from-<device>``), the device's start is what it received at the
end of the round before (its ``r<round-1>-broadcast-aggregate``; in round 1 the initial modules, rebuilt from
the run's config and seed). Every matrix of the push (both sides at least ``STRUCTURE_MIN_SIDE``) is scored by
``hffm.aggregation.structure_of`` on push - start, and the device's score is the median, as the aggregator's.
Prints one line per push, then the honest devices' lowest scores and the configured adversaries' highest, and
JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hffm.adversary import adversaries
from hffm.aggregation import STRUCTURE_MIN_SIDE, structure_of
from hffm.config import load_config
from hffm.data import load_tokenizer, task_labels
from hffm.model import build_model
from hffm.modules import load_modules
from hffm.topology import Topology


def score(push: dict, start: dict) -> float | None:
    """The median ``structure_of`` over every scorable matrix of ``push`` against ``start`` (name -> tensors)."""
    vals = []
    for name, m in push.items():
        if name not in start:
            continue
        for k, t in m.tensors.items():
            if t.dim() == 2 and min(t.shape) >= STRUCTURE_MIN_SIDE:
                v = structure_of(t.double() - start[name][k].double())
                if v is not None:
                    vals.append(v)
    return statistics.median(vals) if vals else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("trace_dir", type=Path)
    a = p.parse_args(argv)
    cfg = load_config(a.run_dir / "config.yaml", [])
    topo = Topology.from_config(cfg, 0)
    bad = adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins)
    model = build_model(cfg, len(load_tokenizer(cfg)), task_labels(cfg))
    init = {n: model.module_state(n) for n in model.module_names()}
    rows = []
    for f in sorted(a.trace_dir.glob("*/r*-aggregate-from-device-*.safetensors")):
        head = f.name.split("-aggregate-from-")
        if not head[0][1:].isdigit():  # a re-run attempt's (r<round>a<attempt>): not scored here
            continue
        r, device = int(head[0][1:]), head[1].removesuffix(".safetensors")
        before = a.trace_dir / device / f"r{r - 1}-broadcast-aggregate.safetensors"
        if r == 1:
            start = init
        elif before.is_file():
            start = {n: m.tensors for n, m in load_modules(str(before)).items()}
        else:
            continue
        s = score(load_modules(str(f)), start)
        if s is not None:
            rows.append(
                {"round": r, "node": f.parent.name, "device": device, "structure": s, "adversary": device in bad}
            )
            print(r, f.parent.name, device, "adversary" if device in bad else "honest", f"{s:.2f}")
    honest = sorted(x["structure"] for x in rows if not x["adversary"])
    attackers = sorted(x["structure"] for x in rows if x["adversary"])
    print("honest pushes", len(honest), "lowest", [round(v, 2) for v in honest[:3]])
    print("adversaries' pushes", len(attackers), "highest", [round(v, 2) for v in attackers[-3:]])
    print(json.dumps({"pushes": rows}))


if __name__ == "__main__":
    main()
