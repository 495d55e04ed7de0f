"""Recovery planning, apart from any network: which state every node starts a round from, which nodes
first adopt their tier's current modules (a *sync*), and which nodes a round cannot lose.

Every node's state is named by the round end it holds: ``(round, attempt)`` of the last round it
completed (``(0, 0)``: its initial modules). The coordinator keeps that table (``held``), updates it
from every completed round and from what a restarted node says it still has on disk, and plans from
it:

- a node whose state is its tier's current one starts from it (``base``: it reloads that round end
  from its checkpoints if it restarted, or restores it if an aborted attempt left it half-changed);
- a node that missed rounds (it sat out, was lost, or restarted without its state) starts with a
  ``Collect(SYNC)`` from a node that holds the current state, which pushes it first thing in the round
  (``Send(SYNC)``), so it never trains on, or contributes, stale modules.

Whose state is current, per method:

- star: the cloud's, for every device;
- hfm / edge-only: a device's edge's (the edge broadcast it); an edge's own, unless a cloud
  aggregation completed since it last took part (then the cloud's global modules: a cluster that
  sat out a cloud round starts over from the federation's modules);
- hfm-d2d / edge-only-d2d: the newest round end any member of the cluster holds (heads broadcast
  it over D2D); the source is a member holding it whose tasks cover the stale device's (the
  round's head first), along the shortest D2D path; with no such member, the edge (its modules of
  the last cloud round). An edge's state is never read in these methods (its collects replace it).

``critical(plan)``: the nodes whose loss in the middle of a round the round cannot absorb (anything
another node's step waits on alone: an edge, the cloud, a D2D cluster head, a relay, a sync source).
Losing any other node (a device whose update is one of several) leaves it out of that aggregate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from hffm.ids import CLOUD, D2D, DEVICE_CLOUD, DEVICE_EDGE, EDGE_CLOUD
from hffm.methods import JOIN_STATS, SYNC, Collect, Method, RoundContext, RoundPlan, Send, Step
from hffm.topology import Topology

StateKey = tuple[int, int]  # (round, attempt) of a round end; (0, 0): the initial modules
INITIAL: StateKey = (0, 0)


@dataclass(frozen=True)
class SyncSource:
    source: str
    link: str
    route: tuple[str, ...] = ()  # D2D relays between the source and the node
    modules: tuple[str, ...] = ()  # only these (a task taken up: its modules); empty: all that circulate


@dataclass(frozen=True)
class StartPlan:
    """Where each node taking part starts: ``base`` (a round end it holds) or ``sync`` (a source)."""

    base: dict[str, StateKey]
    sync: dict[str, SyncSource]


def plan_starts(
    method: Method,
    topo: Topology,
    held: Mapping[str, StateKey],
    cloud_rounds_done: list[int],
    ctx: RoundContext,
    route: Callable[[str, str, str], list[str]] | None = None,
    cost: Callable[[str, list[str]], float] | None = None,
    relay: str = "cheapest",
    accuracy: Callable[[str, tuple[str, ...]], float | None] | None = None,
    tolerance: float = 0.05,
    may_serve: Callable[[str, tuple[str, ...]], bool] | None = None,
) -> StartPlan:
    """The start of every node of ``topo`` (the members taking part this round). ``held``: the round
    end each node holds (missing: none it can use); ``cloud_rounds_done``: completed rounds in which the
    cloud aggregated; ``route(edge, src, dst)``: a D2D path, both ends included; ``cost(edge, path)``:
    its modeled latency. ``relay`` (config circulation.relay) decides who serves a sync — a device that
    lost its state, missed rounds, or a newcomer being onboarded: ``cheapest`` the holder of the current
    state with the least ``cost``, among those whose ``accuracy(node, tasks)`` (its latest, on those
    tasks; None: unknown, kept) is within ``tolerance`` of the best; ``head`` the round's head first;
    ``none``: a device holding no round end starts from its initial modules, unsynced. A device that
    ``may_serve(node, tasks)`` refuses (a flagged specialist) never serves a sync."""
    base: dict[str, StateKey] = {}
    sync: dict[str, SyncSource] = {}

    def keep(n: str) -> None:
        base[n] = held.get(n, INITIAL)

    keep(CLOUD)
    star = method.name == "star"
    d2d = method.uses_d2d
    has_cloud = any(method.cloud_round(r) for r in range(1, 1 + method.e_agg))
    for edge in topo.edges:
        mine = held.get(edge)
        missed_cloud = mine is None or any(r > mine[0] for r in cloud_rounds_done)
        if not star and not d2d and has_cloud and missed_cloud:
            sync[edge] = SyncSource(CLOUD, EDGE_CLOUD)
        else:
            keep(edge)
    for dev in topo.devices:
        n = dev.id
        mine = held.get(n)
        if relay == "none" and mine is None:
            keep(n)
            continue
        if star:
            if mine is None or mine != held.get(CLOUD, INITIAL):
                sync[n] = SyncSource(CLOUD, DEVICE_CLOUD)
            else:
                keep(n)
        elif not d2d:
            if mine is None or edge_state(dev.edge, held, sync) != mine:
                sync[n] = SyncSource(dev.edge, DEVICE_EDGE)
            else:
                keep(n)
        else:
            members = [d for d in topo.cluster(dev.edge)]
            newest = max((held[d.id] for d in members if d.id in held), default=None)
            if mine is not None and mine == newest:
                keep(n)
                continue
            holders = [d for d in members if d.id != n and held.get(d.id) == newest and set(dev.tasks) <= set(d.tasks)]
            holders = [d for d in holders if may_serve is None or may_serve(d.id, dev.tasks)]
            head = ctx.heads.get(dev.edge)
            holders.sort(key=lambda d: (d.id != head, d.id))
            if newest is not None and holders and route is not None:
                if relay == "cheapest" and accuracy is not None:
                    scored = {d.id: accuracy(d.id, dev.tasks) for d in holders}
                    best = max((a for a in scored.values() if a is not None), default=None)
                    if best is not None:  # a holder scoring far below the best does not serve
                        holders = [d for d in holders if scored[d.id] is None or scored[d.id] >= best - tolerance]
                paths = {d.id: route(dev.edge, d.id, n) for d in holders}
                if relay == "cheapest" and cost is not None:  # by the cost model (ties: the head, then id)
                    src = min(holders, key=lambda d: cost(dev.edge, paths[d.id]))
                else:
                    src = holders[0]
                sync[n] = SyncSource(src.id, D2D, tuple(paths[src.id][1:-1]))
            else:
                sync[n] = SyncSource(dev.edge, DEVICE_EDGE)
                keep(dev.edge)
    return StartPlan(base, sync)


def plan_takers(
    method: Method,
    topo: Topology,
    before: Topology,
    takers: Mapping[str, tuple[str, ...]],
    starts: StartPlan,
    route: Callable[[str, str, str], list[str]],
    cost: Callable[[str, list[str]], float] | None,
    modules_of: Callable[[str], list[str]],
    may_serve: Callable[[str, tuple[str, ...]], bool] | None = None,
) -> StartPlan:
    """``starts`` with a sync for each device in ``takers`` (device -> tasks it takes up this round, held
    by somebody before) not synced already: the tasks' modules (``modules_of(task)``) from the cheapest
    holder in its cluster in ``before`` (the table of the round before) over D2D in D2D methods, its edge
    when its cluster held them (hfm, edge-only), else the cloud (its copy as of its last aggregation).
    Only holders that ``may_serve(node, tasks)`` (specialists, when they are on) relay over D2D; without
    one, the edge serves its aggregate where the cluster held the tasks."""
    sync = dict(starts.sync)
    for n, tasks in sorted(takers.items()):
        if n in sync or n not in topo.device_map:  # a full sync carries them already
            continue
        edge = topo.device_map[n].edge
        mods = tuple(m for t in tasks for m in modules_of(t))
        holders = [
            d for d in before.cluster(edge) if d.id != n and set(tasks) <= set(d.tasks) and d.id in topo.device_map
        ]
        servers = [d for d in holders if may_serve is None or may_serve(d.id, tasks)]
        if method.uses_d2d and servers:
            paths = {d.id: route(edge, d.id, n) for d in servers}
            src = min(servers, key=lambda d: (cost(edge, paths[d.id]) if cost else 0.0, d.id))
            sync[n] = SyncSource(src.id, D2D, tuple(paths[src.id][1:-1]), mods)
        elif method.name != "star" and holders:
            sync[n] = SyncSource(edge, DEVICE_EDGE, (), mods)
        else:
            sync[n] = SyncSource(CLOUD, DEVICE_CLOUD, (), mods)
    return StartPlan(starts.base, sync)


def edge_state(edge: str, held: Mapping[str, StateKey], sync: Mapping[str, SyncSource]) -> StateKey | None:
    """The round end an edge's devices must hold to be current: the edge's own; None when the edge is
    synced from the cloud this round (its devices are synced after it)."""
    if edge in sync:
        return None
    return held.get(edge, INITIAL)


def with_syncs(
    plan: RoundPlan,
    starts: StartPlan,
    topo: Topology,
    collect: Callable[..., Collect],
    modules: Callable[[Topology, str], tuple[str, ...]] | None = None,
) -> RoundPlan:
    """``plan`` with every synced node's ``Collect(SYNC)`` first, and each source's ``Send(SYNC)`` right
    after its own sync (if any) and before everything else it does. ``collect(tag, senders, link)`` makes
    the method's collect step (its rule; a sync has one sender); ``modules(topo, node)``: what a sync
    carries (default: all of the node's modules; a circulation policy's personal modules stay put)."""
    if not starts.sync:
        return plan
    steps: dict[str, list[Step]] = {n: list(ss) for n, ss in plan.steps.items()}
    first: dict[str, list[Step]] = {}
    for n, src in sorted(starts.sync.items()):
        # a sync adopts its one source's state as it is: plain FedAvg of one (no robust rule, no clipping)
        sync = replace(collect(SYNC, (src.source,), src.link), rule="fedavg", params=())
        first.setdefault(n, []).insert(0, sync)
    for n, src in sorted(starts.sync.items()):
        carried = modules(topo, n) if modules is not None else tuple(topo.modules_for(n))
        if src.modules:  # a task taken up: its modules alone (those that circulate)
            carried = tuple(m for m in src.modules if m in carried)
        if carried:
            first.setdefault(src.source, []).append(Send(n, src.link, SYNC, carried, src.route))
        else:  # nothing of it circulates: there is nothing to catch up on
            first[n].remove(next(s for s in first[n] if isinstance(s, Collect) and s.tag == SYNC))
    for n, pre in first.items():
        steps[n] = [*pre, *steps.get(n, [])]
    return RoundPlan(plan.round, steps)


def pin_syncs(plan: RoundPlan, starts: StartPlan, pins: Mapping[tuple[str, str], bytes]) -> RoundPlan:
    """``plan`` with each sync of a task's modules whose source's examined digests are in ``pins``
    ((source, module) -> digest; specialists.enabled) accepting those versions alone: the taker refuses
    anything else its source pushes (FAILED_PRECONDITION), so what a specialist relays is what the cloud
    had validated."""
    steps = {n: list(ss) for n, ss in plan.steps.items()}
    for n, src in starts.sync.items():
        pinned = tuple(sorted((m, pins[(src.source, m)]) for m in src.modules if (src.source, m) in pins))
        if not pinned:
            continue
        steps[n] = [
            replace(s, pinned=pinned) if isinstance(s, Collect) and s.tag == SYNC else s for s in steps.get(n, [])
        ]
    return RoundPlan(plan.round, steps)


def critical(plan: RoundPlan) -> set[str]:
    """Nodes whose loss mid-round the round cannot absorb: every relay of a route and every node that
    is the only sender of another node's collect (an edge or the cloud to its broadcast, a cluster
    head, a sync source, the one device of a cluster)."""
    out: set[str] = set()
    for _n, s in plan.transfers():
        out.update(s.route)
    for _n, c in plan.collects():
        if len(c.senders) == 1 and c.tag != JOIN_STATS:  # a synced device's statistics: the collect may end empty
            out.add(c.senders[0])
    return out
