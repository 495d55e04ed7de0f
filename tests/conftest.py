"""Shared fixtures: small configs and helpers to build modules."""

from __future__ import annotations

import pytest
import torch

from hffm.config import load_config
from hffm.modules import Module


@pytest.fixture
def small_cfg():
    return load_config(
        None,
        [
            "topology.edges=2",
            "topology.devices_per_edge=2",
            "rounds=2",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.intermediate_size=64",
            "model.bottleneck=16",
            "model.head_hidden=32",
            "data.train_per_task=160",
            "data.local_test_per_device=16",
            "data.global_test_per_task=32",
        ],
    )


def make_module(
    name: str, shapes: dict[str, tuple[int, ...]], version: int = 1, num_samples: float = 1.0, seed: int = 0
) -> Module:
    g = torch.Generator().manual_seed(seed)
    return Module(name, {k: torch.randn(*s, generator=g) for k, s in shapes.items()}, version, num_samples)


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (read from /proc: never truncated)."""
    import os
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if marker in args and "zombie" not in state:
            out.append(args)
    return out
