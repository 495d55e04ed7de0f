"""FedAvg as a running sum: exact weighted mean, heads only over their task's nodes, atomic adds."""

from __future__ import annotations

import pytest
import torch

from hffm.aggregation import FedAvg, make_aggregator, weighted_mean
from hffm.modules import Module, ModuleError
from tests.conftest import make_module

AD = {"w": (8, 4), "b": (4,)}
HEAD = {"w": (4, 3)}


def test_fedavg_equals_weighted_mean_with_unequal_weights():
    weights = [1.0, 7.0, 30.0, 2.5]
    sets = [{"adapter.0": make_module("adapter.0", AD, num_samples=w, seed=i)} for i, w in enumerate(weights)]
    agg = FedAvg()
    for i, s in enumerate(sets):
        agg.add(f"d{i}", s.values())
    got = agg.result(version=5)["adapter.0"]
    want = sum(w * s["adapter.0"].tensors["w"].double() for w, s in zip(weights, sets, strict=True)) / sum(weights)
    assert torch.allclose(got.tensors["w"].double(), want, atol=1e-6)
    assert got.num_samples == sum(weights) and got.version == 5
    # not the unweighted mean
    unweighted = sum(s["adapter.0"].tensors["w"] for s in sets) / len(sets)
    assert not torch.allclose(got.tensors["w"], unweighted, atol=1e-3)
    ref = weighted_mean(sets)["adapter.0"]
    assert torch.allclose(got.tensors["b"], ref.tensors["b"], atol=1e-6)


def test_one_senders_aggregate_is_its_copy_and_an_owned_buffer_becomes_the_sum():
    """FedAvg keeps its sum relative to the first copy's weight: one sender's aggregate is its copy bit for
    bit (whatever its weight), an owned decoded buffer is the sum itself (no pass, no copy), a copy that is
    not owned is never written, and with more senders the weighted mean is what it was."""
    from hffm.modules import decode_module, encode_module, spec_of

    m = make_module("adapter.0", AD, num_samples=7.3, seed=3)
    spec = spec_of({"adapter.0": m.tensors})
    e = encode_module(m, "fp32")

    def decoded(owned: bool) -> Module:
        d = decode_module(
            bytearray(e.data), name=e.name, version=1, num_samples=7.3, dtype="fp32", digest=e.digest, spec=spec
        )
        d.owned = owned
        return d

    mine = decoded(True)
    agg = FedAvg()
    agg.add("d0", [mine])
    got = agg.result(2)["adapter.0"]
    assert got.flat.data_ptr() == mine.flat.data_ptr() and got.num_samples == 7.3
    assert all(torch.equal(got.tensors[k], m.tensors[k]) for k in AD)
    theirs = decoded(False)
    before = theirs.flat.clone()
    other = make_module("adapter.0", AD, num_samples=2.0, seed=4)
    agg = FedAvg()
    agg.add("d0", [theirs])
    agg.add("d1", [other])
    got = agg.result(2)["adapter.0"]
    assert torch.equal(theirs.flat, before) and got.flat.data_ptr() != theirs.flat.data_ptr()
    for k in AD:
        want = (7.3 * m.tensors[k].double() + 2.0 * other.tensors[k].double()) / 9.3
        assert torch.allclose(got.tensors[k].double(), want, atol=1e-6)


def test_head_averaged_only_over_nodes_with_the_task():
    a = {
        "adapter.0": make_module("adapter.0", AD, num_samples=10, seed=1),
        "head.art": make_module("head.art", HEAD, num_samples=4, seed=2),
    }
    b = {
        "adapter.0": make_module("adapter.0", AD, num_samples=30, seed=3),
        "head.gqa": make_module("head.gqa", HEAD, num_samples=6, seed=4),
    }
    agg = FedAvg()
    agg.add("a", a.values())
    agg.add("b", b.values())
    res = agg.result(1)
    assert torch.equal(res["head.art"].tensors["w"], a["head.art"].tensors["w"] * 4 / 4)
    assert torch.allclose(res["head.gqa"].tensors["w"], b["head.gqa"].tensors["w"])
    assert agg.contributors("head.art") == 1 and agg.contributors("adapter.0") == 2
    assert res["head.art"].num_samples == 4


def test_rejected_add_leaves_state_unchanged():
    agg = FedAvg()
    agg.add("a", [make_module("adapter.0", AD, num_samples=2, seed=1)])
    before = agg.result(1)["adapter.0"].tensors["w"].clone()
    bad = [make_module("head.art", HEAD, seed=5), make_module("adapter.0", {"w": (8, 5), "b": (4,)}, seed=2)]
    with pytest.raises(ModuleError):
        agg.add("b", bad)  # the head would have been fine: all-or-nothing
    assert agg.senders == ["a"] and "head.art" not in agg.result(1)
    assert torch.equal(agg.result(1)["adapter.0"].tensors["w"], before)
    with pytest.raises(ModuleError):
        agg.add("a", [make_module("adapter.0", AD)])  # a sender contributes once


def test_running_sum_memory_is_one_set():
    agg = FedAvg()
    for i in range(20):
        agg.add(f"d{i}", [make_module("adapter.0", AD, seed=i)])
    assert len(agg._sum) == 1 and set(agg._sum["adapter.0"]) == {"w", "b"}


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        make_aggregator("median-of-nothing")


