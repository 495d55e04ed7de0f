"""Durable node state, saved and loaded atomically.

A node's state at a round boundary is its modules (with versions and weights), the round and attempt
it completed, its RNG states, and whatever else it needs to continue (the coordinator: results so far,
membership, what every node holds), as JSON. ``Persistor.save`` writes one checkpoint directory
``<dir>/round-<r>-attempt-<a>/`` (``modules.safetensors`` + ``state.json``) into a temporary
directory, fsyncs every file, renames the directory into place and fsyncs the parent: a crash at any
moment leaves either the previous checkpoint or the new one, never a mix, and a directory of that
name exists only whole. ``load()`` returns the newest complete checkpoint by (round, attempt) (or
None), ``load((r, a))`` that round end's; ``available()`` lists them. Checkpoints beyond the newest
``keep`` are removed. (Until 2026-12-02 a ``LATEST`` file also named the newest, written atomically:
two more fsyncs per save for what the names already say; a ``LATEST`` left by then is ignored.)

Every node (cloud, edge, device) saves at the end of each round it completed; a restarted node loads
the round end the coordinator names (docs/reliability.md). A new backend (object storage, a database)
is a class with the same methods.
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


@dataclass
class NodeState:
    node: str
    round: int
    modules: ModuleSet
    rng: dict[str, Any] = field(default_factory=dict)  # rng_states() at the boundary
    extra: dict[str, Any] = field(default_factory=dict)  # JSON: results so far, membership, ...
    attempt: int = 0  # the round's attempt whose end this is


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

    @staticmethod
    def _name(ref: tuple[int, int]) -> str:
        return f"round-{ref[0]}-attempt-{ref[1]}"

    def save(self, state: NodeState) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / self._name((state.round, state.attempt))
        tmp = self.dir / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_modules(state.modules, str(tmp / "modules.safetensors"))
        doc = {
            "node": state.node,
            "round": state.round,
            "attempt": state.attempt,
            "rng": state.rng,
            "extra": state.extra,
        }
        (tmp / "state.json").write_text(json.dumps(doc))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same round saved again (a retried boundary): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._prune(final.name)
        return final

    def available(self) -> list[tuple[int, int]]:
        """(round, attempt) of every complete checkpoint, oldest first."""
        refs = []
        for p in self.dir.glob("round-*-attempt-*"):
            parts = p.name.split("-")
            if p.is_dir() and (p / "state.json").is_file() and parts[1].isdigit() and parts[3].isdigit():
                refs.append((int(parts[1]), int(parts[3])))
        return sorted(refs)

    def load(self, ref: tuple[int, int] | None = None) -> NodeState | None:
        """The newest complete checkpoint (``ref``: that round end's), or None when there is none."""
        if ref is None:
            refs = self.available()
            if not refs:
                return None
            ref = refs[-1]
        d = self.dir / self._name(ref)
        if not (d / "state.json").is_file():
            return None
        doc = json.loads((d / "state.json").read_text())
        modules = load_modules(str(d / "modules.safetensors"))
        return NodeState(
            doc["node"],
            int(doc["round"]),
            modules,
            doc.get("rng", {}),
            doc.get("extra", {}),
            int(doc.get("attempt", 0)),
        )

    def _prune(self, newest: str) -> None:
        for ref in self.available()[: -self.keep]:
            if self._name(ref) != newest:
                shutil.rmtree(self.dir / self._name(ref), ignore_errors=True)
