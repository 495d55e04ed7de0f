"""Classifier calibration with virtual representations (CCVR; Luo et al., NeurIPS 2021), per task head.

Under label skew FedAvg's shared modules learn usable features while its heads do not: each device's head
learns its own answers' prior and the average of such heads is biased (docs/results.md: on the easy-VQA
setup, heads retrained on the federated adapters' features close most of the gap to centralised training).
CCVR fixes the heads without moving any data: every device sends, per task and answer, the count, sum and
sum of outer products of its samples' features (the backbone's pooled output under the global modules);
those add up exactly over devices, edges and the cloud; the cloud turns the totals into one Gaussian per
answer, draws virtual features from them (as many per answer as the federation holds, times a factor) and
trains the task's head on them. Only the heads change; the adapters stay as aggregated.

Statistics are float64 sums (merged by addition, so the order devices arrive in does not matter and an
edge can fold its devices' statistics before sending). ``diagonal`` keeps each answer's per-coordinate
sums of squares only (d numbers instead of d x d; the paper-size model's hidden 768 makes a full matrix
2.4 MB per answer in float32); ``pooled`` adds one d x d sum of outer products per task over all its answers,
from which the cloud takes the task's pooled within-answer correlations (each answer is drawn with its own
variances and those correlations: d x d per task, not per answer).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hffm.aggregation import LabelReference
from hffm.config import HFFMConfig, ModelConfig
from hffm.data import TaskData
from hffm.ids import HEAD_PREFIX, head_name, stats_name, stats_task
from hffm.model import HFFMModel, build_head
from hffm.modules import Module, ModuleError, ModuleSet


@dataclass
class FeatureStats:
    """One task's feature statistics per answer: ``count`` (C,), ``total`` (C, d) and ``squares``: (C, d, d)
    sums of outer products, or (C, d) per-coordinate sums of squares when diagonal; all float64."""

    count: torch.Tensor
    total: torch.Tensor
    squares: torch.Tensor
    pooled: torch.Tensor | None = None  # (d, d): the sum of outer products over every answer's samples

    @property
    def diagonal(self) -> bool:
        return self.squares.dim() == 2

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if (
            self.total.shape != other.total.shape
            or self.squares.shape != other.squares.shape
            or (self.pooled is None) != (other.pooled is None)
        ):
            raise ValueError(
                f"feature statistics of different shapes: {tuple(self.squares.shape)} and {tuple(other.squares.shape)}"
                + ("" if (self.pooled is None) == (other.pooled is None) else ", one of them pooled")
            )
        pooled = None if self.pooled is None else self.pooled + other.pooled
        return FeatureStats(self.count + other.count, self.total + other.total, self.squares + other.squares, pooled)

    def __sub__(self, other: FeatureStats) -> FeatureStats:
        """The statistics of a sum without a part of it (a federation's without one cluster's senders)."""
        pooled = None if other.pooled is None else -other.pooled
        return self + FeatureStats(-other.count, -other.total, -other.squares, pooled)

    def correlations(self) -> torch.Tensor | None:
        """The task's pooled within-answer correlation matrix (d, d), from ``pooled`` less each answer's mean
        outer products; None without ``pooled`` or without within-answer spread."""
        if self.pooled is None:
            return None
        n = self.count.round()
        present = n >= 1
        dof = float(n[present].sum()) - int(present.sum())
        if dof <= 0:
            return None
        t = self.total[present]
        within = self.pooled - (t.T / n[present]) @ t  # sum over answers of the centred outer products
        within = (within + within.T) / 2
        sd = within.diagonal().clamp_min(0).sqrt()
        if float(sd.max()) == 0.0:
            return None
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        corr = within / torch.outer(sd, sd)
        return corr.clamp(-1, 1).fill_diagonal_(1.0)

    def gaussians(self, shrink: float = 1e-3) -> list[tuple[int, torch.Tensor, torch.Tensor] | None]:
        """Per answer: (count, mean, covariance — (d, d), or (d,) variances when diagonal without ``pooled``),
        unbiased, plus ``shrink`` times the mean variance on the diagonal (an answer with fewer samples than
        dimensions has a singular covariance); None for an answer nobody holds. With ``pooled`` an answer's
        covariance is its own standard deviations times the task's pooled correlations."""
        corr = self.correlations() if self.diagonal else None
        out: list[tuple[int, torch.Tensor, torch.Tensor] | None] = []
        for c in range(self.count.shape[0]):
            n = round(float(self.count[c]))  # a sum of per-sample shares times samples: whole up to rounding
            if n == 0:
                out.append(None)
                continue
            mean = self.total[c] / n
            if self.diagonal:
                var = (self.squares[c] - n * mean * mean) / max(n - 1, 1)
                var = var.clamp_min(0)
                if corr is None:
                    out.append((n, mean, var + shrink * float(var.mean()) + 1e-12))
                    continue
                cov = corr * torch.outer(var.sqrt(), var.sqrt())  # its variances, the task's correlations
            else:
                cov = (self.squares[c] - n * torch.outer(mean, mean)) / max(n - 1, 1)
                cov = (cov + cov.T) / 2
            eye = torch.eye(cov.shape[0], dtype=cov.dtype)
            out.append((n, mean, cov + (shrink * float(cov.diagonal().clamp_min(0).mean()) + 1e-12) * eye))
        return out