@pytest.mark.parametrize("order", ["flat-first", "plain-first", "fp16"])
def test_decoded_modules_fold_in_one_operation_and_mix_with_plain_ones(order):
    """Decoded modules carry one flat region (their tensors are views of it); FedAvg folds that in one
    add. Mixed with modules held as separate tensors (a node's own), the mean is the same."""
    from hffm.modules import decode_module, encode_module, spec_of

    wire = "fp16" if order == "fp16" else "fp32"
    plain = [make_module("adapter.0", AD, num_samples=w, seed=i) for i, w in enumerate([3.0, 5.0, 11.0])]
    spec = spec_of({"adapter.0": plain[0].tensors})

    def dec(m):
        e = encode_module(m, wire)
        return decode_module(
            bytearray(e.data),
            name=e.name,
            version=1,
            num_samples=m.num_samples,
            dtype=wire,
            digest=e.digest,
            spec=spec,
        )

    decoded = [dec(m) for m in plain]
    assert all(d.flat is not None and d.flat.numel() == d.numel() for d in decoded)
    for d in decoded:  # the tensors are views of the region, in sorted-key order
        assert all(t.data_ptr() >= d.flat.data_ptr() for t in d.tensors.values())
    seq = decoded[:2] + [plain[2]] if order != "plain-first" else [plain[0]] + decoded[1:]
    agg = FedAvg()
    for i, m in enumerate(seq):
        agg.add(f"d{i}", [m])
    got = agg.result(1)["adapter.0"]
    want = weighted_mean([{"adapter.0": m} for m in seq])["adapter.0"]
    for k in AD:
        assert torch.allclose(got.tensors[k], want.tensors[k], atol=1e-6)
    if wire == "fp16":  # the region is a cast, not a view of the fp16 bytes
        assert decoded[0].flat.dtype == torch.float32


def test_canonical_order_makes_the_aggregate_independent_of_arrival_order():
    """Senders fold in the step's order whatever order they arrive in: bit-identical aggregates."""
    senders = [f"d{i}" for i in range(6)]
    sets = {s: [make_module("adapter.0", AD, num_samples=1 + 3.7 * i, seed=i)] for i, s in enumerate(senders)}
    results = []
    for arrival in (senders, senders[::-1], ["d3", "d0", "d5", "d1", "d4", "d2"]):
        agg = FedAvg(order=senders)
        for s in arrival:
            agg.add(s, sets[s])
        assert agg.senders == senders and not agg.pending
        results.append(agg.result(1)["adapter.0"].tensors)
    assert all(torch.equal(r[k], results[0][k]) for r in results for k in r)
    # without an order, arrival order shows in the last bits (why the order matters)
    plain = []
    for arrival in (senders, senders[::-1]):
        agg = FedAvg()
        for s in arrival:
            agg.add(s, sets[s])
        plain.append(agg.result(1)["adapter.0"].tensors)
    assert not all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])


def test_quorum_result_folds_whoever_came_in_order_and_reset_forgets():
    agg = FedAvg(order=["a", "b", "c"])
    agg.add("c", [make_module("adapter.0", AD, num_samples=2, seed=1)])
    agg.add("a", [make_module("adapter.0", AD, num_samples=3, seed=2)])
    assert agg.senders == ["a"] and list(agg.pending) == ["c"]
    with pytest.raises(ModuleError, match="already contributed"):
        agg.add("c", [make_module("adapter.0", AD, num_samples=2, seed=1)])
    with pytest.raises(ModuleError, match="not a sender"):
        agg.add("z", [make_module("adapter.0", AD, num_samples=2, seed=1)])
    out = agg.result(4)
    assert agg.senders == ["a", "c"] and out["adapter.0"].num_samples == 5
    agg.reset()
    assert agg.senders == [] and agg.result(4) == {}


def test_reference_module_fixes_the_shape_before_any_sender():
    ref = {"adapter.0": make_module("adapter.0", AD)}
    agg = FedAvg(reference=ref)
    with pytest.raises(ModuleError, match="differs in shape"):
        agg.add("a", [make_module("adapter.0", {"w": (8, 5), "b": (4,)})])
    assert agg.senders == []


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_must_be_finite_and_positive(bad):
    agg = FedAvg()
    with pytest.raises(ModuleError, match="num_samples"):
        agg.add("a", [make_module("adapter.0", AD, num_samples=bad)])
    assert agg.senders == []


def test_server_step_moves_from_the_start_along_the_aggregates_update():
    from hffm.aggregation import server_step

    start = {"a": Module("a", {"w": torch.tensor([1.0, 2.0])}, 1, 10.0)}
    agg = {
        "a": Module("a", {"w": torch.tensor([2.0, 1.0])}, 2, 30.0),
        "new": Module("new", {"w": torch.tensor([5.0])}, 2, 3.0),
    }
    out = server_step(start, agg, 2.5)
    assert torch.equal(out["a"].tensors["w"], torch.tensor([3.5, -0.5]))
    assert (out["a"].version, out["a"].num_samples) == (2, 30.0)
    assert out["new"] is agg["new"]  # nothing to step from: taken as aggregated
    assert server_step(start, agg, 1.0) is agg
