"""A run's identity and provenance, and its folder: an id, the start time, the hffm version and commit
(results.json ``run``), totals over its rounds (``totals``), one run per folder (``claim_run_dir``: a
folder holding an earlier run is refused unless forced; a folder a live run holds is always refused),
and the summary ``hffm runs`` lists."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# What an hffm run writes in its folder: --force removes these and nothing else.
RUN_FILES = (
    "run.json",
    "results.json",
    "results.png",
    "global_modules.safetensors",
    "config.yaml",
    "processes.json",
    "logs",
    "state",
    "pki",
    "prometheus",
    "trace",
)
LOCK = ".lock"
# What may be prepared before a run (a CA, a Prometheus config): not by itself an earlier run.
PREPARED = ("pki", "prometheus", "trace")


class RunDirError(RuntimeError):
    """The run folder cannot be used; the message says why and what to do."""


def new_run_id(method: str, when: datetime | None = None) -> str:
    """``<UTC yyyymmdd-HHMMSS>-<method>-<4 hex>``: sortable by time, says what ran, unique."""
    when = when or datetime.now(UTC)
    return f"{when:%Y%m%d-%H%M%S}-{method}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """hffm's version and the commit of the code that ran (``HFFM_COMMIT`` where there is no git
    checkout, e.g. an image built with it; None when unknown), and whether the checkout had changes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hffm")
    except PackageNotFoundError:
        ver = None
    commit, dirty = os.environ.get("HFFM_COMMIT") or None, None
    if commit is None:
        here = Path(__file__).resolve().parent.parent
        try:
            commit = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"hffm_version": ver, "commit": commit, "dirty": dirty}


def run_record(run_id: str, started: str) -> dict[str, Any]:
    """results.json ``run``: which run this is, when it started and what code ran it."""
    return {"id": run_id, "started": started, **provenance()}


def totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json ``totals``: sums over the rounds done, and the last evaluated round's mean global
    accuracy. Modeled figures are the cost model's (units in the key)."""
    evaluated = [r for r in rounds if r.get("accuracy")]
    final = None
    if evaluated:
        vals = [s["global"] for s in evaluated[-1]["accuracy"].values() if s.get("global") is not None]
        final = sum(vals) / len(vals) if vals else None
    return {
        "rounds": len(rounds),
        "bytes": int(sum(r.get("bytes_total", 0) for r in rounds)),
        "wall_s": float(sum(r.get("wall_s", 0.0) for r in rounds)),
        "modeled_latency_s": float(sum(r.get("modeled", {}).get("latency_s", 0.0) for r in rounds)),
        "modeled_energy_j": float(sum(r.get("modeled", {}).get("energy_j", 0.0) for r in rounds)),
        "final_global_accuracy": final,
    }


# ---- the folder ---------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run folder for as long as its run lives (``flock``: released by the
    kernel when the process dies, so a crashed run never leaves a stale lock)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"{self.path.parent}: a run is in progress there (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def held(out: Path) -> bool:
        p = out / LOCK
        if not p.exists():
            return False
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def claim_run_dir(out: Path, force: bool = False, resume: bool = False) -> RunLock:
    """Make ``out`` this run's folder and lock it. A folder a live run holds is refused; one holding an
    earlier run is refused unless ``force`` (then that run's files go) or ``resume``; one holding
    anything else is refused (``force`` never deletes what hffm did not write)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"--out {out}: cannot make the folder ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise RunDirError(f"--out {out}: not writable")
    lock = RunLock(out).acquire()
    if resume:
        return lock
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    foreign = [n for n in present if n not in RUN_FILES]
    if foreign:
        lock.release()
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunDirError(f"--out {out}: holds files that are not an hffm run's ({shown}); choose a new folder")
    earlier = [n for n in present if n not in PREPARED]
    if earlier and not force:
        lock.release()
        raise RunDirError(
            f"--out {out}: holds an earlier run ({', '.join(earlier[:4])}); choose a new folder, "
            "--force to replace it, or --resume to continue it"
        )
    for name in present if force else ():
        p = out / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return lock


def write_run_json(out: Path, info: dict[str, Any]) -> None:
    from hffm.results import atomic_write_bytes

    atomic_write_bytes(out / "run.json", json.dumps(info, indent=1).encode())


def summarize(out: Path) -> dict[str, Any] | None:
    """What ``hffm runs`` shows of one folder (None: not a run folder)."""
    run_json, results_json = out / "run.json", out / "results.json"
    if not run_json.is_file() and not results_json.is_file():
        return None
    info: dict[str, Any] = {}
    results: dict[str, Any] = {}
    try:
        info = json.loads(run_json.read_text()) if run_json.is_file() else {}
        results = json.loads(results_json.read_text()) if results_json.is_file() else {}
    except (OSError, json.JSONDecodeError):
        pass
    cfg = results.get("config") or {}
    status = info.get("status", "unknown")
    if RunLock.held(out):
        status = "running"
    elif results.get("complete"):
        status = "complete"
    elif status == "running":  # its launcher died without saying so
        status = "stopped"
    t = results.get("totals") or totals(results.get("rounds", []))
    return {
        "id": info.get("id") or (results.get("run") or {}).get("id") or out.name,
        "folder": str(out),
        "method": info.get("method") or cfg.get("method"),
        "status": status,
        "started": info.get("started") or (results.get("run") or {}).get("started"),
        "rounds": f"{t['rounds']}/{cfg.get('rounds', '?')}",
        "final_global_accuracy": t.get("final_global_accuracy"),
        "mb": t["bytes"] / 1e6,
        "wall_s": t["wall_s"],
        "data": (cfg.get("data") or {}).get("source", "synthetic"),
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    rows = [s for d in sorted(root.iterdir()) if d.is_dir() and (s := summarize(d)) is not None]
    return sorted(rows, key=lambda s: s.get("started") or "")
