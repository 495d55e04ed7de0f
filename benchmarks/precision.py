"""Local training in reduced precision (``runtime.precision``) against fp32, side by side.

``python -m benchmarks.precision [--model tiny|paper] [--samples N] [--repeat R] [--device auto|cpu|cuda]
[--precisions fp32,bf16,fp16] [--out FILE]``

One device's local epoch (``train_local``: the forward under autocast, the backward, the optimiser's step) on
the same data and modules, timed in turn for fp32, bf16 and fp16 (a, b, c, a, b, c, ...: a burst of load hits
them alike); each precision's median, and its ratio to fp32's median (below 1: faster). ``--model paper``: a
ViLT-B/32-sized backbone (hidden 768, 12 layers; the paper's Double-Adapters, bottleneck 256) at the default
image size; ``tiny``: the default model. What each precision changes: the pooled features' relative error
against fp32's (the same modules and inputs), and the epoch's training loss. On a CPU, autocast's speed depends
on the CPU's bf16/fp16 instructions; on a GPU with tensor cores it is what the option is for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import interleaved, machine, median
from hffm.config import PAPER_MODEL, check_precision, load_config, resolve_torch_device
from hffm.data import build_device_data, load_tokenizer, task_labels
from hffm.model import build_model
from hffm.topology import split_table
from hffm.training import train_local

PRECISIONS = ("fp32", "bf16", "fp16")


def measure(
    model_size: str = "tiny",
    samples: int = 32,
    repeat: int = 5,
    device: str = "auto",
    precisions: tuple[str, ...] = PRECISIONS,
) -> dict:
    """{precision: {epoch_s (median), ratio to fp32, feature error, loss}} and the basis of the measurement."""
    if "fp32" not in precisions or not set(precisions) <= set(PRECISIONS):
        raise ValueError(f"--precisions: fp32 (the baseline) and any of {', '.join(PRECISIONS)}, not {precisions}")
    sets = [*(PAPER_MODEL if model_size == "paper" else []), "topology.edges=1", "topology.devices_per_edge=1"]
    sets += [f"data.train_per_task={samples}", f"runtime.device={device}", "train.batch_size=16"]
    cfg = load_config(None, sets)
    dev = resolve_torch_device(cfg.runtime.device)
    tok = load_tokenizer(cfg)
    topo = split_table(cfg)
    (name,) = topo.device_map
    data = build_device_data(cfg, name, topo.holders_by_task(), tok, topo.device_map[name].tasks).train
    for p in precisions:
        check_precision(p, dev)
    model = build_model(cfg, len(tok), task_labels(cfg)).to(dev)  # one model, its precision switched per turn
    start = {k: v.clone() for k, v in model.trainable.state_dict().items()}
    names = model.module_names()

    def reset(p: str) -> None:
        model.precision = p
        model.trainable.load_state_dict(start)

    def epoch(p: str):
        def fn() -> None:
            train_local(model, data, names, cfg.train, dev, seed=1)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()

        fn.prepare = lambda: reset(p)
        return fn

    times = interleaved({p: epoch(p) for p in precisions}, repeat)
    feats, losses = {}, {}
    for p in precisions:  # what each precision computes: the start's features, and one epoch's loss
        reset(p)
        with torch.no_grad():
            feats[p] = torch.cat([_pooled(model, td, t, dev) for t, td in sorted(data.items())])
        losses[p] = train_local(model, data, names, cfg.train, dev, seed=1).loss
    out: dict = {
        "basis": {
            "model": model_size,
            "hidden": cfg.model.hidden_size,
            "layers": cfg.model.num_layers,
            "samples_per_epoch": sum(len(td) for td in data.values()),
            "batch_size": cfg.train.batch_size,
            "device": dev,
            "device_name": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu",
            "torch_threads": torch.get_num_threads(),
            "repeat": repeat,
            "timed": "one local epoch (train_local): forwards under autocast, backward, optimiser steps",
        },
        "machine": machine(),
    }
    for p in precisions:
        out[p] = {
            "epoch_s": median(times[p]),
            "epoch_s_all": times[p],
            "ratio_to_fp32": median(times[p]) / median(times["fp32"]),
            # the pooled features' error against fp32's (|z_p - z_fp32| / |z_fp32|), and the epoch's training loss
            "feature_error": float((feats[p] - feats["fp32"]).norm() / feats["fp32"].norm()),
            "loss": losses[p],
        }
    return out


def _pooled(model, td, task: str, dev: str) -> torch.Tensor:
    torch.manual_seed(0)  # ViLT's patch order: the same for every precision
    return model.pooled(td.batch(torch.arange(len(td)), dev), task)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "paper"), default="tiny")
    ap.add_argument("--samples", type=int, default=32, help="training samples per task")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, fp32 among them")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    precisions = tuple(a.precisions.split(","))
    res = measure(a.model, a.samples, a.repeat, a.device, precisions)
    for p in precisions:
        r = res[p]
        print(
            f"{p}: epoch {r['epoch_s'] * 1e3:.0f} ms (median of {a.repeat}), {r['ratio_to_fp32']:.2f} of fp32, "
            f"feature error {r['feature_error']:.4f}, loss {r['loss']:.4f}"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
