"""Screening a training remedy in one process before it is built into the nodes (issue 15).

``python -m benchmarks.screen [--remedy plain|scaffold|fedadam|frozen_heads|virtual|moon|disco|proto]
[--server-lr η] [--tau τ] [--virtual-weight λ] [--moon-mu μ] [--moon-tau τ] [--disco-a a] [--disco-b b]
[--proto-weight λ] [--calibrate none|final|cloud] [--out FILE]
[--set KEY=VALUE ...]``; ``--plot PNG --curve LABEL=FILE ... [--central FILE]`` plots curves made before.

A remedy for the gap to centralised training (docs/results.md) costs a session to build into the devices,
edges and cloud; this runs hfm's round plan in one process on the same data, model, seeds and local loop,
so a remedy can be tried in minutes first. Every round each device loads its edge's modules, trains them
with ``train_local`` (the devices' own seed per node and round), and each edge averages its devices'
modules (heads weighted by the device's samples of the task, adapters by all its samples, as a device
weighs what it sends); every ``e_agg`` rounds (every round with ``method=star``) the same average is taken
over all devices, and the global modules are scored on the global test sets. No gRPC, no checks, no
faults: it screens, it does not replace a run (on the easy-VQA setup of docs/results.md its plain
FedAvg scores what ``hffm run``'s hfm scores).

Remedies:
- ``plain``: FedAvg.
- ``scaffold``: SCAFFOLD (Karimireddy et al. 2020). Each device keeps a control variate c_i per parameter
  (the mean of its raw minibatch gradients in its last round: option II of the paper, whatever the
  optimiser) and adds c - c_i to every gradient, where c is the control variate its aggregator sent with
  the modules, averaged as they are (its edge's in an edge round, the global one after a cloud round).
  Round 1 trains as plain does (every c is 0). It would double the bytes of every exchange.
- ``frozen_heads``: devices train the shared modules alone (FedBABU's body-only training, Oh et al. 2022);
  the heads move only where the cloud calibrates them (``--calibrate cloud``).
- ``fedadam``: FedAdam (Reddi et al. 2021) at the cloud: each cloud round the cloud takes the FedAvg's
  difference from the last global modules as a pseudo-gradient and steps with Adam on it (``--server-lr``
  η, ``--tau`` τ, β = 0.9, 0.99): global + η m / (√v + τ). Devices and edges are plain.
- ``virtual`` (with ``--calibrate cloud``): the federation's feature statistics of the last cloud round's
  calibration go down to the devices, and each local batch of a task adds ``--virtual-weight`` λ times the
  cross-entropy of the device's head on as many features drawn from them (answers in the global prior), so
  its head cannot fit the device's own prior alone (the idea of FedImpro, Tang et al. 2024, at the pooled
  features). It would send the statistics down as well as up.
- ``moon``: MOON, model-contrastive learning (Li, He & Song, CVPR 2021). Each local batch adds ``--moon-mu`` μ
  times the contrastive loss of its pooled features z: −log(e^{sim(z, z_g)/τ} / (e^{sim(z, z_g)/τ} +
  e^{sim(z, z_p)/τ})), with z_g the same batch's features under the modules the device started the round
  from (its aggregator's), z_p under the device's own modules of its last round (none in round 1: the
  start), sim the cosine and τ ``--moon-tau``: the local features are pulled towards the federation's and
  away from where the device's own skew took them. Nothing more is sent; a device keeps its last local
  modules, and each batch costs two forward passes more.
- ``disco``: FedDisco (Ye et al., ICML 2023), discrepancy-aware aggregation weights. Every average (an edge's,
  the cloud's) weighs a device by ReLU(share − a·d + b) instead of its share of the samples (``--disco-a`` a,
  ``--disco-b`` b; the paper's 0.5 and 0.1), d the L2 distance between the device's answer distribution and the
  federation's (pooled) one: a device whose data is far from the whole counts less. A head is weighed by its
  task's share and distance, the shared modules by the device's share of all samples and its distances' mean
  over its tasks (weighted by its samples of each). Only label counts would travel (what calibration's
  statistics already carry).
- ``proto`` (with ``--calibrate cloud``): the answers' mean features of the last cloud round's calibration
  statistics (what the cloud already merges; the federation's prototypes) go down to the devices, and each local
  batch of a task adds ``--proto-weight`` λ times the mean squared distance of each sample's pooled features from
  its answer's prototype (FedPAC's feature alignment, Xu et al., ICLR 2023; FedProto's regulariser, Tan et al.,
  AAAI 2022): a device that holds one or two answers cannot move the shared adapters' features of those answers
  away from where the federation puts them. An answer nobody held adds nothing; round 1, before any statistics,
  trains as plain does. It would send the means down as well as up.

``--calibrate cloud`` calibrates the heads (CCVR, ``hffm.calibration``) after every cloud round's average, as
the cloud does with ``calibration.enabled`` (the same function, its parameters from ``--set calibration.*``);
``final`` only after the last round.

``aggregation.server_lr`` is applied at every cloud round, as the cloud does (``server_step``), and every
``train.*`` option the devices read works here too (the local loop is theirs), e.g. ``--set
train.head_only_share=0.9``.

Writes the curve (round, per-task and mean global accuracy) to ``--out`` as JSON and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import zlib
from pathlib import Path

import torch

from hffm.aggregation import server_step, weighted_mean
from hffm.calibration import calibrate_heads, feature_stats, merge, virtual_features
from hffm.config import HFFMConfig, load_config, resolve_torch_device
from hffm.data import build_device_data, build_global_test, load_tokenizer, task_labels
from hffm.ids import head_name, task_of, update_weight
from hffm.model import HFFMModel, build_model
from hffm.modules import Module, ModuleSet
from hffm.topology import split_table
from hffm.training import evaluate, round_lr, train_local

REMEDIES = ("plain", "scaffold", "fedadam", "frozen_heads", "virtual", "moon", "disco", "proto")
CALIBRATE = ("none", "final", "cloud")


def screen(
    cfg: HFFMConfig,
    remedy: str = "plain",
    log=print,
    server_lr: float = 0.01,
    tau: float = 1e-3,
    calibrate: str = "none",
    virtual_weight: float = 1.0,
    moon_mu: float = 1.0,
    moon_tau: float = 0.5,
    disco: tuple[float, float] = (0.5, 0.1),
    proto_weight: float = 0.01,
) -> tuple[list[dict], ModuleSet]:
    """Run ``cfg.rounds`` rounds of ``cfg.method`` (hfm or star) with ``remedy``: (the curve, one record per
    cloud round ``{"round", "accuracy": {task: global accuracy}, "mean"}``; the last global modules)."""
    if remedy not in REMEDIES:
        raise ValueError(f"--remedy: {remedy!r} is not one of {', '.join(REMEDIES)}")
    if calibrate not in CALIBRATE:
        raise ValueError(f"--calibrate: {calibrate!r} is not one of {', '.join(CALIBRATE)}")
    if remedy in ("virtual", "proto") and calibrate != "cloud":
        raise ValueError(f"--remedy {remedy}: needs the cloud's statistics (--calibrate cloud)")
    if cfg.method not in ("hfm", "star"):
        raise ValueError(f"method: the screen runs hfm or star, not {cfg.method!r}")
    device = resolve_torch_device(cfg.runtime.device, cfg.runtime.precision)
    torch.set_num_threads(cfg.runtime.torch_threads)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok), task_labels(cfg)).to(device)
    topo = split_table(cfg)
    holders = topo.holders_by_task()
    devices = sorted(topo.device_map)
    data = {d: build_device_data(cfg, d, holders, tok, topo.device_map[d].tasks) for d in devices}
    test = {t: build_global_test(cfg, t, tok) for t in cfg.tasks}
    names = model.module_names()
    edge_of = {d: topo.device_map[d].edge if cfg.method == "hfm" else "cloud" for d in devices}
    start = _snapshot(model, names, 0, {})
    held = {e: start for e in set(edge_of.values())}  # what each aggregator last sent its devices
    zero = _zeros(start)
    own_c = {d: zero for d in devices}  # SCAFFOLD: each device's c_i
    sent_c = {e: zero for e in held}  # SCAFFOLD: the c each aggregator last sent
    every = 1 if cfg.method == "star" else cfg.e_agg
    # frozen_heads: devices train the shared modules only (FedBABU's body-only training, Oh et al. 2022); the
    # heads move only where the cloud calibrates them (--calibrate)
    trained = [n for n in names if task_of(n) is None] if remedy == "frozen_heads" else names
    curve: list[dict] = []
    glob = start
    moments: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # FedAdam's m and v
    gstats: dict = {}  # virtual: the last cloud round's merged feature statistics
    last: dict[str, ModuleSet] = {}  # moon: each device's modules of its last round
    anchor = copy.deepcopy(model).eval() if remedy == "moon" else None  # moon: the start's and last round's features
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        new: dict[str, ModuleSet] = {}
        for d in devices:
            for n in names:
                model.load_module_state(n, held[edge_of[d]][n].tensors)
            weights = data[d].train_samples()
            hook, grads = (None, None)
            if remedy == "scaffold":
                hook, grads = _scaffold_hook(model, names, sent_c[edge_of[d]], own_c[d])
            extra = None
            if remedy == "virtual" and gstats:
                extra = _virtual_loss(
                    model, gstats, virtual_weight, zlib.crc32(f"{cfg.seed}/v/{d}/{r}".encode()), device
                )
            if remedy == "proto" and gstats:
                extra = _proto_loss(gstats, proto_weight)
            if remedy == "moon":
                extra = _moon_loss(anchor, names, held[edge_of[d]], last.get(d, held[edge_of[d]]), moon_mu, moon_tau)
            train_local(
                model,
                data[d].train,
                trained,
                cfg.train,
                device,
                seed=zlib.crc32(f"{cfg.seed}/{d}/{r}".encode()),
                lr=round_lr(cfg.train, r, cfg.rounds),
                on_grad=hook,
                extra_loss=extra,
            )
            new[d] = _snapshot(model, names, r, weights)
            last[d] = new[d]
            if grads is not None:
                own_c[d] = grads(weights)
        cloud = r % every == 0
        groups = {e: tuple(devices) if cloud else tuple(d for d in devices if edge_of[d] == e) for e in held}
        if remedy == "disco":
            avg = {g: weighted_mean(_disco_weighted(new, g, data, *disco)) for g in set(groups.values())}
        else:
            avg = {g: weighted_mean([new[d] for d in g]) for g in set(groups.values())}
        if cloud:
            (g,) = avg
            avg[g] = server_step(glob, avg[g], cfg.aggregation.server_lr)
            if remedy == "fedadam":
                avg[g] = _adam_step(glob, avg[g], moments, server_lr, tau)
            glob = avg[g]
        before = None
        if cloud and (calibrate == "cloud" or (calibrate == "final" and r == cfg.rounds)):
            before = _accuracy(model, names, glob, test, device)
            glob, gstats = _calibrated(cfg, model, names, glob, data, devices, r, device)
            avg[g] = glob
        held = {e: avg[g] for e, g in groups.items()}
        if remedy == "scaffold":
            c_avg = {g: weighted_mean([own_c[d] for d in g]) for g in set(groups.values())}
            sent_c = {e: c_avg[g] for e, g in groups.items()}
        if cloud:
            acc = _accuracy(model, names, glob, test, device)
            rec = {"round": r, "accuracy": acc, "mean": sum(acc.values()) / len(acc)}
            if before is not None:
                rec["before_calibration"] = {"accuracy": before, "mean": sum(before.values()) / len(before)}
            curve.append(rec)
            log(
                f"{remedy} round {r:3d}  "
                + " ".join(f"{t}={a:.3f}" for t, a in acc.items())
                + f"  mean {rec['mean']:.3f}"
                + (f" (before calibration {rec['before_calibration']['mean']:.3f})" if before is not None else "")
                + f"  ({time.perf_counter() - t0:.1f} s)"
            )
    return curve, glob


def _accuracy(model: HFFMModel, names: list[str], mods: ModuleSet, test: dict, device: str) -> dict[str, float]:
    for n in names:
        model.load_module_state(n, mods[n].tensors)
    return {t: s.accuracy for t, s in sorted(evaluate(model, test, device).items())}


def _calibrated(
    cfg: HFFMConfig,
    model: HFFMModel,
    names: list[str],
    glob: ModuleSet,
    data: dict,
    devices: list[str],
    r: int,
    device: str,
) -> tuple[ModuleSet, dict]:
    """(``glob`` with every head calibrated as the cloud does (``hffm.calibration.calibrate_heads``, by
    ``calibration.*``) on the devices' feature statistics under ``glob``'s modules; those statistics)."""
    for n in names:
        model.load_module_state(n, glob[n].tensors)
    diagonal, pooled = cfg.calibration.diagonal, cfg.calibration.pooled
    stats = merge([feature_stats(model, data[d].train, device, diagonal=diagonal, pooled=pooled) for d in devices])
    return {**glob, **calibrate_heads(glob, stats, cfg, r)[0]}, stats


def _virtual_loss(model: HFFMModel, stats: dict, weight: float, seed: int, device: str):
    """extra_loss for train_local: each batch of a task adds ``weight`` x the mean cross-entropy of the
    device's head on as many virtual features, drawn from the global statistics' Gaussians (answers in
    the global prior), so the head cannot fit the device's own prior alone."""
    pools = {t: virtual_features(fs, 1.0, seed) for t, fs in stats.items()}
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()

    def extra(task: str, batch: dict, _feats: torch.Tensor) -> torch.Tensor:
        feats, labels = pools[task]
        idx = torch.randint(len(labels), (len(batch["labels"]),), generator=gen)
        return weight * loss_fn(model.module(head_name(task))(feats[idx].to(device)), labels[idx].to(device))

    return extra


