"""The groundwork the next capabilities plug into: layering (the core imports no service, planning no
torch or gRPC), one vocabulary, membership as data, quorum plans, the persistor, config descriptions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hffm.config import HFFMConfig, load_config
from hffm.costmodel import CostModel
from hffm.ids import AGGREGATION_RULES, METHODS, NodeId, device_id, parse_node_id, role_of
from hffm.methods import REGISTRY, Calibrate, Collect, Quorum, Send, Stats, Train
from hffm.persist import NodeState, Persistor, rng_states, set_rng_states
from hffm.planner import Planner
from hffm.topology import Topology
from tests.conftest import make_module

ROOT = Path(__file__).resolve().parent.parent


# ---- layering ----------------------------------------------------------------------------------
def test_the_core_imports_neither_services_nor_benchmarks():
    offenders = []
    for f in sorted((ROOT / "hffm").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("services", "benchmarks", "hffm_cli")]
    assert offenders == []


def test_planning_imports_no_torch_and_no_grpc():
    code = (
        "import sys, hffm.methods, hffm.circulation, hffm.topology, hffm.planner, hffm.ids, hffm.config;"
        "bad = [m for m in ('torch', 'grpc') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- one vocabulary --------------------------------------------------------------------------------
def test_one_list_of_methods_and_rules():
    from hffm.aggregation import RULES

    assert tuple(REGISTRY) == METHODS
    assert tuple(RULES) == AGGREGATION_RULES
    assert HFFMConfig.model_fields["method"].description.endswith(" | ".join(METHODS))


@pytest.mark.parametrize(
    "node, parsed", [("cloud", NodeId("cloud")), ("edge-3", NodeId("edge", 3)), ("device-2-7", NodeId("device", 2, 7))]
)
def test_node_ids_parse_and_format_in_one_place(node, parsed):
    assert parse_node_id(node) == parsed and str(parsed) == node and role_of(node) == parsed.role


@pytest.mark.parametrize("bad", ["edge", "edge-x", "device-1", "device-1-2-3", "Cloud", ""])
def test_malformed_node_ids_are_refused(bad):
    with pytest.raises(ValueError, match="not a node id"):
        parse_node_id(bad)
    assert role_of(bad) == "unknown"


# ---- membership is data ----------------------------------------------------------------------------
def _topo(**sets) -> Topology:
    cfg = load_config(
        None, [f"{k}={v}" for k, v in {"topology.edges": 2, "topology.devices_per_edge": 2, **sets}.items()]
    )
    return Topology.from_config(cfg, 2)


def test_membership_changes_between_rounds():
    t = _topo()
    joined = t.with_device(device_id(0, 9), "edge-1", ("art",))
    assert joined.device_map["device-0-9"].edge == "edge-1" and joined.device_map["device-0-9"].index == 4
    assert [d.id for d in joined.cluster("edge-1")] == ["device-1-0", "device-1-1", "device-0-9"]
    assert joined.holders("gqa") == t.holders("gqa")  # the newcomer holds art only: nobody else moves
    moved = joined.rehome("device-0-0", "edge-1")
    assert [d.id for d in moved.cluster("edge-0")] == ["device-0-1"]
    assert moved.device_map["device-0-0"].tasks == t.device_map["device-0-0"].tasks
    left = moved.without({"device-0-1"})
    assert left.cluster("edge-0") == [] and left.modules_for("edge-0") == left.adapters()
    for bad, match in (
        (lambda: t.with_device("device-0-0", "edge-0", ("art",)), "already"),
        (lambda: t.with_device("edge-5", "edge-0", ("art",)), "not a device"),
        (lambda: t.with_device("device-5-0", "edge-9", ("art",)), "no edge"),
        (lambda: t.with_device("device-5-0", "edge-0", ("vqa",)), "tasks"),
        (lambda: t.rehome("device-7-7", "edge-0"), "not a member"),
    ):
        with pytest.raises(ValueError, match=match):
            bad()


def _planner(method: str, **sets) -> tuple[Planner, Topology]:
    cfg = load_config(
        None,
        [f"method={method}", "topology.edges=2", "topology.devices_per_edge=2", *(f"{k}={v}" for k, v in sets.items())],
    )
    topo = Topology.from_config(cfg, 2)
    return Planner(cfg, CostModel(cfg, topo)), topo


def test_hfm_with_an_empty_cluster_plans_no_stale_upload():
    """Every device of edge-1 is left out: edge-1 sits the round out instead of pushing its round-0
    modules to the cloud (which the cloud's version check refused, failing the run)."""
    planner, topo = _planner("hfm", e_agg=1)
    planned = planner.plan(1, topo, down={"device-1-0", "device-1-1"})
    assert "edge-1" not in planned.plan.steps
    cloud = [s for s in planned.plan.steps["cloud"] if isinstance(s, Collect)]
    assert [c.senders for c in cloud] == [("edge-0",)]
    assert set(planned.left_out) == {"device-1-0", "device-1-1"}


def test_the_config_quorum_reaches_every_collect_of_device_updates_and_caps_follow_registered_samples():
    planner, topo = _planner(
        "hfm", **{"aggregation.quorum.min_fraction": 0.5, "aggregation.quorum.deadline_s": 30, "e_agg": 1}
    )
    samples = {d.id: {"art": 10 + i, "gqa": 5} for i, d in enumerate(topo.devices)}
    plan = planner.plan(1, topo, samples=samples).plan
    collects = plan.collects()
    assert collects and all(c.rule == "fedavg" for _, c in collects)
    # devices' own updates: the quorum; aggregates (edges' to the cloud) and broadcasts: every sender
    updates = [c for n, c in collects if n.startswith("edge") and c.tag == "aggregate"]
    assert len(updates) == 2 and all(c.quorum == Quorum(0, 0.5, 30.0) for c in updates)
    assert all(c.quorum == Quorum() for _, c in collects if not any(c is u for u in updates))
    edge0 = next(c for n, c in collects if n == "edge-0" and c.tag == "aggregate")
    caps = edge0.caps_of("device-0-1")
    assert caps == {"adapter.0": 16.0, "adapter.1": 16.0, "head.art": 11.0, "head.gqa": 5.0}
    cloud = next(c for n, c in collects if n == "cloud")
    assert cloud.caps_of("edge-0")["head.art"] == 10 + 11 + 12 + 13  # an aggregate: at most everyone's
    assert Quorum(0, 0.5).needed(3) == 2 and Quorum(2, 0.1).needed(3) == 2 and Quorum().needed(4) == 4


def test_the_quorum_travels_through_protobuf_unchanged():
    from services.common.convert import step_from_pb, step_to_pb

    c = Collect(
        "aggregate",
        ("a", "b"),
        "device_edge",
        False,
        "fedavg",
        (("beta", 0.1),),
        Quorum(1, 0.5, 2.5),
        (("a", (("adapter.0", 3.0),)), ("b", (("adapter.0", 4.0),))),
    )
    assert step_from_pb(step_to_pb(c)) == c
    assert step_from_pb(step_to_pb(Collect("x", ("a",), "d2d"))) == Collect("x", ("a",), "d2d")
    assert step_from_pb(step_to_pb(Train())) == Train()
    assert step_from_pb(step_to_pb(Stats(("art", "gqa")))) == Stats(("art", "gqa"))
    assert step_from_pb(step_to_pb(Calibrate(("gqa",)))) == Calibrate(("gqa",))
    assert step_from_pb(step_to_pb(Send("e", "device_edge", "t", ("adapter.0",), ("r",)))) == Send(
        "e", "device_edge", "t", ("adapter.0",), ("r",)
    )


# ---- the persistor ----------------------------------------------------------------------------------
def test_persistor_round_trips_modules_rng_and_extra(tmp_path):
    p = Persistor(tmp_path / "cloud", keep=2)
    assert p.load() is None
    mods = {"adapter.0": make_module("adapter.0", {"w": (3, 2)}, version=4, num_samples=7.5)}
    torch.manual_seed(123)
    states = rng_states()
    want = torch.rand(3)
    p.save(NodeState("cloud", 4, mods, states, {"rounds": [{"round": 4}]}))
    got = p.load()
    assert got is not None and got.round == 4 and got.extra == {"rounds": [{"round": 4}]}
    assert torch.equal(got.modules["adapter.0"].tensors["w"], mods["adapter.0"].tensors["w"])
    assert got.modules["adapter.0"].version == 4 and got.modules["adapter.0"].num_samples == 7.5
    torch.manual_seed(999)
    set_rng_states(json.loads(json.dumps(got.rng)))  # through JSON, as on disk
    assert torch.equal(torch.rand(3), want)


def test_persistor_keeps_the_previous_checkpoint_when_a_save_dies_midway(tmp_path, monkeypatch):
    p = Persistor(tmp_path / "edge-0", keep=2)
    mods = {"adapter.0": make_module("adapter.0", {"w": (2, 2)}, version=1)}
    p.save(NodeState("edge-0", 1, mods))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("hffm.persist.save_modules", crash)
    with pytest.raises(OSError):
        p.save(NodeState("edge-0", 2, mods))
    assert p.load().round == 1  # the half-written round 2 never became visible
    monkeypatch.undo()
    for r in (2, 3, 4):
        p.save(NodeState("edge-0", r, mods))
    assert p.load().round == 4
    assert sorted(d.name for d in (tmp_path / "edge-0").glob("round-*")) == [
        "round-3-attempt-0",
        "round-4-attempt-0",
    ]
    p.save(NodeState("edge-0", 4, mods, attempt=1))  # a re-run attempt of round 4 is a round end of its own
    assert p.available() == [(4, 0), (4, 1)] and p.load().attempt == 1 and p.load((4, 0)).attempt == 0
    assert p.load((3, 0)) is None


def _store_files(store: Path) -> list[Path]:
    return sorted(store.glob("*.safetensors"))


def test_nodes_saving_the_same_modules_share_one_file_written_once(tmp_path, monkeypatch):
    """Ten devices of one process ending a round with the same modules (a cloud round's broadcast), saving
    at once: one write of the bytes, ten checkpoints linking it; each loads its modules back whole."""
    from concurrent.futures import ThreadPoolExecutor

    import hffm.persist as persist

    store = tmp_path / ".blobs"
    ps = [Persistor(tmp_path / f"device-0-{i}", keep=2, store=store) for i in range(10)]
    mods = {"adapter.0": make_module("adapter.0", {"w": (64, 32)}, version=3, num_samples=5.0)}
    writes = []
    real_replace = persist.os.replace
    monkeypatch.setattr(persist.os, "replace", lambda a, b: (writes.append(Path(b)), real_replace(a, b))[1])
    with ThreadPoolExecutor(10) as ex:
        list(ex.map(lambda p: p.save(NodeState(p.dir.name, 1, mods)), ps))
    assert [w.parent for w in writes].count(store) == 1  # the bytes written once, by whichever came first
    (blob,) = _store_files(store)
    assert blob.stat().st_nlink == 11  # the store's name and ten checkpoints
    for p in ps:
        got = p.load()
        f = p.dir / "round-1-attempt-0" / "modules.safetensors"
        assert f.stat().st_ino == blob.stat().st_ino
        assert torch.equal(got.modules["adapter.0"].tensors["w"], mods["adapter.0"].tensors["w"])
        assert got.modules["adapter.0"].version == 3 and got.modules["adapter.0"].num_samples == 5.0
    # other modules are other bytes: another file; a node whose modules did not change writes nothing
    other = {"adapter.0": make_module("adapter.0", {"w": (64, 32)}, version=4)}
    ps[0].save(NodeState("device-0-0", 2, other))
    ps[1].save(NodeState("device-0-1", 2, mods))
    assert len(_store_files(store)) == 2 and [w.parent for w in writes].count(store) == 2


def test_the_store_forgets_files_no_checkpoint_links(tmp_path):
    store = tmp_path / ".blobs"
    a = Persistor(tmp_path / "edge-0", keep=1, store=store, store_min_age_s=0)
    b = Persistor(tmp_path / "edge-1", keep=1, store=store, store_min_age_s=0)
    m1 = {"adapter.0": make_module("adapter.0", {"w": (4, 4)}, version=1)}
    m2 = {"adapter.0": make_module("adapter.0", {"w": (4, 4)}, version=2)}
    a.save(NodeState("edge-0", 1, m1))
    b.save(NodeState("edge-1", 1, m1))
    a.save(NodeState("edge-0", 2, m2))  # edge-0's round 1 pruned; edge-1 still links m1's file
    assert len(_store_files(store)) == 2
    b.save(NodeState("edge-1", 2, m2))  # nobody links m1's file now: gone, with its lock
    (left,) = _store_files(store)
    assert left.stat().st_nlink == 3 and len(list(store.glob(".*.lock"))) == 1
    young = Persistor(tmp_path / "edge-2", keep=1, store=store)  # the default: a young file is never removed
    young.save(NodeState("edge-2", 1, m1))
    young.save(NodeState("edge-2", 2, m2))
    assert len(_store_files(store)) == 2


def test_a_checkpoint_is_written_whole_where_the_store_cannot_be_linked(tmp_path, monkeypatch):
    """A store on another file system (no hard link possible), or one whose file a prune elsewhere removed
    between the check and the link: the checkpoint holds its own file, and loads."""
    import errno

    import hffm.persist as persist

    store = tmp_path / ".blobs"
    p = Persistor(tmp_path / "device-0-0", keep=2, store=store)
    mods = {"adapter.0": make_module("adapter.0", {"w": (8, 8)}, version=1)}
    real_link = persist.os.link

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(persist.os, "link", cross_device)
    p.save(NodeState("device-0-0", 1, mods))
    p.save(NodeState("device-0-0", 2, mods))  # the store is not tried again: nothing written twice
    assert len(_store_files(store)) == 1
    p = Persistor(tmp_path / "device-0-0", keep=2, store=store)  # a fresh start tries it again
    f = p.dir / "round-1-attempt-0" / "modules.safetensors"
    assert f.stat().st_nlink == 1 and torch.equal(
        p.load().modules["adapter.0"].tensors["w"], mods["adapter.0"].tensors["w"]
    )
    calls = []

    def pruned_once(src, dst):
        calls.append(src)
        if len(calls) == 1:
            Path(src).unlink()  # gone between the write and the link
        return real_link(src, dst)

    monkeypatch.setattr(persist.os, "link", pruned_once)
    p.save(NodeState("device-0-0", 3, mods))
    assert len(calls) == 2  # written again, then linked
    g = p.dir / "round-3-attempt-0" / "modules.safetensors"
    assert g.stat().st_nlink == 2 and p.load().round == 3


# ---- config ------------------------------------------------------------------------------------------
def test_every_config_field_has_a_description():
    from pydantic import BaseModel

    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            if not f.description:
                missing.append(prefix + name)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(HFFMConfig, "")
    assert missing == []
    for section in ("security", "checkpoint", "aggregation", "circulation"):
        assert section in HFFMConfig.model_fields


def test_config_explain_prints_every_key_with_its_meaning():
    from typer.testing import CliRunner

    from hffm_cli.main import app

    r = CliRunner().invoke(app, ["config", "--explain", "--set", "aggregation.quorum.min_fraction=0.75"])
    assert r.exit_code == 0, r.output
    assert "aggregation.quorum.min_fraction = 0.75\n    at least this fraction of the step's senders" in r.output
    assert "[security]" in r.output and "runtime.round_timeout_s = 600.0" in r.output
    bad = CliRunner().invoke(app, ["config", "--set", "aggregation.rule=median-of-nothing"])
    assert bad.exit_code == 2 and "aggregation.rule" in bad.output and "fedavg" in bad.output


def test_a_joining_device_reshuffles_no_one_s_data():
    """The pooled Dirichlet split is over the starting membership; a device that joins later draws
    its own samples from an index range of its own."""
    from hffm.data import build_device_data, build_tokenizer, joiner_partition, split_for_task

    cfg = load_config(None, ["topology.edges=2", "topology.devices_per_edge=2", "data.train_per_task=200"])
    start = Topology.from_config(cfg, 2)
    later = start.with_device("device-0-7", "edge-0", ("art",))
    holders = start.holders_by_task()
    before = {d: split_for_task("art", holders["art"], cfg.data, cfg.seed)[d] for d in holders["art"]}
    tok = build_tokenizer()
    data = build_device_data(cfg, "device-0-7", holders, tok, later.device_map["device-0-7"].tasks)
    assert set(data.train) == {"art"} and len(data.train["art"]) == 200 // 4
    after = {d: split_for_task("art", holders["art"], cfg.data, cfg.seed)[d] for d in holders["art"]}
    assert all((before[d] == after[d]).all() for d in before)
    _, idx = joiner_partition("art", "device-0-7", 50, 0.1, cfg.seed)
    _, other = joiner_partition("art", "device-1-7", 50, 0.1, cfg.seed)
    pool_end = cfg.data.train_per_task + cfg.data.global_test_per_task + 4 * cfg.data.local_test_per_device
    assert idx.min() > pool_end and not set(idx.tolist()) & set(other.tolist())
    labels, _ = joiner_partition("art", "device-0-7", 50, 0.1, cfg.seed)
    assert (labels == joiner_partition("art", "device-0-7", 50, 0.1, cfg.seed)[0]).all()  # reproducible


def test_membership_validates_registrations_and_keeps_registered_samples():
    from hffm.topology import Registration
    from services.cloud.membership import Membership

    m = Membership(_topo(), "127.0.0.1:1")
    assert m.register(Registration("device-0-1", "device", "a:1", "edge-0", (("art", 40), ("gqa", 9)))) == 2
    assert m.samples == {"device-0-1": {"art": 40, "gqa": 9}}
    for reg, match in (
        (Registration("device-9-9", "device", "a:2", "edge-0"), "not a node"),
        (Registration("device-0-0", "edge", "a:2"), "is a device"),
        (Registration("device-0-0", "device", "a:2", "edge-1"), "belongs to edge-0"),
        (Registration("device-0-0", "device", "", "edge-0"), "address"),
        (Registration("device-0-0", "device", "a:2", "edge-0", (("vqa", 3),)), "train_samples"),
        (Registration("device-0-0", "device", "a:2", "edge-0", (("art", -1),)), "train_samples"),
    ):
        with pytest.raises(ValueError, match=match):
            m.register(reg)
    assert m.snapshot() == {"cloud": "127.0.0.1:1", "device-0-1": "a:1"}  # refusals changed nothing


def test_a_node_process_freezes_what_is_alive_once_set_up_and_collects_the_garbage_first():
    """``freeze_startup_heap`` (every node's main calls it once set up): cyclic garbage made during
    start-up is collected, not frozen for the process's life; what is alive leaves the collector's scans."""
    import gc
    import weakref

    from services.common.bootstrap import freeze_startup_heap

    class Node:
        pass

    alive, garbage = Node(), Node()
    alive.me = alive  # a cycle: only the cyclic collector would ever free it
    garbage.me = garbage
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_startup_heap()
        assert gone() is None  # collected before the freeze
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())


