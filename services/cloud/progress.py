"""The run's progress feed: events the coordinator publishes (registrations, rounds, the end), streamed
to every watcher from the first event on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

FINAL = ("done", "failed")


@dataclass(frozen=True)
class ProgressEvent:
    """One step of the run, as watchers see it (``Progress`` on the wire)."""

    phase: str  # waiting | round | done | failed
    round: int = 0
    rounds: int = 0
    registered: int = 0
    expected: int = 0
    results_json: str = ""  # the round's record (JSON), in phase "round"
    message: str = ""


class ProgressFeed:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self._cv = threading.Condition()

    def publish(self, ev: ProgressEvent) -> None:
        with self._cv:
            self.events.append(ev)
            self._cv.notify_all()

    def watch(self, active: Callable[[], bool]) -> Iterator[ProgressEvent]:
        """Every event so far, then each new one, until a final one or ``active()`` turns false."""
        i = 0
        while active():
            with self._cv:
                while i >= len(self.events) and active():
                    self._cv.wait(0.5)
                batch = self.events[i:]
                i = len(self.events)
            for ev in batch:
                yield ev
                if ev.phase in FINAL:
                    return
