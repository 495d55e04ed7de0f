"""Local training (E_local epochs over a device's tasks) and evaluation of modules.

Only the named modules are optimised; the backbone stays frozen. A fresh optimiser is made each
round (the usual FedAvg practice: optimiser state is not shared or kept across aggregations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hffm.config import TrainConfig
from hffm.data import TaskData
from hffm.ids import head_name, task_of
from hffm.model import HFFMModel
from hffm.results import TaskScore


@dataclass
class TrainStats:
    loss: float  # mean training loss over every sample seen
    samples: int  # samples processed (E_local x dataset size)
    steps: int


def train_local(
    model: HFFMModel,
    data: dict[str, TaskData],
    module_names: list[str],
    cfg: TrainConfig,
    device: str,
    seed: int,
    lr: float | None = None,
    on_grad: Callable[[str], None] | None = None,
    extra_loss: Callable[[str, dict, torch.Tensor], torch.Tensor] | None = None,
) -> TrainStats:
    """E_local epochs; each epoch visits every batch of every task once, tasks interleaved. ``lr``: the
    round's learning rate (``round_lr``); None: ``cfg.lr``. ``on_grad(task)``, when given, is called after
    each batch's backward pass and before the optimiser's step: it may read and change the parameters'
    ``.grad`` (``benchmarks.screen``'s SCAFFOLD correction). ``extra_loss(task, batch, feats)``, when given, is
    added to each batch's objective (``feats``: the batch's pooled features, in the graph; ``benchmarks.screen``'s
    virtual features and MOON)."""
    gen = torch.Generator().manual_seed(seed)
    # ViLT's embedding draws a random patch order from torch's global RNG on every forward; without a
    # seed here the result depends on what else ran in the process before (not reproducible).
    torch.manual_seed(seed)
    params = model.trainable_parameters(module_names)
    opt = make_optimizer(params, cfg, lr)
    # FedProx (Li et al. 2020): a proximal term keeps the local modules near the round's start, which
    # limits client drift on non-IID data; mu = 0 leaves the loss (and every bit of the result) as it was
    mu = cfg.prox_mu
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    # FedRS (Li & Zhan, KDD 2021): with label-skewed data a device's head learns to push down the answers
    # it never sees; scaling those answers' logits by alpha during local training restricts that update.
    # alpha = 1 multiplies nothing (the loss, and every bit of the result, is as before)
    alpha = cfg.restricted_softmax
    restrict = {task: _absent_scale(td, alpha) for task, td in data.items()} if alpha < 1 else {}
    # Logit adjustment (balanced softmax; Menon et al. 2021, Ren et al. 2020; FedLC's idea, Zhang et al.
    # 2022): tau * log(the device's own answer prior) added to the logits in the local loss, so that the
    # head learns what tells the answers apart rather than its device's prior, which differs from device to
    # device under label skew; evaluation uses the plain logits. tau = 0 adds nothing (every bit as before)
    tau = cfg.logit_adjust
    adjust = {task: tau * _log_prior(td) for task, td in data.items()} if tau > 0 else {}
    # Skewed tasks train their head alone: a task whose local answers are (nearly) one meets its loss with a
    # near-constant output, which the shared modules would be bent to give; their gradients from its batches
    # are dropped (None: off, every bit as before)
    head_only = skewed_tasks(data, cfg.head_only_share) if cfg.head_only_share is not None else set()
    # FedDecorr (Shi et al., ICLR 2023): under label skew a device's local training collapses the features
    # the shared modules make into few directions; penalising the correlations between the batch's feature
    # dimensions keeps them spread (0: nothing added, every bit as before)
    beta = cfg.decorr
    shared = model.trainable_parameters([n for n in module_names if task_of(n) is None]) if head_only else []
    # fp16 (runtime.precision) computes the backbone's gradients in half precision, where small ones underflow
    # to 0: the loss is scaled up before the backward pass and the gradients down before the step (a step
    # whose gradients overflowed is skipped and the scale lowered). bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(torch.device(device).type) if model.precision == "fp16" else None
    model.train()
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(cfg.local_epochs):
        batches: list[tuple[str, torch.Tensor]] = []
        for task, td in data.items():
            perm = torch.randperm(len(td), generator=gen)
            batches.extend((task, perm[i : i + cfg.batch_size]) for i in range(0, len(td), cfg.batch_size))
        order = torch.randperm(len(batches), generator=gen).tolist()
        for bi in order:
            task, idx = batches[bi]
            batch = data[task].batch(idx, device)
            if cfg.noop:
                seen += len(idx)
                continue
            feats = model.pooled(batch, task)  # what model(batch, task) computes, the features kept for FedDecorr
            logits = model.module(head_name(task))(feats)
            if task in restrict:
                logits = logits * restrict[task].to(logits.device)
            if task in adjust:
                logits = logits + adjust[task].to(logits.device)
            loss = loss_fn(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            objective = loss / len(idx)
            if beta > 0 and len(idx) > 1:
                objective = objective + beta * decorrelation(feats)
            if extra_loss is not None:
                objective = objective + extra_loss(task, batch, feats)
            if anchors:
                objective = objective + 0.5 * mu * sum(
                    (p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)
                )
            (objective if scaler is None else scaler.scale(objective)).backward()
            if task in head_only:
                for p in shared:
                    p.grad = None
            if on_grad is not None:
                if scaler is not None:
                    scaler.unscale_(opt)  # the hook reads and changes true gradients
                on_grad(task)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            total_loss += float(loss.detach())
            seen += len(idx)
            steps += 1
    model.eval()
    return TrainStats(loss=total_loss / max(seen, 1) if not cfg.noop else 0.0, samples=seen, steps=steps)


def decorrelation(z: torch.Tensor) -> torch.Tensor:
    """FedDecorr's loss of a batch's features ``z`` (N, d), as its authors' code computes it: each dimension
    standardised over the batch, then the mean over the off-diagonal entries of the squared zᵀz, divided by N
    (N times the mean squared correlation between two dimensions)."""
    n, d = z.shape
    z = z - z.mean(dim=0, keepdim=True)
    z = z / torch.sqrt(1e-5 + z.var(dim=0, keepdim=True))
    k = z.T @ z
    off = k.pow(2).sum() - k.diagonal().pow(2).sum()
    return off / (d * (d - 1)) / n


def round_lr(cfg: TrainConfig, round_: int, rounds: int) -> float:
    """Round ``round_``'s (1-based, of ``rounds``) learning rate under ``train.lr_schedule``: ``cfg.lr`` when
    constant; on a half cosine from ``cfg.lr`` in round 1 to ``cfg.lr * cfg.lr_final`` in round ``rounds``
    (and at that floor beyond it: rounds a resumed or extended run adds)."""
    progress = min(max(round_ - 1, 0) / (rounds - 1), 1.0) if rounds > 1 else 0.0
    if cfg.lr_schedule == "constant" or progress == 0:
        return cfg.lr  # exactly: round 1 trains as the constant schedule does, bit for bit
    low = cfg.lr * cfg.lr_final
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The round's fresh local optimiser, as ``train.optimizer`` names it, at ``lr`` (default ``cfg.lr``)."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:  # the fused kernel: one call for every tensor's update (an epoch's CPU -13 % on the tiny model)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def skewed_tasks(data: dict[str, TaskData], share: float) -> set[str]:
    """The tasks of ``data`` whose most common answer holds at least ``share`` of their samples."""
    counts = {t: td.label_counts() for t, td in data.items()}
    return {t for t, c in counts.items() if sum(c) and max(c) >= share * sum(c)}


def _absent_scale(td: TaskData, alpha: float) -> torch.Tensor:
    """Per answer: 1 for answers in ``td``'s labels, ``alpha`` for the others (FedRS's restriction)."""
    present = torch.tensor(td.label_counts()) > 0
    return torch.where(present, 1.0, alpha)


def _log_prior(td: TaskData) -> torch.Tensor:
    """Per answer: the log of its share of ``td``'s labels, counted with one more of each answer (an
    answer the device never saw gets a finite prior, 1 / (n + classes), not minus infinity)."""
    counts = torch.tensor(td.label_counts(), dtype=torch.float32) + 1.0
    return torch.log(counts / counts.sum())


@torch.no_grad()
def evaluate(
    model: HFFMModel, data: dict[str, TaskData], device: str, batch_size: int = 128, split: str = "global"
) -> dict[str, TaskScore]:
    """{task: its score}: exact matches, and for a data set with human answers (VQA v2) the summed VQA
    accuracy."""
    model.eval()
    torch.manual_seed(0)  # ViLT's patch order (global RNG): the same modules always score the same
    out: dict[str, TaskScore] = {}
    for task, td in data.items():
        correct, score = 0, None
        for i in range(0, len(td), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(td)))
            pred = model(td.batch(idx, device), task).argmax(-1)
            c, s = td.score(idx, pred)
            correct += c
            if s is not None:
                score = (score or 0.0) + s
        out[task] = TaskScore(task, split, correct, len(td), score)
    return out
