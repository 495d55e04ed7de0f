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

Robust rules (``median``, ``trimmed_mean``, ``krum``, ``bulyan``, and ``fedavg`` with ``clip_norm``)
need every sender's copy of a module at once: they hold each sender's modules as received (the receive
buffers, no copy) and, at ``result``, make one module's aggregate at a time from an n × d matrix of its
copies, releasing that module's copies as soon as its aggregate is made. Peak: the held copies plus one
module's matrix (``peak_bytes``). Every robust rule takes ``clip_norm`` (clip each copy's update, its
difference from the centre, to that L2 norm before the rule; the centre is the node's own module at the
start of the round, or the copies' coordinate-wise median where the node has none). Order statistics
ignore sample weights (a sender's claimed weight buys it no influence over them); Multi-Krum weights
the copies it selects by samples. The aggregate's ``num_samples`` is every contributor's total, as FedAvg
(less the senders excluded by ``exclude_flagged``).

Detection (any rule, ``flag_z``): every copy of every module is scored against the others
(``SenderScore``: distance to their coordinate-wise median, its update's norm and cosine to the median
update, the larger robust z-score of distance and norm) and flagged above ``flag_z``; with
``exclude_flagged`` flagged senders are left out of that module's aggregate (a majority is always
kept). ``update_z`` scores each sender's whole update the same way (distance and norm over every
scored module it sent, as one vector) and flags the sender, all its modules, above it: an honest device
with labels of its own stands out on one head, an attacker that poisons its update everywhere stands out
as a whole. ``twin_cos`` flags senders whose whole updates point the same way. ``structure`` and
``subspace`` flag senders whose update is shaped like noise: its matrices' top singular value no larger
than independent noise's, or little of it along the other senders' main directions (a free rider hiding in
noise of an honest size). ``echo`` flags senders whose whole update points where the node's last step went
(its start minus its previous training collect's, ``previous``, which the node sets): a free rider that
sends the federation's last step back as its update. Where the node has that last step, ``structure`` and
``subspace`` judge each update less its component along it, so an echo drowned in noise of its own, under
``echo``'s cut, shows its noise's shape. A sender's whole-update flags hold in every module it
sent, one with too few copies for a spread of its own included. Scores are in ``scores`` for the node's report.

A new rule is a new subclass registered in ``RULES`` (its name in ``hffm.ids.AGGREGATION_RULES``, its
parameters in ``hffm.ids.RULE_PARAMS``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from hffm.config import rule_arguments
from hffm.ids import COMMON_AGGREGATION_PARAMS, HEAD_PREFIX, RULE_PARAMS
from hffm.modules import Module, ModuleError, ModuleSet, flat_views
from hffm.results import SenderScore


def _robust_z(v: torch.Tensor, floor: float, ref: list[int] | None = None) -> torch.Tensor:
    """(v - median) / scale per value, scale = max(1.4826 MAD, floor): about a standard deviation for
    normal data; median and MAD over the values ``ref`` (default: all). The floor (Z_FLOOR x the median
    update's size): copies that agree more closely than that (several senders' same untrained head) do
    not make a small difference an outlier; with MAD and floor both zero, any value off the median is
    infinitely far."""
    r = v if ref is None else v[ref]
    med = _coordinate_median(r)
    dev = (v - med).abs()
    scale = max(1.4826 * float(_coordinate_median((r - med).abs())), floor)
    if scale <= 0:
        return torch.where(dev > 0, torch.full_like(v, math.inf), torch.zeros_like(v))
    return (v - med) / scale


# a sender and its modules -> (its head_drop, whether that leaves it out), or None: not checked
Screen = Callable[[str, list[Module]], tuple[float, bool] | None]
MIN_SENDERS_TO_FLAG = 4  # fewer copies give no meaningful spread: they are not scored
MIN_REFERENCE = 3  # the fewest non-twin senders the scores' medians are taken over (else over all)
Z_FLOOR = 0.25  # the least spread assumed, relative to the median update's norm (see _robust_z)
SAME_UPDATE = 1e-6  # two whole updates closer than this x the median update's norm are the same (twins)


STRUCTURE_MIN_SIDE = 8  # narrower matrices (a yes/no head) cannot tell structure from noise: not scored


def _short_gram(u: torch.Tensor) -> torch.Tensor:
    """u^T u or u u^T, whichever is smaller: the Gram matrix of a matrix's short side."""
    return u.T @ u if u.shape[1] <= u.shape[0] else u @ u.T


def structure_of(u: torch.Tensor, gram: torch.Tensor | None = None) -> float | None:
    """How much more of a matrix update ``u`` (m x n) its top singular value holds than independent noise
    would: (s_1^2 / |u|^2) / ((sqrt(m) + sqrt(n))^2 / (m n)). Independent zero-mean entries of any one size
    give about 1 (the largest singular value of such a matrix is about sigma (sqrt(m) + sqrt(n)), its squared
    norm sigma^2 m n); an update made of a few directions gives up to m n / (sqrt(m) + sqrt(n))^2 (a rank-1
    update). Scale-free: neither shrinking nor boosting noise changes it. None for a zero update. ``gram``: its
    short side's Gram matrix, where already made (s_1^2 is its top eigenvalue, |u|^2 its trace)."""
    g = _short_gram(u) if gram is None else gram
    total = float(g.diagonal().sum())
    if not total > 0:
        return None
    m, n = u.shape
    top = float(torch.linalg.eigvalsh(g)[-1])
    return top / total * (m * n) / (math.sqrt(m) + math.sqrt(n)) ** 2


SUBSPACE_RANK = 8  # the other senders' main directions a sender's update is measured along
SUBSPACE_MIN_SIDE = 4 * SUBSPACE_RANK  # narrower matrices: their main directions are most of the space


def subspace_of(gram: torch.Tensor, others_gram: torch.Tensor) -> float | None:
    """How much of a matrix update lies along the other senders' main directions, over what chance gives:
    with ``gram`` its short side's Gram matrix (u^T u for u of m x n, m >= n) and ``others_gram`` the sum of
    the other senders' on the same side, the share of |u|^2 in the span of the top SUBSPACE_RANK eigenvectors
    of ``others_gram`` (their main directions), divided by SUBSPACE_RANK / n, the share of a random direction.
    About 1 for noise of any size and rank; honest updates of one round measured 2.8 or more (the adapters'
    short side of 64). None for a zero update or others without a spread."""
    total = float(gram.diagonal().sum())
    if not total > 0 or not float(others_gram.diagonal().sum()) > 0:
        return None
    n = gram.shape[0]
    _, vec = torch.linalg.eigh((others_gram + others_gram.T) / 2)
    top = vec[:, -SUBSPACE_RANK:]  # eigh sorts ascending
    return float((top.T @ gram @ top).diagonal().sum()) / total / (SUBSPACE_RANK / n)


def _medians(per: dict[str, list[float]]) -> dict[str, float]:
    """sender -> the median of its values (of two middle values, their mean); none with fewer than
    MIN_SENDERS_TO_FLAG senders scored."""
    if len(per) < MIN_SENDERS_TO_FLAG:
        return {}
    return {s: float(torch.tensor(v, dtype=torch.float64).quantile(0.5)) for s, v in per.items()}


def _outlier_z(dist: torch.Tensor, norm: torch.Tensor, ref: list[int]) -> torch.Tensor:
    """The larger robust z-score of a copy's distance and of its update's norm (two-sided), over the
    rows ``ref``, with the floor Z_FLOOR x their median norm."""
    floor = Z_FLOOR * float(_coordinate_median(norm[ref]))
    return torch.maximum(_robust_z(dist, floor, ref), _robust_z(norm, floor, ref).abs())


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
        # sender -> its label_t: left out of this aggregate (found mislabelled by the node's last label check;
        # the inbox sets it); its pushes are counted and scored as excluded, never folded
        self.excluded: dict[str, float] = getattr(self, "excluded", {})
        # sender, its modules -> (its head_drop, whether that leaves it out), or None where it is not checked
        # (calibration.head_check; the inbox sets it on collects of devices' training updates)
        self.screen: Screen | None = getattr(self, "screen", None)
        # module -> what the node started its previous training collect from (``echo``: the last step is
        # reference - previous; the inbox sets it; empty: none yet, nothing scored)
        self.previous: dict[str, Module] = getattr(self, "previous", {})
        self.scores: list[SenderScore] = []  # outlier scores per module and sender (rules with flag_z)
        self.pending: dict[str, list[Module]] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {n: m.shapes() for n, m in self.reference.items()}
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
            if want is not None and want != m.shapes():
                raise ModuleError(
                    "INVALID_ARGUMENT", "shape_mismatch", f"module {m.name}: differs in shape from earlier senders"
                )

    def add(self, sender: str, modules: Iterable[Module]) -> None:
        mods = list(modules)
        self.validate(sender, mods)
        for m in mods:
            if m.name not in self._shapes:
                self._shapes[m.name] = m.shapes()
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
        t = self.excluded.get(sender)
        verdict = self.screen(sender, mods) if t is None and self.screen is not None else None
        if t is not None:
            self.scores.extend(_label_score(m.name, sender, t, True) for m in mods)
        elif verdict is not None and verdict[1]:  # its heads contradict its statistics: every module left out
            self.scores.extend(_head_score(m.name, sender, verdict[0], True) for m in mods)
        else:
            self._fold(sender, mods)
            if verdict is not None:  # checked and passed: scored on its heads
                heads = [m for m in mods if m.name.startswith(HEAD_PREFIX)]
                self.scores.extend(_head_score(m.name, sender, verdict[0], False) for m in heads)
        self.senders.append(sender)

    # ---- what a rule implements ---------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _fold(self, sender: str, modules: list[Module]) -> None: ...

    @abstractmethod
    def _result(self, version: int) -> ModuleSet: ...


class FedAvg(Aggregator):
    """Sample-weighted mean per module, as a running sum: sum_i w_i x_i / sum_i w_i.

    The sum is kept relative to the first copy's weight w_0 (sum_i (w_i / w_0) x_i, divided by
    sum_i w_i / w_0 at the end): the first copy is taken as it is (an owned receive buffer is the
    sum, no pass over it), each later one costs one multiply-add, and one sender's aggregate is its
    copy unchanged."""

    name = "fedavg"

    def _reset(self) -> None:
        self._mean: ModuleSet | None = None  # the result, once asked for (the sums were divided in place)
        self._sum: dict[str, dict[str, torch.Tensor]] = {}
        self._flat: dict[str, torch.Tensor] = {}  # module -> one tensor that _sum[module] views
        self._weight: dict[str, float] = {}
        self._base: dict[str, float] = {}  # module -> w_0, the weight the sum is relative to
        self._contributors: dict[str, int] = {}

    def _fold(self, sender: str, mods: list[Module]) -> None:
        if self._mean is not None:
            raise ModuleError("FAILED_PRECONDITION", "already_aggregated", f"{sender}: the aggregate was taken")
        for m in mods:
            w = float(m.num_samples)
            acc = self._sum.get(m.name)
            flat = m.flat if m.flat is not None and m.flat.dtype == torch.float32 else None
            if acc is None:
                if flat is not None:  # one tensor for the module, tensors as views (same layout)
                    f = flat.detach()
                    f = f if m.owned else f.clone()  # owned: nothing else reads it, it becomes the sum
                    self._flat[m.name] = f
                    self._sum[m.name] = flat_views(f, m.shapes())
                else:
                    self._sum[m.name] = {k: t.detach().to(torch.float32, copy=True) for k, t in m.tensors.items()}
                self._weight[m.name] = self._base[m.name] = w
                self._contributors[m.name] = 1
            else:
                alpha = w / self._base[m.name]
                f = self._flat.get(m.name)
                if f is not None and flat is not None and flat.device == f.device:
                    f.add_(flat, alpha=alpha)  # shapes checked: both are the sorted-key layout
                else:
                    for k, t in m.tensors.items():
                        acc[k].add_(t.to(acc[k].device, torch.float32), alpha=alpha)
                self._weight[m.name] += w
                self._contributors[m.name] += 1

    def contributors(self, name: str) -> int:
        return self._contributors.get(name, 0)

    def _result(self, version: int) -> ModuleSet:
        if self._mean is None:  # divide the running sums (ours alone) in place, once
            self._mean = {}
            for name, acc in self._sum.items():
                w = self._weight[name]
                d = w / self._base[name]  # 1.0 for one sender: its copy is the mean as it is
                f = self._flat.get(name)
                if f is not None:  # one division for the module; its tensors view the result (same layout)
                    self._mean[name] = Module(name, acc, version, w, flat=f if d == 1.0 else f.div_(d))
                else:
                    self._mean[name] = Module(
                        name, acc if d == 1.0 else {k: v.div_(d) for k, v in acc.items()}, version, w
                    )
        return {n: Module(n, m.tensors, version, m.num_samples, flat=m.flat) for n, m in self._mean.items()}


def _flat32(m: Module) -> torch.Tensor:
    """A module's tensors as one fp32 vector in sorted-key order (its received region when it has one)."""
    if m.flat is not None and m.flat.dtype == torch.float32:
        return m.flat.detach()
    return torch.cat([m.tensors[k].detach().reshape(-1).to(torch.float32) for k in sorted(m.tensors)])


def _coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``x`` (n × d, or n values); for even n the mean of the two
    middle values."""
    n = x.shape[0]
    s = x.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The ``w``-weighted mean of the rows of ``x``, summed in float64."""
    return (x.double() * w[:, None]).sum(dim=0).div(w.sum()).to(torch.float32)


def _sq_distances(x: torch.Tensor) -> torch.Tensor:
    """n × n squared Euclidean distances between the rows of ``x``, in float64 (exact enough to rank)."""
    n = x.shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        diff = (x[i + 1 :] - x[i]).double()
        d[i, i + 1 :] = diff.pow(2).sum(dim=1)
        d[i + 1 :, i] = d[i, i + 1 :]
    return d


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each of n points: the sum of squared distances to its n - f - 2 nearest others
    (at least 1 of them when n is too small for f)."""
    n = d2.shape[0]
    k = max(min(n - f - 2, n - 1), 1) if n > 1 else 0
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1 :]])
        out[i] = others.sort().values[:k].sum()
    return out


class _Buffered(Aggregator):
    """Holds every sender's modules; ``_combine`` makes one module's aggregate from its copies' matrix."""

    def __init__(self, order: Sequence[str] = (), reference: Mapping[str, Module] | None = None, **params: Any) -> None:
        self.args, common = rule_arguments(self.name, params)
        self.clip_norm, self.flag_z, self.twin_cos = common["clip_norm"], common["flag_z"], common["twin_cos"]
        self.update_z, self.structure, self.subspace = common["update_z"], common["structure"], common["subspace"]
        self.echo = common["echo"]
        self.exclude_flagged = common["exclude_flagged"]
        super().__init__(order, reference)

    def _reset(self) -> None:
        self._held: dict[str, list[tuple[str, Module]]] = {}
        self._out: ModuleSet | None = None
        self.selected: dict[str, list[str]] = {}  # module -> senders the rule kept (Krum, Bulyan)
        self.held_bytes = 0
        self.peak_bytes = 0

    def _fold(self, sender: str, mods: list[Module]) -> None:
        if self._out is not None:
            raise ModuleError("FAILED_PRECONDITION", "already_aggregated", f"{sender}: the aggregate was taken")
        for m in mods:
            self._held.setdefault(m.name, []).append((sender, m))
            self.held_bytes += m.numel() * 4
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def contributors(self, name: str) -> int:
        return len(self._held.get(name, ())) if self._out is None else self._counts.get(name, 0)

    def _result(self, version: int) -> ModuleSet:
        if self._out is None:
            self._out, self._counts = {}, {}
            self._twins = self._twin_scores() if self.twin_cos is not None else {}
            self._echoes = self._echo_scores() if self.echo is not None else {}
            self._update_zs = self._update_scores() if self.update_z is not None else {}
            shapes = self.structure is not None or self.subspace is not None
            self._structures, self._subspaces = self._shape_scores() if shapes else ({}, {})
            for name in sorted(self._held):
                copies = self._held.pop(name)
                like = copies[0][1].shapes()
                x = torch.stack([_flat32(m) for _, m in copies])  # n x d: the one extra module-sized matrix
                self.peak_bytes = max(self.peak_bytes, self.held_bytes + x.numel() * 4)
                w = torch.tensor([float(m.num_samples) for _, m in copies], dtype=torch.float64)
                senders = [s for s, _ in copies]
                scored = any(
                    p is not None
                    for p in (self.flag_z, self.twin_cos, self.update_z, self.structure, self.subspace, self.echo)
                )
                whole = (self._twins, self._update_zs, self._structures, self._subspaces, self._echoes)
                whole_scored = any(s in d for d in whole for s in senders)
                if scored and (len(senders) >= MIN_SENDERS_TO_FLAG or whole_scored):
                    keep = self._score(name, senders, x)
                    if len(keep) < len(senders):
                        x, w, senders = x[keep], w[keep], [senders[i] for i in keep]
                if self.clip_norm is not None:
                    x = self._clip(name, x)
                vec = self._combine(name, senders, x, w).contiguous()  # w: the kept senders' weights
                self.held_bytes -= sum(m.numel() * 4 for _, m in copies)
                self._out[name] = Module(name, flat_views(vec, like), version, float(w.sum()), flat=vec)
                self._counts[name] = len(copies)
        return {n: Module(n, m.tensors, version, m.num_samples, flat=m.flat) for n, m in self._out.items()}

    def _score(self, name: str, senders: list[str], x: torch.Tensor) -> list[int]:
        """Score every copy of module ``name`` (``scores``); the rows to aggregate: all, or with
        ``exclude_flagged`` those not flagged (never fewer than a majority: past that, the least
        suspicious majority). A module with fewer than MIN_SENDERS_TO_FLAG copies (a head of a task few
        senders here hold) has no spread of its own to judge by (z 0), but its senders' whole-update flags
        (update_z, twin_cos, structure, subspace, echo: measured over everything they sent) hold in it too."""
        n = len(senders)
        ref = self._reference_rows(senders)
        med, base, dist, u, norm = self._measure(name, x, ref)
        cu = med - base
        denom = norm * cu.norm()
        cos = torch.where(denom > 0, (u @ cu) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        spread = n >= MIN_SENDERS_TO_FLAG
        z = _outlier_z(dist, norm, ref) if spread else torch.zeros(n, dtype=torch.float64)
        twin = [self._twins.get(s, 0.0) for s in senders]
        whole = [self._update_zs.get(s, 0.0) for s in senders]
        shape = [self._structures.get(s) for s in senders]  # None: not scored (nothing measurable sent)
        along = [self._subspaces.get(s) for s in senders]
        echo = [self._echoes.get(s) for s in senders]  # None: not scored (no last step to compare with)
        flagged = [
            (spread and self.flag_z is not None and bool(z[i] > float(self.flag_z)))
            or (self.update_z is not None and whole[i] > self.update_z)
            or (self.twin_cos is not None and twin[i] >= self.twin_cos)
            or (self.structure is not None and shape[i] is not None and shape[i] < self.structure)
            or (self.subspace is not None and along[i] is not None and along[i] < self.subspace)
            or (self.echo is not None and echo[i] is not None and echo[i] >= self.echo)
            for i in range(n)
        ]
        keep = list(range(n))
        if self.exclude_flagged and any(flagged):
            majority = n // 2 + 1
            is_twin = [self.twin_cos is not None and t >= self.twin_cos for t in twin]
            # least suspicious first; of the flagged, twins last (colluders must not be the majority kept),
            # ordered by their sender-level twin score (the same choice in every module)
            order = sorted(range(n), key=lambda i: (flagged[i], is_twin[i], twin[i] if is_twin[i] else float(z[i]), i))
            keep = sorted(order[: max(majority, n - sum(flagged))])
        for i, s in enumerate(senders):
            self.scores.append(
                SenderScore(
                    name,
                    s,
                    float(dist[i]),
                    float(norm[i]),
                    float(cos[i]),
                    float(z[i]),
                    flagged[i],
                    i not in keep,
                    twin[i],
                    whole[i],
                    structure=shape[i] or 0.0,
                    subspace=along[i] or 0.0,
                    echo=echo[i] or 0.0,
                )
            )
        return keep

    def _update_scores(self) -> dict[str, float]:
        """sender -> the robust z-score of its whole update: the larger of its distance's and its norm's
        (``_score``'s per module), each over every module with at least MIN_SENDERS_TO_FLAG copies, as
        one vector (the square root of the module's squared distances, or norms, summed). Fewer than
        MIN_SENDERS_TO_FLAG senders: none scored."""
        dist2: dict[str, float] = {}
        norm2: dict[str, float] = {}
        for name, copies in self._held.items():
            if len(copies) < MIN_SENDERS_TO_FLAG:
                continue
            x = torch.stack([_flat32(m) for _, m in copies])
            _, _, d, _, u = self._measure(name, x, self._reference_rows([s for s, _ in copies]))
            for i, (s, _) in enumerate(copies):
                dist2[s] = dist2.get(s, 0.0) + float(d[i]) ** 2
                norm2[s] = norm2.get(s, 0.0) + float(u[i]) ** 2
        senders = sorted(dist2)
        if len(senders) < MIN_SENDERS_TO_FLAG:
            return {}
        dist = torch.tensor([dist2[s] for s in senders], dtype=torch.float64).sqrt()
        norm = torch.tensor([norm2[s] for s in senders], dtype=torch.float64).sqrt()
        z = _outlier_z(dist, norm, self._reference_rows(senders))
        return {s: float(z[i]) for i, s in enumerate(senders)}

    def _shape_scores(self) -> tuple[dict[str, float], dict[str, float]]:
        """(sender -> ``structure``, sender -> ``subspace``; each empty where its parameter is not set): over
        every matrix of every module with at least MIN_SENDERS_TO_FLAG copies (both sides at least
        STRUCTURE_MIN_SIDE, and SUBSPACE_MIN_SIDE for ``subspace``), the median of the sender's scores of its
        update (copy - centre), each from its short side's Gram matrix, made once.

        ``structure_of``: gradient training moves a matrix along a few directions (honest adapters' top
        singular value holds 15-60 % of their update at full size); noise added to what the sender received,
        of any size, spreads evenly (3.5 % for a 256 x 64 adapter). ``subspace_of`` against the sum of the other
        senders' Gram matrices, each divided by its trace (one vote a sender, whatever its update's size: a
        loud sender, noise ten times an honest update's, would otherwise set "the others' main directions" by
        itself, measured: an honest device's score from 3.06 to 1.92): honest updates of a round share their
        main directions (the same backbone's features feed every adapter); noise of any shape, one random
        direction included, falls along them by chance alone. A sender with a zero update in every such matrix
        (a plain free rider: the twins catch it) is not scored; fewer than MIN_SENDERS_TO_FLAG senders scored:
        none."""
        shape: dict[str, list[float]] = {}
        along: dict[str, list[float]] = {}
        side = STRUCTURE_MIN_SIDE if self.structure is not None else SUBSPACE_MIN_SIDE
        for updates in self._matrix_updates(side):
            grams = {s: _short_gram(u) for s, u in updates.items()}
            traces = {s: float(g.diagonal().sum()) for s, g in grams.items()}
            units = {s: g / traces[s] if traces[s] > 0 else g for s, g in grams.items()}
            total = sum(units.values())
            for s, u in updates.items():
                v = structure_of(u, grams[s]) if self.structure is not None else None
                if v is not None:
                    shape.setdefault(s, []).append(v)
                if self.subspace is not None and min(u.shape) >= SUBSPACE_MIN_SIDE:
                    v = subspace_of(grams[s], total - units[s])
                    if v is not None:
                        along.setdefault(s, []).append(v)
        return _medians(shape), _medians(along)

    def _echo_scores(self) -> dict[str, float]:
        """sender -> the cosine of its whole update (its copies of every module the node has a last step of,
        each minus the node's start, concatenated) with the node's last step over the same modules (start -
        ``previous``), from per-module dot products (no concatenation held). Honest training moves along its
        own data's gradients, this round's; a free rider echoing the last step (``adversary.behaviour: echo``)
        points exactly along it, at any scale. A sender with a zero update, or no module with a non-zero last
        step, is not scored (the twins catch zero updates)."""
        dot: dict[str, float] = {}
        uu: dict[str, float] = {}
        ss: dict[str, float] = {}
        for name, copies in self._held.items():
            ref, prev = self.reference.get(name), self.previous.get(name)
            if ref is None or prev is None or ref.shapes() != prev.shapes():
                continue
            start = _flat32(ref).double()
            step = start - _flat32(prev).double()
            s2 = float(step @ step)
            if s2 == 0:
                continue
            x = torch.stack([_flat32(m) for _, m in copies]).double() - start
            d, n2 = x @ step, (x * x).sum(dim=1)
            for i, (s, _) in enumerate(copies):
                dot[s] = dot.get(s, 0.0) + float(d[i])
                uu[s] = uu.get(s, 0.0) + float(n2[i])
                ss[s] = ss.get(s, 0.0) + s2
        return {s: dot[s] / math.sqrt(uu[s] * ss[s]) for s in dot if uu[s] > 0}

    def _matrix_updates(self, side: int) -> Iterable[dict[str, torch.Tensor]]:
        """For every matrix with both sides at least ``side`` of every module with at least MIN_SENDERS_TO_FLAG
        copies: sender -> its update of that matrix (copy - centre, float64). Where the node has the matrix's last
        step (``echo``: its start minus its previous start), less each update's component along it: the shape
        scores then judge what a sender added to the last step, so an echo of it drowned in noise of its own (its
        cosine under ``echo``'s cut) shows its noise's shape; an honest update, about orthogonal to the last step,
        keeps nearly all of itself."""
        for name, copies in self._held.items():
            if len(copies) < MIN_SENDERS_TO_FLAG:
                continue
            like = copies[0][1].shapes()
            keys = [k for k, d in like.items() if len(d) == 2 and min(d) >= side]
            if not keys:
                continue
            x = torch.stack([_flat32(m) for _, m in copies])
            centre = flat_views(self._centre(name, x).double(), like)
            ref, prev = self.reference.get(name), self.previous.get(name)
            last = ref is not None and prev is not None and ref.shapes() == prev.shapes()
            for k in keys:
                updates = {s: m.tensors[k].detach().double() - centre[k] for s, m in copies}
                step = ref.tensors[k].detach().double() - prev.tensors[k].detach().double() if last else None
                s2 = float((step * step).sum()) if step is not None else 0.0
                if s2 > 0:
                    updates = {s: u - float((u * step).sum()) / s2 * step for s, u in updates.items()}
                yield updates

    def _measure(
        self, name: str, x: torch.Tensor, ref: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Of module ``name``'s copies ``x`` (float64): the coordinate-wise median of the rows ``ref``,
        the centre updates are measured from (the node's own module, else that median), each copy's
        distance to the median, its update and the update's norm."""
        med = _coordinate_median(x[ref]).double()
        base = (self._centre(name, x) if name in self.reference else med).double()
        xd = x.double()
        u = xd - base
        return med, base, (xd - med).norm(dim=1), u, u.norm(dim=1)

    def _reference_rows(self, senders: list[str]) -> list[int]:
        """The rows that the scores' medians and MADs are taken over: with ``twin_cos``, the senders that
        are not twins, and with ``echo`` that do not echo the last step (at least MIN_REFERENCE of them,
        else every row). Two colluders sending one vector among five senders would otherwise place the
        median and shrink the MAD, and the honest three would stand out (measured: every honest sender of a
        cluster flagged, the colluders kept); two echoes of one step likewise (an honest device flagged by
        update_z in four rounds of six, measured)."""
        rows = list(range(len(senders)))
        if self.twin_cos is None and self.echo is None:
            return rows
        ref = [
            i
            for i, s in enumerate(senders)
            if (self.twin_cos is None or self._twins.get(s, 0.0) < self.twin_cos)
            and (self.echo is None or self._echoes.get(s, 0.0) < self.echo)
        ]
        return ref if len(ref) >= MIN_REFERENCE else rows

    def _twin_scores(self) -> dict[str, float]:
        """sender -> the highest cosine of its whole update (its copies of every module, each minus the
        centre, concatenated) with another sender's, from their Gram matrix summed module by module (no
        concatenation held). Honest non-IID updates point their own ways; colluders sending one vector
        (ALIE, IPM) are twins at 1, and so are senders whose whole updates are the same (within
        SAME_UPDATE of the median update's norm: free riders sending back what they received, all zero).
        Measured from the node's start (every module has one), a zero update is a twin at 1 of the start
        itself: a lone free rider, or an echo with no last step yet, has nobody else to be a twin of.
        Fewer than MIN_SENDERS_TO_FLAG senders: none scored."""
        senders = sorted({s for copies in self._held.values() for s, _ in copies})
        if len(senders) < MIN_SENDERS_TO_FLAG:
            return {}
        index = {s: i for i, s in enumerate(senders)}
        gram = torch.zeros(len(senders), len(senders), dtype=torch.float64)
        for name, copies in self._held.items():
            x = torch.stack([_flat32(m) for _, m in copies])
            u = (x - self._centre(name, x)).double()
            ix = torch.tensor([index[s] for s, _ in copies])
            gram[ix[:, None], ix[None, :]] += u @ u.T
        norms = gram.diagonal().sqrt()
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
        # the same update twice is a twin at 1 whatever its direction: free riders returning what they
        # received all send zero (no cosine), and honest training never sends another sender's update;
        # not when the typical update is zero itself (nobody trained: nothing to tell apart)
        med = float(_coordinate_median(norms))
        if med > 0:
            d2 = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)
            cos = torch.where(d2 <= (SAME_UPDATE * med) ** 2, torch.ones_like(cos), cos)
        cos.fill_diagonal_(-1.0)
        best = cos.max(dim=1).values
        if med > 0 and all(self.reference.get(name) is not None for name in self._held):
            # from a median centre a zero update only says "at the median": a twin of nothing
            best = torch.where(norms <= SAME_UPDATE * med, torch.ones_like(best), best)
        return {s: float(best[i]) for s, i in index.items()}

    def _centre(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What a copy's update is measured from: the node's own module at the start of the round, or
        the copies' coordinate-wise median where it has none."""
        ref = self.reference.get(name)
        return _flat32(ref).to(x.device) if ref is not None else _coordinate_median(x)

    def _clip(self, name: str, x: torch.Tensor) -> torch.Tensor:
        centre = self._centre(name, x)
        u = x - centre
        norms = u.double().norm(dim=1)
        scale = torch.clamp(float(self.clip_norm) / norms.clamp_min(1e-30), max=1.0).to(x.dtype)
        return centre + u * scale[:, None]

    @abstractmethod
    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...


class BufferedFedAvg(_Buffered):
    """FedAvg of held copies (``fedavg`` with ``clip_norm`` or ``flag_z``): clipping against the copies'
    median and scoring need every copy before the mean, so it holds them like the rules below."""

    name = "fedavg"

    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _weighted_mean(x, w)


class Median(_Buffered):
    """Coordinate-wise median of the copies (even n: the mean of the two middle values)."""

    name = "median"

    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _coordinate_median(x)


class TrimmedMean(_Buffered):
    """Per coordinate, drop the floor(beta * n) smallest and largest values and average the rest (at least
    one value is kept)."""

    name = "trimmed_mean"

    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        k = min(math.floor(self.args["beta"] * n), (n - 1) // 2)
        s = x.sort(dim=0).values
        return s[k : n - k].double().mean(dim=0).to(torch.float32)


class Krum(_Buffered):
    """Krum (m = 1) and Multi-Krum: the m copies with the lowest Krum scores for f attackers (their
    sample-weighted mean). With n <= f + 2 the scores use the single nearest neighbour."""

    name = "krum"

    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scores = krum_scores(_sq_distances(x), self.args["f"])
        keep = sorted(scores.argsort(stable=True)[: min(self.args["m"], len(senders))].tolist())
        self.selected[name] = [senders[i] for i in keep]
        return _weighted_mean(x[keep], w[keep])


class Bulyan(_Buffered):
    """Bulyan (El Mhamdi et al., 2018): Krum picks theta = n - 2f copies one at a time (scores recomputed on
    what is left), then per coordinate the mean of the beta = theta - 2f selected values closest to their
    median. Needs n >= 4f + 3; with fewer copies theta and beta are clamped to at least 1."""

    name = "bulyan"

    def _combine(self, name: str, senders: list[str], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, f = x.shape[0], self.args["f"]
        theta = max(n - 2 * f, 1)
        d2 = _sq_distances(x)
        left, picked = list(range(n)), []
        while len(picked) < theta:
            sub = d2[left][:, left]
            best = int(krum_scores(sub, f).argmin())  # the first of equal scores: canonical order
            picked.append(left.pop(best))
        picked.sort()
        self.selected[name] = [senders[i] for i in picked]
        sel = x[picked].double()  # float64: distances to the median tie exactly where they should
        beta = max(theta - 2 * f, 1)
        closest = (sel - _coordinate_median(sel)).abs().argsort(dim=0, stable=True)[:beta]
        return sel.gather(0, closest).mean(dim=0).to(torch.float32)


@dataclass(frozen=True)
class LabelReference:
    """What a label check judged a phase's statistics against, kept for a device that sends statistics later
    (a joiner's ``join-stats``): ``here``, task -> the sum of the statistics of the senders it kept (``peers``
    of them); ``rest``, task -> the federation's sums less every sender here (a deferred check's), or None.
    ``round``: the round whose modules the statistics were computed under (its closing phase's); ``modules``: those
    that shape the features (every one but the heads), where the node keeps them (an edge, for joiners after an
    edge round: ``NodeRuntime.keep_reference``), else None."""

    round: int
    here: dict  # task -> FeatureStats
    peers: int
    rest: dict | None = None  # task -> FeatureStats
    modules: ModuleSet | None = field(default=None, compare=False, repr=False)

    def score(self, mine: dict) -> float | None:
        """``mine``'s label_t against this reference as ``label_scores`` would score it beside the senders
        kept (the smaller against here and the rest, where each applies and holds any of its answers; here only
        with at least MIN_SENDERS_TO_FLAG senders in all); None where neither does."""
        from hffm.calibration import evidence

        scores = [evidence(mine, [self.here])] if self.peers + 1 >= MIN_SENDERS_TO_FLAG else []
        if self.rest is not None:
            scores.append(evidence(mine, [self.rest]))
        known = [v for v in scores if v is not None]
        return min(known) if known else None


class LabelCheck(Aggregator):
    """The FedAvg of feature statistics (``stats.<task>`` modules: calibration) with each sender's labels
    checked by them (``calibration.label_t``; ``hffm.calibration.label_scores``): a sender whose per-answer
    mean features sit where the other senders' samples of those answers do not is flagged. Every sender is
    scored (``SenderScore.label_t``) when at least MIN_SENDERS_TO_FLAG came; a majority is never flagged.

    Two references. By default the other senders of this collect (the cloud in star: every device): the
    flagged senders' statistics are left out of the sum at once (the cloud's calibration must not learn
    their labels). With ``defer`` (an edge in hfm, whose cluster of a few devices can be outvoted by two
    flippers holding most of an answer: docs/robustness.md) the sum goes up without the senders the node
    found mislabelled before (``excluded``: held and scored, not summed), and ``check`` scores every sender
    later against both its peers here and the federation's sums, which the cloud sends down before it
    calibrates, and flags those that stand out against both; ``kept`` is then what the node sends up again to be
    calibrated on.
    Holds the senders' statistics (a few hundred KB each for the tiny model) for the round: the deferred check
    and the head check's claims read them after the sum, which is therefore made from copies (an owned
    receive buffer is never its running sum; until 2026-12-06 the first sender's was, and in runs without a
    trace a deferred check read that sender's statistics as its whole cluster's sum)."""

    name = "label_check"

    def __init__(
        self,
        order: Sequence[str] = (),
        reference: Mapping[str, Module] | None = None,
        label_t: float = 4.0,
        defer: float = 0,
    ) -> None:
        if not (float(label_t) > 0):
            raise ValueError(f"aggregation rule {self.name!r}: label_t must be > 0, got {label_t}")
        if defer not in (0, 1):
            raise ValueError(f"aggregation rule {self.name!r}: defer must be 0 or 1, got {defer}")
        self.cut = float(label_t)
        self.defer = bool(defer)
        super().__init__(order, reference)

    def _reset(self) -> None:
        self._held: dict[str, list[Module]] = {}
        self._out: ModuleSet | None = None
        self.flagged: list[str] = []
        # what the last check judged against (``label_reference``): the kept senders' sums and the federation's rest
        self._judged: tuple[dict, int, dict | None] | None = None
        # sender -> its label_t where the node checked it on arrival (a joiner's statistics, ``Inbox``) and it
        # passed; those it flagged are ``excluded``
        self.passed: dict[str, float] = {}

    def _fold_one(self, sender: str, mods: list[Module]) -> None:  # held even when excluded: scored later
        self._fold(sender, mods)
        self.senders.append(sender)

    def _fold(self, sender: str, mods: list[Module]) -> None:
        if self._out is not None:
            raise ModuleError("FAILED_PRECONDITION", "already_aggregated", f"{sender}: the aggregate was taken")
        self._held[sender] = mods

    def contributors(self, name: str) -> int:
        return sum(1 for mods in self._held.values() for m in mods if m.name == name)

    def claims(self) -> dict[str, dict]:
        """sender -> task -> what its statistics say (``hffm.calibration.Claim``: counts and answer means)."""
        from hffm.calibration import claims_of

        return {s: claims_of(by_task) for s, by_task in self._stats().items()}

    def _stats(self) -> dict[str, dict]:
        from hffm.calibration import sums_of  # the model's side of the package

        return {s: sums_of(mods) for s, mods in self._held.items()}

    def _result(self, version: int) -> ModuleSet:
        if self._out is None:
            from hffm.calibration import label_scores

            t: dict[str, float] = {}
            if self.defer:  # left out as flagged before, and scored so (the record says whom the sum lacks)
                self.flagged = [s for s in self.senders if s in self.excluded]
                left = [(m.name, s) for s in self.flagged for m in self._held[s]]
                self.scores.extend(_label_score(name, s, self.excluded[s], True) for name, s in left)
                ok = [
                    (m.name, s)
                    for s in self.senders
                    if s in self.passed and s not in self.excluded
                    for m in self._held[s]
                ]
                self.scores.extend(_label_score(name, s, self.passed[s], False) for name, s in ok)
            elif len(self._held) >= MIN_SENDERS_TO_FLAG:
                stats = self._stats()
                t, self.flagged = label_scores(stats, self.cut)
                self._judged = (*self._kept_sums(stats), None)
            self._out = self._unflagged_sum(version)
            if t:
                self.scores.extend(self._scored(t))
        return {n: Module(n, m.tensors, version, m.num_samples, flat=m.flat) for n, m in self._out.items()}

    def check(self, federation: Mapping[str, Module]) -> list[SenderScore]:
        """``defer``: score every sender against the other senders here and against ``federation`` (the
        ``stats.<task>`` sums of every device the cloud counted) minus its own statistics where they were in
        it, and flag, greedily, those that stand out against both (``label_scores``: either reference alone
        can be the flippers'). Their scores (none with fewer than MIN_SENDERS_TO_FLAG senders)."""
        from hffm.calibration import federation_rest, label_scores, sums_of

        if len(self._held) < MIN_SENDERS_TO_FLAG:
            return []
        summed = {s for s in self.senders if s not in self.flagged}  # what this node sent up
        fed = sums_of(federation.values())
        stats = self._stats()
        t, self.flagged = label_scores(stats, self.cut, fed, summed)
        self._judged = (*self._kept_sums(stats), federation_rest(fed, stats, summed))
        return self._scored(t)

    def kept(self, version: int) -> ModuleSet:
        """The sum of the statistics of the senders not flagged by the last check (``check``: those it flags now
        are left out too), as modules of ``version``: what a deferred check's node sends up to be calibrated on."""
        return self._unflagged_sum(version)  # FedAvg's result: modules of ``version``, made for this call

    def _unflagged_sum(self, version: int) -> ModuleSet:
        """The FedAvg of the held statistics of every sender not in ``flagged``, in fold order (the sum is the same
        whatever order the pushes came in), summed from copies: the held statistics are read again later."""
        out = FedAvg()
        for s in self.senders:
            if s not in self.flagged:
                out.add(s, [replace(m, owned=False) for m in self._held[s]])
        return out.result(version)

    def _kept_sums(self, stats: Mapping[str, dict]) -> tuple[dict, int]:
        """(task -> the sum of ``stats`` of the senders not flagged, how many senders that is)."""
        here: dict = {}
        kept = [s for s in self.senders if s not in self.flagged]
        for s in kept:
            for task, fs in stats[s].items():
                here[task] = here[task] + fs if task in here else fs
        return here, len(kept)

    def label_reference(self, round_: int) -> LabelReference | None:
        """What the last check here judged against, for statistics computed under round ``round_``'s modules
        (None: no check scored anyone, as with fewer than MIN_SENDERS_TO_FLAG senders)."""
        return None if self._judged is None else LabelReference(round_, *self._judged)

    def _scored(self, t: Mapping[str, float]) -> list[SenderScore]:
        return [_label_score(m.name, s, t[s], s in self.flagged) for s in self.senders for m in self._held[s]]


def _label_score(module: str, sender: str, t: float, flagged: bool) -> SenderScore:
    """A label check's score of one copy: flagged senders are left out (no geometry is measured)."""
    return SenderScore(module, sender, 0.0, 0.0, 0.0, 0.0, flagged, flagged, label_t=t)


def _head_score(module: str, sender: str, drop: float, flagged: bool) -> SenderScore:
    """A head check's score of one copy (``Aggregator.screen``): flagged senders are left out."""
    return SenderScore(module, sender, 0.0, 0.0, 0.0, 0.0, flagged, flagged, head_drop=drop)


RULES: dict[str, type[Aggregator]] = {r.name: r for r in (FedAvg, Median, TrimmedMean, Krum, Bulyan)}


def rule_parameters(rule: str) -> list[str]:
    """The parameters ``rule`` takes (every rule takes ``COMMON_AGGREGATION_PARAMS``)."""
    return sorted([*RULE_PARAMS[rule], *COMMON_AGGREGATION_PARAMS])


def make_aggregator(
    rule: str = "fedavg",
    order: Sequence[str] = (),
    reference: Mapping[str, Module] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Aggregator:
    """The aggregator for ``rule`` with ``params`` (ValueError naming a bad rule or parameter)."""
    params = dict(params or {})
    if rule == LabelCheck.name:  # a calibration statistics collect's (never a config's aggregation.rule)
        return LabelCheck(order, reference, **params)
    try:
        cls = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {sorted(RULES)}") from None
    if cls is FedAvg and set(params) & set(COMMON_AGGREGATION_PARAMS):
        cls = BufferedFedAvg
    return cls(order, reference, **params)


def server_step(start: Mapping[str, Module], aggregate: ModuleSet, lr: float) -> ModuleSet:
    """A server learning rate (FedOpt's η_s, Reddi et al. 2021): per module, ``start`` + ``lr`` ×
    (aggregate − ``start``), the aggregate's version and weight kept. With FedAvg from few local steps
    on many non-IID devices the mean update is short (the devices' updates partly cancel); ``lr`` > 1
    takes a longer step along it. A module not in ``start`` (or of another shape) is taken as
    aggregated; ``lr`` = 1 returns ``aggregate`` itself."""
    if lr == 1.0:
        return aggregate
    out: ModuleSet = {}
    for n, m in aggregate.items():
        s = start.get(n)
        if (
            s is None
            or s.tensors.keys() != m.tensors.keys()
            or any(s.tensors[k].shape != t.shape for k, t in m.tensors.items())
        ):
            out[n] = m
            continue
        out[n] = Module(
            n, {k: s.tensors[k] + lr * (t - s.tensors[k]) for k, t in m.tensors.items()}, m.version, m.num_samples
        )
    return out


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
