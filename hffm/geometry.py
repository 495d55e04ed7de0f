"""Where nodes stand, and the D2D graph of each cluster.

Positions follow the paper's experiment and the seed code's draws exactly (one
``numpy.random.default_rng(seed)``; servers uniform with a minimum separation, then per server a
cluster centre within ``cluster_center_radius_m`` and its devices within ``device_radius_m`` of the
centre, each rejected while outside the area). D2D links join devices within ``d2d_range_m``; a
cluster that is not connected gets the links of its minimum spanning tree (by link latency) added.
Paths are latency-weighted shortest paths (networkx).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import numpy as np

from hffm.config import GeometryConfig
from hffm.topology import Topology


@dataclass(frozen=True)
class Geometry:
    servers: dict[str, tuple[float, float]]  # edge id -> (x, y) m
    centres: dict[str, tuple[float, float]]
    devices: dict[str, tuple[float, float]]  # device id -> (x, y) m

    def distance(self, a: str, b: str) -> float:
        pa = self.devices.get(a) or self.servers[a]
        pb = self.devices.get(b) or self.servers[b]
        return float(np.hypot(pa[0] - pb[0], pa[1] - pb[1]))

    def nearest_edge(self, point: tuple[float, float]) -> str:
        """The edge whose server is nearest to ``point`` (ties: the first edge id in order)."""
        x, y = point
        return min(sorted(self.servers), key=lambda e: float(np.hypot(x - self.servers[e][0], y - self.servers[e][1])))


def parse_point(text: str) -> tuple[float, float]:
    """``"X,Y"`` (metres) as a point; ``ValueError`` naming the text otherwise."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected X,Y in m, got {text!r}") from None
    return x, y


def point_in_disc(rng: np.random.Generator, area: float, r_max: float, cx: float, cy: float) -> tuple[float, float]:
    """A uniform point of the disc of radius ``r_max`` around (cx, cy) that lies inside the area."""
    for _ in range(100_000):
        r = np.sqrt(rng.random()) * r_max
        th = rng.random() * 2 * np.pi
        x, y = cx + r * np.cos(th), cy + r * np.sin(th)
        if 0 <= x <= area and 0 <= y <= area:
            return float(x), float(y)
    raise ValueError("geometry: cannot place a point inside the area")


def draw_geometry(cfg: GeometryConfig, topo: Topology) -> Geometry:
    rng = np.random.default_rng(cfg.seed)
    area = cfg.area_m
    servers: list[tuple[float, float]] = []
    for _ in range(100_000):
        if len(servers) == len(topo.edges):
            break
        x, y = rng.uniform(0, area, size=2)
        if all(np.hypot(x - sx, y - sy) >= cfg.min_server_separation_m for sx, sy in servers):
            servers.append((float(x), float(y)))
    else:
        raise ValueError(
            f"geometry: cannot place {len(topo.edges)} servers {cfg.min_server_separation_m} m apart in {area} m"
        )

    centres, devices = {}, {}
    for e, (sx, sy) in zip(topo.edges, servers, strict=True):
        cx, cy = point_in_disc(rng, area, cfg.cluster_center_radius_m, sx, sy)
        centres[e] = (cx, cy)
        for d in topo.cluster(e):
            devices[d.id] = point_in_disc(rng, area, cfg.device_radius_m, cx, cy)
    return Geometry(dict(zip(topo.edges, servers, strict=True)), centres, devices)


def d2d_graph(members: list[str], geo: Geometry, range_m: float, latency: Callable[[str, str], float]) -> nx.DiGraph:
    """Directed graph of a cluster's D2D links, weighted by per-direction latency ``latency(u, v)``;
    patched with its undirected MST (by min latency of the two directions) when not strongly connected."""
    g = nx.DiGraph()
    g.add_nodes_from(members)
    for i, u in enumerate(members):
        for v in members[i + 1 :]:
            if geo.distance(u, v) <= range_m:
                g.add_edge(u, v, weight=latency(u, v))
                g.add_edge(v, u, weight=latency(v, u))
    if len(members) > 1 and not nx.is_strongly_connected(g):
        h = nx.Graph()
        h.add_nodes_from(members)
        for i, u in enumerate(members):
            for v in members[i + 1 :]:
                h.add_edge(u, v, weight=min(latency(u, v), latency(v, u)))
        for u, v in nx.minimum_spanning_tree(h, weight="weight").edges():
            if not g.has_edge(u, v):
                g.add_edge(u, v, weight=latency(u, v))
            if not g.has_edge(v, u):
                g.add_edge(v, u, weight=latency(v, u))
    return g


def path(g: nx.DiGraph, src: str, dst: str) -> list[str]:
    return [src] if src == dst else nx.shortest_path(g, src, dst, weight="weight")


def path_latency(g: nx.DiGraph, p: list[str]) -> float:
    return sum(g[a][b]["weight"] for a, b in zip(p, p[1:], strict=False))


def choose_head(
    policy: str, members: list[str], g: nx.DiGraph, seed: int, round_: int, edge: str, exclude: set[str] = frozenset()
) -> str:
    """The cluster head of ``edge`` for ``round_`` among ``members`` not in ``exclude``.

    - ``random``: a seeded draw, fixed for the run;
    - ``central``: minimum total path latency to and from every other member;
    - ``rotate``: members in turn, one per round.
    Failover: when the chosen one is excluded (unreachable), the next by the same policy is taken.
    """
    order: list[str]
    if policy == "random":
        rng = np.random.default_rng([seed, zlib.crc32(edge.encode())])
        order = [members[i] for i in rng.permutation(len(members))]
    elif policy == "central":

        def total(h: str) -> float:
            return sum(path_latency(g, path(g, m, h)) + path_latency(g, path(g, h, m)) for m in members)

        order = sorted(members, key=lambda h: (total(h), h))
    elif policy == "rotate":
        k = (round_ - 1) % len(members)
        order = members[k:] + members[:k]
    else:
        raise ValueError(f"unknown head policy {policy!r}")
    for h in order:
        if h not in exclude:
            return h
    raise ValueError(f"{edge}: no reachable device to be cluster head")
