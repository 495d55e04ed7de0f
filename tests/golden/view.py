"""What a golden run pins down: a run's results.json minus timings and node addresses, and the
SHA-256 and L2 norm of every tensor of its final global modules, with the platform it ran on.
``python -m tests.golden.view RUN_DIR`` prints it as JSON (how tests/golden/hfm_d2d.json was recorded:
then add the run's ``sets``).

Learned values (loss, accuracies, module tensors) are bit-exact only on one kernel path: MKL, oneDNN
and ATen pick instruction-set-specific kernels by CPU, whose float rounding differs in the last bits,
and training amplifies that (an AVX2 AMD EPYC and the AVX-512 machine the first record came from
agree on every byte count and hop, and on the loss to 7 digits). ``platform`` says which path a view
came from; everything else about a run (bytes, hops, modeled latency and energy, who aggregated
what) is the same on every machine."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

TIMINGS = {"wall_s", "train_s"}
KERNEL_ENV = ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
# per round: values of training, which differ in float rounding by platform
LEARNED = {"loss", "accuracy", "node_accuracy"}


def _strip(x: Any, drop: set[str]) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v, drop) for k, v in x.items() if k not in drop}
    if isinstance(x, list):
        return [_strip(v, drop) for v in x]
    return x


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or "unknown"


def platform_fingerprint() -> dict[str, str]:
    """What decides the kernels, hence the float rounding, of a CPU run: architecture, CPU model, the
    vector instructions torch dispatches to, torch's build, and the variables that pin MKL's and
    oneDNN's kernels where set (``MKL_CBWR=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``: each changes the bits)."""
    import os

    import torch

    return {
        "arch": _platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }


def module_digests(path: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Every tensor's SHA-256 (bit-exact) and L2 norm (comparable across platforms)."""
    digests, norms = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            digests[k] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
            norms[k] = float(t.double().norm())
    return digests, norms


def golden_view(run_dir: Path) -> dict[str, Any]:
    res = json.loads((run_dir / "results.json").read_text())
    digests, norms = module_digests(run_dir / "global_modules.safetensors")
    return {
        "rounds": _strip(res["rounds"], TIMINGS),
        "complete": res["complete"],
        "modules": digests,
        "module_norms": norms,
        "platform": platform_fingerprint(),
    }


def structural(view: dict[str, Any]) -> dict[str, Any]:
    """The part of a view that is the same on every platform: rounds without learned values."""
    return {"rounds": _strip(view["rounds"], LEARNED), "complete": view["complete"]}


if __name__ == "__main__":
    print(json.dumps(golden_view(Path(sys.argv[1])), indent=1, sort_keys=True))
