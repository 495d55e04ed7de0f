"""A node's rounds: which round (and attempt) it is in, the steps assigned to it, and its account of
each round so far. Holds core types only (the servicers convert at the edge)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from hffm.ids import trace_prefix
from hffm.inbox import RoundAborted
from hffm.methods import Collect, Send, Step
from hffm.modules import ModuleError, ModuleSpec
from hffm.results import NodeReport


@dataclass
class RoundState:
    round: int
    method: str
    steps: list[Step]
    peers: dict[str, str]
    attempt: int = 0
    base: tuple[int, int] | None = None  # the round end it starts from; None: what it holds (then a sync)
    future: Future | None = None
    report: NodeReport = field(init=False)
    aborted: threading.Event = field(default_factory=threading.Event)  # a later attempt replaced this one
    lost: set[str] = field(default_factory=set)  # nodes the coordinator left out of this attempt

    def __post_init__(self) -> None:
        self.report = NodeReport(node="", round=self.round, attempt=self.attempt)

    @property
    def trace_prefix(self) -> str:
        return trace_prefix(self.round, self.attempt)

    def raise_if_aborted(self) -> None:
        """``RoundAborted`` once a later attempt (or round) replaced this one."""
        if self.aborted.is_set():
            raise RoundAborted(f"{self.report.node}: round {self.round} attempt {self.attempt} was replaced")


class RoundRegistry:
    """Assignments by round. A round is assigned once per attempt: the same steps again are a retry;
    a higher attempt of the current round replaces it (the earlier attempt was aborted); anything
    else is refused. Keeps the last few rounds (relays and late reports look them up)."""

    def __init__(self, node_id: str, keep: int = 3) -> None:
        self.node_id = node_id
        self.keep = keep
        self.lock = threading.RLock()
        self._rounds: dict[int, RoundState] = {}
        self.current = 0

    def validate(self, steps: list[Step], peers: dict[str, str], spec: ModuleSpec, has_modules: bool) -> None:
        for s in steps:
            if isinstance(s, Send):
                if s.to not in peers:
                    raise ModuleError("INVALID_ARGUMENT", "bad_task", f"send to {s.to!r} but no address for it")
                unknown = [m for m in s.modules if m not in spec]
                if unknown:
                    raise ModuleError(
                        "INVALID_ARGUMENT", "bad_task", f"send of modules {self.node_id} lacks: {unknown}"
                    )
            if isinstance(s, Collect) and s.include_self and not has_modules:
                raise ModuleError("INVALID_ARGUMENT", "bad_task", "include_self on a node without modules")

    def install(self, state: RoundState) -> bool:
        """Install ``state``; False when it repeats the current assignment (nothing changes)."""
        with self.lock:
            prev = self._rounds.get(state.round)
            if prev is not None:
                if prev.attempt == state.attempt:
                    if prev.steps == state.steps and prev.peers == state.peers:
                        return False  # a retried assignment
                    raise ModuleError(
                        "ALREADY_EXISTS", "bad_task", f"round {state.round} attempt {state.attempt} already assigned"
                    )
                if state.round != self.current or state.attempt < prev.attempt:
                    raise ModuleError(
                        "FAILED_PRECONDITION",
                        "bad_task",
                        f"attempt {state.attempt} of round {state.round}: this node runs round {self.current} "
                        f"attempt {self._rounds[self.current].attempt}",
                    )
            elif state.round <= self.current:
                raise ModuleError(
                    "FAILED_PRECONDITION", "bad_task", f"round {state.round} is not after current round {self.current}"
                )
            state.report.node = self.node_id
            for other in self._rounds.values():  # a run still going on an earlier assignment is moot
                other.aborted.set()
            self._rounds[state.round] = state
            self.current = state.round
            for old in [r for r in self._rounds if r < state.round - self.keep + 1]:
                del self._rounds[old]
            return True

    def abort_all(self) -> None:
        with self.lock:
            for state in self._rounds.values():
                state.aborted.set()

    def get(self, round_: int) -> RoundState | None:
        with self.lock:
            return self._rounds.get(round_)
