"""The cost of security: an hfm round with mTLS and signed pushes (the default) against the same round in
plaintext, side by side in one run.

N devices in 10 clusters (N/10 per edge), a no-op local step (every exchange kept, the paper-size module
set is not used: the tiny default modules, so the per-call costs of TLS and signing are not hidden behind
bulk transfer), no evaluation, 4 rounds. Round 1 is left out (it opens the channels: TLS handshakes);
the figure is the median of rounds 2-4. The two runs alternate (off, on, off, on) so load bursts on this
shared machine hit both; the ratio is median(on) / median(off) over both pairs' rounds.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from benchmarks.common import median
from benchmarks.devices import sweep_config
from services.launcher import run

TARGET_RATIO = 1.10  # a round with security on within 10 % of one without


def one(n: int, tls: bool, out: Path) -> list[float]:
    cfg = sweep_config(n, 4, "train.eval_every=0", f"security.tls={'true' if tls else 'false'}")
    res = run(cfg, out, Console(file=io.StringIO()), timeout_s=1200, force=True)
    return [r["wall_s"] for r in res["rounds"][1:]]


def run_pair(n: int, out: Path, pairs: int = 2) -> dict:
    on: list[float] = []
    off: list[float] = []
    for i in range(pairs):
        off += one(n, False, out / f"security-{n}-off-{i}")
        on += one(n, True, out / f"security-{n}-on-{i}")
    return {
        "devices": n,
        "round_s_tls": median(on),
        "round_s_plaintext": median(off),
        "ratio": median(on) / median(off),
        "rounds_tls": on,
        "rounds_plaintext": off,
        "target": TARGET_RATIO,
    }


def run_all(out: Path, quick: bool, log=print) -> dict:
    n = 4 if quick else 40
    log(f"security: a round with mTLS + signed pushes vs plaintext, {n} devices...")
    return run_pair(n, out, pairs=1 if quick else 2)
