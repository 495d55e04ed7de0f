"""Durable node state, saved and loaded atomically.

A node's state at a round boundary is its modules (with versions and weights), the round it
completed, its RNG states, and whatever else it needs to continue (the coordinator: results so far
and membership), as JSON. ``Persistor.save`` writes one checkpoint directory
``<dir>/round-<r>/`` (``modules.safetensors`` + ``state.json``) into a temporary directory, fsyncs
every file, renames the directory into place and fsyncs the parent, then points ``LATEST`` at it the
same way: a crash at any moment leaves either the previous checkpoint or the new one, never a mix.
``load`` returns the newest complete checkpoint (or None). Old checkpoints beyond ``keep`` are removed.

The cloud saves its final state through it today; the fault-tolerance issue saves every node's state
at every round boundary and resumes from ``load``. A new backend (object storage, a database) is a
class with the same two methods.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hffm.modules import ModuleSet, load_modules, save_modules
from hffm.results import atomic_write_bytes

LATEST = "LATEST"


@dataclass
class NodeState:
    node: str
    round: int
    modules: ModuleSet
    rng: dict[str, Any] = field(default_factory=dict)  # rng_states() at the boundary
    extra: dict[str, Any] = field(default_factory=dict)  # JSON: results so far, membership, ...


def rng_states() -> dict[str, Any]:
    """Python's, numpy's legacy and torch's CPU RNG states, as JSON."""
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    import torch

    if "python" in states:
        v, s, g = states["python"]
        random.setstate((v, tuple(s), g))
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "torch" in states:
        torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Persistor:
    """Checkpoints of one node under ``directory`` (one directory per node)."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def save(self, state: NodeState) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"round-{state.round}"
        tmp = self.dir / f".round-{state.round}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_modules(state.modules, str(tmp / "modules.safetensors"))
        doc = {"node": state.node, "round": state.round, "rng": state.rng, "extra": state.extra}
        (tmp / "state.json").write_text(json.dumps(doc))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same round saved again (a retried boundary): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        atomic_write_bytes(self.dir / LATEST, final.name.encode())
        self._prune(final.name)
        return final

    def load(self) -> NodeState | None:
        """The newest complete checkpoint, or None when there is none."""
        latest = self.dir / LATEST
        if not latest.is_file():
            return None
        d = self.dir / latest.read_text().strip()
        doc = json.loads((d / "state.json").read_text())
        modules = load_modules(str(d / "modules.safetensors"))
        return NodeState(doc["node"], int(doc["round"]), modules, doc.get("rng", {}), doc.get("extra", {}))

    def _prune(self, newest: str) -> None:
        done = sorted((p for p in self.dir.glob("round-*") if p.is_dir()), key=lambda p: int(p.name.split("-", 1)[1]))
        for p in done[: -self.keep]:
            if p.name != newest:
                shutil.rmtree(p, ignore_errors=True)