def merge(stats: list[dict[str, FeatureStats]]) -> dict[str, FeatureStats]:
    """Sum the statistics of several senders, task by task (a task some senders lack is summed over the rest)."""
    out: dict[str, FeatureStats] = {}
    for s in stats:
        for task, fs in s.items():
            out[task] = out[task] + fs if task in out else fs
    return out


def stats_of(
    feats: torch.Tensor, labels: torch.Tensor, classes: int, diagonal: bool = False, pooled: bool = False
) -> FeatureStats:
    """The statistics of features ``feats`` (N, d) with answers ``labels`` (N,; a label < 0, an answer outside
    the vocabulary, is left out) over ``classes`` answers (``pooled``: with the sum of outer products over all
    of them)."""
    keep = labels >= 0
    x, y = feats[keep].double(), labels[keep].long()
    d = feats.shape[1]
    count = torch.bincount(y, minlength=classes).double()
    total = torch.zeros(classes, d, dtype=torch.float64).index_add_(0, y, x)
    if diagonal:
        squares = torch.zeros(classes, d, dtype=torch.float64).index_add_(0, y, x * x)
    else:
        squares = torch.zeros(classes, d, d, dtype=torch.float64).index_add_(0, y, x.unsqueeze(2) * x.unsqueeze(1))
    return FeatureStats(count, total, squares, x.T @ x if pooled else None)


@torch.no_grad()
def feature_stats(
    model: HFFMModel,
    data: dict[str, TaskData],
    device: str,
    diagonal: bool = False,
    batch_size: int = 128,
    pooled: bool = False,
) -> dict[str, FeatureStats]:
    """Each task's statistics of the pooled features of ``data`` under the model's current modules (a task
    with no samples is left out)."""
    model.eval()
    torch.manual_seed(0)  # ViLT's patch order (global RNG): the same modules and data give the same sums
    out: dict[str, FeatureStats] = {}
    for task, td in data.items():
        if len(td) == 0:
            continue
        classes = answers_of(model.module(head_name(task)))
        batches = pooled_batches(model, td, task, device, batch_size)
        parts = [stats_of(f, y, classes, diagonal, pooled) for f, y in batches]
        out[task] = sum(parts[1:], parts[0])
    return out


def pooled_batches(
    model: HFFMModel, td: TaskData, task: str, device: str, batch_size: int = 128
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled features, labels) of ``td``'s samples, batch by batch in order, under the model's current modules,
    on the CPU. The caller sets the mode, the gradients and ViLT's patch-order seed."""
    for i in range(0, len(td), batch_size):
        batch = td.batch(torch.arange(i, min(i + batch_size, len(td))), device)
        yield model.pooled(batch, task).cpu(), batch["labels"].cpu()


def answers_of(head: nn.Module) -> int:
    """The number of answers a task head scores (a ``TaskHead``'s last layer, an ``ETFHead``'s frame)."""
    frame = getattr(head, "frame", None)
    return int(frame.shape[0]) if frame is not None else int(head.net[-1].out_features)