def _proto_loss(stats: dict, weight: float):
    """extra_loss for train_local: ``weight`` x the batch's mean squared distance of each sample's pooled features
    from its answer's mean feature in ``stats`` (the federation's prototypes); answers nobody held add nothing."""
    means = {t: (fs.total / fs.count.clamp_min(1).unsqueeze(1)).float() for t, fs in stats.items()}
    held = {t: fs.count.round() >= 1 for t, fs in stats.items()}

    def extra(task: str, batch: dict, feats: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"].cpu()
        ok = held[task][labels] if task in held else torch.zeros_like(labels, dtype=torch.bool)
        if not bool(ok.any()):
            return feats.sum() * 0.0
        mu = means[task][labels[ok]].to(feats.device)
        return weight * (feats[ok.to(feats.device)].float() - mu).pow(2).sum(-1).mean()

    return extra


def _moon_loss(anchor: HFFMModel, names: list[str], start: ModuleSet, prev: ModuleSet, mu: float, tau: float):
    """extra_loss for train_local: MOON's model-contrastive loss of a batch's features (the module docstring),
    ``anchor`` a second model whose modules are switched between ``start`` and ``prev`` for each batch."""
    cos = torch.nn.CosineSimilarity(dim=-1)

    def features(mods: ModuleSet, batch: dict, task: str) -> torch.Tensor:
        for n in names:
            anchor.load_module_state(n, mods[n].tensors)
        dev = batch["pixel_values"].device
        # ViLT draws its patch order from torch's RNG on every forward: these draws are forked off, so the
        # local forwards see the draws plain training sees (with mu = 0 the same result, bit for bit)
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            return anchor.pooled(batch, task)

    def extra(task: str, batch: dict, feats: torch.Tensor) -> torch.Tensor:
        pos = cos(feats, features(start, batch, task)) / tau
        neg = cos(feats, features(prev, batch, task)) / tau
        logits = torch.stack([pos, neg], dim=1)
        return mu * torch.nn.functional.cross_entropy(
            logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device)
        )

    return extra


