"""Failpoints: a node kills or stops its own process at a named point of a round, so a fault scenario
hits exactly the phase it names (the pattern of etcd's gofail and TiKV's fail-rs).

``HFFM_FAILPOINTS`` (environment, read at the first ``hit``, not at import: a process forked from the
launcher's zygote has its own environment by then): comma-separated ``node:point:round:action`` with action
``kill`` (SIGKILL: no cleanup, no goodbye) or ``stop`` (SIGSTOP: the process hangs until someone sends
SIGCONT). Each fires once per process. Unset (every real run): ``hit`` is a dictionary lookup.

Points (where the code calls ``hit``):

| point | where |
|---|---|
| ``train`` | a device starts its local training |
| ``send.<tag>`` | a push to collect step ``<tag>`` is mid-stream, never whole at the receiver (``push_requests``) |
| ``relay`` | a device starts relaying a D2D push for a peer |
| ``collect.<tag>`` | a node starts waiting in collect step ``<tag>`` |
| ``collected.<tag>`` | collect step ``<tag>`` has every push it waits for, before it aggregates |
| ``round_end`` | the cloud saved its checkpoint of the round, before the next one starts |
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("hffm.faults")

ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def parse(spec: str) -> dict[tuple[str, str, int], str]:
    """``node:point:round:action,...`` -> {(node, point, round): action}; ValueError names the bad item."""
    table: dict[tuple[str, str, int], str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 4 or not parts[2].isdigit() or parts[3] not in ACTIONS:
            raise ValueError(f"HFFM_FAILPOINTS: {item!r} is not node:point:round:{'|'.join(ACTIONS)}")
        table[(parts[0], parts[1], int(parts[2]))] = parts[3]
    return table


_TABLE: dict[tuple[str, str, int], str] | None = None
_LOCK = threading.Lock()


def hit(node: str, point: str, round_: int) -> None:
    """Fire the failpoint ``(node, point, round_)`` if one is set (once)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = parse(os.environ.get("HFFM_FAILPOINTS", ""))
    if not _TABLE:
        return
    with _LOCK:
        action = _TABLE.pop((node, point, round_), None)
    if action is None:
        return
    log.warning("failpoint %s:%s:%d: %s", node, point, round_, action)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    # To this thread, not the process: a process-directed SIGSTOP is taken by the main thread, which may
    # not run for a while on a busy machine, and until it does this thread goes on (a push's last chunk
    # reached its receiver before the process stopped, seen in CI). Taken by this thread, the signal
    # stops the whole process before the call returns; SIGKILL ends every thread either way.
    signal.pthread_kill(threading.get_ident(), ACTIONS[action])