def virtual_features(
    stats: FeatureStats, factor: float, seed: int, shrink: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, d) float32, labels (N,)): ``round(factor * count)`` draws per answer (at least one for an
    answer anyone holds) from its Gaussian; answers nobody holds get none."""
    gen = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, g in enumerate(stats.gaussians(shrink)):
        if g is None:
            continue
        n, mean, cov = g
        m = max(1, round(factor * n))
        z = torch.randn(m, mean.shape[0], generator=gen, dtype=torch.float64)
        if cov.dim() == 1:  # variances only
            x = mean + z * cov.sqrt()
        else:
            evals, evecs = torch.linalg.eigh(cov)  # symmetric PSD up to rounding: clamp what rounding made negative
            x = mean + (z * evals.clamp_min(0).sqrt()) @ evecs.T
        feats.append(x.float())
        labels.append(torch.full((m,), c, dtype=torch.long))
    if not feats:
        raise ValueError("no feature statistics: no device holds any sample of the task")
    return torch.cat(feats), torch.cat(labels)


def calibrate_head(
    head: nn.Module,
    stats: FeatureStats,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 32,
    factor: float = 1.0,
    seed: int = 0,
    shrink: float = 1e-3,
) -> float:
    """Train ``head`` (in place) on virtual features drawn from ``stats`` for ``epochs`` epochs with AdamW;
    the mean loss of the last epoch."""
    feats, labels = virtual_features(stats, factor, seed, shrink)
    gen = torch.Generator().manual_seed(zlib.crc32(f"calibrate/{seed}".encode()))
    device = next(head.parameters()).device
    feats, labels = feats.to(device), labels.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    was = head.training
    head.train()
    last = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(labels), batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            (loss / len(idx)).backward()
            opt.step()
            total += float(loss.detach())
        last = total / len(labels)
    head.train(was)
    return last


def calibrate_heads(
    heads: ModuleSet, stats: dict[str, FeatureStats], cfg: HFFMConfig, round_: int
) -> tuple[ModuleSet, dict[str, float]]:
    """(each task of ``stats`` its head of ``heads`` calibrated as ``cfg.calibration`` says — virtual draws
    seeded by (seed, round, task) — as the round's version with the aggregate's weight; each task's last
    virtual loss). What the cloud's ``Calibrate`` step does, and ``benchmarks.screen`` with it."""
    c = cfg.calibration
    out: ModuleSet = {}
    losses: dict[str, float] = {}
    for task, fs in stats.items():
        name = head_name(task)
        held = heads[name]
        head = build_head(int(held.tensors["net.0.weight"].shape[1]), cfg.model, task, int(fs.count.shape[0]))
        head.load_state_dict(held.tensors)
        seed = zlib.crc32(f"{cfg.seed}/calibrate/{round_}/{task}".encode())
        losses[task] = calibrate_head(head, fs, c.epochs, c.lr, c.batch_size, c.factor, seed, c.shrink)
        out[name] = Module(
            name, {k: v.detach().clone() for k, v in head.state_dict().items()}, round_, held.num_samples
        )
    return out, losses


# ---- checking senders' labels by their statistics -----------------------------------------------------
# Under label skew (a Dirichlet split over answers) every honest device draws its samples of an answer from
# the same distribution: what differs between devices is how many of each answer they hold, not what an
# answer's samples look like. So, under the model every sender computed its statistics with, the mean feature
# of answer a at one sender should match the other senders' mean of a up to sampling noise, however skewed the
# sender. A device whose labels are wrong (flipped, poisoned) has answer a's mean where another answer's
# samples lie. This is evidence from the data, not from an update's geometry: label flipping leaves an
# update's norm, distance and direction unremarkable (docs/robustness.md), and leave-one-out accuracy could
# not tell a flipper from an honest skewed device.


def label_t(mine: dict[str, FeatureStats], others: list[dict[str, FeatureStats]], metric: str = "trace") -> float:
    """``evidence`` or 0 where nothing is comparable."""
    t = evidence(mine, others, metric)
    return 0.0 if t is None else t


LABEL_METRICS = ("trace", "whitened")


