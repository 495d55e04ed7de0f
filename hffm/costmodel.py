"""Wireless latency and energy of what the services really send (docs/cost-model.md).

Rate of a wireless link: r = B * log2(1 + P*|h|^2*g(d) / (N0*B)), with
g(d) = beta0*(d/d0)^-alpha (the paper's) or 10^(-(128.1 + 37.6*log10(d/km))/10) (3GPP UMa), N0 in
dBm/Hz converted to W/Hz, Rayleigh fading |h|^2 with E|h|^2 = 1 drawn once per link (seeded).
Backhaul (edge<->cloud): fixed delay + bytes/rate. A transfer's energy is the sender's transmit power
times its transmit time; local training costs T = c*D/f and E = kappa*c*D*f^2.

Two profiles:
- ``corrected`` (default): the formulas above; a round's latency is its critical path over the
  plan actually executed (parallel branches: max; hops and phases: sum), its energy the sum of every
  hop's and every device's training energy; charged with the real serialized byte counts.
- ``paper``: the seed code's model, quirks included — noise computed with bandwidth in kHz (30 dB
  too low), E|h|^2 = 2, rate and energy powers that differ, a fixed 6 MB per upload, no downlink and
  no compute, and its round formulas with the cloud's cost amortised over e_agg.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hffm.config import BackhaulConfig, ComputeConfig, CostConfig, HFFMConfig, LinkConfig
from hffm.geometry import Geometry, choose_head, d2d_graph, draw_geometry, path, path_latency, point_in_disc
from hffm.methods import D2D, DEVICE_CLOUD, DEVICE_EDGE, EDGE_CLOUD, Collect, RoundContext, RoundPlan, Send, Train
from hffm.topology import CLOUD, Topology, final

PAPER_MODULE_BYTES = 6 * 8000 * 1000 // 8  # the seed code's "6 MB" = 48,000 kbit


def effective_cost(cost: CostConfig) -> CostConfig:
    """The parameters in force: the config as given (corrected), or the seed code's (paper)."""
    if cost.profile == "corrected":
        return cost
    return cost.model_copy(
        update={
            "noise_dbm_per_hz": -174.0,
            "pathloss": "paper",
            "beta0_db": -30.0,
            "d0_m": 1.0,
            "pathloss_exponent": 3.0,
            "uplink": LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6, energy_power_w=0.6),
            "downlink": LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6, energy_power_w=0.6),
            "d2d": LinkConfig(tx_power_w=0.2, bandwidth_hz=8e6, energy_power_w=0.6),
            "backhaul": BackhaulConfig(delay_s=0.1, rate_bps=4e6, tx_power_w=0.8),
            "compute": ComputeConfig(cycles_per_sample=0.0, cpu_hz=1e9, kappa=0.0),
            "module_bytes_override": cost.module_bytes_override or PAPER_MODULE_BYTES,
        }
    )


# ---- the physics ---------------------------------------------------------------------------------
def noise_w(cost: CostConfig, bandwidth_hz: float) -> float:
    """Noise power in W over the band. The paper profile keeps the seed code's error: N0 (dBm/Hz)
    times the bandwidth in kHz, read as mW -> 30 dB too low."""
    n0_mw_per_hz = 10 ** (cost.noise_dbm_per_hz / 10)
    if cost.profile == "paper":
        return n0_mw_per_hz * (bandwidth_hz / 1e3) / 1e3
    return n0_mw_per_hz * bandwidth_hz / 1e3


def channel_gain(cost: CostConfig, distance_m: float) -> float:
    """Large-scale power gain g(d) (linear)."""
    d = max(distance_m, 1e-3)
    if cost.pathloss == "uma":
        return 10 ** (-(128.1 + 37.6 * math.log10(d / 1000.0)) / 10)
    return 10 ** (cost.beta0_db / 10) * (d / cost.d0_m) ** (-cost.pathloss_exponent)


def rate_bps(cost: CostConfig, link: LinkConfig, distance_m: float, fading_h2: float) -> float:
    snr = link.tx_power_w * fading_h2 * channel_gain(cost, distance_m) / noise_w(cost, link.bandwidth_hz)
    return link.bandwidth_hz * math.log2(1 + snr)


