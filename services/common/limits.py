"""What one client may hold of a node (config ``limits``): push streams must keep moving (a deadline for
the header and between chunks), and the node caps the push streams it serves at once, per caller and
in all, and the module bytes it assembles at once. Beyond a cap the call fails at once with
RESOURCE_EXHAUSTED; a stalled stream with DEADLINE_EXCEEDED; either way its buffers are released, so
memory stays bounded under a flood of half-open streams and the server's worker threads stay free
for health checks and round control."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hffm.config import LimitsConfig
from hffm.modules import ModuleError
from services.common.metrics import Metrics

_END = object()


class TimedStream:
    """A request stream read with deadlines: the first message within ``first_s``, each next one within
    ``next_s`` (``ModuleError`` DEADLINE_EXCEEDED otherwise). gRPC's synchronous server has no
    per-message deadline, so a helper thread reads the stream and hands messages over through a queue
    of two (no more than two chunks wait); the handler waits on the queue with a timeout. ``close()``
    lets the helper go (it ends with the call)."""

    def __init__(self, requests: Iterator, first_s: float, next_s: float, what: str) -> None:
        self.first_s, self.next_s, self.what = first_s, next_s, what
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._closed = threading.Event()
        self._first = True
        self.awaiting: str | None = None  # what the next message must be, when the reader knows (a stall names it)
        self._requests = requests
        threading.Thread(target=self._pump, args=(requests,), name="push-reader", daemon=True).start()

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _pump(self, requests: Iterator) -> None:
        try:
            for r in requests:
                self._put(r)
                if self._closed.is_set():
                    return
            self._put(_END)
        except BaseException as err:  # noqa: BLE001 - the call ended (cancelled, broken): hand it over
            self._put(err)

    def __iter__(self) -> TimedStream:
        return self

    def place_into(self, placer) -> bool:
        """Have the stream read each next chunk's bytes into ``placer(index, offset, n)`` where it can
        (the bulk transport's chunk frames, ``services.common.bulk._Frames``); None stops it. False when
        the stream cannot (a gRPC call's messages arrive whole)."""
        if not hasattr(self._requests, "placer"):
            return False
        self._requests.placer = placer
        return True

    def __next__(self):
        wait = self.first_s if self._first else self.next_s
        try:
            item = self._q.get(timeout=wait)
        except queue.Empty:
            what = "its header" if self._first else self.awaiting or "its next chunk"
            raise ModuleError(
                "DEADLINE_EXCEEDED", "stream_stalled", f"{self.what}: {what} did not come within {wait:g}s"
            ) from None
        self._first = False
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()


class Admission:
    """A node's caps on concurrent push streams (per caller and in all) and on bytes being assembled."""

    def __init__(self, node_id: str, limits: LimitsConfig, metrics: Metrics) -> None:
        self.node_id, self.limits, self.metrics = node_id, limits, metrics
        self._lock = threading.Lock()
        self._streams: dict[str, int] = {}
        self._total = 0
        self._bytes = 0

    @staticmethod
    def _refuse(reason: str, message: str) -> ModuleError:
        return ModuleError("RESOURCE_EXHAUSTED", reason, message)  # counted by the receiver, by reason

    @contextmanager
    def stream(self, caller: str):
        """Hold one push stream slot for ``caller`` (RESOURCE_EXHAUSTED when none is free)."""
        with self._lock:
            mine = self._streams.get(caller, 0)
            if mine >= self.limits.max_streams_per_peer:
                raise self._refuse(
                    "too_many_streams", f"{caller} already has {mine} push streams open at {self.node_id}"
                )
            if self._total >= self.limits.max_streams:
                raise self._refuse("too_many_streams", f"{self.node_id} serves {self._total} push streams already")
            self._streams[caller] = mine + 1
            self._total += 1
            self.metrics.push_streams.labels(node=self.node_id).set(self._total)
        try:
            yield
        finally:
            with self._lock:
                self._streams[caller] -= 1
                if not self._streams[caller]:
                    del self._streams[caller]
                self._total -= 1
                self.metrics.push_streams.labels(node=self.node_id).set(self._total)

    @contextmanager
    def bytes(self, n: int, what: str):
        """Reserve ``n`` bytes of assembly for a push (RESOURCE_EXHAUSTED beyond the cap)."""
        with self._lock:
            if self._bytes + n > self.limits.max_bytes_in_flight:
                raise self._refuse(
                    "bytes_in_flight",
                    f"{what}: {n} bytes would put {self.node_id} over its {self.limits.max_bytes_in_flight} "
                    f"bytes in flight ({self._bytes} now)",
                )
            self._bytes += n
            self.metrics.push_bytes_in_flight.labels(node=self.node_id).set(self._bytes)
        try:
            yield
        finally:
            with self._lock:
                self._bytes -= n
                self.metrics.push_bytes_in_flight.labels(node=self.node_id).set(self._bytes)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"streams": self._total, "bytes": self._bytes}