def evidence(
    mine: dict[str, FeatureStats], others: list[dict[str, FeatureStats]], metric: str = "trace"
) -> float | None:
    """How far a sender's per-answer mean features are from the others' pooled means of the same answers, in
    units of what sampling alone would give; the mean over the (task, answer) pairs both hold, weighted by the
    sender's samples. About 1 when the sender's samples of each answer are like the others'; None when nothing
    is comparable (no answer held by both, no within-answer spread): no evidence either way.

    ``metric`` ``trace``: T = |mu_mine - mu_others|^2 / (v (1/n_mine + 1/n_others)), v the total within-answer
    variance (the trace of the pooled within-answer covariance W, over every sample of the task the sender and
    the others hold). ``whitened``: T = d' W^-1 d / (k (1/n_mine + 1/n_others)), d the difference of the means,
    W shrunk by ``WHITEN_SHRINK`` times its mean variance and k its effective dimension (tr(W (W + s I)^-1)):
    Hotelling's statistic per dimension, diagonal W where the statistics are. Where answers differ along
    directions of little spread (a feature that tells two answers apart varies little within each), the trace
    drowns them in the large directions' noise and the whitened statistic does not: both are about 1 for honest
    data, and a flipper's mean, another answer's, stands out further in the second."""
    if metric not in LABEL_METRICS:
        raise ValueError(f"label metric must be one of {LABEL_METRICS}, got {metric!r}")
    num = den = 0.0
    for task, fs in mine.items():
        held = [o[task] for o in others if task in o]
        if not held:
            continue
        ref = sum(held[1:], held[0])
        pooled = ref + fs
        n = pooled.count
        present = n >= 0.5
        mu = pooled.total[present] / n[present, None]
        sq = pooled.squares[present]
        dof = float(n[present].sum()) - int(present.sum())
        if metric == "trace":
            sq = sq if sq.dim() == 2 else torch.diagonal(sq, dim1=1, dim2=2)
            within = float((sq.sum(1) - n[present] * (mu * mu).sum(1)).sum())
            if dof <= 0 or within <= 0:
                continue
            v, weigh = within / dof, None
        else:
            whitening = _whitening(sq, n[present], mu, dof)
            if whitening is None:
                continue
            v, weigh = whitening
        for c in range(fs.count.shape[0]):
            a, b = float(fs.count[c]), float(ref.count[c])
            if a < 0.5 or b < 0.5:
                continue
            diff = fs.total[c] / a - ref.total[c] / b
            d2 = float((diff**2).sum()) if weigh is None else weigh(diff)
            num += a * d2 / (v * (1 / a + 1 / b))
            den += a
    return num / den if den else None


WHITEN_SHRINK = 1e-2  # the whitened label metric's ridge, times the mean within-answer variance


def _whitening(
    sq: torch.Tensor, n: torch.Tensor, mu: torch.Tensor, dof: float
) -> tuple[float, Callable[[torch.Tensor], float]] | None:
    """The whitened label metric's (effective dimension k, d -> d' (W + s I)^-1 d) from the answers' sums of
    squares ``sq`` (per coordinate or whole), counts ``n`` and means ``mu``: W the pooled within-answer
    covariance, s WHITEN_SHRINK times its mean variance. None without within-answer spread."""
    if dof <= 0:
        return None
    if sq.dim() == 2:  # diagonal statistics: W diagonal
        var = ((sq.sum(0) - (n[:, None] * mu * mu).sum(0)) / dof).clamp_min(0)
        if not float(var.sum()) > 0:
            return None
        scale = 1 / (var + WHITEN_SHRINK * float(var.mean()))
        return float((var * scale).sum()), lambda d: float((d**2 * scale).sum())
    w = (sq.sum(0) - torch.einsum("c,ci,cj->ij", n, mu, mu)) / dof
    lam, vec = torch.linalg.eigh((w + w.T) / 2)
    lam = lam.clamp_min(0)
    if not float(lam.sum()) > 0:
        return None
    inv = 1 / (lam + WHITEN_SHRINK * float(lam.mean()))
    return float((lam * inv).sum()), lambda d: float(((vec.T @ d) ** 2 * inv).sum())


def federation_rest(
    federation: Mapping[str, FeatureStats], stats: Mapping[str, Mapping[str, FeatureStats]], summed: Iterable[str]
) -> dict[str, FeatureStats]:
    """task -> ``federation``'s sums less the statistics of every sender of ``stats`` among ``summed`` (those the
    node sent up): the other clusters' devices, whom nothing here can outvote."""
    rest = {}
    for task, ref in federation.items():
        for s in sorted(set(summed) & set(stats)):
            if task in stats[s]:
                ref = ref - stats[s][task]
        rest[task] = ref
    return rest


