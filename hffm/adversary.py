"""Adversarial devices for tests and benchmarks (config ``adversary``): which devices attack, and what
an attacking device sends instead of its honest update. Pure functions; a device applies ``poison`` to
its trained modules only when it is in ``adversaries`` (an honest device is never touched).

Behaviours, with ``start`` the module the device began the round with and ``update`` = trained − start:
``sign_flip`` sends start − scale × update (gradient ascent), ``scale`` start + scale × update (a
boosted update), ``noise`` start + N(0, sigma²) per value (a Gaussian attacker), ``free_ride`` start
itself (returns what it received, trains nothing)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable

import torch

from hffm.config import AdversaryConfig
from hffm.modules import Module, ModuleSet


def adversaries(cfg: AdversaryConfig, devices: Iterable[str], seed: int) -> frozenset[str]:
    """The attacking devices: ``cfg.nodes`` and round(fraction × n) more drawn from the rest by ``seed``.
    ValueError naming ``adversary.nodes`` for an id that is not a device."""
    devs = sorted(devices)
    unknown = sorted(set(cfg.nodes) - set(devs))
    if unknown:
        raise ValueError(f"adversary.nodes: {unknown} are not devices of this topology")
    chosen = set(cfg.nodes)
    k = round(cfg.fraction * len(devs)) - len(chosen)
    rest = [d for d in devs if d not in chosen]
    if k > 0:
        chosen.update(random.Random(f"adversary/{seed}").sample(rest, min(k, len(rest))))
    return frozenset(chosen)


def poison(cfg: AdversaryConfig, trained: ModuleSet, start: ModuleSet, seed: int, node: str, round_: int) -> ModuleSet:
    """What an attacking device sends in place of ``trained`` (same names, versions and weights)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{node}/{round_}/adversary".encode()))
    out: ModuleSet = {}
    for name, m in trained.items():
        s = start.get(name)
        tensors = {}
        for k, t in m.tensors.items():
            base = s.tensors[k].to(t.dtype) if s is not None else torch.zeros_like(t)
            if cfg.behaviour == "sign_flip":
                v = base - cfg.scale * (t - base)
            elif cfg.behaviour == "scale":
                v = base + cfg.scale * (t - base)
            elif cfg.behaviour == "noise":
                v = base + cfg.sigma * torch.randn(t.shape, generator=g, dtype=t.dtype)
            else:  # free_ride
                v = base.clone()
            tensors[k] = v
        out[name] = Module(name, tensors, m.version, m.num_samples)
    return out
