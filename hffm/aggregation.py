"""Aggregation rules behind one small interface.

Contract of an ``Aggregator``:
- ``add(sender, modules)`` folds one sender's modules in. It is all-or-nothing: it validates every
  module first and raises ``ModuleError`` without changing state if any is unacceptable.
- ``result(version)`` returns the aggregate of every module received from at least one sender (a
  task head is therefore averaged only over the nodes that train that task), or an empty set when
  nothing arrived.
- Memory is O(one module set) for FedAvg (a running weighted sum), whatever the number of senders.

A new rule (coordinate-wise median, trimmed mean, ...) is a new class registered in ``RULES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from hffm.modules import Module, ModuleError, ModuleSet


class Aggregator(ABC):
    name: str = "abstract"

    def __init__(self) -> None:
        self.senders: list[str] = []

    @abstractmethod
    def add(self, sender: str, modules: Iterable[Module]) -> None: ...

    @abstractmethod
    def result(self, version: int) -> ModuleSet: ...


class FedAvg(Aggregator):
    """Sample-weighted mean per module, as a running sum: sum_i w_i x_i / sum_i w_i."""

    name = "fedavg"

    def __init__(self) -> None:
        super().__init__()
        self._sum: dict[str, dict[str, torch.Tensor]] = {}
        self._flat: dict[str, torch.Tensor] = {}  # module -> one tensor that _sum[module] views
        self._weight: dict[str, float] = {}
        self._contributors: dict[str, int] = {}

    def add(self, sender: str, modules: Iterable[Module]) -> None:
        mods = list(modules)
        if sender in self.senders:
            raise ModuleError("ALREADY_EXISTS", "duplicate_sender", f"{sender} already contributed")
        for m in mods:  # validate all before changing anything
            if not (m.num_samples > 0):
                raise ModuleError("INVALID_ARGUMENT", "bad_weight", f"module {m.name}: num_samples must be > 0")
            acc = self._sum.get(m.name)
            if acc is not None:
                if set(acc) != set(m.tensors) or any(acc[k].shape != m.tensors[k].shape for k in acc):
                    raise ModuleError(
                        "INVALID_ARGUMENT", "shape_mismatch", f"module {m.name}: differs in shape from earlier senders"
                    )
        for m in mods:
            w = float(m.num_samples)
            acc = self._sum.get(m.name)
            flat = m.flat if m.flat is not None and m.flat.dtype == torch.float32 else None
            if acc is None:
                if flat is not None:  # one operation for the module, tensors as views (same layout)
                    self._flat[m.name] = f = flat.detach().mul(w)
                    self._sum[m.name] = _views(f, m.tensors)
                else:
                    self._sum[m.name] = {k: t.detach().to(torch.float32).mul(w) for k, t in m.tensors.items()}
                self._weight[m.name] = w
                self._contributors[m.name] = 1
            else:
                f = self._flat.get(m.name)
                if f is not None and flat is not None and flat.device == f.device:
                    f.add_(flat, alpha=w)  # shapes checked above: both are the sorted-key layout
                else:
                    for k, t in m.tensors.items():
                        acc[k].add_(t.to(acc[k].device, torch.float32), alpha=w)
                self._weight[m.name] += w
                self._contributors[m.name] += 1
        self.senders.append(sender)

    def contributors(self, name: str) -> int:
        return self._contributors.get(name, 0)

    def result(self, version: int) -> ModuleSet:
        out: ModuleSet = {}
        for name, acc in self._sum.items():
            w = self._weight[name]
            f = self._flat.get(name)
            if f is not None:  # one division for the module; its tensors view the result (same layout)
                mean = f / w
                out[name] = Module(name, _views(mean, acc), version, w, flat=mean)
            else:
                out[name] = Module(name, {k: v / w for k, v in acc.items()}, version, w)
        return out


def _views(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as ``like``'s tensors, in sorted-key order without gaps."""
    out, off = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[off : off + n].view(like[k].shape)
        off += n
    return out


RULES: dict[str, type[Aggregator]] = {FedAvg.name: FedAvg}


def make_aggregator(rule: str = "fedavg") -> Aggregator:
    try:
        return RULES[rule]()
    except KeyError:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {sorted(RULES)}") from None


def weighted_mean(sets: list[ModuleSet]) -> ModuleSet:
    """Reference (non-streaming) FedAvg, used by tests to check the running sum."""
    names = {n for s in sets for n in s}
    out: ModuleSet = {}
    for n in names:
        parts = [s[n] for s in sets if n in s]
        total = sum(p.num_samples for p in parts)
        keys = parts[0].tensors.keys()
        out[n] = Module(
            n,
            {k: sum(p.tensors[k].double() * p.num_samples for p in parts).div(total).float() for k in keys},
            parts[0].version,
            total,
        )
    return out
