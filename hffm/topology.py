"""Who is in the federation: node ids, tiers, clusters and the modules each node handles.

Pure and deterministic from the config, so every process (launcher, cloud, edge, device) derives
the same view. Ids: ``cloud``, ``edge-<e>``, ``device-<e>-<i>`` (edge e, index i in its cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hffm.config import HFFMConfig
from hffm.data import device_tasks
from hffm.model import adapter_name, head_name

CLOUD = "cloud"


def edge_id(e: int) -> str:
    return f"edge-{e}"


def device_id(e: int, i: int) -> str:
    return f"device-{e}-{i}"


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    edge: str
    index: int  # global index over all devices
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    edges: tuple[str, ...]
    devices: tuple[DeviceInfo, ...]
    tasks: tuple[str, ...]
    num_layers: int

    @classmethod
    def from_config(cls, cfg: HFFMConfig, num_layers: int) -> Topology:
        edges = tuple(edge_id(e) for e in range(cfg.topology.edges))
        devices = []
        g = 0
        for e in range(cfg.topology.edges):
            for i in range(cfg.topology.devices_per_edge):
                tasks = device_tasks(g, list(cfg.tasks), cfg.topology.tasks_per_device)
                devices.append(DeviceInfo(device_id(e, i), edge_id(e), g, tuple(tasks)))
                g += 1
        return cls(edges, tuple(devices), tuple(cfg.tasks), num_layers)

    def without(self, devices: set[str]) -> Topology:
        """The same federation minus ``devices`` (unreachable this round)."""
        if not devices:
            return self
        return Topology(self.edges, tuple(d for d in self.devices if d.id not in devices), self.tasks, self.num_layers)

    @cached_property
    def device_map(self) -> dict[str, DeviceInfo]:
        return {d.id: d for d in self.devices}

    def cluster(self, edge: str) -> list[DeviceInfo]:
        return [d for d in self.devices if d.edge == edge]

    def node_ids(self) -> list[str]:
        return [CLOUD, *self.edges, *(d.id for d in self.devices)]

    def role(self, node: str) -> str:
        if node == CLOUD:
            return "cloud"
        if node in self.edges:
            return "edge"
        if node in self.device_map:
            return "device"
        raise KeyError(f"unknown node {node!r}")

    def holders(self, task: str) -> list[str]:
        """Devices holding ``task``, in global order (the order the data split uses)."""
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
        """Modules a node holds: every adapter, and the heads of the tasks it (or its subtree) has."""
        return self.adapters() + [head_name(t) for t in self.node_tasks(node)]