def _disco_weighted(
    new: dict[str, ModuleSet], group: tuple[str, ...], data: dict, a: float, b: float
) -> list[ModuleSet]:
    """FedDisco: ``group``'s module sets with each module's weight ReLU(share − a·d + b) (the module
    docstring), the shares among ``group``, d from the devices' answer counts against the federation's."""
    counts = {
        d: {t: torch.tensor(td.label_counts(), dtype=torch.float64) for t, td in data[d].train.items()} for d in data
    }
    pooled: dict[str, torch.Tensor] = {}
    for c in counts.values():
        for t, v in c.items():
            pooled[t] = pooled.get(t, torch.zeros_like(v)) + v
    target = {t: v / v.sum() for t, v in pooled.items()}
    dist = {
        d: {t: float((v / v.sum() - target[t]).norm()) for t, v in c.items() if v.sum() > 0} for d, c in counts.items()
    }
    out = []
    for d in group:
        mods = {}
        for n, m in new[d].items():
            t = task_of(n)
            parts = [x for x in group if (t is None or t in dist[x])]
            size = {
                x: float(sum(counts[x][u].sum() for u in dist[x])) if t is None else float(counts[x][t].sum())
                for x in parts
            }
            if t is None:
                disc = sum(dist[d][u] * float(counts[d][u].sum()) for u in dist[d]) / max(size[d], 1.0)
            elif t in dist[d]:
                disc = dist[d][t]
            else:  # no samples of the task: its head as received, at (next to) no weight
                mods[n] = Module(n, m.tensors, m.version, 1e-12)
                continue
            w = max(size[d] / sum(size.values()) - a * disc + b, 0.0)
            mods[n] = Module(n, m.tensors, m.version, max(w, 1e-12))
        out.append(mods)
    return out


