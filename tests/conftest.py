"""Shared fixtures: small configs and helpers to build modules."""

from __future__ import annotations

import pytest
import torch

from hffm.config import load_config
from hffm.modules import Module


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory):
    """A federation CA with a key and certificate for every node id up to 10 edges x 10 devices, and the
    operator (what hffm run makes for one run): tests that build nodes directly run with mTLS too."""
    from hffm.model import backbone_dims
    from hffm.topology import Topology
    from services.launcher import provision_pki

    cfg = load_config(None, ["topology.edges=10", "topology.devices_per_edge=10"])
    return provision_pki(cfg, Topology.from_config(cfg, backbone_dims(cfg)[1]), tmp_path_factory.mktemp("pki"))


@pytest.fixture
def small_cfg(pki_dir):
    return load_config(
        None,
        [
            f"security.dir={pki_dir}",
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


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """The golden hfm-d2d run (tests/golden/hfm_d2d.json's config), once per session: ``(record, view of
    this run, run dir)``. tests/test_golden.py compares it to the record; tests/test_attacks.py holds an
    attacked run on this machine to it bit for bit."""
    import io
    import json
    from pathlib import Path

    from rich.console import Console

    from services.launcher import run
    from tests.golden.view import golden_view

    golden = json.loads((Path(__file__).parent / "golden" / "hfm_d2d.json").read_text())
    out = tmp_path_factory.mktemp("golden")
    run(load_config(None, golden["sets"]), out, Console(file=io.StringIO(), width=120), timeout_s=300)
    return golden, golden_view(out), out