def label_scores(
    stats: dict[str, dict[str, FeatureStats]],
    cut: float,
    federation: dict[str, FeatureStats] | None = None,
    summed: set[str] | frozenset[str] = frozenset(),
    here: bool = True,
    metric: str = "trace",
) -> tuple[dict[str, float], list[str]]:
    """(sender -> ``label_t``, the senders flagged). Each sender is scored against the other senders kept
    (``here``) and, given ``federation`` (task -> the sums of every sender anywhere, ``summed`` of ``stats``'
    senders among them), against the rest of the federation (the federation minus every sender here: other
    clusters' devices, whom nothing here can outvote); with both, its score is the smaller: it must stand out
    against both references (against the one that holds any of its answers, where only one does: a reference
    with nothing comparable is no evidence, and until 2026-12-06 its 0 cleared the sender against the other).
    Greedily, the sender with the largest score above ``cut`` is flagged and left out of every other sender's
    references, and all are scored again, while a majority of the senders stays unflagged (a detector fooled
    into flagging the honest cannot flag most of them).

    Either reference alone can be the flippers': among a cluster's few senders, two flippers holding most of
    an answer's samples make it theirs (the honest holders of that answer then score high); in the rest of
    the federation, a flipper elsewhere that its edge has not left out yet does the same to a whole honest
    cluster (docs/robustness.md "Catching label flippers by their statistics")."""
    senders = sorted(stats)
    flagged: list[str] = []
    majority = len(senders) // 2 + 1
    rest = federation_rest(federation or {}, stats, summed)
    # against the rest of the federation a score does not change as senders here are flagged: once. A reference
    # that holds none of a sender's answers (one edge alone; answers only this cluster holds) is no evidence:
    # it cannot clear the sender against the other
    by_rest = {s: evidence(stats[s], [rest], metric) for s in senders} if federation is not None else {}

    while True:
        t: dict[str, float] = {}
        for s in senders:
            scores = [by_rest.get(s)]
            if here:
                scores.append(evidence(stats[s], [stats[o] for o in senders if o != s and o not in flagged], metric))
            known = [v for v in scores if v is not None]
            t[s] = min(known) if known else 0.0
        over = [s for s in senders if s not in flagged and t[s] > cut]
        if not over or len(senders) - len(flagged) - 1 < majority:
            return t, flagged
        flagged.append(max(over, key=lambda s: (t[s], s)))


# ---- checking a sender's heads against its statistics (calibration.head_check) -----------------------
# The label check trusts a sender's statistics: a liar can train on flipped labels and report its data's true
# statistics, which pass. But a head trained on a device's data classifies that data's answer means as those
# answers (the mean is the answer's most typical feature), however skewed the device; a head trained on
# flipped labels classifies answer a's mean as another answer. So a sender's statistics and its update must
# agree: the statistics it sent last (what it says its data is) against the heads it pushes now (what it
# trained). A liar must send statistics that match its flipped heads (which the label check flags) or heads
# that match its honest statistics (which undo the flip).


@dataclass(frozen=True)
class Claim:
    """What a sender's statistics of one task said: per answer its sample count (C,) and mean feature (C, d)."""

    count: torch.Tensor
    mean: torch.Tensor


def claims_tensors(claims: Mapping[str, Mapping[str, Claim]]) -> dict[str, torch.Tensor]:
    """``claims`` (sender -> task -> Claim) as named tensors (``claims/<sender>/<task>/{count,mean}``): what a
    node saves with a round end (``hffm.persist.NodeState.tensors``)."""
    out = {}
    for sender, by_task in sorted(claims.items()):
        for task, c in sorted(by_task.items()):
            out[f"claims/{sender}/{task}/count"] = c.count.contiguous()
            out[f"claims/{sender}/{task}/mean"] = c.mean.contiguous()
    return out