def _snapshot(model: HFFMModel, names: list[str], version: int, samples: dict[str, int]) -> ModuleSet:
    """The model's modules as a device sends them: heads weighted by the task's samples, adapters by all."""
    out: ModuleSet = {}
    for n in names:
        state = {k: v.detach().cpu().clone() for k, v in model.module_state(n).items()}
        out[n] = Module(n, state, version, update_weight(n, samples))
    return out


def _adam_step(start: ModuleSet, aggregate: ModuleSet, moments: dict, lr: float, tau: float) -> ModuleSet:
    """FedAdam's cloud step: Adam (β 0.9, 0.99, no bias correction, as in the paper) on Δ = aggregate − start,
    ``moments`` holding each tensor's m and v between cloud rounds."""
    out: ModuleSet = {}
    for n, m in aggregate.items():
        tensors = {}
        for k, t in m.tensors.items():
            delta = t - start[n].tensors[k]
            mom, var = moments.get((n, k), (torch.zeros_like(delta), torch.zeros_like(delta)))
            mom = 0.9 * mom + 0.1 * delta
            var = 0.99 * var + 0.01 * delta * delta
            moments[n, k] = (mom, var)
            tensors[k] = start[n].tensors[k] + lr * mom / (var.sqrt() + tau)
        out[n] = Module(n, tensors, m.version, m.num_samples)
    return out


