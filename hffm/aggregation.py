"""Aggregation rules behind one small interface.

Contract of an ``Aggregator`` (the base class does the bookkeeping; a rule implements ``_fold`` and
``_result``):
- ``add(sender, modules)`` takes one sender's modules. It is all-or-nothing: ``validate`` checks every
  module (weight, and shape against the round's reference module or the first sender's) and raises
  ``ModuleError`` without changing state if any is unacceptable.
- Senders are folded in a canonical ``order`` (given at construction: the collect step's senders),
  whatever order they arrive in: a sender that arrives early waits in ``pending`` until every sender
  before it was folded or ``result`` is asked for. Floating-point sums therefore do not depend on
  network timing, and the same contributors give the same aggregate bit for bit.
- ``result(version)`` folds what is still pending (skipping senders that never came: a quorum) and
  returns the aggregate of every module received from at least one sender (a task head is therefore
  averaged only over the nodes that train that task), or an empty set when nothing arrived.
- ``reset()`` forgets everything (a round's new attempt).
- ``reference`` (optional) is the node's module set at the start of the round: the shape every
  contribution must have, and what clipping or anomaly scores measure updates against.
- Memory: FedAvg keeps one running weighted sum per module, plus the senders that arrived out of order.
  When the first module folded is ``owned`` (a receive buffer nothing else reads), its buffer becomes the
  running sum (scaled in place) and the mean is divided in place: no allocation per round, the same
  arithmetic (bit for bit) as the out-of-place operations. ``result`` may be asked for again (it
  returns the same aggregate); nothing may be added after it.

A new rule (coordinate-wise median, trimmed mean, ...) is a new subclass registered in ``RULES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from hffm.modules import Module, ModuleError, ModuleSet


class Aggregator(ABC):
    name: str = "abstract"

    def __init__(self, order: Sequence[str] = (), reference: Mapping[str, Module] | None = None, **params: Any) -> None:
        if params:
            raise ValueError(f"aggregation rule {self.name!r} takes no parameters {sorted(params)}")
        self.order = list(order)
        self.reference = dict(reference or {})
        self.reset()

    def reset(self) -> None:
        self.senders: list[str] = []  # folded, in fold order
        self.pending: dict[str, list[Module]] = {}
        self._shapes: dict[str, dict[str, torch.Size]] = {
            n: {k: t.shape for k, t in m.tensors.items()} for n, m in self.reference.items()
        }
        self._next = 0
        self._reset()

    # ---- the bookkeeping every rule shares ---------------------------------------------------
    def validate(self, sender: str, modules: Sequence[Module]) -> None:
        """Raise ``ModuleError`` if ``modules`` cannot be added (nothing changes either way)."""
        if sender in self.senders or sender in self.pending:
            raise ModuleError("ALREADY_EXISTS", "duplicate_sender", f"{sender} already contributed")
        if self.order and sender not in self.order:
            raise ModuleError("FAILED_PRECONDITION", "unexpected_sender", f"{sender} is not a sender of this step")
        for m in modules:
            if not (m.num_samples > 0) or m.num_samples == float("inf"):
                raise ModuleError("INVALID_ARGUMENT", "bad_weight", f"module {m.name}: num_samples must be finite, > 0")
            want = self._shapes.get(m.name)
            if want is not None and (set(want) != set(m.tensors) or any(want[k] != m.tensors[k].shape for k in want)):
                raise ModuleError(
                    "INVALID_ARGUMENT", "shape_mismatch", f"module {m.name}: differs in shape from earlier senders"
                )

    def add(self, sender: str, modules: Iterable[Module]) -> None:
        mods = list(modules)
        self.validate(sender, mods)
        for m in mods:
            self._shapes.setdefault(m.name, {k: t.shape for k, t in m.tensors.items()})
        if not self.order:
            self._fold_one(sender, mods)
            return
        self.pending[sender] = mods
        while self._next < len(self.order) and self.order[self._next] in self.pending:
            s = self.order[self._next]
            self._fold_one(s, self.pending.pop(s))
            self._next += 1

    def result(self, version: int) -> ModuleSet:
        for s in self.order[self._next :]:  # a quorum: whoever came, still in canonical order
            if s in self.pending:
                self._fold_one(s, self.pending.pop(s))
        self._next = len(self.order)
        return self._result(version)

    def _fold_one(self, sender: str, mods: list[Module]) -> None:
        self._fold(sender, mods)
        self.senders.append(sender)

    # ---- what a rule implements ---------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _fold(self, sender: str, modules: list[Module]) -> None: ...

    @abstractmethod
    def _result(self, version: int) -> ModuleSet: ...


class FedAvg(Aggregator):
    """Sample-weighted mean per module, as a running sum: sum_i w_i x_i / sum_i w_i."""

    name = "fedavg"

    def _reset(self) -> None:
        self._mean: ModuleSet | None = None  # the result, once asked for (the sums were divided in place)
        self._sum: dict[str, dict[str, torch.Tensor]] = {}
        self._flat: dict[str, torch.Tensor] = {}  # module -> one tensor that _sum[module] views
        self._weight: dict[str, float] = {}
        self._contributors: dict[str, int] = {}

    def _fold(self, sender: str, mods: list[Module]) -> None:
        if self._mean is not None:
            raise ModuleError("FAILED_PRECONDITION", "already_aggregated", f"{sender}: the aggregate was taken")
        for m in mods:
            w = float(m.num_samples)
            acc = self._sum.get(m.name)
            flat = m.flat if m.flat is not None and m.flat.dtype == torch.float32 else None
            if acc is None:
                if flat is not None:  # one operation for the module, tensors as views (same layout)
                    f = flat.detach()
                    f = f.mul_(w) if m.owned else f.mul(w)  # owned: nothing else reads it, reuse it
                    self._flat[m.name] = f
                    self._sum[m.name] = _views(f, m.tensors)
                else:
                    self._sum[m.name] = {k: t.detach().to(torch.float32).mul(w) for k, t in m.tensors.items()}
                self._weight[m.name] = w
                self._contributors[m.name] = 1
            else:
                f = self._flat.get(m.name)
                if f is not None and flat is not None and flat.device == f.device:
                    f.add_(flat, alpha=w)  # shapes checked: both are the sorted-key layout
                else:
                    for k, t in m.tensors.items():
                        acc[k].add_(t.to(acc[k].device, torch.float32), alpha=w)
                self._weight[m.name] += w
                self._contributors[m.name] += 1

    def contributors(self, name: str) -> int:
        return self._contributors.get(name, 0)

    def _result(self, version: int) -> ModuleSet:
        if self._mean is None:  # divide the running sums (ours alone) in place, once
            self._mean = {}
            for name, acc in self._sum.items():
                w = self._weight[name]
                f = self._flat.get(name)
                if f is not None:  # one division for the module; its tensors view the result (same layout)
                    self._mean[name] = Module(name, acc, version, w, flat=f.div_(w))
                else:
                    self._mean[name] = Module(name, {k: v.div_(w) for k, v in acc.items()}, version, w)
        return {n: Module(n, m.tensors, version, m.num_samples, flat=m.flat) for n, m in self._mean.items()}


def _views(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as ``like``'s tensors, in sorted-key order without gaps."""
    out, off = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[off : off + n].view(like[k].shape)
        off += n
    return out


RULES: dict[str, type[Aggregator]] = {FedAvg.name: FedAvg}


def make_aggregator(
    rule: str = "fedavg",
    order: Sequence[str] = (),
    reference: Mapping[str, Module] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Aggregator:
    try:
        cls = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {sorted(RULES)}") from None
    return cls(order, reference, **dict(params or {}))


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
