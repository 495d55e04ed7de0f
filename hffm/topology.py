"""Membership: who is in the federation right now, as data.

A ``Topology`` is a membership table at one moment: the edges, the devices (each with its edge and
its tasks) and the modules each node handles. It is a value: ``with_device``, ``without`` and
``rehome`` return the table after a node joined, left or moved to another edge, so membership can
change between rounds while every round's plan is made from one consistent table.
``Topology.from_config`` is the federation the config starts with; every process derives the same.

Pure: no torch, no gRPC (tested), so planning is fast and testable without the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property

from hffm.config import HFFMConfig
from hffm.ids import CLOUD, MODALITY_ADAPTERS, adapter_name, device_id, edge_id, head_name, parse_node_id, prompt_name

__all__ = ["CLOUD", "DeviceInfo", "Registration", "Topology", "device_tasks"]


def device_tasks(device_index: int, tasks: list[str], tasks_per_device: int | str) -> list[str]:
    """Tasks of the device with global index ``device_index`` (round-robin when not 'all')."""
    if tasks_per_device == "all" or int(tasks_per_device) >= len(tasks):
        return list(tasks)
    k = int(tasks_per_device)
    return [tasks[(device_index + j) % len(tasks)] for j in range(k)]


def arrived(arrivals, round_: int | None = None) -> dict[str, tuple[str, ...]]:
    """device -> the tasks it has taken up by ``round_`` (None: by the end of the run), from the config's
    ``circulation.arrivals`` (items with ``task``, ``round``, ``devices``)."""
    out: dict[str, list[str]] = {}
    for a in arrivals:
        if round_ is None or a.round <= round_:
            for d in a.devices:
                out.setdefault(d, []).append(a.task)
    return {d: tuple(ts) for d, ts in out.items()}


def final(topo: Topology, cfg: HFFMConfig) -> Topology:
    """``topo`` with every task arrival of the run applied: the modules each node will ever hold."""
    return topo.with_tasks(arrived(cfg.circulation.arrivals))


def split_table(cfg: HFFMConfig) -> Topology:
    """The table each task's training pool is split over: the config's starting devices, with every task
    arrival applied (a task that arrives mid-run is split over the devices that will take it up). Every
    device process, ``hffm partition`` and the benchmarks split the data over it; a joiner, outside it,
    draws its own samples. (Its adapter count is 0: the split does not depend on it.)"""
    return final(Topology.from_config(cfg, 0), cfg)


@dataclass(frozen=True)
class Registration:
    """What a node says about itself when it registers (the ``NodeInfo`` message, converted)."""

    id: str
    role: str
    address: str
    edge: str = ""
    train_samples: tuple[tuple[str, int], ...] = ()  # devices: (task, training samples), sorted
    states: tuple[tuple[int, int], ...] = ()  # (round, attempt) ends it holds checkpoints of, sorted
    position: tuple[float, float] | None = None  # a joiner's (x, y) m, when it says where it is
    label_coverage: tuple[tuple[str, float], ...] = ()  # devices: (task, share of its classes held), sorted


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    edge: str
    index: int  # order of creation over all devices (the config's devices first)
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    edges: tuple[str, ...]
    devices: tuple[DeviceInfo, ...]
    tasks: tuple[str, ...]
    num_layers: int
    prompts: bool = False  # model.prompt_tokens > 0: a prompt.<task> module per task
    modality: bool = False  # model.modality_adapters: modality.image and modality.text

    @classmethod
    def from_config(cls, cfg: HFFMConfig, num_layers: int) -> Topology:
        """The starting table: tasks that arrive mid-run (circulation.arrivals) are nobody's yet."""
        edges = tuple(edge_id(e) for e in range(cfg.topology.edges))
        arriving = {a.task for a in cfg.circulation.arrivals}
        held = [t for t in cfg.tasks if t not in arriving]
        devices = []
        g = 0
        for e in range(cfg.topology.edges):
            for i in range(cfg.topology.devices_per_edge):
                tasks = device_tasks(g, held, cfg.topology.tasks_per_device)
                devices.append(DeviceInfo(device_id(e, i), edge_id(e), g, tuple(tasks)))
                g += 1
        m = cfg.model
        return cls(edges, tuple(devices), tuple(cfg.tasks), num_layers, m.prompt_tokens > 0, m.modality_adapters)

    def joiner(self, device: str, tasks_per_device: int | str) -> Topology:
        """The table after ``device`` (an id outside it, ``device-<e>-<i>``) joined edge ``e``: its tasks
        are those the config's round-robin gives index ``e * devices_per_edge + i`` restricted to the tasks
        its edge's cluster already holds (its edge aggregates only those heads), or the cluster's first
        ones when none is left. ``ValueError`` names what is wrong."""
        nid = parse_node_id(device)
        if nid.role != "device":
            raise ValueError(f"{device!r} is not a device id")
        edge = edge_id(nid.edge or 0)
        if edge not in self.edges:
            raise ValueError(f"{device}: no edge {edge!r} in this federation")
        held = self.node_tasks(edge) if self.cluster(edge) else list(self.tasks)
        k = len(held) if tasks_per_device == "all" else min(int(tasks_per_device), len(held))
        per_edge = max(1, len(self.cluster(edge)))
        wanted = device_tasks((nid.edge or 0) * per_edge + (nid.index or 0), list(self.tasks), tasks_per_device)
        tasks = [t for t in wanted if t in held][:k] or held[:k]
        return self.with_device(device, edge, tuple(tasks))

    # ---- membership changes (each returns a new table) -----------------------------------------
    def with_device(self, device: str, edge: str, tasks: tuple[str, ...]) -> Topology:
        """The table after ``device`` joined ``edge`` holding ``tasks``."""
        if parse_node_id(device).role != "device":
            raise ValueError(f"{device!r} is not a device id")
        if device in self.device_map:
            raise ValueError(f"{device} is already a member")
        if edge not in self.edges:
            raise ValueError(f"{device}: no edge {edge!r}")
        unknown = [t for t in tasks if t not in self.tasks]
        if not tasks or unknown:
            raise ValueError(f"{device}: tasks {list(tasks)} (federation's: {list(self.tasks)})")
        index = 1 + max((d.index for d in self.devices), default=-1)
        return replace(self, devices=(*self.devices, DeviceInfo(device, edge, index, tuple(tasks))))

    def without(self, nodes: set[str]) -> Topology:
        """The same federation minus ``nodes`` (left, or unreachable this round): devices, and edges
        together with their whole cluster (a cluster sits out with its edge)."""
        if not nodes:
            return self
        edges = tuple(e for e in self.edges if e not in nodes)
        return replace(
            self,
            edges=edges,
            devices=tuple(d for d in self.devices if d.id not in nodes and d.edge in edges),
        )

    def with_tasks(self, extra: Mapping[str, Iterable[str]]) -> Topology:
        """The table with ``extra`` (device -> tasks) taken up by those devices (tasks in the federation's
        order; a device not in the table, one that left, is skipped)."""
        if not extra:
            return self

        def grown(d: DeviceInfo) -> DeviceInfo:
            more = set(extra.get(d.id, ())) - set(d.tasks)
            return replace(d, tasks=tuple(t for t in self.tasks if t in d.tasks or t in more)) if more else d

        return replace(self, devices=tuple(grown(d) for d in self.devices))

    def rehome(self, device: str, edge: str) -> Topology:
        """The table after ``device`` moved to ``edge`` (its id, tasks and data stay)."""
        if device not in self.device_map:
            raise ValueError(f"{device} is not a member")
        if edge not in self.edges:
            raise ValueError(f"{device}: no edge {edge!r}")
        return replace(self, devices=tuple(replace(d, edge=edge) if d.id == device else d for d in self.devices))

    # ---- queries ---------------------------------------------------------------------------------
    @cached_property
    def device_map(self) -> dict[str, DeviceInfo]:
        return {d.id: d for d in self.devices}

    def cluster(self, edge: str) -> list[DeviceInfo]:
        return [d for d in self.devices if d.edge == edge]

    def node_ids(self) -> list[str]:
        return [CLOUD, *self.edges, *(d.id for d in self.devices)]

    def role(self, node: str) -> str:
        """The role of a member (``KeyError`` for a node that is not one)."""
        if node == CLOUD or node in self.edges or node in self.device_map:
            return parse_node_id(node).role
        raise KeyError(f"unknown node {node!r}")

    def holders(self, task: str) -> list[str]:
        """Devices holding ``task``, in creation order (the order the data split uses)."""
        return [d.id for d in self.devices if task in d.tasks]

    def holders_by_task(self) -> dict[str, list[str]]:
        return {t: self.holders(t) for t in self.tasks}

    def adapters(self) -> list[str]:
        return [adapter_name(i) for i in range(self.num_layers)]

    def node_tasks(self, node: str) -> list[str]:
        role = self.role(node)
        if role == "device":
            return list(self.device_map[node].tasks)
        members = self.devices if role == "cloud" else self.cluster(node)
        return [t for t in self.tasks if any(t in d.tasks for d in members)]

    def modules_for(self, node: str) -> list[str]:
        """Modules a node holds: every adapter (and the modality adapters), and the heads (and prompts) of
        the tasks it (or its subtree) has."""
        tasks = self.node_tasks(node)
        shared = self.adapters() + (list(MODALITY_ADAPTERS) if self.modality else [])
        return shared + [head_name(t) for t in tasks] + ([prompt_name(t) for t in tasks] if self.prompts else [])