def _zeros(mods: ModuleSet) -> ModuleSet:
    return {n: Module(n, {k: torch.zeros_like(v) for k, v in m.tensors.items()}, 0, 1.0) for n, m in mods.items()}


def _scaffold_hook(model: HFFMModel, names: list[str], c: ModuleSet, c_i: ModuleSet):
    """(on_grad, grads): ``on_grad`` sums each parameter's raw gradient, then adds c - c_i to it;
    ``grads(samples)`` is the device's new c_i, the mean raw gradient of each parameter over the batches
    that reached it (a parameter no batch reached keeps its old c_i), weighted as the device's modules."""
    params = [(n, k, p) for n in names for k, p in model.module(n).named_parameters()]
    dev = params[0][2].device if params else "cpu"
    shift = {(n, k): (c[n].tensors[k] - c_i[n].tensors[k]).to(dev) for n, k, _ in params}
    sums = {(n, k): torch.zeros_like(p) for n, k, p in params}
    counts = dict.fromkeys(sums, 0)

    def on_grad(task: str) -> None:
        for n, k, p in params:
            if p.grad is not None:
                sums[n, k] += p.grad
                counts[n, k] += 1
                p.grad += shift[n, k]

    def grads(samples: dict[str, int]) -> ModuleSet:
        out: ModuleSet = {}
        for n in names:
            tensors = dict(c_i[n].tensors)
            for k in model.module(n).state_dict():
                if counts.get((n, k)):
                    tensors[k] = (sums[n, k] / counts[n, k]).cpu()
            out[n] = Module(n, tensors, 0, update_weight(n, samples))
        return out

    return on_grad, grads


