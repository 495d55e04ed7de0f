"""Durable node state, saved and loaded atomically.

A node's state at a round boundary is its modules (with versions and weights), the round and attempt
it completed, its RNG states, and whatever else it needs to continue (the coordinator: results so far,
membership, what every node holds), as JSON. ``Persistor.save`` writes one checkpoint directory
``<dir>/round-<r>-attempt-<a>/`` (``modules.safetensors`` + ``state.json``, and ``tensors.safetensors``
when the node keeps tensors that are not modules: the head check's claims) into a temporary
directory, fsyncs every file, renames the directory into place and fsyncs the parent: a crash at any
moment leaves either the previous checkpoint or the new one, never a mix, and a directory of that
name exists only whole. ``load()`` returns the newest complete checkpoint by (round, attempt) (or
None), ``load((r, a))`` that round end's; ``available()`` lists them. Checkpoints beyond the newest
``keep`` are removed. (Until 2026-12-02 a ``LATEST`` file also named the newest, written atomically:
two more fsyncs per save for what the names already say; a ``LATEST`` left by then is ignored.)

Every node (cloud, edge, device) saves at the end of each round it completed; a restarted node loads
the round end the coordinator names (docs/reliability.md). A new backend (object storage, a database)
is a class with the same methods.

With a ``store`` (the launcher and the services give ``<checkpoint dir>/.blobs``, shared by every node
saving under that directory), a checkpoint's ``modules.safetensors`` (and ``tensors.safetensors``) is a
hard link to a file of the store named by the BLAKE3 digest of its bytes, written (atomically, fsynced)
only when no node has saved those bytes before: devices that end a round holding the same modules
(every device of a star or hfm cloud round, ten to a process) write them once, not once each, and a node
whose modules (and claims) did not change since its last round end writes nothing but its
``state.json``. The file in the checkpoint is an ordinary file (``load`` reads it as before); a file of
the store that no checkpoint links any more is removed when a node prunes. Where the store cannot be
linked from (another file system, no hard links) the file is written into the checkpoint as without one.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_tensors

from hffm.modules import ModuleSet, checkpoint_segments, digest_of, load_modules, save_modules

MISLABELLED = "mislabelled"  # state.json extra: sender -> label_t, the senders a node's label checks flagged
# state.json extra: what the node's last label check judged by ({round, peers, here, rest}; its sums in the tensors)
LABEL_REFERENCE = "label_reference"
TENSORS = "tensors.safetensors"  # a round end's NodeState.tensors, beside its modules
STORE = ".blobs"  # the shared store's name under a checkpoint directory (beside the nodes' <node>/)


@dataclass
class NodeState:
    node: str
    round: int
    modules: ModuleSet
    rng: dict[str, Any] = field(default_factory=dict)  # rng_states() at the boundary
    extra: dict[str, Any] = field(default_factory=dict)  # JSON: results so far, membership, ...
    attempt: int = 0  # the round's attempt whose end this is
    # named tensors beside the modules that are not modules (the head check's claims), saved only when any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def valid_flags(raw: Any, ref: tuple[int, int]) -> dict[str, float]:
    """A round end's label-check flags (``extra[MISLABELLED]``) read back: sender -> its label_t (finite,
    >= 0); ValueError naming the round end otherwise (a damaged checkpoint is not half-believed)."""
    if not isinstance(raw, dict) or not all(
        isinstance(s, str) and isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < float("inf")
        for s, t in raw.items()
    ):
        raise ValueError(f"round end {ref}: {MISLABELLED} must map sender ids to finite label_t >= 0, got {raw!r}")
    return {s: float(t) for s, t in raw.items()}


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

    def __init__(
        self, directory: str | Path, keep: int = 2, store: str | Path | None = None, store_min_age_s: float = 60.0
    ) -> None:
        """``store``: the shared content-addressed directory (module docstring); None: every checkpoint
        writes its own file. ``store_min_age_s``: a store file younger than this is never removed by a
        prune (a node that just wrote it is about to link it)."""
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.store = Path(store) if store is not None else None
        self.store_min_age_s = store_min_age_s
        self._linkable = True  # False once a link from the store failed for good: no file written twice
        self.last_written = 0  # bytes of module and claim files the last save wrote (0: it linked shared files)

    @classmethod
    def in_root(cls, root: str | Path, node: str, keep: int) -> Persistor:
        """``node``'s checkpoints under a checkpoint directory: ``<root>/<node>/``, module files shared
        with every node saving there (``<root>/.blobs``)."""
        return cls(Path(root) / node, keep=keep, store=Path(root) / STORE)

    @staticmethod
    def _name(ref: tuple[int, int]) -> str:
        return f"round-{ref[0]}-attempt-{ref[1]}"

    def save(self, state: NodeState) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / self._name((state.round, state.attempt))
        tmp = self.dir / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.store is None or not self._linkable:
            save_modules(state.modules, str(tmp / "modules.safetensors"))
            self.last_written = (tmp / "modules.safetensors").stat().st_size
        else:
            self.last_written = self._save_shared(checkpoint_segments(state.modules), tmp / "modules.safetensors")
        doc = {
            "node": state.node,
            "round": state.round,
            "attempt": state.attempt,
            "rng": state.rng,
            "extra": state.extra,
        }
        (tmp / "state.json").write_text(json.dumps(doc))
        if state.tensors and (self.store is None or not self._linkable):
            save_file(state.tensors, str(tmp / TENSORS))
            self.last_written += (tmp / TENSORS).stat().st_size
        elif state.tensors:  # the head check's claims change only when statistics come: mostly the same bytes
            self.last_written += self._save_shared((save_tensors(state.tensors),), tmp / TENSORS)
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

    def _save_shared(self, segments: tuple[bytes | memoryview, ...], target: Path) -> int:
        """``target`` (a file whose bytes are ``segments``, in order) as a hard link to the store's file of these
        bytes, written first when missing; the bytes this call wrote."""
        assert self.store is not None
        blob = self.store / f"{digest_of(segments).hex()}.safetensors"
        written = 0
        for _ in range(3):  # a prune elsewhere may remove a file between our write (or check) and our link
            if not blob.exists():
                self.store.mkdir(parents=True, exist_ok=True)
                # nodes saving the same bytes at once (a process's devices after a cloud round) wait for
                # the first to write them instead of each writing its own copy; the lock only saves work:
                # the file appears by an atomic rename whoever writes it
                with open(self.store / f".{blob.stem}.lock", "a+b") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not blob.exists():
                        part = self.store / f".{blob.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                        with open(part, "wb") as f:
                            for seg in segments:
                                f.write(seg)
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(part, blob)
                        _fsync_dir(self.store)
                        written += sum(len(seg) for seg in segments)
            try:
                os.link(blob, target)
                return written
            except FileNotFoundError:
                continue
            except OSError:  # another file system, no hard links: a file of its own, from now on
                self._linkable = False
                break
        with open(target, "wb") as f:
            for seg in segments:
                f.write(seg)
        return written + target.stat().st_size

    def _prune_store(self) -> None:
        """Remove the store's files no checkpoint links any more (link count 1: the store's own name)."""
        if self.store is None or not self.store.is_dir():
            return
        now = time.time()
        for f in [*self.store.glob("*.safetensors"), *self.store.glob(".*.lock")]:
            try:
                st = f.stat()
                if now - st.st_mtime < self.store_min_age_s:
                    continue
                if f.suffix == ".lock" and not (self.store / f"{f.name[1:-5]}.safetensors").exists():
                    f.unlink()  # its file is gone (a late locker only writes that file again)
                elif f.suffix == ".safetensors" and st.st_nlink == 1:
                    f.unlink()
            except FileNotFoundError:  # another node's prune got there first
                pass

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
            load_file(str(d / TENSORS)) if (d / TENSORS).is_file() else {},
        )

    def _prune(self, newest: str) -> None:
        for ref in self.available()[: -self.keep]:
            if self._name(ref) != newest:
                shutil.rmtree(self.dir / self._name(ref), ignore_errors=True)
        self._prune_store()
