"""Adversarial nodes for tests and benchmarks (config ``adversary``): which devices and edges attack,
and what an attacking node sends instead of its honest update. Pure functions; a device applies
``poison`` to its trained modules, an edge to the aggregate of its devices (before it forwards it to
the cloud and back to them), only when it is in ``adversaries`` (an honest node is never touched).

Behaviours, with ``start`` the module the device began the round with and ``update`` = trained − start:
``sign_flip`` sends start − scale × update (gradient ascent), ``scale`` start + scale × update (a
boosted update), ``noise`` start + N(0, sigma²) per value (a Gaussian attacker; with ``noise_rank`` k
each matrix's noise is instead a random rank-k matrix of the same expected size, sigma² per value on
average: a free rider hiding from the structure check), ``free_ride`` start itself (returns what it
received, trains nothing), ``echo`` start + scale × (start − ``previous``, the start of its previous round:
the last step the federation took, as it saw it; trains nothing: a free rider disguised as a plausible update,
pointing where honest training went last; in its first round start itself), with ``jitter`` > 0 plus independent
Gaussian noise of that fraction of each tensor's step norm (so that two echoers are not twins).

``label_flip`` poisons data, not the update: the device trains honestly on its local training set with
every label y of a task with C answers replaced by C − 1 − y (``flip_labels``), and sends that.

``absent`` is no attack but the yardstick a defence is judged against: the attackers' training data taken
away (``withhold``), so that they take part holding nothing (no training, statistics of no sample, updates
of weight 1 against the federation's thousands). A defence that found every attacker and left its data out
from the first round could reach this run's accuracy and no more: what only the attackers hold leaves with
them (docs/robustness.md).

``alie`` and ``ipm`` are colluding attacks that need the benign updates of the attackers (``collude``):
every attacker also trains, from its own start, on each other attacker's partition (the colluders
pool their data), and all of them send one vector built from the per-coordinate mean μ and standard
deviation σ of those benign updates: ALIE ("a little is enough", Baruch et al. 2019) start + μ − z σ
with z from the number of senders n and attackers f at the first aggregator (``alie_z``) unless
``adversary.z`` is set; IPM (inner-product manipulation, Xie et al. 2019) start − ε μ."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from statistics import NormalDist

import torch

from hffm.config import AdversaryConfig
from hffm.data import DeviceData
from hffm.ids import HEAD_PREFIX, joining_edge
from hffm.modules import Module, ModuleSet

UPDATE_ATTACKS = ("sign_flip", "scale", "noise", "free_ride", "echo")  # poison the trained update alone
DATA_ATTACKS = ("label_flip", "absent")  # change the training data; the update is sent as trained
COLLUDING_ATTACKS = ("alie", "ipm")  # need the attackers' benign updates (``collude``)
SERVING_ATTACKS = ("fake_specialist", "bait_switch")  # honest in training and aggregation; poison what they serve
EXAMINED_HONESTLY = ("bait_switch",)  # ... but show the cloud's examination the honest modules


def fake_served(cfg: AdversaryConfig, modules: ModuleSet) -> ModuleSet:
    """What a fake specialist serves of ``modules``: every task head negated and scaled by ``cfg.scale``
    (confidently wrong: the answers it ranked first it now ranks last); other modules as they are."""
    return {
        n: Module(n, {k: -cfg.scale * t for k, t in m.tensors.items()}, m.version, m.num_samples)
        if n.startswith(HEAD_PREFIX)
        else m
        for n, m in modules.items()
    }


def claim_factor(cfg: AdversaryConfig) -> float:
    """How many times its real training samples an attacker registers and pushes as its weight."""
    if cfg.claim is not None:
        return cfg.claim
    return 4.0 if cfg.behaviour in SERVING_ATTACKS else 1.0


def lie(candidate: str, attackers: Iterable[str]) -> tuple[float, float]:
    """What a lying validator reports for ``candidate`` (config ``adversary.liars``): (its accuracy, the
    liar's own): an attacker's modules perfect and its own useless (vouching), anyone else's useless and
    its own perfect (framing). Both within [0, 1]: a plausible score, which only other validators contradict."""
    return (1.0, 0.0) if candidate in set(attackers) else (0.0, 1.0)


def adversaries(
    cfg: AdversaryConfig, devices: Iterable[str], seed: int, edges: Iterable[str] = (), joins: bool = False
) -> frozenset[str]:
    """The attacking nodes: ``cfg.nodes`` (devices or edges; with ``joins``, topology.joins, also devices that
    may join one of ``edges`` later, ``device-<e>-<i>``) and round(fraction × devices) more devices drawn from
    the rest by ``seed``. ValueError naming the field for an id that is none of those, or for an edge given a
    behaviour that needs training data (an edge only aggregates: it can poison what it forwards with an
    ``UPDATE_ATTACKS`` behaviour)."""
    devs = sorted(devices)
    aggregators = set(edges)
    joiners = {n for n in cfg.nodes if joins and joining_edge(n) in aggregators}
    unknown = sorted(set(cfg.nodes) - set(devs) - aggregators - joiners)
    if unknown:
        raise ValueError(
            f"adversary.nodes: {unknown} are not devices or edges of this topology"
            + (" (nor devices that may join one of its edges)" if joins else "")
        )
    if bad := sorted(set(cfg.liars) - set(devs)):
        raise ValueError(f"adversary.liars: {bad} are not devices of this topology (only devices validate)")
    if (bad := sorted(set(cfg.nodes) & aggregators)) and cfg.behaviour not in UPDATE_ATTACKS:
        raise ValueError(
            f"adversary.behaviour: {cfg.behaviour} needs training data, and {bad} only aggregate "
            f"(an edge attacks with one of {list(UPDATE_ATTACKS)})"
        )
    chosen = set(cfg.nodes)
    k = round(cfg.fraction * len(devs)) - len(chosen & set(devs))
    rest = [d for d in devs if d not in chosen]
    if k > 0:
        chosen.update(random.Random(f"adversary/{seed}").sample(rest, min(k, len(rest))))
    return frozenset(chosen)


def flip_labels(data: DeviceData, answers: dict[str, int]) -> DeviceData:
    """``data`` with every training label y of a task with C answers replaced by C − 1 − y (labels −1,
    outside the vocabulary, stay); the local test split is left as it is (it measures the attacker)."""
    train = {}
    for task, td in data.train.items():
        c = answers[task]
        labels = torch.where(td.labels >= 0, c - 1 - td.labels, td.labels)
        train[task] = replace(td, labels=labels)
    return replace(data, train=train)


def withhold(data: DeviceData) -> DeviceData:
    """``data`` with no training sample left (``absent``: the yardstick of a perfect defence); the local test
    split is left as it is."""
    train = {}
    for task, td in data.train.items():
        none = torch.zeros(0, dtype=torch.long)
        train[task] = replace(
            td,
            input_ids=td.input_ids[none],
            attention_mask=td.attention_mask[none],
            labels=td.labels[none],
            scores=[] if td.scores is not None else None,
        )
    return replace(data, train=train)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z for n senders of which f attack: s = ⌊n/2 + 1⌋ − f honest senders must be
    'behind' the attackers; z = Φ⁻¹((n − s) / n), and 0 when (n − s) / n ≤ 1/2."""
    if n < 1 or f < 1:
        raise ValueError(f"alie_z needs n >= 1 senders and f >= 1 attackers, got n={n} f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(p, 1 - 1e-6))


def collude(cfg: AdversaryConfig, start: ModuleSet, benign: Sequence[ModuleSet], z: float) -> ModuleSet:
    """The colluders' common vector (``alie`` or ``ipm``) from their benign trained module sets, each
    module from the sets that hold it (μ and σ per coordinate, σ with no correction: one colluder
    holding a module gives σ = 0). Versions and weights are the first holder's."""
    out: ModuleSet = {}
    for name in sorted({n for b in benign for n in b}):
        held = [b[name] for b in benign if name in b]
        s = start.get(name)
        tensors = {}
        for k, t in held[0].tensors.items():
            base = s.tensors[k].to(torch.float64) if s is not None else torch.zeros(t.shape, dtype=torch.float64)
            ups = torch.stack([h.tensors[k].to(torch.float64) - base for h in held])
            mu = ups.mean(0)
            if cfg.behaviour == "alie":
                v = base + mu - z * ups.std(0, correction=0)
            elif cfg.behaviour == "ipm":
                v = base - cfg.epsilon * mu
            else:
                raise ValueError(f"collude: adversary.behaviour {cfg.behaviour!r} is not a colluding attack")
            tensors[k] = v.to(t.dtype)
        out[name] = Module(name, tensors, held[0].version, held[0].num_samples)
    return out


def _noise(t: torch.Tensor, rank: int | None, g: torch.Generator) -> torch.Tensor:
    """Unit-variance noise shaped like ``t``: independent per value, or for a matrix with ``rank`` (less than
    its smaller side) the product of two Gaussian factors with that many columns, scaled so that each value's
    variance is 1 on average (its expected squared norm is that of independent noise)."""
    if rank is None or t.dim() != 2 or rank >= min(t.shape):
        return torch.randn(t.shape, generator=g, dtype=t.dtype)
    a = torch.randn(t.shape[0], rank, generator=g, dtype=t.dtype)
    b = torch.randn(rank, t.shape[1], generator=g, dtype=t.dtype)
    return a @ b / math.sqrt(rank)


def poison(
    cfg: AdversaryConfig,
    trained: ModuleSet,
    start: ModuleSet,
    seed: int,
    node: str,
    round_: int,
    previous: ModuleSet | None = None,
) -> ModuleSet:
    """What an attacking node sends in place of ``trained`` (same names, versions and weights), for the
    behaviours that poison the update alone (``UPDATE_ATTACKS``); others send ``trained``. A device's
    ``trained`` is its locally trained modules; an edge's is the aggregate of its devices, ``start``
    what it held before (its update is the aggregate's step); ``previous`` what it started its previous
    round from (``echo``; None: none yet)."""
    if cfg.behaviour not in UPDATE_ATTACKS:
        return trained
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
                v = base + cfg.sigma * _noise(t, cfg.noise_rank, g)
            elif cfg.behaviour == "echo" and previous is not None and name in previous and s is not None:
                step = base - previous[name].tensors[k].to(t.dtype)
                v = base + cfg.scale * step
                if cfg.jitter > 0:
                    v = v + _noise(t, None, g) * (cfg.jitter * cfg.scale * float(step.norm()) / math.sqrt(t.numel()))
            else:  # free_ride (echo with no step seen yet)
                v = base.clone()
            tensors[k] = v
        out[name] = Module(name, tensors, m.version, m.num_samples)
    return out