def _h2(rng: np.random.Generator, profile: str) -> float:
    """Rayleigh |h|^2 from two N(0,1) draws: E = 1 (corrected) or the seed code's E = 2 (paper)."""
    a, b = rng.standard_normal((1, 2))[0]
    return float(a * a + b * b) / (2.0 if profile == "corrected" else 1.0)


@dataclass
class LinkBudget:
    uplink_bps: dict[str, float]  # device -> its edge
    downlink_bps: dict[str, float]  # edge -> device
    d2d_bps: dict[tuple[str, str], float]  # ordered device pairs of a cluster


def draw_budget(cost: CostConfig, topo: Topology, geo: Geometry) -> LinkBudget:
    """Every link's rate, drawn once in the seed code's order (one default_rng(fading_seed)):
    uplinks cluster by cluster; then per cluster one draw per unordered pair (the seed code's unused
    1 MHz D2D rates); then per cluster every ordered pair (the D2D links); then downlinks."""
    rng = np.random.default_rng(cost.fading_seed)
    up = {}
    for e in topo.edges:
        for d in topo.cluster(e):
            up[d.id] = rate_bps(cost, cost.uplink, geo.distance(d.id, e), _h2(rng, cost.profile))
    for e in topo.edges:
        members = topo.cluster(e)
        for i in range(len(members)):
            for _ in members[i + 1 :]:
                _h2(rng, cost.profile)
    d2d = {}
    for e in topo.edges:
        ids = [d.id for d in topo.cluster(e)]
        for u in ids:
            for v in ids:
                if u != v:
                    d2d[(u, v)] = rate_bps(cost, cost.d2d, geo.distance(u, v), _h2(rng, cost.profile))
    down = {}
    for e in topo.edges:
        for d in topo.cluster(e):
            down[d.id] = rate_bps(cost, cost.downlink, geo.distance(d.id, e), _h2(rng, cost.profile))
    return LinkBudget(up, down, d2d)


_SIZES: dict[str, dict[str, int]] = {}  # the config parts sizes depend on -> sizes (a paper-size set takes seconds)


def module_sizes(cfg: HFFMConfig) -> dict[str, int]:
    """Serialized size (wire dtype) of each of the federation's modules: what the services send. Built
    once per model, tasks, data and wire settings in a process."""
    from hffm.data import task_labels
    from hffm.model import backbone_dims, initial_modules
    from hffm.modules import encode_module

    key = cfg.model_dump_json(include={"model", "tasks", "data", "wire", "topology", "circulation"})
    if key not in _SIZES:
        topo = final(Topology.from_config(cfg, backbone_dims(cfg)[1]), cfg)
        mods = initial_modules(cfg, topo.modules_for(CLOUD), task_labels(cfg))
        _SIZES[key] = {n: encode_module(m, cfg.wire.dtype).size_bytes for n, m in mods.items()}
    return dict(_SIZES[key])


# ---- charging transfers --------------------------------------------------------------------------
@dataclass(order=True)
class Hop:
    """One module over one hop. ``origin``/``destination`` name the push (they differ from
    sender/receiver on relayed D2D hops)."""

    sender: str
    receiver: str
    link: str
    module: str
    bytes: int
    tag: str = ""
    origin: str = ""
    destination: str = ""

    def push(self) -> tuple[str, str, str]:
        return (self.origin or self.sender, self.destination or self.receiver, self.tag)


@dataclass
class RoundCost:
    latency_s: float
    energy_j: float
    compute_energy_j: float = 0.0
    by_link: dict[str, dict[str, float]] = field(default_factory=dict)  # link -> latency_s (sum), energy_j, bytes
    by_module: dict[str, float] = field(default_factory=dict)  # module -> energy_j
    by_node: dict[str, float] = field(default_factory=dict)  # node -> energy_j (transmit + compute)
    hop_costs: list[tuple[Hop, float, float]] = field(default_factory=list)  # (hop, latency_s, energy_j)
    compute: dict[str, tuple[float, float]] = field(default_factory=dict)  # device -> (seconds, joules)

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "energy_j": self.energy_j,
            "compute_energy_j": self.compute_energy_j,
            "by_link": self.by_link,
            "by_module": dict(sorted(self.by_module.items())),
            "by_node": dict(sorted(self.by_node.items())),
        }


