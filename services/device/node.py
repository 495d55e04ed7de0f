"""Device runtime: local training and evaluation over a backbone shared by the process's devices."""

from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import replace

import torch

from hffm.adversary import (
    COLLUDING_ATTACKS,
    DATA_ATTACKS,
    EXAMINED_HONESTLY,
    SERVING_ATTACKS,
    UPDATE_ATTACKS,
    adversaries,
    alie_z,
    claim_factor,
    collude,
    fake_served,
    flip_labels,
    lie,
    poison,
    withhold,
)
from hffm.calibration import empty_stats, feature_stats, to_module, with_stats_spec
from hffm.config import HFFMConfig, resolve_torch_device
from hffm.data import DeviceData, TaskData, build_device_data, build_global_test, load_tokenizer, task_labels
from hffm.ids import head_name, stats_name, stats_task, task_of, update_weight
from hffm.model import HFFMModel, build_model
from hffm.modules import Module, ModuleError, ModuleSet, spec_of
from hffm.topology import Topology, arrived, final, split_table
from hffm.training import evaluate, round_lr, train_local
from services.common import faults
from services.common.node import NodeRuntime, RoundState

log = logging.getLogger(__name__)


class ModelHost:
    """One frozen backbone per process; its devices take turns loading their modules into it."""

    def __init__(self, cfg: HFFMConfig) -> None:
        self.cfg = cfg
        self.device = resolve_torch_device(cfg.runtime.device, cfg.runtime.precision)
        torch.set_num_threads(cfg.runtime.torch_threads)
        self.tokenizer = load_tokenizer(cfg)
        self.model: HFFMModel = build_model(cfg, len(self.tokenizer), task_labels(cfg)).to(self.device)
        self.lock = threading.Lock()
        self._global_test: dict[str, TaskData] = {}

    def global_test(self, task: str) -> TaskData:
        with self.lock:
            if task not in self._global_test:
                self._global_test[task] = build_global_test(self.cfg, task, self.tokenizer)
            return self._global_test[task]

    def load(self, modules: ModuleSet) -> None:
        for name, m in modules.items():
            if stats_task(name) is None:  # feature statistics (calibration) are held beside the model's modules
                self.model.load_module_state(name, {k: v.to(self.device) for k, v in m.tensors.items()})


