"""The cloud's membership: who registered, where each node is reachable, and the training samples each
device registered (the weights a sender may claim are bounded by them). Registration is validated
against the membership table (``hffm.topology.Topology``); the table itself is data that later changes
(joins, leaves, re-homing) replace between rounds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hffm.ids import CLOUD
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
    ) -> None:
        self.topo = topo
        self.addresses: dict[str, str] = {CLOUD: cloud_address}
        self.samples: dict[str, dict[str, int]] = {}  # device -> task -> registered training samples
        self._on_states = on_states or (lambda _n, _s: None)  # the round ends a registering node holds
        self._on_change = on_change or (lambda _msg: None)
        self._cv = threading.Condition()

    @property
    def expected(self) -> int:
        return len(self.topo.node_ids())

    def register(self, reg: Registration) -> int:
        """Validate and record ``reg``; returns how many nodes are registered. ``ValueError`` names
        what is wrong and changes nothing."""
        try:
            role = self.topo.role(reg.id)
        except KeyError:
            raise ValueError(f"{reg.id!r} is not a node of this topology") from None
        if role != reg.role:
            raise ValueError(f"{reg.id} is a {role}, registered as {reg.role!r}")
        if role == "device" and reg.edge != self.topo.device_map[reg.id].edge:
            raise ValueError(f"{reg.id} belongs to {self.topo.device_map[reg.id].edge}, not {reg.edge!r}")
        if not reg.address:
            raise ValueError(f"{reg.id}: address is required")
        samples = dict(reg.train_samples)
        if role == "device":
            tasks = set(self.topo.device_map[reg.id].tasks)
            if set(samples) - tasks or any(not 0 <= v < 2**31 for v in samples.values()):
                raise ValueError(f"{reg.id}: train_samples {samples} (tasks {sorted(tasks)}, each 0 <= n < 2^31)")
        with self._cv:
            prev = self.addresses.get(reg.id)
            if prev is not None and prev != reg.address and role != "device":
                raise PermissionError(f"{reg.id} is registered at {prev}; the cloud's and an edge's address never move")
            self.addresses[reg.id] = reg.address  # a restarted device re-registers with its new address
            if role == "device":
                self.samples[reg.id] = samples
            self._on_states(reg.id, set(reg.states))
            n = len(self.addresses)
            self._cv.notify_all()
        log.info("registered %s at %s (%d/%d)", reg.id, reg.address, n, self.expected)
        self._on_change(f"{reg.id} registered")
        return n

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

    def to_json(self) -> dict:
        with self._cv:
            return {"addresses": dict(self.addresses), "samples": dict(self.samples)}

    def restore(self, doc: dict) -> None:
        """A resumed coordinator: the members and their samples as saved (nodes that restart register
        again and replace their entry)."""
        with self._cv:
            for n, a in doc.get("addresses", {}).items():
                self.addresses.setdefault(n, a)
            for n, s in doc.get("samples", {}).items():
                self.samples.setdefault(n, dict(s))
            self._cv.notify_all()