class CostModel:
    def __init__(self, cfg: HFFMConfig, topo: Topology, geo: Geometry | None = None) -> None:
        self.cfg = cfg
        self.topo = topo
        self.cost = effective_cost(cfg.cost)
        self.geo = geo or draw_geometry(cfg.geometry, topo)
        self.budget = draw_budget(self.cost, topo, self.geo)
        self._graphs: dict[tuple[str, frozenset[str]], Any] = {}

    # -- single hops ---------------------------------------------------------------------------
    def _energy_power(self, link: LinkConfig) -> float:
        return link.energy_power_w or link.tx_power_w

    def _backhaul(self, nbytes: float) -> tuple[float, float]:
        bh = self.cost.backhaul
        tx = nbytes * 8 / bh.rate_bps
        # the seed code charges energy over the whole latency (delay included); corrected: transmit time
        energy = bh.tx_power_w * ((bh.delay_s + tx) if self.cost.profile == "paper" else tx)
        return bh.delay_s + tx, energy

    def hop_cost(self, link: str, sender: str, receiver: str, nbytes: float) -> tuple[float, float]:
        """(latency_s, energy_j) of sending ``nbytes`` over one hop."""
        role_s, role_r = self.topo.role(sender), self.topo.role(receiver)
        if link == D2D:
            r = self.budget.d2d_bps[(sender, receiver)]
            t = nbytes * 8 / r
            return t, self._energy_power(self.cost.d2d) * t
        if link == DEVICE_EDGE:
            if role_s == "device":
                t = nbytes * 8 / self.budget.uplink_bps[sender]
                return t, self._energy_power(self.cost.uplink) * t
            t = nbytes * 8 / self.budget.downlink_bps[receiver]
            return t, self._energy_power(self.cost.downlink) * t
        if link == EDGE_CLOUD:
            return self._backhaul(nbytes)
        if link == DEVICE_CLOUD:
            if self.cost.profile == "paper":  # the seed code: straight to the cloud over the backhaul
                return self._backhaul(nbytes)
            dev = sender if role_s == "device" else receiver
            if role_s == "device":  # wireless to its base station, then the backhaul
                tw = nbytes * 8 / self.budget.uplink_bps[dev]
                ew = self._energy_power(self.cost.uplink) * tw
            else:
                tw = nbytes * 8 / self.budget.downlink_bps[dev]
                ew = self._energy_power(self.cost.downlink) * tw
            tb, eb = self._backhaul(nbytes)
            return tw + tb, ew + eb
        raise ValueError(f"unknown link kind {link!r} ({role_s} -> {role_r})")

    def compute_cost(self, samples: int) -> tuple[float, float]:
        c = self.cost.compute
        cycles = c.cycles_per_sample * samples
        return cycles / c.cpu_hz, c.kappa * cycles * c.cpu_hz**2

    def _charged_bytes(self, hops: list[Hop]) -> list[float]:
        """Real bytes, or the override spread over each push's modules (a whole push = override)."""
        override = self.cost.module_bytes_override
        if not override:
            return [float(h.bytes) for h in hops]
        totals: dict[tuple, int] = defaultdict(int)
        for h in hops:
            totals[(*h.push(), h.sender)] += h.bytes
        return [override * h.bytes / max(totals[(*h.push(), h.sender)], 1) for h in hops]

    # -- devices that joined -------------------------------------------------------------------
    def locate(self, point: tuple[float, float]) -> str:
        """The edge a device standing at ``point`` (m) joins: the nearest edge server by geometry.
        ``ValueError`` when the point is not a finite point of the area."""
        x, y = point
        area = self.cfg.geometry.area_m
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= area and 0 <= y <= area):
            raise ValueError(f"position ({x}, {y}) m is outside the area [0, {area}] m x [0, {area}] m")
        return self.geo.nearest_edge((float(x), float(y)))

    def admit(self, topo: Topology, positions: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
        """Give the devices of ``topo`` this model does not know (joiners) a position and link rates,
        each drawn from generators seeded by the device's id, so nobody else's draw changes: the position
        the device gave (``positions``), else a point in its cluster's disc; its uplink and downlink, and
        D2D rates both ways with every member of its cluster. Returns the devices added."""
        new = [d for d in topo.devices if d.id not in self.geo.devices]
        for d in new:
            salt = zlib.crc32(d.id.encode())
            rng = np.random.default_rng([self.cfg.geometry.seed, salt])
            g = self.cfg.geometry
            given = (positions or {}).get(d.id)
            self.geo.devices[d.id] = (
                (float(given[0]), float(given[1]))
                if given is not None
                else point_in_disc(rng, g.area_m, g.device_radius_m, *self.geo.centres[d.edge])
            )
            fade = np.random.default_rng([self.cost.fading_seed, salt])
            c = self.cost
            self.budget.uplink_bps[d.id] = rate_bps(c, c.uplink, self.geo.distance(d.id, d.edge), _h2(fade, c.profile))
            self.budget.downlink_bps[d.id] = rate_bps(
                c, c.downlink, self.geo.distance(d.id, d.edge), _h2(fade, c.profile)
            )
            for peer in topo.cluster(d.edge):
                if peer.id != d.id and peer.id in self.geo.devices:
                    dist = self.geo.distance(d.id, peer.id)
                    self.budget.d2d_bps[(d.id, peer.id)] = rate_bps(c, c.d2d, dist, _h2(fade, c.profile))
                    self.budget.d2d_bps[(peer.id, d.id)] = rate_bps(c, c.d2d, dist, _h2(fade, c.profile))
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != d.edge}
        if new:
            self.topo = topo
        return [d.id for d in new]

    # -- D2D graph -------------------------------------------------------------------------------
    def d2d_graph(self, edge: str, exclude: frozenset[str] = frozenset(), nbytes: float | None = None):
        """The cluster's D2D graph (weights: latency of a whole module set) without ``exclude``."""
        key = (edge, exclude)
        if key not in self._graphs:
            size = nbytes or self.cost.module_bytes_override or float(sum(module_sizes(self.cfg).values()))
            members = [d.id for d in self.topo.cluster(edge) if d.id not in exclude]
            self._graphs[key] = d2d_graph(
                members,
                self.geo,
                self.cfg.geometry.d2d_range_m,
                lambda u, v: size * 8 / self.budget.d2d_bps[(u, v)],
            )
        return self._graphs[key]

    def d2d_context(self, topo: Topology, round_: int, down: set[str] | frozenset[str] = frozenset()) -> RoundContext:
        """Cluster heads (``d2d.head_policy``) and latency-weighted shortest paths for ``round_`` over
        ``topo``; devices in ``down`` (unreachable), and those this model knows that ``topo`` lacks (they
        left), are left out of every cluster's D2D graph: nobody relays through them."""
        ctx = RoundContext()
        for edge in topo.edges:
            members = [d.id for d in topo.cluster(edge)]
            if not members:
                continue
            known = {d.id for d in self.topo.cluster(edge)}
            g = self.d2d_graph(edge, exclude=frozenset((set(down) | (known - set(members))) & known))
            head = choose_head(self.cfg.d2d.head_policy, members, g, self.cfg.seed, round_, edge)
            ctx.heads[edge] = head
            for m in members:
                ctx.up_paths[m] = path(g, m, head)
                ctx.down_paths[m] = path(g, head, m)
        return ctx

    # -- a round -----------------------------------------------------------------------------------
    def round_cost(self, plan: RoundPlan, hops: list[Hop], samples: dict[str, int]) -> RoundCost:
        """Charge a round: every hop with its bytes; latency = critical path through the plan."""
        charged = self._charged_bytes(hops)
        by_link: dict[str, dict[str, float]] = defaultdict(lambda: {"latency_s": 0.0, "energy_j": 0.0, "bytes": 0.0})
        by_module: dict[str, float] = defaultdict(float)
        by_node: dict[str, float] = defaultdict(float)
        push_latency: dict[tuple[str, str, str], float] = defaultdict(float)
        energy = 0.0
        hop_costs = []
        for h, nbytes in zip(hops, charged, strict=True):
            t, e = self.hop_cost(h.link, h.sender, h.receiver, nbytes)
            hop_costs.append((h, t, e))
            by_link[h.link]["latency_s"] += t
            by_link[h.link]["energy_j"] += e
            by_link[h.link]["bytes"] += nbytes
            by_module[h.module] += e
            by_node[h.sender] += e
            energy += e
            # store-and-forward: a push's latency is the sum over its hops and modules
            push_latency[h.push()] += t
        compute_j = 0.0
        compute_s: dict[str, float] = {}
        compute: dict[str, tuple[float, float]] = {}
        for dev, n in samples.items():
            t, e = self.compute_cost(n)
            compute_s[dev] = t
            compute[dev] = (t, e)
            compute_j += e
            by_node[dev] += e
        latency = self._critical_path(plan, push_latency, compute_s)
        return RoundCost(
            latency, energy + compute_j, compute_j, dict(by_link), dict(by_module), dict(by_node), hop_costs, compute
        )

    @staticmethod
    def _critical_path(plan: RoundPlan, push_latency: dict[tuple[str, str, str], float], compute_s) -> float:
        """Earliest finish of every node's steps (Train adds compute time, a Collect waits for its
        senders' pushes to arrive, consecutive Sends leave together); the round ends with the last."""
        t = dict.fromkeys(plan.steps, 0.0)
        pc = dict.fromkeys(plan.steps, 0)
        arrivals: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        progress = True
        while progress:
            progress = False
            for node, steps in plan.steps.items():
                while pc[node] < len(steps):
                    s = steps[pc[node]]
                    if isinstance(s, Train):
                        t[node] += compute_s.get(node, 0.0)
                    elif isinstance(s, Send):  # consecutive sends leave together
                        j, start = pc[node], t[node]
                        while j < len(steps) and isinstance(steps[j], Send):
                            sj = steps[j]
                            done = start + push_latency.get((node, sj.to, sj.tag), 0.0)
                            arrivals[(sj.to, sj.tag)][node] = done
                            t[node] = max(t[node], done)
                            j += 1
                        pc[node] = j
                        progress = True
                        continue
                    elif isinstance(s, Collect):
                        got = arrivals.get((node, s.tag), {})
                        if any(x not in got for x in s.senders):
                            break
                        t[node] = max([t[node], *(got[x] for x in s.senders)])
                    pc[node] += 1
                    progress = True
        stuck = [n for n, steps in plan.steps.items() if pc[n] < len(steps)]
        if stuck:
            raise ValueError(f"round {plan.round}: plan deadlocks at {stuck}")
        return max(t.values(), default=0.0)

    # -- the seed code's round formulas (paper profile) ------------------------------------------
    def paper_round(self, method: str, e_agg: int, heads: dict[str, str] | None = None) -> tuple[float, float]:
        """(latency_s, energy_j) per round as the seed code computes them (see design notes)."""
        s_bytes = self.cost.module_bytes_override or PAPER_MODULE_BYTES
        p_up = self._energy_power(self.cost.uplink)
        p_d2d = self._energy_power(self.cost.d2d)
        t_cloud, e_cloud = self._backhaul(s_bytes)
        t_up = {d: s_bytes * 8 / r for d, r in self.budget.uplink_bps.items()}
        devices = [d.id for d in self.topo.devices]
        if method == "star":
            return t_cloud, len(devices) * e_cloud
        edge_only = method.startswith("edge-only")
        e = 200 if edge_only else e_agg  # the seed code computes edge-only as E_agg = 200
        cloud_e = 0.0 if edge_only else e_cloud  # ... keeping the cloud term in latency only
        lat, energy = [], 0.0
        for edge in self.topo.edges:
            members = [d.id for d in self.topo.cluster(edge)]
            if method in ("hfm", "edge-only"):
                lat.append((t_cloud + e * max(t_up[m] for m in members)) / e)
                energy += (cloud_e + sum(t_up[m] for m in members) * e * p_up) / e
                continue
            g = self.d2d_graph(edge, nbytes=s_bytes)
            head = (heads or {})[edge]
            ups = {m: path_latency(g, path(g, m, head)) for m in members}
            downs = {m: path(g, head, m) for m in members}
            up_t = max(ups.values())
            down_t = max(path_latency(g, p) for p in downs.values())
            e_up = sum(p_d2d * x for x in ups.values())
            tree = {(a, b) for p in downs.values() for a, b in zip(p, p[1:], strict=False)}
            e_down = sum(p_d2d * g[a][b]["weight"] for a, b in tree)
            mean_up = float(np.mean([t_up[m] for m in members]))
            lat.append((t_cloud + (up_t + down_t) * (e - 1) + up_t + mean_up) / e)
            energy += (cloud_e + (e_up + e_down) * (e - 1) + e_up + mean_up * p_up) / e
        return max(lat), energy
