"""Centralised training of the same modules on all the data: the upper bound a federation is judged
against. One process, no network: the whole training pool of every task (what the devices split among
themselves) in one place, the same frozen backbone, modules, optimiser and local-training loop, and as
many passes over the data as the federation makes (``rounds`` x ``train.local_epochs``). Each "round"
is evaluated on the same global test sets the devices use.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import numpy as np
import torch

from hffm.config import HFFMConfig, resolve_torch_device
from hffm.data import (
    TaskData,
    build_global_test,
    is_real,
    load_tokenizer,
    make_task_data,
    task_labels,
    task_pool_labels,
)
from hffm.model import build_model
from hffm.modules import Module, ModuleSet
from hffm.training import evaluate, round_lr, train_local


def training_pool(cfg: HFFMConfig, task: str, tokenizer) -> TaskData:
    """Every training sample of ``task`` the federation's starting devices share."""
    if not is_real(cfg):
        n = cfg.data.train_per_task
        labels = task_pool_labels(task, n, cfg.seed)
        return make_task_data(
            task, labels, np.arange(n), cfg.seed, cfg.model.image_size, cfg.model.max_text_len, tokenizer
        )
    from hffm.data import image_cache, image_loader
    from hffm.data.real import prepared

    rd = prepared(cfg)
    idx = np.arange(len(rd.train[task]))
    return rd.task_data(task, "train", idx, tokenizer, cfg.model.max_text_len, image_loader(cfg), image_cache(cfg))


def run_centralised(cfg: HFFMConfig, log: Callable[[str], None] = print) -> dict:
    """Train for ``cfg.rounds`` rounds of ``train.local_epochs`` epochs over the whole pool; a results
    mapping shaped like a federated run's (``rounds[].accuracy[task]["global"]``, ``loss``)."""
    return train_centralised(cfg, log)[0]


def train_centralised(cfg: HFFMConfig, log: Callable[[str], None] = print) -> tuple[dict, ModuleSet]:
    """``run_centralised``'s results and the modules it ended with."""
    device = resolve_torch_device(cfg.runtime.device, cfg.runtime.precision)
    torch.set_num_threads(cfg.runtime.torch_threads)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok), task_labels(cfg)).to(device)
    train = {t: training_pool(cfg, t, tok) for t in cfg.tasks}
    test = {t: build_global_test(cfg, t, tok) for t in cfg.tasks}
    names = model.module_names()
    central = cfg.train.model_copy(
        update={"prox_mu": 0.0, "restricted_softmax": 1.0, "logit_adjust": 0.0, "head_only_share": None, "decorr": 0.0}
    )  # one model: no drift, no skew
    rounds = []
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        seed = zlib.crc32(f"{cfg.seed}/central/{r}".encode())
        stats = train_local(model, train, names, central, device, seed=seed, lr=round_lr(central, r, cfg.rounds))
        scores = evaluate(model, test, device)
        acc = {t: {"global": s.accuracy} for t, s in sorted(scores.items())}
        rounds.append(
            {
                "method": "centralised",
                "round": r,
                "accuracy": acc,
                "loss": stats.loss,
                "train_samples": stats.samples,
                "wall_s": time.perf_counter() - t0,
            }
        )
        log(f"round {r:3d}  loss {stats.loss:.3f}  " + " ".join(f"{t}={a['global']:.3f}" for t, a in acc.items()))
    results = {"config": cfg.model_dump(mode="json"), "method": "centralised", "rounds": rounds, "complete": True}
    modules = {
        n: Module(n, {k: v.detach().cpu().clone() for k, v in model.module_state(n).items()}, cfg.rounds, 1.0)
        for n in names
    }
    return results, modules