def test_a_node_s_label_check_flags_are_part_of_each_round_end_it_saves(tmp_path):
    """An edge's flags (senders its label checks found mislabelled) are saved with its round end: a
    restarted edge holds them again, a re-run attempt starts from the flags of its base (its collects leave
    those senders out from the start), and a damaged checkpoint's flags are refused with the round end
    named."""
    from services.common.bootstrap import node_modules
    from services.common.rounds import RoundState
    from services.edge.__main__ import EdgeNode

    cfg = load_config(None, ["method=hfm", "topology.edges=1", "topology.devices_per_edge=4", "security.tls=false"])
    from hffm.model import backbone_dims

    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    spec, modules = node_modules(cfg, topo, "edge-0")

    def edge() -> EdgeNode:
        return EdgeNode("edge-0", cfg, spec, dict(modules), "127.0.0.1:0", persistor=Persistor(tmp_path, keep=2))

    node = edge()
    assert node.inbox.mislabelled == {}
    node.inbox.mislabelled = {"device-0-2": 9.5}
    node.end_round(RoundState(1, "hfm", [], {}))
    node.close()
    assert Persistor(tmp_path).load().extra == {"mislabelled": {"device-0-2": 9.5}}
    node = edge()  # restarted
    assert node.inbox.mislabelled == {"device-0-2": 9.5}
    node.inbox.mislabelled = {"device-0-1": 7.0}  # an attempt of round 2 flagged another, then was aborted
    collect = Collect("aggregate", ("device-0-1", "device-0-2", "device-0-3"), "device_edge")
    node.assign(2, "hfm", [collect], {}, attempt=1, base=(1, 0))  # the re-run attempt
    assert node.inbox.mislabelled == {"device-0-2": 9.5}
    assert node.inbox._collections["aggregate"].aggregator.excluded == {"device-0-2": 9.5}
    node.start_round(RoundState(2, "hfm", [collect], {}, attempt=1, base=(1, 0)))
    assert node.inbox.mislabelled == {"device-0-2": 9.5}
    node.inbox.mislabelled = {}  # a later check cleared it: the round end says so
    node.end_round(RoundState(2, "hfm", [], {}, attempt=1))
    node.close()
    assert edge().inbox.mislabelled == {}
    state = json.loads((tmp_path / "round-2-attempt-1" / "state.json").read_text())
    for bad in ({"device-0-2": float("nan")}, {"device-0-2": -1}, ["device-0-2"], {"device-0-2": "9"}):
        state["extra"] = {"mislabelled": bad}
        (tmp_path / "round-2-attempt-1" / "state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=r"round end \(2, 1\): mislabelled"):
            edge()


def test_a_restarted_node_reads_an_older_base_from_disk_once(tmp_path):
    """A restarted node holds its newest round end; an attempt based on an older one reads that from disk at
    the assignment and keeps it, so the round's start does not read it again."""
    from hffm.model import backbone_dims
    from services.common.bootstrap import node_modules
    from services.common.rounds import RoundState
    from services.edge.__main__ import EdgeNode

    cfg = load_config(None, ["method=hfm", "topology.edges=1", "topology.devices_per_edge=2", "security.tls=false"])
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    spec, modules = node_modules(cfg, topo, "edge-0")
    node = EdgeNode("edge-0", cfg, spec, dict(modules), "127.0.0.1:0", persistor=Persistor(tmp_path, keep=3))
    node.inbox.mislabelled = {"device-0-1": 8.0}
    node.end_round(RoundState(1, "hfm", [], {}))
    node.inbox.mislabelled = {}
    node.end_round(RoundState(2, "hfm", [], {}))
    node.close()
    node = EdgeNode("edge-0", cfg, spec, dict(modules), "127.0.0.1:0", persistor=Persistor(tmp_path, keep=3))
    reads = []
    load = node.persistor.load
    node.persistor.load = lambda ref=None: reads.append(ref) or load(ref)
    collect = Collect("aggregate", ("device-0-0", "device-0-1"), "device_edge")
    node.assign(2, "hfm", [collect], {}, attempt=1, base=(1, 0))
    node.start_round(RoundState(2, "hfm", [collect], {}, attempt=1, base=(1, 0)))
    assert reads == [(1, 0)] and node.inbox.mislabelled == {"device-0-1": 8.0}
    node.close()


def _checked_edge_saving_to(tmp_path, *more: str):
    """A factory of edge-0 (hfm, one edge of four, calibration with the label and head checks, no TLS, and
    ``more`` sets) saving its round ends under ``tmp_path``: each call a fresh process's node, as a restart makes
    it."""
    from hffm.model import backbone_dims
    from services.common.bootstrap import node_modules
    from services.edge.__main__ import EdgeNode

    sets = ["method=hfm", "topology.edges=1", "topology.devices_per_edge=4", "security.tls=false"]
    sets += ["calibration.enabled=true", "calibration.label_t=4", "calibration.head_check=0.3", *more]
    cfg = load_config(None, sets)
    topo = Topology.from_config(cfg, backbone_dims(cfg)[1])
    spec, modules = node_modules(cfg, topo, "edge-0")

    def edge():
        return EdgeNode("edge-0", cfg, spec, dict(modules), "127.0.0.1:0", persistor=Persistor(tmp_path, keep=2))

    return edge


def test_what_a_node_s_label_check_judged_by_is_part_of_each_round_end_it_saves(tmp_path):
    """The label reference (the kept senders' statistics and the federation's rest, by which a joiner's
    statistics are checked as they arrive) is saved with a round end (its sums in tensors.safetensors, its
    round and peers in state.json): a restarted edge holds it again, a re-run attempt starts from its base's,
    a round end without one has none, and a damaged one is refused with the round end named."""
    from safetensors.torch import load_file, save_file

    from hffm.aggregation import LabelReference
    from hffm.calibration import stats_of
    from services.common.rounds import RoundState

    edge = _checked_edge_saving_to(tmp_path)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.arange(40) % 3
    ref = LabelReference(1, {"art": stats_of(x, y, 3)}, 4, {"art": stats_of(x[:20], y[:20], 3, diagonal=True)})

    def same(got: LabelReference | None, want: LabelReference) -> bool:
        parts = [(got.here, want.here), (got.rest, want.rest)] if got is not None else []
        return (
            got is not None
            and (got.round, got.peers) == (want.round, want.peers)
            and all(
                a.keys() == b.keys()
                and all(torch.equal(a[t].count, b[t].count) and torch.equal(a[t].squares, b[t].squares) for t in a)
                for a, b in parts
            )
        )

    node = edge()
    assert node.inbox.label_reference is None
    node.inbox.label_reference = ref
    node.end_round(RoundState(1, "hfm", [], {}))
    node.close()
    node = edge()  # restarted
    assert same(node.inbox.label_reference, ref)
    node.inbox.label_reference = LabelReference(2, {}, 0)  # an attempt of round 2 checked labels, aborted
    collect = Collect("aggregate", ("device-0-1", "device-0-2"), "device_edge")
    node.assign(2, "hfm", [collect], {}, attempt=1, base=(1, 0))  # the re-run attempt
    assert same(node.inbox.label_reference, ref)
    node.inbox.label_reference = None
    node.end_round(RoundState(2, "hfm", [], {}, attempt=1))
    node.close()
    assert edge().inbox.label_reference is None
    path = tmp_path / "round-1-attempt-0" / "tensors.safetensors"
    good = load_file(str(path))
    (tmp_path / "round-2-attempt-1").rename(tmp_path / "later")  # round 1 is the newest again
    assert same(edge().inbox.label_reference, ref)
    damaged = [
        {k: v for k, v in good.items() if not k.endswith("here/art/total")},  # a part missing
        {**good, "labelref/rest/art/total": torch.zeros(2, 4, dtype=torch.float64)},  # shapes that disagree
        {**good, "labelref/here/art/count": torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64)},
        {**good, "labelref/there/art/count": torch.zeros(3, dtype=torch.float64)},
    ]
    for bad in damaged:
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=r"round end \(1, 0\): "):
            edge()
    save_file(good, str(path))
    state = tmp_path / "round-1-attempt-0" / "state.json"
    meta = json.loads(state.read_text())
    meta["extra"]["label_reference"]["peers"] = -1
    state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"round end \(1, 0\): a label reference must be"):
        edge()


