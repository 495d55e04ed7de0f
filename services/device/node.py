"""Device runtime: local training and evaluation over a backbone shared by the process's devices."""

from __future__ import annotations

import logging
import threading
import time
import zlib

import torch

from hffm.adversary import adversaries, poison
from hffm.config import HFFMConfig, resolve_torch_device
from hffm.data import DeviceData, TaskData, build_device_data, build_global_test, load_tokenizer, task_labels
from hffm.ids import task_of
from hffm.model import HFFMModel, build_model
from hffm.modules import Module, ModuleSet, spec_of
from hffm.topology import Topology
from hffm.training import evaluate, train_local
from services.common import faults
from services.common.node import NodeRuntime, RoundState

log = logging.getLogger(__name__)


class ModelHost:
    """One frozen backbone per process; its devices take turns loading their modules into it."""

    def __init__(self, cfg: HFFMConfig) -> None:
        self.cfg = cfg
        self.device = resolve_torch_device(cfg.runtime.device)
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
        own = topo.modules_for(node_id)
        cluster = topo.modules_for(topo.device_map[node_id].edge)
        spec = spec_of({n: host.model.module_state(n) for n in cluster})  # shapes only: no copies
        super().__init__(
            node_id, cfg, spec, {n: initial(n) for n in own}, address, metrics, channels, persistor=persistor
        )
        self.own_modules = own
        self.topo = topo
        self.host = host
        self.info = topo.device_map[node_id]
        self.data: DeviceData = build_device_data(cfg, node_id, topo.holders_by_task(), host.tokenizer, self.info.tasks)
        # config adversary (tests and benchmarks): this device poisons what it sends
        self.attacks = node_id in adversaries(cfg.adversary, topo.device_map, cfg.seed)
        if self.attacks:
            log.warning("%s is an adversary: it sends %s updates (config adversary)", node_id, cfg.adversary.behaviour)

    def own_module_names(self) -> list[str]:
        return self.own_modules

    def train_samples(self) -> dict[str, int]:
        return self.data.train_samples()

    def train(self, state: RoundState) -> None:
        faults.hit(self.node_id, "train", state.round)
        t0 = time.perf_counter()
        names = self.own_modules
        noop = self.cfg.train.noop  # the modules come back as they went in: no copy into the model and out
        with self.host.lock:
            if not noop:
                self.host.load(self.modules)
            stats = train_local(
                self.host.model,
                self.data.train,
                names,
                self.cfg.train,
                self.host.device,
                seed=zlib.crc32(f"{self.cfg.seed}/{self.node_id}/{state.round}".encode()),
            )
            if noop:
                trained = {n: dict(self.modules[n].tensors) for n in names}
            else:
                trained = {
                    n: {k: v.detach().cpu().clone() for k, v in self.host.model.module_state(n).items()} for n in names
                }
        samples = self.data.train_samples()
        total = sum(samples.values())
        new: ModuleSet = {}
        for n, tensors in trained.items():
            task = task_of(n)
            weight = samples.get(task, 0) if task else total
            new[n] = Module(n, tensors, state.round, float(max(weight, 1)))
        if self.attacks:
            new = poison(self.cfg.adversary, new, self.modules, self.cfg.seed, self.node_id, state.round)
        self.modules = {**self.modules, **new}  # other tasks' heads held as a cluster head stay
        rep = state.report
        rep.train_loss, rep.train_samples, rep.train_s = stats.loss, stats.samples, time.perf_counter() - t0
        self.metrics.train_seconds.labels(node=self.node_id).inc(rep.train_s)
        self.metrics.train_samples.labels(node=self.node_id).inc(stats.samples)
        self.metrics.train_loss.labels(node=self.node_id).set(stats.loss)

    def evaluate(self, state: RoundState) -> None:
        global_sets = {task: self.host.global_test(task) for task in self.info.tasks}
        with self.host.lock:
            self.host.load(self.modules)
            local = evaluate(self.host.model, self.data.test, self.host.device, split="local")
            glob = evaluate(self.host.model, global_sets, self.host.device, split="global")
        for split, res in (("local", local), ("global", glob)):
            for task, s in res.items():
                state.report.scores.append(s)
                self.metrics.accuracy.labels(node=self.node_id, task=task, split=split).set(s.accuracy)
