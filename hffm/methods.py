"""Methods: who sends which modules to whom in a round.

A ``Method`` turns (round, topology) into a ``RoundPlan``: for every node taking part, the ordered
steps it executes. The services carry plans out without knowing which method they serve; adding a
method (D2D clusters, edge-only, per-module schedules) is adding a class to ``METHODS``.

Steps:
- ``Train``: local training of the node's modules (devices).
- ``Send(to, link, tag, modules)``: push those modules (the node's current ones) to ``to``,
  feeding ``to``'s collect step ``tag``.
- ``Collect(tag, senders, link, rule, params, quorum, weight_caps)``: wait for pushes from the
  senders, aggregate what arrived with ``rule`` (FedAvg by default) and adopt the result as the
  node's current modules (a single sender means: adopt what it sent). The ``quorum`` says how many
  senders must have pushed and how long to wait for the rest (default: all of them, the round's
  timeout; config ``aggregation.quorum`` applies to collects of devices' own updates);
  ``weight_caps`` bound each sender's module weights by what the coordinator knows of the samples
  behind them (registered sample counts), whatever a push header claims: a push claiming more is
  refused. ``weight_bounds`` (``aggregation.claim_bound``) are lower: the weight a device's own
  update counts with at most, however much it registered (a push claiming more is counted with the
  bound, not refused: the claim may be honest).
- ``Evaluate``: test the node's current modules (devices).
- ``Stats(tasks)``: compute the node's feature statistics of those tasks under its current modules
  (devices; ``calibration.enabled``), held as ``stats.<task>`` for the ``Send`` that follows.
- ``Calibrate(tasks)``: train those tasks' heads on the feature statistics collected (the cloud).

A ``Send`` with a ``route`` goes hop by hop through those devices (D2D relaying): each relay
streams the push on to the next hop without decoding it; only the final receiver checks it.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from hffm.ids import (
    CLOUD,
    D2D,
    DEVICE_CLOUD,
    DEVICE_EDGE,
    EDGE_CLOUD,
    LINK_KINDS,
    head_name,
    is_head,
    stats_name,
    stats_task,
    task_of,
)
from hffm.topology import DeviceInfo, Topology

__all__ = ["D2D", "DEVICE_CLOUD", "DEVICE_EDGE", "EDGE_CLOUD", "LINK_KINDS", "SYNC"]

# The collect tag of a sync: a node that missed rounds (or lost its state) first adopts its tier's
# current modules from a node that holds them (hffm/recovery.py); they carry an earlier round's version.
SYNC = "sync"


@dataclass(frozen=True)
class Train:
    pass


@dataclass(frozen=True)
class Evaluate:
    pass


@dataclass(frozen=True)
class Stats:
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Calibrate:
    tasks: tuple[str, ...]


# The collect tags of calibration (calibration.enabled): feature statistics up, calibrated heads down; the
# opening phase's (calibration.opening: round 1, before any device trains) have tags of their own, since a round
# may hold both phases (star's round 1 is a cloud round).
STATS = "stats"
CALIBRATED = "calibrated"
OPENING_STATS = "opening-stats"
OPENING_CALIBRATED = "opening-calibrated"
# with an edge's label check (calibration.label_t in hfm), between the two: the federation's statistics down to
# the edges, which check their devices against them, and each edge's statistics up again without the devices it
# flagged, which the cloud calibrates on (so that no statistics an edge found mislabelled reach the heads
# calibrated in the very phase that found them)
FEDERATION = "federation"
CHECKED = "checked"
OPENING_FEDERATION = "opening-federation"
OPENING_CHECKED = "opening-checked"
STATS_OF = {FEDERATION: STATS, OPENING_FEDERATION: OPENING_STATS}  # the federation's sums -> the statistics checked
OPENING_TAGS = (OPENING_STATS, OPENING_FEDERATION, OPENING_CHECKED, OPENING_CALIBRATED)
# statistics first for a device that starts a later round synced (a joiner, one that lost its state): its
# statistics go to its collector before it trains (calibration.opening with the head check), nothing comes back
JOIN_STATS = "join-stats"
# ... computed, after an edge round, under the modules its collector's label check of the last phase judged by,
# which the collector sends it first (the adapters it was synced to are the edge's since; label_t)
JOIN_REF = "join-ref"
TRAINING_TAG = "aggregate"  # the tag (prefix) of every collect of training updates and their aggregates
CLUSTER = "cluster"  # a D2D cluster head's collect of its cluster's updates (hfm-d2d, edge-only-d2d)
LABEL_CHECK = "label_check"  # a statistics collect's rule with calibration.label_t (hffm.aggregation.LabelCheck)


@dataclass(frozen=True)
class Send:
    to: str
    link: str
    tag: str
    modules: tuple[str, ...]
    route: tuple[str, ...] = ()  # intermediate hops (D2D relaying); empty: direct


@dataclass(frozen=True)
class Quorum:
    """How many senders a collect step needs, and how long it waits for the rest.

    The step needs ``max(min_senders, ceil(min_fraction * senders))`` pushes (at most all, and at
    least one when it has senders). It returns as soon as every sender pushed; once ``deadline_s``
    has passed (None: the round's timeout) it aggregates whoever came if that is enough, else fails."""

    min_senders: int = 0
    min_fraction: float = 1.0
    deadline_s: float | None = None

    def needed(self, senders: int) -> int:
        if senders == 0:
            return 0
        return max(1, min(senders, max(self.min_senders, math.ceil(self.min_fraction * senders - 1e-9))))


@dataclass(frozen=True)
class Collect:
    tag: str
    senders: tuple[str, ...]
    link: str
    include_self: bool = False
    rule: str = "fedavg"
    params: tuple[tuple[str, float], ...] = ()  # the rule's parameters, sorted by name
    quorum: Quorum = Quorum()
    # sender -> ((module, largest weight it may claim), ...); senders not listed are unbounded
    weight_caps: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    own: tuple[str, ...] = ()  # include_self: which of the node's own modules count (empty: all of them)
    # module -> the only digest accepted for it (a relay from a specialist: the version the cloud examined)
    pinned: tuple[tuple[str, bytes], ...] = ()
    # sender -> ((module, the weight it counts with at most), ...) (aggregation.claim_bound); not listed: its caps
    weight_bounds: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    def caps_of(self, sender: str) -> dict[str, float]:
        return dict(next((c for s, c in self.weight_caps if s == sender), ()))

    def bounds_of(self, sender: str) -> dict[str, float]:
        return dict(next((c for s, c in self.weight_bounds if s == sender), ()))


Step = Train | Evaluate | Send | Collect | Stats | Calibrate


def bound_claims(samples: Mapping[str, Mapping[str, int]], k: float) -> dict[str, dict[str, int]]:
    """Registered claims (device -> task -> samples), each at most ``k`` × the median claim of the
    task's devices (those claiming any): however much a device registers, its update counts as much as
    ``k`` typical ones at most (the median moves only when half the devices lie)."""
    by_task: dict[str, list[int]] = {}
    for claims in samples.values():
        for t, n in claims.items():
            if n > 0:
                by_task.setdefault(t, []).append(int(n))
    cap = {t: k * statistics.median(v) for t, v in by_task.items()}
    return {d: {t: int(min(n, max(1, math.floor(cap.get(t, n))))) for t, n in c.items()} for d, c in samples.items()}


@dataclass
class RoundPlan:
    round: int
    steps: dict[str, list[Step]] = field(default_factory=dict)

    def add(self, node: str, *steps: Step) -> None:
        self.steps.setdefault(node, []).extend(steps)

    def without_evaluation(self) -> RoundPlan:
        """The same plan with every ``Evaluate`` step left out."""
        steps = {n: [s for s in ss if not isinstance(s, Evaluate)] for n, ss in self.steps.items()}
        return RoundPlan(self.round, steps)

    def collects(self) -> list[tuple[str, Collect]]:
        return [(n, s) for n, ss in self.steps.items() for s in ss if isinstance(s, Collect)]

    def with_weight_caps(
        self, samples: Mapping[str, Mapping[str, int]], topo: Topology, claim_bound: float | None = None
    ) -> RoundPlan:
        """The plan with every collect's senders' weights bounded by registered sample counts
        (``samples``: device -> task -> samples). A device that trains and sends its own update may
        claim exactly its samples (adapters: all of its tasks; a head: its task); any other sender (an
        aggregate from an edge, the cloud or a cluster head) at most the federation's total. With
        ``claim_bound`` a device's own update also counts with at most its ``bound_claims`` (a weight
        bound wherever that is below its registered samples)."""
        bounded = bound_claims(samples, claim_bound) if claim_bound is not None else None

        def total(tasks: Mapping[str, int], module: str) -> float:
            t = task_of(module) or stats_task(module)  # a task's statistics weigh as its head
            return float(max(1, sum(tasks.values()) if t is None else tasks.get(t, 0)))

        def bound(node: str, mods: Sequence[str], registered: Mapping[str, int]):
            """``node``'s (module, bounded weight) pairs, or None where no bound is below ``registered``."""
            b = tuple((m, total((bounded or {}).get(node, {}), m)) for m in mods)
            return (node, b) if any(w < total(registered, m) for m, w in b) else None

        heads = {n for n, c in self.collects() if c.include_self}
        trainers = {n for n, ss in self.steps.items() if any(isinstance(s, Train) for s in ss)} - heads

        def everyone(module: str) -> float:
            """What an aggregate of ``module`` may weigh: every device's own cap summed (each at least 1, as a
            device holding no sample of a task still weighs 1; the registered total alone refused an honest edge
            whose devices held none of a task)."""
            t = task_of(module) or stats_task(module)
            return float(sum(total(samples.get(d.id, {}), module) for d in topo.devices if t is None or t in d.tasks))

        sent = {(src, x.to, x.tag): x.modules for src, x in self.transfers()}
        steps: dict[str, list[Step]] = {}
        for n, ss in self.steps.items():
            out: list[Step] = []
            for s in ss:
                if isinstance(s, Collect):
                    caps, bounds = [], []
                    for sender in s.senders:
                        mods = sent.get((sender, n, s.tag), ())
                        own = sender in trainers and s.tag != SYNC  # a sync carries an aggregate
                        basis = samples.get(sender, {})
                        caps.append((sender, tuple((m, total(basis, m) if own else everyone(m)) for m in mods)))
                        if own and bounded is not None and (b := bound(sender, mods, basis)):
                            bounds.append(b)
                    if s.include_self and bounded is not None and n in samples:  # a cluster head's own update
                        names = sorted({m for sender in s.senders for m in sent.get((sender, n, s.tag), ())})
                        if b := bound(n, names, samples[n]):
                            bounds.append(b)
                    s = replace(s, weight_caps=tuple(caps), weight_bounds=tuple(sorted(bounds)))
                out.append(s)
            steps[n] = out
        return RoundPlan(self.round, steps)

    def with_tier_rules(
        self, rules: Mapping[str, tuple[str, tuple[tuple[str, float], ...]]], topo: Topology
    ) -> RoundPlan:
        """The plan with each collect step's rule and parameters those of its node's tier (``rules``:
        tier -> (rule, sorted params); tiers ``cloud``, ``edge`` and ``head``: a device's collects)."""
        steps: dict[str, list[Step]] = {}
        for n, ss in self.steps.items():
            role = topo.role(n)
            rule, params = rules.get("head" if role == "device" else role, (None, ()))
            steps[n] = [
                replace(s, rule=rule, params=params) if isinstance(s, Collect) and rule is not None else s for s in ss
            ]
        return RoundPlan(self.round, steps)

    def with_calibration(
        self, topo: Topology, quorum: Quorum = Quorum(), label_t: float | None = None, opening: bool = False
    ) -> RoundPlan:
        """The plan with a calibration phase after the cloud's broadcast (``calibration.enabled``; a cloud
        round of star, hfm or hfm-d2d), or with ``opening`` one before any device trains (round 1 with
        ``calibration.opening``: the same steps under the tags ``OPENING_STATS`` and ``OPENING_CALIBRATED``, first
        in each edge's and the cloud's round and before each device's training, so every training push has
        statistics at its collector to be checked and weighed by, and trains from calibrated heads). Each
        device that trains, once it holds the global modules, computes its
        feature statistics of its tasks (``Stats``) and sends them where it sent its update (its edge, or
        the cloud in star, its cluster head over D2D in hfm-d2d); an edge sums its devices' (FedAvg of
        per-sample statistics weighted by samples: hffm/calibration.py) and forwards them, as a cluster head
        sums its cluster's and its own and forwards them to its edge; the cloud sums what came, calibrates
        the heads (``Calibrate``) and sends each node the heads of its tasks back the same way (over the
        head's D2D routes to its cluster), before the devices evaluate. A device's statistics collect waits
        as its update's did (``quorum``). With ``label_t`` each statistics collect checks its senders' labels
        by them first (``hffm.aggregation.LabelCheck``; not in hfm-d2d, whose heads are devices: the config
        refuses it); an edge's check waits for the federation's sums (``FEDERATION``, sent down before the cloud
        calibrates), and the edge sends its statistics up again without the devices it flagged (``CHECKED``),
        which the cloud calibrates on."""
        stats_tag, calibrated_tag = (OPENING_STATS, OPENING_CALIBRATED) if opening else (STATS, CALIBRATED)
        fed_tag, checked_tag = (OPENING_FEDERATION, OPENING_CHECKED) if opening else (FEDERATION, CHECKED)
        check = (LABEL_CHECK, (("label_t", float(label_t)),)) if label_t is not None else ("fedavg", ())
        # an edge checks its devices against its peers and the federation's statistics, sent down before calibrating
        deferred = (LABEL_CHECK, (("defer", 1.0), ("label_t", float(label_t)))) if label_t is not None else check
        # D2D cluster heads: devices that collect their cluster's updates (their own too when they train)
        heads = {
            n
            for n, ss in self.steps.items()
            if topo.role(n) == "device" and any(isinstance(s, Collect) and s.tag == CLUSTER for s in ss)
        }
        trains = {
            n for n, ss in self.steps.items() if topo.role(n) == "device" and any(isinstance(s, Train) for s in ss)
        }
        up: dict[str, Send] = {}  # device -> the send of its update (a head's own update is in its collect)
        for n in sorted(trains - heads):
            up[n] = next(
                s for s in self.steps[n] if isinstance(s, Send) and (s.tag.startswith(TRAINING_TAG) or s.tag == CLUSTER)
            )
        tasks = {d: tuple(topo.device_map[d].tasks) for d in trains}
        steps = {n: list(ss) for n, ss in self.steps.items()}

        def place(node: str, phase: list[Step]) -> None:
            """A device's (or cluster head's) phase: before it evaluates, or with ``opening`` before it trains."""
            at = Train if opening else Evaluate
            i = next((i for i, x in enumerate(steps[node]) if isinstance(x, at)), 0 if opening else len(steps[node]))
            steps[node][i:i] = phase

        def tier(node: str, phase: list[Step]) -> None:
            """An edge's or the cloud's phase: after its round's steps, or with ``opening`` before them."""
            steps[node] = [*phase, *steps.get(node, [])] if opening else [*steps.get(node, []), *phase]

        for d, s in up.items():
            place(
                d,
                [
                    Stats(tasks[d]),
                    Send(s.to, s.link, stats_tag, tuple(stats_name(t) for t in tasks[d]), s.route),
                    Collect(calibrated_tag, (s.to,), s.link),
                ],
            )
        below: dict[str, list[str]] = {h: [] for h in heads}  # aggregator -> its devices
        for d, s in up.items():
            below.setdefault(s.to, []).append(d)
        cloud_from: list[tuple[str, str, tuple[str, ...]]] = []  # (sender, link, its tasks)
        for head in sorted(heads):  # it sums its cluster's statistics and its own, up to its edge and back
            members = below.pop(head)
            own = tasks.get(head, ())
            held = tuple(sorted({t for d in members for t in tasks[d]} | set(own)))
            edge = topo.device_map[head].edge
            down = {s.to: s.route for s in self.steps[head] if isinstance(s, Send) and s.link == D2D}
            place(
                head,
                [
                    *([Stats(own)] if own else []),
                    Collect(
                        stats_tag,
                        tuple(members),
                        D2D,
                        include_self=bool(own),
                        quorum=quorum,
                        own=tuple(stats_name(t) for t in own),
                    ),
                    Send(edge, DEVICE_EDGE, stats_tag, tuple(stats_name(t) for t in held)),
                    Collect(calibrated_tag, (edge,), DEVICE_EDGE),
                    *(Send(d, D2D, calibrated_tag, tuple(head_name(t) for t in tasks[d]), down[d]) for d in members),
                ],
            )
            tier(
                edge,
                [
                    Collect(stats_tag, (head,), DEVICE_EDGE),
                    Send(CLOUD, EDGE_CLOUD, stats_tag, tuple(stats_name(t) for t in held)),
                    Collect(calibrated_tag, (CLOUD,), EDGE_CLOUD),
                    Send(head, DEVICE_EDGE, calibrated_tag, tuple(head_name(t) for t in held)),
                ],
            )
            cloud_from.append((edge, EDGE_CLOUD, held))
        for agg, members in sorted(below.items()):
            link = up[members[0]].link
            if agg == CLOUD:
                cloud_from += [(d, link, tasks[d]) for d in members]
                continue
            held = tuple(sorted({t for d in members for t in tasks[d]}))
            sums = tuple(stats_name(t) for t in held)
            # with the label check: the federation's sums come down, the edge checks its devices against them and
            # sends its statistics up again without those it flagged, before the cloud calibrates
            checking = [Collect(fed_tag, (CLOUD,), EDGE_CLOUD), Send(CLOUD, EDGE_CLOUD, checked_tag, sums)]
            tier(
                agg,
                [
                    Collect(stats_tag, tuple(members), link, rule=deferred[0], params=deferred[1], quorum=quorum),
                    Send(CLOUD, EDGE_CLOUD, stats_tag, sums),
                    *(checking if label_t is not None else []),
                    Collect(calibrated_tag, (CLOUD,), EDGE_CLOUD),
                    *(Send(d, link, calibrated_tag, tuple(head_name(t) for t in tasks[d])) for d in members),
                ],
            )
            cloud_from.append((agg, EDGE_CLOUD, held))
        if not cloud_from:
            return RoundPlan(self.round, steps)
        held = tuple(sorted({t for _, _, ts in cloud_from for t in ts}))
        from_devices = cloud_from[0][1] == DEVICE_CLOUD
        if not from_devices:  # the edges' sums: nothing to check them against (their devices were checked)
            check = ("fedavg", ())
        senders = tuple(n for n, _, _ in cloud_from)
        # edges that check their devices' labels (not D2D cluster heads: label_t is refused in hfm-d2d) get the
        # federation's sums and send their checked statistics back, which the heads are calibrated on
        checking = (
            [
                *(Send(n, link, fed_tag, tuple(stats_name(t) for t in ts)) for n, link, ts in cloud_from),
                Collect(checked_tag, senders, EDGE_CLOUD),
            ]
            if label_t is not None and not from_devices
            else []
        )
        tier(
            CLOUD,
            [
                Collect(
                    stats_tag,
                    senders,
                    cloud_from[0][1],
                    rule=check[0],
                    params=check[1],
                    quorum=quorum if from_devices else Quorum(),
                ),
                *checking,
                Calibrate(held),
                *(Send(n, link, calibrated_tag, tuple(head_name(t) for t in ts)) for n, link, ts in cloud_from),
            ],
        )
        return RoundPlan(self.round, steps)

    def with_join_statistics(
        self,
        topo: Topology,
        devices: Iterable[str],
        quorum: Quorum = Quorum(),
        label_t: float | None = None,
        reference: Callable[[Topology, str], tuple[str, ...]] | None = None,
    ) -> RoundPlan:
        """The plan with each of ``devices`` that trains and sends its update straight to an edge or the cloud (a
        device synced at the start of the round: one that joined, or lost its state; calibration.opening with
        the head check) sending its feature statistics there before it trains, under ``JOIN_STATS``: the
        collector then holds what they claim before the device's first training push, which its weights and
        the head check are held to as any other device's (``hffm.inbox.Inbox``), where it would otherwise weigh
        as a typical device and go unchecked until the next cloud round's statistics. Nothing comes back; the
        collector's step (before its first collect of training updates) only holds the statistics, checked
        against nothing (``LabelCheck`` deferred: the next calibration phase checks the device's labels), and
        ends with whoever sent by the deadline, or nobody (``Inbox.wait``). The collector checks the labels of
        statistics computed under the modules its last label check judged by (``Inbox._check_joiner``): those
        the device was synced to where the last round was a cloud round. ``reference`` (the round after an edge
        round, with ``label_t``): the feature modules (every circulating one but the heads: ``reference(topo,
        device)``) that an edge collector sends the device first, under ``JOIN_REF``, and the device computes
        these statistics under (``NodeRuntime.join_reference``); the device trains from its sync as before."""
        steps = {n: list(ss) for n, ss in self.steps.items()}
        below: dict[str, list[tuple[str, str]]] = {}  # collector -> (device, link)
        refs: dict[str, list[Send]] = {}  # collector -> its sends of the reference modules (JOIN_REF)
        for d in sorted(set(devices)):
            ss = steps.get(d, [])
            if topo.role(d) != "device" or not any(isinstance(s, Train) for s in ss):
                continue
            up = next((s for s in ss if isinstance(s, Send) and s.tag.startswith(TRAINING_TAG)), None)
            if up is None or up.link == D2D:  # a D2D cluster's member or head: no head check there
                continue
            tasks = tuple(topo.device_map[d].tasks)
            i = next(i for i, x in enumerate(ss) if isinstance(x, Train))
            ss[i:i] = [Stats(tasks), Send(up.to, up.link, JOIN_STATS, tuple(stats_name(t) for t in tasks), up.route)]
            below.setdefault(up.to, []).append((d, up.link))
            feats = () if reference is None else tuple(m for m in reference(topo, d) if not is_head(m))
            if feats and topo.role(up.to) == "edge":
                ss.insert(i, Collect(JOIN_REF, (up.to,), up.link))
                refs.setdefault(up.to, []).append(Send(d, up.link, JOIN_REF, feats, tuple(reversed(up.route))))
        held = (LABEL_CHECK, (("defer", 1.0), ("label_t", float(label_t)))) if label_t is not None else ("fedavg", ())
        for n, senders in sorted(below.items()):
            ss = steps[n]
            i = next((i for i, x in enumerate(ss) if isinstance(x, Collect) and x.tag.startswith(TRAINING_TAG)), 0)
            senders_ = tuple(d for d, _ in senders)
            ss[i:i] = [*refs.get(n, []), Collect(JOIN_STATS, senders_, senders[0][1], rule=held[0], params=held[1],
                                                 quorum=quorum)]  # fmt: skip
        return RoundPlan(self.round, steps)

    def transfers(self) -> list[tuple[str, Send]]:
        return [(n, s) for n, ss in self.steps.items() for s in ss if isinstance(s, Send)]

    def validate(self) -> None:
        """Every Send feeds a Collect at its receiver listing the sender; every Collect's senders send."""
        collects = {(n, s.tag): s for n, ss in self.steps.items() for s in ss if isinstance(s, Collect)}
        sends = self.transfers()
        for n, s in sends:
            c = collects.get((s.to, s.tag))
            if c is None or n not in c.senders:
                raise ValueError(f"round {self.round}: {n} sends to {s.to}/{s.tag} which does not collect from it")
        for (n, tag), c in collects.items():
            for sender in c.senders:
                if not any(src == sender and s.to == n and s.tag == tag for src, s in sends):
                    raise ValueError(f"round {self.round}: {n}/{tag} waits for {sender} which never sends")


def evaluates(round_: int, rounds: int, eval_every: int) -> bool:
    """Whether devices test their modules in this round (``train.eval_every``; 0: never)."""
    return eval_every > 0 and (round_ % eval_every == 0 or round_ == rounds)


@dataclass
class RoundContext:
    """What the coordinator decided for a round beyond the topology: D2D cluster heads and the
    latency-weighted shortest paths (each a list of node ids, both ends included)."""

    heads: dict[str, str] = field(default_factory=dict)  # edge -> cluster head
    up_paths: dict[str, list[str]] = field(default_factory=dict)  # device -> path to its head
    down_paths: dict[str, list[str]] = field(default_factory=dict)  # device -> path from its head


@dataclass(frozen=True)
class AggregationSpec:
    """The rule, its parameters and the quorum every collect step of a method uses (config
    ``aggregation``); the default, FedAvg over every sender, is the paper's."""

    rule: str = "fedavg"
    params: tuple[tuple[str, float], ...] = ()
    quorum: Quorum = Quorum()


class Method(ABC):
    """A whole-set schedule. ``select`` restricts it to some modules (a circulation rule's: the others
    are not its business) and ``suffix`` marks its collect tags apart from other rules' in one round."""

    name: str
    uses_d2d = False

    def __init__(
        self,
        e_agg: int = 1,
        aggregation: AggregationSpec | None = None,
        select: Callable[[str], bool] | None = None,
        suffix: str = "",
    ) -> None:
        self.e_agg = e_agg
        self.aggregation = aggregation or AggregationSpec()
        self.select = select
        self.suffix = suffix

    def mods(self, topo: Topology, node: str) -> tuple[str, ...]:
        """The modules of ``node`` this schedule moves."""
        return tuple(m for m in topo.modules_for(node) if self.select is None or self.select(m))

    def takes_part(self, topo: Topology, devices: list[DeviceInfo]) -> list[str]:
        """The devices holding a module this schedule moves."""
        return [d.id for d in devices if self.mods(topo, d.id)]

    def tag(self, tag: str) -> str:
        return tag + self.suffix

    def collect(self, tag: str, senders: tuple[str, ...] | list[str], link: str, include_self: bool = False) -> Collect:
        """A collect of aggregates (an edge's, a head's, the cloud's): the rule, and every sender waited
        for (a lost aggregator aborts the attempt: docs/reliability.md)."""
        a = self.aggregation
        return Collect(self.tag(tag), tuple(senders), link, include_self, a.rule, a.params)

    def collect_updates(
        self, tag: str, senders: tuple[str, ...] | list[str], link: str, include_self: bool = False
    ) -> Collect:
        """A collect of devices' own updates: the rule and the quorum (a straggler or a lost device is
        left out once the deadline passed, if enough came)."""
        a = self.aggregation
        return Collect(self.tag(tag), tuple(senders), link, include_self, a.rule, a.params, a.quorum)

    def send(self, to: str, link: str, tag: str, modules: tuple[str, ...], route: tuple[str, ...] = ()) -> Send:
        return Send(to, link, self.tag(tag), modules, route)

    @abstractmethod
    def plan(self, round_: int, topo: Topology, ctx: RoundContext | None = None) -> RoundPlan: ...

    def cloud_round(self, round_: int) -> bool:
        """Whether the cloud aggregates in this round."""
        return True


class Star(Method):
    """Conventional FFM: every device uploads to the cloud each round; FedAvg there; broadcast."""

    name = "star"

    def plan(self, round_: int, topo: Topology, ctx: RoundContext | None = None) -> RoundPlan:
        plan = RoundPlan(round_)
        devices = self.takes_part(topo, list(topo.devices))
        for d in devices:
            plan.add(
                d,
                Train(),
                self.send(CLOUD, DEVICE_CLOUD, "aggregate", self.mods(topo, d)),
                self.collect("broadcast", (CLOUD,), DEVICE_CLOUD),
                Evaluate(),
            )
        plan.add(CLOUD, self.collect_updates("aggregate", devices, DEVICE_CLOUD))
        plan.add(CLOUD, *(self.send(d, DEVICE_CLOUD, "broadcast", self.mods(topo, d)) for d in devices))
        return plan


class HFM(Method):
    """HF-FM: devices <-> edge every round; edges <-> cloud every ``e_agg`` rounds."""

    name = "hfm"

    def cloud_round(self, round_: int) -> bool:
        return round_ % self.e_agg == 0

    def plan(self, round_: int, topo: Topology, ctx: RoundContext | None = None) -> RoundPlan:
        plan = RoundPlan(round_)
        sync = self.cloud_round(round_)
        clusters = {e: self.takes_part(topo, topo.cluster(e)) for e in topo.edges}
        edges = tuple(e for e in topo.edges if clusters[e])  # an edge with no device sits the round out
        for edge in edges:
            members = clusters[edge]
            for d in members:
                plan.add(
                    d,
                    Train(),
                    self.send(edge, DEVICE_EDGE, "aggregate", self.mods(topo, d)),
                    self.collect("broadcast", (edge,), DEVICE_EDGE),
                    Evaluate(),
                )
            plan.add(edge, self.collect_updates("aggregate", members, DEVICE_EDGE))
            if sync:
                plan.add(
                    edge,
                    self.send(CLOUD, EDGE_CLOUD, "aggregate", self.mods(topo, edge)),
                    self.collect("broadcast", (CLOUD,), EDGE_CLOUD),
                )
            plan.add(edge, *(self.send(d, DEVICE_EDGE, "broadcast", self.mods(topo, d)) for d in members))
        if sync:
            plan.add(CLOUD, self.collect("aggregate", edges, EDGE_CLOUD))
            plan.add(CLOUD, *(self.send(e, EDGE_CLOUD, "broadcast", self.mods(topo, e)) for e in edges))
        return plan


class EdgeOnly(HFM):
    """HF-FM with no cloud aggregation ever: each cluster learns on its own."""

    name = "edge-only"

    def cloud_round(self, round_: int) -> bool:
        return False


class HFMD2D(Method):
    """HF-FM + D2D: each cluster aggregates at its cluster head over multi-hop D2D every round
    (devices -> head along shortest paths, head -> devices back along its shortest-path tree);
    every ``e_agg`` rounds the heads upload via their edge to the cloud and get the global modules
    back the same way."""

    name = "hfm-d2d"
    uses_d2d = True

    def cloud_round(self, round_: int) -> bool:
        return round_ % self.e_agg == 0

    def plan(self, round_: int, topo: Topology, ctx: RoundContext | None = None) -> RoundPlan:
        if ctx is None or not ctx.heads:
            raise ValueError(f"{self.name} needs cluster heads and D2D paths")
        plan = RoundPlan(round_)
        sync = self.cloud_round(round_)
        edges = []
        for edge in topo.edges:
            members = self.takes_part(topo, topo.cluster(edge))
            if not members:
                continue
            edges.append(edge)
            head = ctx.heads[edge]
            others = [d for d in members if d != head]
            for d in others:
                plan.add(
                    d,
                    Train(),
                    self.send(head, D2D, "cluster", self.mods(topo, d), tuple(ctx.up_paths[d][1:-1])),
                    self.collect("broadcast", (head,), D2D),
                    Evaluate(),
                )
            # the head counts its own update when it holds any of these modules (it may only aggregate)
            cluster = self.collect_updates("cluster", others, D2D, include_self=head in members)
            if self.select is not None and head in members:
                cluster = replace(cluster, own=self.mods(topo, head))
            plan.add(head, Train(), cluster)
            cluster_modules = self.mods(topo, edge)
            if sync:
                plan.add(
                    head,
                    self.send(edge, DEVICE_EDGE, "aggregate", cluster_modules),
                    self.collect("down", (edge,), DEVICE_EDGE),
                )
                plan.add(
                    edge,
                    self.collect("aggregate", (head,), DEVICE_EDGE),
                    self.send(CLOUD, EDGE_CLOUD, "aggregate", cluster_modules),
                    self.collect("broadcast", (CLOUD,), EDGE_CLOUD),
                    self.send(head, DEVICE_EDGE, "down", cluster_modules),
                )
            plan.add(
                head,
                *(self.send(d, D2D, "broadcast", self.mods(topo, d), tuple(ctx.down_paths[d][1:-1])) for d in others),
                Evaluate(),
            )
        if sync:
            plan.add(CLOUD, self.collect("aggregate", tuple(edges), EDGE_CLOUD))
            plan.add(CLOUD, *(self.send(e, EDGE_CLOUD, "broadcast", self.mods(topo, e)) for e in edges))
        return plan


class EdgeOnlyD2D(HFMD2D):
    """HF-FM + D2D with no cloud aggregation ever."""

    name = "edge-only-d2d"

    def cloud_round(self, round_: int) -> bool:
        return False


# by name, in the order of hffm.ids.METHODS (the config's list; a test holds the two together)
REGISTRY: dict[str, type[Method]] = {m.name: m for m in (Star, HFM, HFMD2D, EdgeOnly, EdgeOnlyD2D)}


def make_method(
    name: str,
    e_agg: int = 1,
    aggregation: AggregationSpec | None = None,
    select: Callable[[str], bool] | None = None,
    suffix: str = "",
) -> Method:
    try:
        return REGISTRY[name](e_agg=e_agg, aggregation=aggregation, select=select, suffix=suffix)
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(REGISTRY)}") from None
