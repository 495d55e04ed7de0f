"""Auditing a run from its trace (``runtime.trace_dir``) and its ``results.json``: is every aggregate that
was formed the weighted mean of exactly the updates it says it counted, with nothing accepted and then
dropped, and nothing counted twice? The fault scenarios and ``hffm chaos`` hold every run to it.

For every round's completed attempt and every collect step a node reports (``aggregates``):

- the adopted aggregate equals the sample-weighted mean of the pushes the node accepted from the
  senders in ``counted`` (and its own modules when it counted itself), within float rounding, less the
  senders its scores say it excluded (counted, not folded: a label check's flags, ``flag_z``), each push
  at the weight the record says it was folded with where that is lower than it pushed (``weights``; a
  recorded weight above the pushed one is reported wrong: a bound only lowers);
- its weight is the sum of theirs (a sender counted twice would show here);
- ``counted`` has no repeats and shares nobody with ``left_out``;
- every push the node accepted for that step in that attempt is in ``counted`` (else it was *lost*).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hffm.aggregation import weighted_mean
from hffm.ids import trace_prefix
from hffm.modules import ModuleSet, load_modules


@dataclass
class Audit:
    aggregates: int = 0  # collect steps checked
    counted: int = 0  # updates counted over them
    left_out: int = 0  # senders aggregates went on without
    lost: list[str] = field(default_factory=list)  # accepted, never counted
    double_counted: list[str] = field(default_factory=list)  # counted twice (or weights say so)
    wrong: list[str] = field(default_factory=list)  # aggregate != weighted mean of what it counted

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double_counted or self.wrong)

    def as_dict(self) -> dict[str, Any]:
        return {
            "aggregates": self.aggregates,
            "counted": self.counted,
            "left_out": self.left_out,
            "lost": len(self.lost),
            "double_counted": len(self.double_counted),
            "wrong": len(self.wrong),
        }


def _close(a: ModuleSet, b: ModuleSet, atol: float) -> bool:
    return set(a) == set(b) and all(
        a[n].tensors.keys() == b[n].tensors.keys()
        and all(torch.allclose(a[n].tensors[k], b[n].tensors[k], atol=atol, rtol=0) for k in a[n].tensors)
        for n in a
    )


def audit_run(results: dict[str, Any], trace_dir: str | Path, atol: float = 1e-6) -> Audit:
    trace = Path(trace_dir)
    out = Audit()
    for rec in results["rounds"]:
        pre = trace_prefix(rec["round"], rec["attempt"])
        for agg in rec["aggregates"]:
            node, tag, counted = agg["node"], agg["tag"], list(agg["counted"])
            where = f"round {rec['round']} {node}/{tag}"
            out.aggregates += 1
            out.counted += len(counted)
            out.left_out += len(agg["left_out"])
            if len(set(counted)) != len(counted) or set(counted) & set(agg["left_out"]):
                out.double_counted.append(f"{where}: counted {counted}, left out {agg['left_out']}")
            d = trace / node
            accepted = {p.name[len(f"{pre}-{tag}-from-") : -len(".safetensors")] for p in d.glob(f"{pre}-{tag}-from-*")}
            for s in sorted(accepted - set(counted)):
                out.lost.append(f"{where}: accepted {s}'s push, did not count it")
            excluded = {s["sender"] for s in agg.get("scores", []) if s["excluded"]}
            lowered = agg.get("weights", {})  # sender -> module -> the weight it was folded with, where lower
            parts = []
            for s in counted:
                f = d / (f"{pre}-{tag}-own.safetensors" if s == node else f"{pre}-{tag}-from-{s}.safetensors")
                if not f.is_file():
                    out.wrong.append(f"{where}: counted {s} but no trace of its push ({f.name})")
                    break
                if s not in excluded:
                    pushed = load_modules(str(f))
                    w = lowered.get(s, {})
                    raised = sorted(n for n in w if n not in pushed or w[n] > pushed[n].num_samples)
                    if raised:  # a record can only lower a weight (a bound); anything else is a lie
                        out.wrong.append(f"{where}: {s}'s {raised} folded above the weight pushed, or never pushed")
                    parts.append({n: replace(m, num_samples=w[n]) if n in w else m for n, m in pushed.items()})
            else:
                if not parts:  # every sender excluded: nothing was folded, nothing to compare
                    continue
                got = load_modules(str(d / f"{pre}-{tag}-aggregate.safetensors"))
                want = weighted_mean(parts)
                if not _close(got, want, atol):
                    folded = [s for s in counted if s not in excluded]
                    out.wrong.append(f"{where}: the aggregate is not the weighted mean of {folded}")
                for n, m in got.items():
                    if abs(m.num_samples - want[n].num_samples) > 1e-6 * max(1.0, want[n].num_samples):
                        out.double_counted.append(f"{where}: {n} weighs {m.num_samples}, counted {want[n].num_samples}")
    return out