def plot(curves: dict[str, Path], out: Path, central: Path | None = None) -> None:
    """Mean global accuracy per cloud round of screened curves (``label -> --out JSON``), beside a centralised
    run's per pass (``benchmarks.realdata``'s kept ``centralised.json`` or ``hffm centralised``'s results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if central is not None:
        res = json.loads(central.read_text())
        rounds = res.get("results", res)["rounds"]
        mean = [sum(a["global"] for a in r["accuracy"].values()) / len(r["accuracy"]) for r in rounds]
        ax.plot([r["round"] for r in rounds], mean, ls="--", marker="o", ms=3, label="centralised")
    for label, path in curves.items():
        curve = json.loads(path.read_text())["curve"]
        ax.plot([c["round"] for c in curve], [c["mean"] for c in curve], marker="o", ms=3, label=label)
    ax.set_xlabel("round (centralised: pass over the pool)")
    ax.set_ylabel("mean global accuracy (easy-VQA tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def remedy_options(p: argparse.ArgumentParser) -> None:
    """The options that choose a remedy and its parameters (``screen``'s keywords: ``remedy_kwargs``)."""
    p.add_argument("--remedy", choices=REMEDIES, default="plain")
    p.add_argument("--config", type=Path, default=None, help="a config file (default: the built-in one)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server step size η")
    p.add_argument("--tau", type=float, default=1e-3, help="FedAdam's τ (adaptivity)")
    p.add_argument("--virtual-weight", type=float, default=1.0, help="virtual: the virtual features' loss weight")
    p.add_argument("--moon-mu", type=float, default=1.0, help="moon: the contrastive loss's weight μ")
    p.add_argument("--moon-tau", type=float, default=0.5, help="moon: the contrastive loss's temperature τ")
    p.add_argument("--disco-a", type=float, default=0.5, help="disco: the discrepancy's coefficient a")
    p.add_argument("--disco-b", type=float, default=0.1, help="disco: the offset b")
    p.add_argument("--proto-weight", type=float, default=0.01, help="proto: the prototype loss's weight λ")
    p.add_argument("--calibrate", choices=CALIBRATE, default="none", help="CCVR head calibration at the cloud")


def remedy_kwargs(a: argparse.Namespace) -> dict:
    """``screen``'s keywords from ``remedy_options``' values."""
    return {
        "server_lr": a.server_lr,
        "tau": a.tau,
        "calibrate": a.calibrate,
        "virtual_weight": a.virtual_weight,
        "moon_mu": a.moon_mu,
        "moon_tau": a.moon_tau,
        "disco": (a.disco_a, a.disco_b),
        "proto_weight": a.proto_weight,
    }


def remedy_info(a: argparse.Namespace) -> dict:
    """What a kept result records of the remedy: its name, the calibration and the parameters it reads."""
    info = {"remedy": a.remedy, "calibrate": a.calibrate}
    if a.remedy == "virtual":
        info |= {"virtual_weight": a.virtual_weight}
    if a.remedy == "moon":
        info |= {"moon_mu": a.moon_mu, "moon_tau": a.moon_tau}
    if a.remedy == "disco":
        info |= {"disco_a": a.disco_a, "disco_b": a.disco_b}
    if a.remedy == "proto":
        info |= {"proto_weight": a.proto_weight}
    if a.remedy == "fedadam":
        info |= {"server_lr": a.server_lr, "tau": a.tau}
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.screen", description=__doc__.split("\n\n")[0])
    remedy_options(p)
    p.add_argument("--out", type=Path, default=None, help="write the curve here as JSON")
    p.add_argument("--plot", type=Path, default=None, help="only plot: the curves of --curve LABEL=JSON to this PNG")
    p.add_argument("--curve", action="append", default=[], metavar="LABEL=JSON", help="with --plot")
    p.add_argument("--central", type=Path, default=None, help="with --plot: a centralised run's results")
    a = p.parse_args(argv)
    if a.plot:
        plot({k: Path(v) for k, v in (c.split("=", 1) for c in a.curve)}, a.plot, a.central)
        return
    cfg = load_config(a.config, a.sets)
    curve, _ = screen(cfg, a.remedy, **remedy_kwargs(a))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        info = {**remedy_info(a), "sets": a.sets, "curve": curve}
        a.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
