"""The run's progress feed: events the coordinator publishes (registrations, rounds, the end), streamed
to every watcher from the first event on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from services.rpc import pb

FINAL = ("done", "failed")


class ProgressFeed:
    def __init__(self) -> None:
        self.events: list[pb.Progress] = []
        self._cv = threading.Condition()

    def publish(self, ev: pb.Progress) -> None:
        with self._cv:
            self.events.append(ev)
            self._cv.notify_all()

    def watch(self, active: Callable[[], bool]) -> Iterator[pb.Progress]:
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