def test_the_federation_s_claims_are_part_of_each_round_end_a_node_saves(tmp_path):
    """What the last calibration phase's statistics said of the whole federation (``NodeRuntime.federation``:
    the cloud's, which the specialists' review holds served heads to) is saved with a round end beside the head
    check's claims and read back apart from them by a restarted node; a re-run attempt starts from its base's."""
    from hffm.calibration import Claim
    from services.common.rounds import RoundState

    edge = _checked_edge_saving_to(tmp_path)
    fed = {"art": Claim(torch.tensor([3.0, 0.0, 5.0]), torch.arange(12.0).reshape(3, 4))}
    node = edge()
    node.federation = dict(fed)
    node.end_round(RoundState(1, "hfm", [], {}))
    node.close()
    node = edge()
    got = node.federation["art"]
    assert set(node.federation) == {"art"} and torch.equal(got.count, fed["art"].count)
    assert torch.equal(got.mean, fed["art"].mean) and "@federation" not in node.inbox.claims
    node.federation = {}  # an attempt of round 2 calibrated nothing, aborted; its re-run starts from round 1's
    node.assign(2, "hfm", [Collect("aggregate", ("device-0-1",), "device_edge")], {}, attempt=1, base=(1, 0))
    node.start_round(RoundState(2, "hfm", [], {}, attempt=1, base=(1, 0)))
    assert torch.equal(node.federation["art"].mean, fed["art"].mean)
    node.close()


