"""Round-end saves of co-hosted nodes: one file each against files shared by content.

``python -m benchmarks.checkpoints [--nodes 10] [--repeat 5] [--dir runs/bench-checkpoints]``

``--nodes`` persistors under one checkpoint directory save the same paper-size module set (38 MB fp32)
at once on a thread pool, as the devices of one process do at the end of a star or hfm cloud round;
each round's modules are new bytes (a new version), so nothing is reused across rounds. Timed: one
round's saves, from the first starting to the last finishing, fsyncs included. The two ways are taken
in turn (a, b, a, b, ...) on the same disk; the median per round and the ratio are printed.
"""

from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import interleaved, median, paper_modules
from hffm.persist import STORE, NodeState, Persistor


def compare(root: Path, nodes: int = 10, repeat: int = 5) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    mods = paper_modules()
    rounds = {"own": 0, "shared": 0}

    def way(name: str, store: bool):
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        ps = [Persistor(d / f"device-0-{i}", keep=2, store=d / STORE if store else None) for i in range(nodes)]

        def prepare() -> None:
            for m in mods.values():  # new bytes every round: a new version, as after an aggregation
                m.version += 1

        def save_all() -> None:
            rounds[name] += 1
            with ThreadPoolExecutor(nodes) as ex:
                list(ex.map(lambda p: p.save(NodeState(p.dir.name, rounds[name], mods)), ps))

        save_all.prepare = prepare  # type: ignore[attr-defined]
        return save_all

    times = interleaved({"own": way("own", False), "shared": way("shared", True)}, repeat)
    out = {k: median(v) for k, v in times.items()}
    out["ratio"] = out["shared"] / out["own"]
    out["nodes"] = nodes
    out["disk_bytes"] = {
        k: sum(f.stat().st_size for f in {p.stat().st_ino: p for p in (root / k).rglob("*") if p.is_file()}.values())
        for k in ("own", "shared")
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-checkpoints"))
    a = ap.parse_args(argv)
    r = compare(a.dir, a.nodes, a.repeat)
    print(
        f"{r['nodes']} nodes saving the 38 MB set at once: own files {r['own']:.3f} s, shared {r['shared']:.3f} s "
        f"(median per round; ratio {r['ratio']:.2f}); on disk {r['disk_bytes']['own'] / 1e6:.0f} MB vs "
        f"{r['disk_bytes']['shared'] / 1e6:.0f} MB"
    )


if __name__ == "__main__":
    main()