def _named_parts(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    groups: tuple[str, ...] | None,
    leaves: tuple[str, ...],
    where: str,
    what: str,
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Named tensors ``<prefix>/<group>/<key>/<leaf>`` grouped: (group, key) -> leaf -> tensor; ValueError
    naming ``where`` and the name for any other (``groups`` None: any group), saying it is ``what``."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        bits = name.split("/")
        if (
            len(bits) != 4
            or bits[0] != prefix
            or (groups is not None and bits[1] not in groups)
            or bits[3] not in leaves
        ):
            raise ValueError(f"{where}: {name!r} is {what}")
        parts.setdefault((bits[1], bits[2]), {})[bits[3]] = t
    return parts


def claims_from(tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, Claim]]:
    """The claims ``claims_tensors`` made, read back; ValueError naming ``where`` and the entry for anything
    else (an unknown name, a count without its means, shapes that disagree, a negative count, a value that is
    not finite): a damaged round end is refused, not half-believed."""
    parts = _named_parts(
        tensors, "claims", None, ("count", "mean"), where, "no claim (claims/<sender>/<task>/count or mean)"
    )
    out: dict[str, dict[str, Claim]] = {}
    for (sender, task), p in sorted(parts.items()):
        count, mean = p.get("count"), p.get("mean")
        ok = count is not None and mean is not None and count.dim() == 1 and mean.dim() == 2
        ok = ok and mean.shape[0] == count.shape[0] and bool(torch.isfinite(mean).all())
        if not ok or not bool(torch.isfinite(count).all()) or bool((count < 0).any()):
            raise ValueError(f"{where}: the claim of {sender} on task {task} is damaged")
        out.setdefault(sender, {})[task] = Claim(count, mean)
    return out


REFERENCE_PREFIX = "labelref"  # a round end's tensors of its label reference (``reference_tensors``)
_REFERENCE_MODULES = f"{REFERENCE_PREFIX}/modules/"  # ... and of the modules it was computed under, if kept
_STATS_PARTS = ("count", "total", "squares", "pooled")