def test_an_edge_keeps_the_modules_its_label_check_judged_by_with_its_round_ends(tmp_path):
    """An edge whose label check just judged a phase's statistics keeps the modules they were computed under,
    which it holds then: every module but the heads (LabelReference.modules, for joiners after an edge round:
    ``join-ref``). They stay as they were while its own modules move on in later rounds,
    are saved with each round end (``labelref/modules/...``) and read back by a restarted edge, which sends them
    to a joiner in place of its own (``_refer``); a damaged copy is refused with the round end named. Without
    statistics first no joiner sends statistics, and nothing is kept."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from hffm.aggregation import LabelReference
    from hffm.calibration import stats_of
    from hffm.ids import is_head
    from hffm.methods import JOIN_REF
    from services.common.rounds import RoundState

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.arange(40) % 3
    plain = _checked_edge_saving_to(tmp_path / "plain")()
    plain.inbox.label_reference = LabelReference(1, {"art": stats_of(x, y, 3)}, 4, None)
    plain.keep_reference()
    assert plain.inbox.label_reference.modules is None
    plain.close()
    edge = _checked_edge_saving_to(tmp_path, "calibration.opening=true")
    node = edge()
    node.inbox.label_reference = LabelReference(1, {"art": stats_of(x, y, 3)}, 4, None)  # its check just ran
    at_1 = {n: {k: v.clone() for k, v in m.tensors.items()} for n, m in node.modules.items() if not is_head(n)}
    node.keep_reference()
    node.end_round(RoundState(1, "hfm", [], {}))
    kept = node.inbox.label_reference.modules
    assert kept is not None and set(kept) == set(at_1) and at_1
    moved = {
        n: replace(m, tensors={k: v + 1 for k, v in m.tensors.items()}, version=2) for n, m in node.modules.items()
    }
    node.adopt(moved)  # round 2, an edge round: its own modules move on, the reference's stay
    node.end_round(RoundState(2, "hfm", [], {}))
    assert node.inbox.label_reference.round == 1
    assert all(torch.equal(kept[n].tensors[k], v) for n, ts in at_1.items() for k, v in ts.items())
    node.close()
    node = edge()  # restarted from round 2's end
    back = node.inbox.label_reference.modules
    assert back is not None and set(back) == set(at_1) and all(m.version == 1 for m in back.values())
    assert all(torch.equal(back[n].tensors[k], v) for n, ts in at_1.items() for k, v in ts.items())
    joiner = "device-0-4"
    send = Send(joiner, "device_edge", JOIN_REF, tuple(sorted(at_1)))
    node._refer(RoundState(3, "hfm", [send], {joiner: "127.0.0.1:1"}))
    assert node.inbox.referred == {joiner: 1} and node._join_ref is back
    node.inbox.label_reference = replace(node.inbox.label_reference, modules=None)  # none kept: its own, unchecked
    node._refer(RoundState(3, "hfm", [send], {joiner: "127.0.0.1:1"}))
    assert node.inbox.referred == {joiner: None} and node._join_ref is None
    node.close()
    path = tmp_path / "round-2-attempt-0" / "tensors.safetensors"
    good = load_file(str(path))
    name = next(k for k in good if k.startswith("labelref/modules/"))
    damaged = [
        {k: v for k, v in good.items() if not k.startswith("labelref/modules/")},  # listed, not there
        {**good, name: torch.full_like(good[name], float("nan"))},  # not finite
        {**good, "labelref/modules/head.art/w": torch.zeros(2)},  # a module its JSON does not list
    ]
    for bad in damaged:
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=r"round end \(2, 0\): label reference module"):
            edge()


def test_a_round_end_s_claims_are_shared_by_content_like_its_modules(tmp_path):
    """tensors.safetensors (the head check's claims) goes through the store as modules.safetensors does: a round
    end whose claims did not change since the last (hfm's rounds between cloud rounds) links the file written
    before and writes none; changed claims are a file of their own; each round end reads its own back."""
    store = tmp_path / ".blobs"
    p = Persistor(tmp_path / "edge-0", keep=3, store=store)
    mods = {"adapter.0": make_module("adapter.0", {"w": (8, 4)}, version=1, num_samples=5.0)}
    claims = {"claims/device-0-1/art/count": torch.tensor([3.0, 0.0]), "claims/device-0-1/art/mean": torch.ones(2, 4)}
    p.save(NodeState("edge-0", 1, mods, tensors=claims))
    first = p.last_written
    assert first > 0
    p.save(NodeState("edge-0", 2, mods, tensors=dict(reversed(claims.items()))))  # the same claims, any order
    assert p.last_written == 0
    files = [p.dir / f"round-{r}-attempt-0" / "tensors.safetensors" for r in (1, 2)]
    assert files[0].stat().st_ino == files[1].stat().st_ino and files[0].stat().st_nlink == 3
    changed = {**claims, "claims/device-0-1/art/mean": torch.full((2, 4), 2.0)}
    p.save(NodeState("edge-0", 3, mods, tensors=changed))
    assert 0 < p.last_written < first  # the modules linked, the claims written
    assert len(_store_files(store)) == 3  # one module file, two claim files
    for r, want in ((1, claims), (2, claims), (3, changed)):
        got = p.load((r, 0)).tensors
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items()), r


def test_a_node_s_head_check_claims_are_part_of_each_round_end_it_saves(tmp_path):
    """The head check's claims (what each sender's statistics said: answer counts and mean features) are saved
    with a round end beside the modules (tensors.safetensors): a restarted edge holds them again, a re-run
    attempt starts from its base's (an aborted attempt's statistics are forgotten), and a damaged file is
    refused with the round end named."""
    from safetensors.torch import load_file, save_file

    from hffm.calibration import Claim
    from services.common.rounds import RoundState

    edge = _checked_edge_saving_to(tmp_path)

    def claim(k: float) -> Claim:
        return Claim(torch.tensor([3.0, 0.0, k]), torch.arange(12, dtype=torch.float32).reshape(3, 4) * k)

    node = edge()
    assert node.inbox.claims == {}
    node.inbox.claims = {"device-0-2": {"art": claim(2.0), "gqa": claim(5.0)}}
    node.end_round(RoundState(1, "hfm", [], {}))
    node.close()
    assert (tmp_path / "round-1-attempt-0" / "tensors.safetensors").is_file()

    def same(got: dict, want: dict) -> bool:
        return got.keys() == want.keys() and all(
            got[s].keys() == want[s].keys()
            and all(
                torch.equal(got[s][t].count, c.count) and torch.equal(got[s][t].mean, c.mean) for t, c in by.items()
            )
            for s, by in want.items()
        )

    node = edge()  # restarted
    assert same(node.inbox.claims, {"device-0-2": {"art": claim(2.0), "gqa": claim(5.0)}})
    node.inbox.claims = {"device-0-1": {"art": claim(9.0)}}  # an attempt of round 2 collected statistics, aborted
    collect = Collect("aggregate", ("device-0-1", "device-0-2", "device-0-3"), "device_edge")
    node.assign(2, "hfm", [collect], {}, attempt=1, base=(1, 0))  # the re-run attempt
    assert same(node.inbox.claims, {"device-0-2": {"art": claim(2.0), "gqa": claim(5.0)}})
    node.start_round(RoundState(2, "hfm", [collect], {}, attempt=1, base=(1, 0)))
    assert same(node.inbox.claims, {"device-0-2": {"art": claim(2.0), "gqa": claim(5.0)}})
    node.inbox.claims = {}
    node.end_round(RoundState(2, "hfm", [], {}, attempt=1))
    node.close()
    assert not (tmp_path / "round-2-attempt-1" / "tensors.safetensors").exists()  # nothing claimed: no file
    assert edge().inbox.claims == {}
    path = tmp_path / "round-1-attempt-0" / "tensors.safetensors"
    good = load_file(str(path))
    (tmp_path / "round-2-attempt-1").rename(tmp_path / "later")  # round 1 is the newest again
    damaged = [
        {k: v for k, v in good.items() if not k.endswith("art/mean")},  # a count without its means
        {**good, "claims/device-0-2/art/count": torch.tensor([3.0, -1.0, 2.0])},
        {**good, "claims/device-0-2/gqa/mean": torch.full((3, 4), float("nan"))},
        {**good, "claims/device-0-2/art/mean": torch.zeros(2, 4)},  # shapes that disagree
        {**good, "weights/device-0-2": torch.zeros(1)},
    ]
    for bad in damaged:
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=r"round end \(1, 0\): "):
            edge()
