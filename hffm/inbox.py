"""The receiving side of a node's round: which pushes it expects, and their running aggregates.

An ``Inbox`` is opened for a round with the node's ``Collect`` steps. A push is checked twice:
``precheck`` on its header before any byte is read (round, collect step, sender, duplicates), and
``accept`` with its decoded modules, which folds them into that step's aggregator all-or-nothing.
A rejected push raises ``ModuleError`` and leaves the inbox exactly as it was. A push repeated by a
retrying client (same push id, same digests) is acknowledged as a duplicate and counted once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from hffm.aggregation import Aggregator, make_aggregator
from hffm.methods import Collect
from hffm.modules import Module, ModuleError, ModuleSet
from hffm.wire import PushHeader


@dataclass
class _Collection:
    step: Collect
    aggregator: Aggregator
    accepted: dict[str, tuple[str, tuple[bytes, ...]]] = field(default_factory=dict)  # sender -> (push id, digests)

    @property
    def complete(self) -> bool:
        return len(self.accepted) == len(self.step.senders)


class Inbox:
    def __init__(self, node_id: str, rule: str = "fedavg") -> None:
        self.node_id = node_id
        self.rule = rule
        self.round: int | None = None
        self.registered: set[str] = set()
        self._collections: dict[str, _Collection] = {}
        self._cv = threading.Condition()

    # -- round lifecycle ------------------------------------------------------------------
    def open_round(self, round_: int, collects: list[Collect], registered: set[str]) -> None:
        with self._cv:
            self.round = round_
            self.registered = set(registered)
            self._collections = {c.tag: _Collection(c, make_aggregator(self.rule, self._order(c))) for c in collects}
            self._cv.notify_all()

    def _order(self, c: Collect) -> list[str]:
        """The canonical fold order of a collect step: its senders (and this node) sorted."""
        return sorted({*c.senders, *([self.node_id] if c.include_self else [])})

    def snapshot(self) -> dict[str, object]:
        """A comparable view of the inbox state (tests use it to show rejections change nothing)."""
        with self._cv:
            return {
                "round": self.round,
                "accepted": {t: dict(c.accepted) for t, c in self._collections.items()},
                "senders": {t: [*c.aggregator.senders, *c.aggregator.pending] for t, c in self._collections.items()},
            }

    # -- receiving ------------------------------------------------------------------------
    def _check(self, h: PushHeader) -> tuple[_Collection, bool]:
        if h.receiver != self.node_id:
            raise ModuleError(
                "INVALID_ARGUMENT", "wrong_receiver", f"push addressed to {h.receiver!r}, this is {self.node_id!r}"
            )
        if h.sender not in self.registered:
            raise ModuleError("PERMISSION_DENIED", "unregistered_sender", f"sender {h.sender!r} is not registered")
        if self.round is None:
            raise ModuleError("FAILED_PRECONDITION", "no_round", f"{self.node_id} has no open round")
        if h.round != self.round:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "wrong_round",
                f"push for round {h.round}, {self.node_id} is in round {self.round}",
            )
        coll = self._collections.get(h.tag)
        if coll is None:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "unexpected_push",
                f"{self.node_id} collects nothing as {h.tag!r} in round {self.round}",
            )
        if h.sender not in coll.step.senders:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "unexpected_sender",
                f"{h.sender} is not a sender of {self.node_id}/{h.tag} this round",
            )
        if h.link != coll.step.link:
            raise ModuleError("INVALID_ARGUMENT", "wrong_link", f"link {h.link!r}, expected {coll.step.link!r}")
        for m in h.modules:
            if m.version != h.round:
                raise ModuleError(
                    "FAILED_PRECONDITION",
                    "wrong_version",
                    f"module {m.name} has version {m.version}, round is {h.round}",
                )
        prev = coll.accepted.get(h.sender)
        if prev is not None:
            digests = tuple(m.sha256 for m in h.modules)
            if prev == (h.push_id, digests):
                return coll, True
            raise ModuleError(
                "ALREADY_EXISTS",
                "conflicting_push",
                f"{h.sender} already pushed different modules to {h.tag} this round",
            )
        return coll, False

    def precheck(self, header: PushHeader) -> bool:
        """Raise if the push cannot be accepted; True when it repeats one already accepted."""
        with self._cv:
            return self._check(header)[1]

    def accept(self, header: PushHeader, modules: list[Module]) -> bool:
        """Fold the push in (all-or-nothing); True when it was a duplicate (nothing changed)."""
        with self._cv:
            coll, dup = self._check(header)
            if dup:
                return True
            coll.aggregator.add(header.sender, modules)
            coll.accepted[header.sender] = (header.push_id, tuple(m.sha256 for m in header.modules))
            self._cv.notify_all()
            return False

    def add_own(self, tag: str, modules: ModuleSet) -> None:
        """A collect step with include_self: the node's own modules count like a sender's."""
        with self._cv:
            self._collections[tag].aggregator.add(self.node_id, modules.values())

    def wait(self, tag: str, timeout_s: float) -> ModuleSet:
        """Block until every sender of ``tag`` pushed; return the aggregate (version = round)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            coll = self._collections[tag]
            while not coll.complete:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(coll.step.senders) - set(coll.accepted))
                    raise TimeoutError(f"{self.node_id}/{tag}: no push from {missing} after {timeout_s:.0f}s")
                self._cv.wait(left)
            assert self.round is not None
            return coll.aggregator.result(self.round)
