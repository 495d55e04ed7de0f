"""The cloud's membership: who registered, where each node is reachable, and the training samples each
device registered (the weights a sender may claim are bounded by them). Registration is validated
against the membership table (``hffm.topology.Topology``); the table itself is data that later changes
(joins, leaves, re-homing) replace between rounds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hffm.ids import CLOUD, edge_id, parse_node_id
from hffm.topology import Registration, Topology

__all__ = ["Membership", "Registration"]

log = logging.getLogger("hffm.membership")


class RegistrationTimeout(TimeoutError):
    """Nodes of the topology never registered (the message names them)."""


class Membership:
    def __init__(
        self,
        topo: Topology,
        cloud_address: str,
        on_change: Callable[[str], None] | None = None,
        on_states: Callable[[str, set[tuple[int, int]]], None] | None = None,
        joins: bool = False,
        max_joins: int = 64,
        later: dict[str, tuple[str, ...]] | None = None,
        locate: Callable[[tuple[float, float]], str] | None = None,
    ) -> None:
        self.topo = topo
        self.later = later or {}  # device -> tasks it takes up mid-run (circulation.arrivals)
        self.locate = locate  # a joiner's position -> the edge it belongs to (nearest by geometry)
        self.positions: dict[str, tuple[float, float]] = {}  # joiners that said where they are
        self.joins = joins  # topology.joins: devices outside the table may be admitted, members may leave
        self.max_joins = max_joins  # topology.max_joins: at most this many
        self._joined = 0  # devices admitted from outside the starting table
        self.departed: set[str] = set()  # devices that left (Leave): off the table for the rest of the run
        self.evicted: set[str] = set()  # departed by the operator's Evict: never admitted again
        self._leaving: dict[str, str] = {}  # departed, not yet shut down: device -> its address
        self._planned: tuple[int, frozenset[str]] = (0, frozenset())  # the last round planned, its devices
        self.addresses: dict[str, str] = {CLOUD: cloud_address}
        self.samples: dict[str, dict[str, int]] = {}  # device -> task -> registered training samples
        self.coverage: dict[str, dict[str, float]] = {}  # device -> task -> registered label coverage
        self._on_states = on_states or (lambda _n, _s: None)  # the round ends a registering node holds
        self._on_change = on_change or (lambda _msg: None)
        self._cv = threading.Condition()

    @property
    def expected(self) -> int:
        return len(self.topo.node_ids())

    def register(self, reg: Registration) -> int:
        """Validate and record ``reg``; returns how many nodes are registered. ``ValueError`` names
        what is wrong and changes nothing."""
        joined = None
        if reg.id in self.evicted:
            raise PermissionError(f"{reg.id} was evicted by the operator: it may not register again")
        try:
            role = self.topo.role(reg.id)
        except KeyError:
            if not self.joins:
                raise ValueError(f"{reg.id!r} is not a node of this topology (topology.joins is off)") from None
            joined = self._admit(reg)
            role = "device"
        topo = joined or self.topo
        if role != reg.role:
            raise ValueError(f"{reg.id} is a {role}, registered as {reg.role!r}")
        if role == "device" and reg.edge != topo.device_map[reg.id].edge:
            raise ValueError(f"{reg.id} belongs to {topo.device_map[reg.id].edge}, not {reg.edge!r}")
        if not reg.address:
            raise ValueError(f"{reg.id}: address is required")
        samples = dict(reg.train_samples)
        if role == "device":
            tasks = set(topo.device_map[reg.id].tasks) | set(self.later.get(reg.id, ()))
            if set(samples) - tasks or any(not 0 <= v < 2**31 for v in samples.values()):
                raise ValueError(f"{reg.id}: train_samples {samples} (tasks {sorted(tasks)}, each 0 <= n < 2^31)")
            coverage = dict(reg.label_coverage)
            if set(coverage) - tasks or any(not 0 <= v <= 1 for v in coverage.values()):  # NaN fails too
                raise ValueError(f"{reg.id}: label_coverage {coverage} (tasks {sorted(tasks)}, each in [0, 1])")
        with self._cv:
            if joined is not None:
                if reg.id in self.topo.device_map:  # admitted meanwhile by a concurrent registration
                    joined = None
                else:  # onto the table as it is now (another joiner may have come in meanwhile)
                    info = joined.device_map[reg.id]
                    self.topo = self.topo.with_device(info.id, info.edge, info.tasks)
                    self._joined += 1
                    if reg.position is not None:
                        self.positions[reg.id] = reg.position
                    self.departed.discard(reg.id)  # a device that left may come back, as a newcomer
            prev = self.addresses.get(reg.id)
            if prev is not None and prev != reg.address and role != "device":
                raise PermissionError(f"{reg.id} is registered at {prev}; the cloud's and an edge's address never move")
            self.addresses[reg.id] = reg.address  # a restarted device re-registers with its new address
            if role == "device":
                self.samples[reg.id] = samples
                self.coverage[reg.id] = coverage
            self._on_states(reg.id, set(reg.states))
            n = len(self.addresses)
            self._cv.notify_all()
        if joined is not None:
            where = f" at ({reg.position[0]:.1f}, {reg.position[1]:.1f}) m" if reg.position else ""
            log.info("admitted %s to %s%s, tasks %s", reg.id, reg.edge, where, list(joined.device_map[reg.id].tasks))
        log.info("registered %s at %s (%d/%d)", reg.id, reg.address, n, self.expected)
        self._on_change(f"{reg.id} registered")
        return n

    def _admit(self, reg: Registration) -> Topology:
        """The table with the joining device ``reg`` in it: its role and edge as its id says (when it gives
        its position, that edge must be the nearest to it), tasks (its registered training samples' keys)
        among those its edge's cluster holds. ``ValueError``."""
        if reg.role != "device":
            raise ValueError(f"{reg.id!r}: only devices join mid-run (registered as {reg.role!r})")
        if self._joined >= self.max_joins:
            raise ValueError(f"{reg.id}: topology.max_joins ({self.max_joins}) devices have joined already")
        tasks = tuple(t for t, _ in reg.train_samples)
        try:
            nid = parse_node_id(reg.id)
        except ValueError as err:
            raise ValueError(str(err)) from None
        edge = edge_id(nid.edge or 0) if nid.role == "device" else ""
        if reg.edge != edge:
            raise ValueError(f"{reg.id} belongs to {edge or 'no edge'}, not {reg.edge!r}")
        if reg.position is not None:
            if self.locate is None:
                raise ValueError(f"{reg.id}: position given, but this membership has no geometry to place it")
            nearest = self.locate(reg.position)  # ValueError when outside the area
            if nearest != edge:
                x, y = reg.position
                raise ValueError(f"{reg.id}: position ({x:.1f}, {y:.1f}) m is nearest to {nearest}, not {edge}")
        held = self.topo.node_tasks(edge) if edge in self.topo.edges and self.topo.cluster(edge) else []
        if not tasks or set(tasks) - set(held):
            raise ValueError(f"{reg.id}: tasks {list(tasks)} must be among those {edge}'s cluster holds ({held})")
        return self.topo.with_device(reg.id, edge, tasks)

    def leave(self, device: str, reason: str = "", evict: bool = False) -> int:
        """``device`` leaves the federation: off the table now (the coordinator plans every later round
        without it; a round already planned with it finishes with it), its samples forgotten, its address
        kept until ``take_leaving`` hands it over to be shut down. Returns the last round planned with it
        (``plan_view``; 0: none), its last. ``ValueError`` (topology.joins off: membership is fixed) and
        ``LookupError`` (not a member) change nothing. ``evict`` (the operator's call): it may not come
        back, not even as a newcomer."""
        if not self.joins:
            raise ValueError(f"{device}: topology.joins is off: the membership is fixed, nobody leaves")
        with self._cv:
            if device not in self.topo.device_map:
                raise LookupError(f"{device!r} is not a device of this federation (now)")
            self.topo = self.topo.without({device})
            self.samples.pop(device, None)
            self.coverage.pop(device, None)
            self.departed.add(device)
            if evict:
                self.evicted.add(device)
            if device in self.addresses:
                self._leaving[device] = self.addresses[device]
            last = self._planned[0] if device in self._planned[1] else 0
            self._cv.notify_all()
        log.info("%s left the federation%s", device, f" ({reason})" if reason else "")
        self._on_change(f"{device} left")
        return last

    def plan_view(
        self, round_: int
    ) -> tuple[dict[str, str], Topology, dict[str, dict[str, int]], dict[str, tuple[float, float]]]:
        """What round ``round_`` is planned over, taken at one instant (a Leave or a registration lands
        wholly before or wholly after it): the departed devices to shut down now (``take_leaving``), the
        table, the registered samples and the joiners' positions. A device that leaves after this is
        planned into ``round_`` with its samples, and ``round_`` is its last."""
        with self._cv:
            leaving = self.take_leaving()
            self._planned = (round_, frozenset(self.topo.device_map))
            samples = {d: dict(ts) for d, ts in self.samples.items()}
            return leaving, self.topo, samples, dict(self.positions)

    def take_leaving(self) -> dict[str, str]:
        """Departed devices not yet handed over (device -> address), now off the address book too."""
        with self._cv:
            out, self._leaving = self._leaving, {}
            for n in out:
                if n not in self.topo.device_map:
                    self.addresses.pop(n, None)
            return out

    def missing(self) -> list[str]:
        with self._cv:
            return sorted(set(self.topo.node_ids()) - set(self.addresses) - {CLOUD})

    def wait_for_all(self, timeout_s: float, log_every_s: float = 10.0) -> None:
        """Until every node of the topology registered; says every ``log_every_s`` whom it waits for (the
        topology in the config names them: a node never started, or a config naming more nodes than were
        started, shows here), and raises ``RegistrationTimeout`` naming them."""
        start = time.monotonic()
        deadline, next_log = start + timeout_s, start + log_every_s
        with self._cv:
            while len(self.addresses) < self.expected:
                now = time.monotonic()
                if now >= deadline or now >= next_log:
                    missing = sorted(set(self.topo.node_ids()) - set(self.addresses) - {CLOUD})
                    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                    if now >= deadline:
                        raise RegistrationTimeout(
                            f"{len(missing)} of the topology's nodes did not register within "
                            f"runtime.register_timeout_s={timeout_s:.0f}s: {shown} (start them, or make topology.* "
                            "match the nodes started)"
                        )
                    log.info("waiting for %d node(s) to register: %s (%.0fs)", len(missing), shown, now - start)
                    next_log = now + log_every_s
                self._cv.wait(min(deadline, next_log) - now)

    def address(self, node: str) -> str:
        with self._cv:
            return self.addresses[node]

    def snapshot(self) -> dict[str, str]:
        with self._cv:
            return dict(sorted(self.addresses.items()))

    def claims(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
        """Copies of what devices registered: (device -> task -> training samples, device -> task -> label
        coverage), one consistent view."""
        with self._cv:
            return (
                {n: dict(s) for n, s in self.samples.items()},
                {n: dict(c) for n, c in self.coverage.items()},
            )

    def to_json(self) -> dict:
        with self._cv:
            return {
                "addresses": dict(self.addresses),
                "samples": dict(self.samples),
                "coverage": dict(self.coverage),
                "departed": sorted(self.departed),
                "evicted": sorted(self.evicted),
            }

    def restore(self, doc: dict) -> None:
        """A resumed coordinator: the members and their samples as saved (nodes that restart register
        again and replace their entry). Devices that had joined are not in the starting table: they are
        admitted again when they register, so their saved entries are not restored (an address outside the
        table would count towards ``expected`` in place of a member). Devices that had left stay off."""
        with self._cv:
            self.departed |= set(doc.get("departed", [])) & set(self.topo.device_map)
            self.evicted |= set(doc.get("evicted", []))
            self.topo = self.topo.without(self.departed)
            members = set(self.topo.node_ids())
            for n, a in doc.get("addresses", {}).items():
                if n in members:
                    self.addresses.setdefault(n, a)
            for n, s in doc.get("samples", {}).items():
                if n in members:
                    self.samples.setdefault(n, dict(s))
            for n, c in doc.get("coverage", {}).items():
                if n in members:
                    self.coverage.setdefault(n, dict(c))
            self._cv.notify_all()