class DeviceNode(NodeRuntime):
    role = "device"
    relays = True

    def __init__(
        self,
        node_id: str,
        cfg: HFFMConfig,
        topo: Topology,
        host: ModelHost,
        address: str,
        metrics=None,
        channels=None,
        persistor=None,
    ) -> None:
        def initial(n: str) -> Module:
            return Module(n, {k: v.cpu().clone() for k, v in host.model.module_state(n).items()}, 0, 1.0)

        # A device trains its own tasks' modules but accepts its whole cluster's: as a D2D cluster
        # head it aggregates heads of tasks it does not train itself.
        # ... and, from the start, the modules of tasks it (or its cluster) takes up later: it holds them at
        # their initial values, trains and sends them from the round it takes the task up
        grown = final(topo, cfg)
        own = grown.modules_for(node_id)
        cluster = grown.modules_for(topo.device_map[node_id].edge)
        spec = spec_of({n: host.model.module_state(n) for n in cluster})  # shapes only: no copies
        if cfg.calibration.enabled:  # the feature statistics it sends
            spec = with_stats_spec(spec, task_labels(cfg), cfg.calibration.diagonal, cfg.calibration.pooled)
        super().__init__(
            node_id, cfg, spec, {n: initial(n) for n in own}, address, metrics, channels, persistor=persistor
        )
        self.own_modules = own
        self.topo = topo
        self.host = host
        self.info = topo.device_map[node_id]
        # the starting membership splits the data (a joiner, outside it, draws its own samples)
        start = split_table(cfg).holders_by_task()
        self.data: DeviceData = build_device_data(cfg, node_id, start, host.tokenizer, grown.device_map[node_id].tasks)
        # config adversary (tests and benchmarks): this device poisons what it sends
        attackers = adversaries(cfg.adversary, topo.device_map, cfg.seed, topo.edges, cfg.topology.joins)
        self.attacks = node_id in attackers
        self.attackers = attackers
        self.lies = node_id in cfg.adversary.liars  # lies when it validates a specialist (config adversary)
        self.stats_data: DeviceData | None = None  # whose statistics it reports, where not its training data
        self.stats_lie: str | None = None  # a label flipper's adversary.stats (None: an honest device)
        self.colluders: list[tuple[str, DeviceData]] = []  # the other attackers' benign data (alie, ipm)
        self._round_start: ModuleSet = self.modules  # what it held when it began training this round
        self.labels = task_labels(cfg)  # task -> its answer classes
        self.fake = self.attacks and cfg.adversary.behaviour in SERVING_ATTACKS
        if self.fake:
            self.sender.served = self.served  # its relays go out poisoned
        if self.attacks:
            log.warning("%s is an adversary: it sends %s updates (config adversary)", node_id, cfg.adversary.behaviour)
            adv = cfg.adversary
            if adv.behaviour == "absent":  # the yardstick: it holds no training data (what it reports agrees)
                self.data = withhold(self.data)
            elif adv.behaviour in DATA_ATTACKS:
                # what its statistics report: its true labels (honest, inflated) or what it trained on
                self.stats_data = self.data if adv.stats in ("honest", "inflated") else None
                self.stats_lie = adv.stats
                self.data = flip_labels(self.data, task_labels(cfg))
            if adv.behaviour in COLLUDING_ATTACKS:
                holders = topo.holders_by_task()
                for c in sorted((attackers - {node_id}) & set(topo.device_map)):  # joiners: not yet
                    shared = tuple(t for t in topo.device_map[c].tasks if t in self.info.tasks)
                    if shared:
                        self.colluders.append((c, build_device_data(cfg, c, holders, host.tokenizer, shared)))
                # the first aggregator's senders: every device (star) or this device's cluster
                first = list(topo.device_map) if cfg.method == "star" else [d.id for d in topo.cluster(self.info.edge)]
                self.alie_z = adv.z if adv.z is not None else alie_z(len(first), len(attackers & set(first)))

    def own_module_names(self) -> list[str]:
        """What it contributes as its own (a D2D head's include_self): its modules of the tasks it holds in
        the current round, not those of a task it takes up later (it holds them, untrained or as the
        cluster's aggregate, and counting them would count the cluster twice)."""
        tasks = self.tasks_at(self.rounds.current)
        return [n for n in self.own_modules if task_of(n) is None or task_of(n) in tasks]

    def tasks_at(self, round_: int) -> tuple[str, ...]:
        """Its tasks in ``round_``: those it started with and those it has taken up by then."""
        later = arrived(self.cfg.circulation.arrivals, round_).get(self.node_id, ())
        return tuple(t for t in self.topo.tasks if t in self.info.tasks or t in later)

    def train_samples(self) -> dict[str, int]:
        """task -> the training samples it registers (and weighs its updates with): an attacker (config
        adversary) claims ``claim_factor`` times what it has."""
        return self._claimed(self.data.train_samples())

    def _claimed(self, samples: dict[str, int]) -> dict[str, int]:
        k = claim_factor(self.cfg.adversary) if self.attacks else 1.0
        return {t: int(n * k) for t, n in samples.items()} if k != 1.0 else samples

    def label_coverage(self) -> dict[str, float]:
        """task -> the share of its answer classes this device's training data holds (evidence for
        specialists; a fake specialist claims them all)."""
        out = {}
        for t, td in self.data.train.items():
            classes = max(1, self.labels.get(t, 1))
            out[t] = 1.0 if self.fake else len({int(y) for y in td.labels.tolist() if y >= 0}) / classes
        return out

    def served(self, modules: ModuleSet) -> ModuleSet:
        return fake_served(self.cfg.adversary, modules) if self.fake else modules

    def task_modules(self, task: str) -> ModuleSet:
        """Its modules for ``task`` (head, prompt) as it serves them; FAILED_PRECONDITION when it does
        not hold the task."""
        if task not in self.tasks_at(self.rounds.current):
            raise ModuleError("FAILED_PRECONDITION", "not_held", f"{self.node_id} does not hold task {task!r}")
        held = self.modules
        mods = {n: held[n] for n in self.own_modules if task_of(n) == task and n in held}
        if self.fake and self.cfg.adversary.behaviour in EXAMINED_HONESTLY:
            return mods  # a bait and switch: the examination sees the honest modules, relays get the others
        return self.served(mods)

    def validate(self, task: str, modules: ModuleSet, provider: str = "") -> tuple[float, float, int, int]:
        """Score another node's (``provider``'s) ``modules`` for ``task`` with this device's other modules
        on its own test split, and its own modules on the same data: (accuracy, own accuracy, samples,
        classes). A liar (config adversary) reports ``lie`` instead."""
        if task not in self.tasks_at(self.rounds.current) or task not in self.data.test:
            raise ModuleError("FAILED_PRECONDITION", "not_held", f"{self.node_id} holds no test data of {task!r}")
        if not modules or any(task_of(n) != task for n in modules):
            raise ModuleError("INVALID_ARGUMENT", "bad_module", f"only modules of task {task!r}: {sorted(modules)}")
        data = {task: self.data.test[task]}
        with self.host.lock:
            self.host.load(self.modules)
            own = evaluate(self.host.model, data, self.host.device, split="local")[task]
            self.host.load(modules)
            theirs = evaluate(self.host.model, data, self.host.device, split="local")[task]
        if self.lies:
            return (*lie(provider, self.attackers), own.total, int(self.labels.get(task, 1)))
        return theirs.accuracy, own.accuracy, own.total, int(self.labels.get(task, 1))

    def train(self, state: RoundState) -> None:
        faults.hit(self.node_id, "train", state.round)
        t0 = time.perf_counter()
        tasks = self.tasks_at(state.round)
        names = [n for n in self.own_modules if task_of(n) is None or task_of(n) in tasks]
        previous, self._round_start = self._round_start, self.modules  # an attacking head poisons against it
        new, stats = self._train_on(self.node_id, self.data, names, state.round)
        if self.attacks:
            adv = self.cfg.adversary
            if adv.behaviour in COLLUDING_ATTACKS:
                benign = [new]
                for c, data in self.colluders:
                    cnames = [n for n in names if task_of(n) is None or task_of(n) in data.train]
                    benign.append(self._train_on(c, data, cnames, state.round)[0])
                new = collude(adv, self.modules, benign, self.alie_z)
            else:
                new = poison(adv, new, self.modules, self.cfg.seed, self.node_id, state.round, previous)
        self.modules = {**self.modules, **new}  # other tasks' heads held as a cluster head stay
        rep = state.report
        rep.train_loss, rep.train_samples, rep.train_s = stats.loss, stats.samples, time.perf_counter() - t0
        self.metrics.train_seconds.labels(node=self.node_id).inc(rep.train_s)
        self.metrics.train_samples.labels(node=self.node_id).inc(stats.samples)
        self.metrics.train_loss.labels(node=self.node_id).set(stats.loss)

    def poison_aggregate(self, tag: str, modules: ModuleSet, round_: int) -> ModuleSet:
        """An attacking device that is its cluster's D2D head (config adversary, an update behaviour)
        also poisons the cluster's aggregate, against what it held at the start of the round."""
        if not self.attacks or tag != "cluster" or self.cfg.adversary.behaviour not in UPDATE_ATTACKS:
            return modules
        return poison(self.cfg.adversary, modules, self._round_start, self.cfg.seed, f"{self.node_id}/head", round_)

    def _train_on(self, node: str, data: DeviceData, names: list[str], round_: int):
        """``names`` trained from this device's modules on ``data`` with ``node``'s seed for the round:
        (the trained module set, the training stats)."""
        noop = self.cfg.train.noop  # the modules come back as they went in: no copy into the model and out
        held = {task_of(n) for n in names if task_of(n) is not None}  # a task not taken up yet: no data of it
        train = {t: td for t, td in data.train.items() if t in held}
        with self.host.lock:
            if not noop:
                self.host.load(self.modules)
            stats = train_local(
                self.host.model,
                train,
                names,
                self.cfg.train,
                self.host.device,
                seed=zlib.crc32(f"{self.cfg.seed}/{node}/{round_}".encode()),
                lr=round_lr(self.cfg.train, round_, self.cfg.rounds),
            )
            if noop:
                trained = {n: dict(self.modules[n].tensors) for n in names}
            else:
                trained = {
                    n: {k: v.detach().cpu().clone() for k, v in self.host.model.module_state(n).items()} for n in names
                }
        samples = {t: n for t, n in data.train_samples().items() if t in held}
        if node == self.node_id and not self.fake:  # an attacker's own update weighs what it registered (a fake
            samples = self._claimed(samples)  # specialist's updates are honest, weights too: it lies when it serves)
        new = {n: Module(n, tensors, round_, update_weight(n, samples)) for n, tensors in trained.items()}
        return new, stats

    def feature_stats(self, state: RoundState, tasks: tuple[str, ...]) -> None:
        """Its training data's feature statistics of ``tasks`` under the modules it holds now (the global ones,
        in a calibration phase), or those its collector sent it for them (a joiner after an edge round:
        ``JOIN_REF``), held as ``stats.<task>`` for the send that follows (hffm/calibration.py)."""
        if unknown := [t for t in tasks if t not in self.tasks_at(state.round)]:
            raise ModuleError("INVALID_ARGUMENT", "bad_task", f"{self.node_id} holds no task {unknown}")
        diagonal, pooled = self.cfg.calibration.diagonal, self.cfg.calibration.pooled
        source = self.data if self.stats_data is None else self.stats_data  # a liar reports its true labels
        data = {t: source.train[t] for t in tasks if t in source.train}
        if self.stats_lie == "empty":
            data = {}  # a liar reporting no sample of any task
        under = {**self.modules, **(self.stats_under or {})}  # its collector's reference (JOIN_REF), if it sent one
        self.stats_under = None
        with self.host.lock:
            self.host.load(under)
            stats = feature_stats(self.host.model, data, self.host.device, diagonal=diagonal, pooled=pooled)
        out = {}
        for t in tasks:
            hidden = int(self.modules[head_name(t)].tensors["net.0.weight"].shape[1])
            fs = stats.get(t) or empty_stats(hidden, int(self.labels[t]), diagonal, pooled)
            out[stats_name(t)] = to_module(stats_name(t), fs, state.round)
            if self.stats_lie == "inflated":
                m = out[stats_name(t)]  # the same shares, weighing its registered claim: counts x claim
                out[stats_name(t)] = replace(m, num_samples=m.num_samples * claim_factor(self.cfg.adversary))
        self.adopt(out)

    def evaluate(self, state: RoundState) -> None:
        tasks = self.tasks_at(state.round)
        global_sets = {task: self.host.global_test(task) for task in tasks}
        local_sets = {task: td for task, td in self.data.test.items() if task in tasks}
        with self.host.lock:
            self.host.load(self.modules)
            local = evaluate(self.host.model, local_sets, self.host.device, split="local")
            glob = evaluate(self.host.model, global_sets, self.host.device, split="global")
        for split, res in (("local", local), ("global", glob)):
            for task, s in res.items():
                state.report.scores.append(s)
                self.metrics.accuracy.labels(node=self.node_id, task=task, split=split).set(s.accuracy)
