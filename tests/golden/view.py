"""What a golden run pins down: a run's results.json minus timings and node addresses, and the
SHA-256 of every tensor of its final global modules. ``python -m tests.golden.view RUN_DIR`` prints
it as JSON (how tests/golden/hfm_d2d.json was recorded)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

TIMINGS = {"wall_s", "train_s"}


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def module_digests(path: Path) -> dict[str, str]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            out[k] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return out


def golden_view(run_dir: Path) -> dict[str, Any]:
    res = json.loads((run_dir / "results.json").read_text())
    return {
        "rounds": _strip(res["rounds"]),
        "complete": res["complete"],
        "modules": module_digests(run_dir / "global_modules.safetensors"),
    }


if __name__ == "__main__":
    print(json.dumps(golden_view(Path(sys.argv[1])), indent=1, sort_keys=True))