def reference_tensors(ref: LabelReference | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A label check's reference (``LabelReference``) as a node saves it with a round end: named float64 tensors
    (``labelref/<here|rest>/<task>/<count|total|squares|pooled>``) and the JSON the rest needs (round, peers,
    the tasks of each part; rest null where it has none); ({}, None) without one."""
    if ref is None:
        return {}, None
    out = {}
    for part, sums in (("here", ref.here), ("rest", ref.rest or {})):
        for task, fs in sorted(sums.items()):
            for k, v in zip(_STATS_PARTS, (fs.count, fs.total, fs.squares, fs.pooled), strict=True):
                if v is not None:
                    out[f"{REFERENCE_PREFIX}/{part}/{task}/{k}"] = v.double().contiguous()
    rest = None if ref.rest is None else sorted(ref.rest)
    meta = {"round": ref.round, "peers": ref.peers, "here": sorted(ref.here), "rest": rest}
    if ref.modules is not None:
        meta["modules"] = sorted(ref.modules)
        for name, m in sorted(ref.modules.items()):
            for k, v in sorted(m.tensors.items()):
                out[f"{_REFERENCE_MODULES}{name}/{k}"] = v.detach().clone().contiguous()
    return out, meta


def reference_from(tensors: Mapping[str, torch.Tensor], meta: object, where: str) -> LabelReference | None:
    """What ``reference_tensors`` made, read back; ValueError naming ``where`` and the entry for anything else
    (an unknown name, a part missing, shapes that disagree, a value that is not finite, JSON that is not
    ``{round, peers, here, rest}`` or names other tasks than the tensors hold, tensors without it): a damaged
    round end is refused, not half-believed."""
    if meta is None:
        if tensors:
            raise ValueError(f"{where}: label reference tensors {sorted(tensors)[:2]} without its round and peers")
        return None

    def counts(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def tasks(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(t, str) for t in v)

    keys = {"round", "peers", "here", "rest"}
    ok = isinstance(meta, dict) and set(meta) in (keys, keys | {"modules"})
    if not (ok and counts(meta["round"]) and counts(meta["peers"]) and tasks(meta["here"])) or not (
        (meta["rest"] is None or tasks(meta["rest"])) and tasks(meta.get("modules", []))
    ):
        raise ValueError(
            f"{where}: a label reference must be {{round, peers: ints >= 0, here, rest: task lists (rest or null), "
            f"modules: module names (optional)}}, got {meta!r}"
        )
    modules = _reference_modules(tensors, meta, where)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_REFERENCE_MODULES)}
    what = f"no part of a label reference ({REFERENCE_PREFIX}/here|rest/<task>/...)"
    parts = _named_parts(tensors, REFERENCE_PREFIX, ("here", "rest"), _STATS_PARTS, where, what)
    sums: dict[str, dict[str, FeatureStats]] = {"here": {}, "rest": {}}
    for (part, task), p in sorted(parts.items()):
        entry = f"{where}: label reference {part}/{task}"
        if missing := [k for k in _STATS_PARTS[:3] if k not in p]:
            raise ValueError(f"{entry} lacks {missing}")
        c, total, sq, pooled = (p.get(k) for k in _STATS_PARTS)
        classes, d = c.shape[0] if c.dim() == 1 else -1, total.shape[-1]
        shapes_ok = (
            c.dim() == 1
            and tuple(total.shape) == (classes, d)
            and tuple(sq.shape) in ((classes, d), (classes, d, d))
            and (pooled is None or tuple(pooled.shape) == (d, d))
        )
        if not shapes_ok:
            raise ValueError(f"{entry}: shapes that disagree")
        if not all(bool(torch.isfinite(v).all()) for v in (c, total, sq, *([pooled] if pooled is not None else []))):
            raise ValueError(f"{entry}: a value that is not finite")
        sums[part][task] = FeatureStats(
            c.double(), total.double(), sq.double(), None if pooled is None else pooled.double()
        )
    for part in ("here", "rest"):
        if sorted(sums[part]) != sorted(meta[part] or []):
            raise ValueError(f"{where}: label reference {part} holds {sorted(sums[part])}, its JSON says {meta[part]}")
    rest = None if meta["rest"] is None else sums["rest"]
    return LabelReference(meta["round"], sums["here"], meta["peers"], rest, modules)


def _reference_modules(tensors: Mapping[str, torch.Tensor], meta: dict, where: str) -> ModuleSet | None:
    """The modules a saved label reference was computed under (``labelref/modules/<module>/<tensor>``), as the
    round's modules (version its round); None where it kept none. ValueError naming ``where`` for tensors of a
    module its JSON does not list, a module listed without tensors, or a value that is not finite."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith(_REFERENCE_MODULES):
            module, _, key = name[len(_REFERENCE_MODULES) :].partition("/")
            held.setdefault(module, {})[key] = t
    if "modules" not in meta:
        if held:
            raise ValueError(f"{where}: label reference modules {sorted(held)[:2]} its JSON does not list")
        return None
    if sorted(held) != sorted(meta["modules"]) or not all(k for ts in held.values() for k in ts):
        raise ValueError(f"{where}: label reference modules {sorted(held)}, its JSON says {meta['modules']}")
    for module, ts in held.items():
        if not all(bool(torch.isfinite(v).all()) for v in ts.values()):
            raise ValueError(f"{where}: label reference module {module}: a value that is not finite")
    return {n: Module(n, ts, meta["round"], 1.0) for n, ts in sorted(held.items())}


def sums_of(modules: Iterable[Module]) -> dict[str, FeatureStats]:
    """task -> the sums one sender's statistics modules (``stats.<task>``) stand for; other modules ignored."""
    return {t: from_module(m) for m in modules if (t := stats_task(m.name))}


def claims_of(stats: dict[str, FeatureStats]) -> dict[str, Claim]:
    """task -> the claim of a sender's statistics (answers it holds no sample of: count 0, mean 0)."""
    out = {}
    for task, fs in stats.items():
        n = fs.count.round()
        out[task] = Claim(n.float(), (fs.total / n.clamp_min(1)[:, None]).float())
    return out


def head_drop(
    heads: ModuleSet,
    start: ModuleSet,
    claims: dict[str, Claim],
    model_cfg: ModelConfig,
    built: dict[str, nn.Module] | None = None,
) -> float | None:
    """How much less likely a sender's own heads (``heads``: the modules it pushed) find the answers its
    ``claims`` report, at those answers' mean features, than the heads it started the round from (``start``):
    the mean over its reported samples of log p_start(answer | mean) - log p_own(answer | mean), in nats, over
    every task all three have. Training on the data the claims describe makes them more likely (the drop is
    below 0, or a little above where the features moved since the statistics); training on flipped labels
    makes them less likely. Against the start, not in absolute terms: where a task's answers share one mean
    (yes/no questions look alike) no head tells them apart there, honest or not. None: nothing comparable.
    ``built``: the start's heads already built, by task (filled here; a collect checks every sender against
    the same start)."""
    built = {} if built is None else built

    def load(task: str, held: Module, classes: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # build_head seeds the global generator: left as it was
            head = build_head(int(held.tensors["net.0.weight"].shape[1]), model_cfg, task, classes)
        head.load_state_dict(held.tensors)
        return head.eval()

    drop = total = 0.0
    for task, claim in sorted(claims.items()):
        name = head_name(task)
        answers = torch.nonzero(claim.count > 0).flatten()
        if name not in heads or name not in start or not len(answers):
            continue
        n, classes = claim.count[answers], int(claim.count.shape[0])
        if task not in built:
            built[task] = load(task, start[name], classes)
        for sign, head in ((-1.0, load(task, heads[name], classes)), (1.0, built[task])):
            with torch.no_grad():
                logp = torch.log_softmax(head(claim.mean[answers]), 1)[torch.arange(len(answers)), answers]
            drop += sign * float((n * logp).sum())
        total += float(n.sum())
    return drop / total if total else None


# ---- statistics as modules on the wire ----------------------------------------------------------
# A device sends its statistics of a task as the module ``stats.<task>`` (hffm.ids.stats_name): the sums
# divided by its samples of the task, with those samples as the module's FedAvg weight. A sample-weighted
# FedAvg of such modules (an edge's, the cloud's) is the sums over all senders divided by all their samples,
# with that total as its weight: ``from_module`` gives back the sums. An aggregator needs nothing new.


def stats_spec(hidden: int, answers: int, diagonal: bool, pooled: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a ``stats.<task>`` module."""
    squares = (answers, hidden) if diagonal else (answers, hidden, hidden)
    out = {"count": (answers,), "total": (answers, hidden), "squares": squares}
    if pooled:
        out["pooled"] = (hidden, hidden)
    return out


def with_stats_spec(spec: dict, answers: dict[str, int], diagonal: bool, pooled: bool = False) -> dict:
    """``spec`` (module -> tensor shapes) with a ``stats.<task>`` entry beside every head in it (a node that
    sends, sums or calibrates a task's statistics accepts them; the head's input width is the features')."""
    out = dict(spec)
    for name, shapes in spec.items():
        if name.startswith(HEAD_PREFIX):
            task = name[len(HEAD_PREFIX) :]
            out[stats_name(task)] = stats_spec(int(shapes["net.0.weight"][1]), int(answers[task]), diagonal, pooled)
    return out


def empty_stats(hidden: int, answers: int, diagonal: bool, pooled: bool = False) -> FeatureStats:
    """The statistics of no sample (a device holding a task without training data of it)."""
    shapes = stats_spec(hidden, answers, diagonal, pooled)
    return FeatureStats(*(torch.zeros(shapes[k], dtype=torch.float64) for k in shapes))


def to_module(name: str, stats: FeatureStats, version: int) -> Module:
    """``stats`` as the module ``name``: per-sample sums (float32), weighted by the samples (at least 1)."""
    n = max(float(stats.count.sum()), 1.0)
    tensors = {"count": stats.count / n, "total": stats.total / n, "squares": stats.squares / n}
    if stats.pooled is not None:
        tensors["pooled"] = stats.pooled / n
    return Module(name, {k: v.float().contiguous() for k, v in tensors.items()}, version, n)


def check_stats(module: Module, tol: float = 1e-4) -> None:
    """A statistics module as it arrives (its shapes the receiver's spec has checked, its values finite):
    per-sample shares, so counts are >= 0 and sum to at most 1 and every sum of squares is >= 0; otherwise
    INVALID_ARGUMENT naming the module (a sender cannot make the cloud draw from a negative variance)."""
    count, squares = module.tensors["count"], module.tensors["squares"]
    diag = squares if squares.dim() == 2 else torch.diagonal(squares, dim1=1, dim2=2)
    problems = []
    if bool((count < -tol).any()):
        problems.append("a negative count")
    if float(count.sum()) > 1 + tol:
        problems.append(f"counts summing to {float(count.sum()):.4g} of its samples (at most 1)")
    if bool((diag < -tol).any()) or (
        "pooled" in module.tensors and bool((module.tensors["pooled"].diagonal() < -tol).any())
    ):
        problems.append("a negative sum of squares")
    if problems:
        raise ModuleError("INVALID_ARGUMENT", "bad_stats", f"{module.name}: {', '.join(problems)}")


def from_module(module: Module) -> FeatureStats:
    """The sums a (possibly aggregated) statistics module stands for."""
    n = float(module.num_samples)
    t = module.tensors
    for k in ("count", "total", "squares"):
        if k not in t:
            raise ValueError(f"{module.name}: a statistics module without {k!r}")
    pooled = t["pooled"].double() * n if "pooled" in t else None
    return FeatureStats(*(t[k].double() * n for k in ("count", "total", "squares")), pooled)
