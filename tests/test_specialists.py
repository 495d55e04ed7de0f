"""Specialists (issue 17, Section V-C): candidates chosen from evidence, their modules cross-validated by
other holders of the task before anything they serve is relayed, the refused flagged for good, the best
accepted appointed; a fake specialist (claims more data than it has, serves a poisoned head) caught."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from hffm.config import load_config
from hffm.methods import D2D, DEVICE_EDGE, make_method
from hffm.recovery import StartPlan, plan_takers
from hffm.specialists import (
    ACCEPTED,
    DISPUTED,
    REFUSED,
    UNPROVEN,
    UNVALIDATED,
    Score,
    appoint,
    candidates,
    evidence,
    judge,
)
from hffm.specialists import validators as pick_validators
from hffm.topology import Topology
from services.rpc import pb, pb_grpc
from tests.test_security import _channel, _status


def test_evidence_is_data_share_times_label_coverage_and_picks_whom_to_examine():
    holders = {"art": ["a", "b", "c"], "gqa": ["b"]}
    samples = {"a": {"art": 10}, "b": {"art": 30, "gqa": 5}, "c": {"art": 60}}
    coverage = {"a": {"art": 1.0}, "b": {"art": 1.0, "gqa": 0.5}, "c": {"art": 0.25}}
    ev = evidence(holders, samples, coverage)
    assert ev["art"] == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.15}) and ev["gqa"] == {"b": 0.5}
    assert candidates(ev["art"], 2) == ["b", "c"] and candidates(ev["art"], 2, flagged={"b"}) == ["c", "a"]
    assert candidates({"x": 0.0, "y": 0.2}, 5) == ["y"]  # no evidence: never examined
    # validators: the other candidates first, then by evidence; never the candidate or a flagged node
    assert pick_validators("b", ev["art"], ["b", "c"], 3) == ["c", "a"]
    assert pick_validators("b", ev["art"], ["b", "c"], 3, flagged={"c"}) == ["a"]


def test_verdicts_refuse_far_below_peers_or_chance_accept_only_above_chance_and_appoint_by_accuracy():
    def s(v, acc, own, classes=4):
        return Score(v, acc, own, 20, classes)

    good = judge("g", "art", 0.4, [s("x", 0.70, 0.65), s("y", 0.60, 0.66)], tolerance=0.15, min_gain=0.05)
    close = judge("c", "art", 0.4, [s("x", 0.40, 0.50)], tolerance=0.15, min_gain=0.05)
    assert close.verdict == UNPROVEN  # above chance, but 0.1 below its validator's own
    assert good.verdict == ACCEPTED and good.accuracy == pytest.approx(0.65) and good.margin == pytest.approx(-0.005)
    fake = judge("f", "art", 0.9, [s("x", 0.30, 0.65), s("y", 0.35, 0.66)], 0.15, 0.05)
    assert fake.verdict == REFUSED and fake.margin == pytest.approx(-0.33)  # far below its peers
    early = judge("e", "art", 0.5, [s("x", 0.26, 0.27)], 0.15, 0.05)
    assert early.verdict == UNPROVEN  # nobody beats chance (0.25) yet: not accepted, not refused either
    # one validator's collapse is not hidden by a median: 0.0 against its own 0.55 (a negated head on a
    # one-class test split), while another validator's skewed data makes the negated head look better
    hidden = judge("f", "art", 0.5, [s("x", 0.0, 0.02), s("y", 0.0, 0.55), s("z", 0.84, 0.0)], 0.15, 0.05)
    assert hidden.margin == pytest.approx(-0.02) and hidden.worst == pytest.approx(-0.55)
    assert hidden.verdict == REFUSED
    dip = judge("d", "art", 0.5, [s("x", 0.60, 0.60), s("y", 0.40, 0.60), s("z", 0.70, 0.60)], 0.15, 0.05)
    assert dip.verdict == UNPROVEN  # 0.2 below one validator's own: not refused (< 0.3), not accepted
    skewed = judge("w", "art", 0.5, [s("x", 0.05, 0.10, classes=4)], 0.15, 0.05)
    assert skewed.verdict == UNPROVEN  # below chance, but so is the validator's own on its (non-IID) data
    assert judge("n", "art", 0.5, [], 0.15, 0.05).verdict == UNVALIDATED
    other = judge("h", "art", 0.2, [s("x", 0.80, 0.65)], 0.15, 0.05)
    gqa = judge("q", "gqa", 0.2, [s("x", 0.5, 0.5)], 0.15, 0.05)
    # conflicts are settled by measured accuracy, not by evidence: h (0.80) beats g (0.65), f is out
    assert appoint([good, fake, early, other, gqa], per_task=1) == {"art": ["h"], "gqa": ["q"]}
    assert appoint([good, fake, other], per_task=2) == {"art": ["h", "g"]}


def test_a_quorum_of_accusers_refuses_one_validator_alone_only_disputes_and_accusations_stand_until_withdrawn():
    """quorum 2: one validator's collapse (perhaps a liar's) makes the candidate disputed (not appointed,
    not flagged); a second accuser, in the same review or a later one, refuses it; an accuser asked again
    that now sees no drop withdraws. quorum 1 is one witness's word (the rule before quorums)."""

    def s(v, acc, own):
        return Score(v, acc, own, 20, 4)

    framed = [s("liar", 0.0, 1.0), s("x", 0.70, 0.65), s("y", 0.68, 0.66)]
    assert judge("h", "art", 0.4, framed, 0.15, 0.05, quorum=1).verdict == REFUSED  # one liar flags an honest node
    one = judge("h", "art", 0.4, framed, 0.15, 0.05, quorum=2)
    assert one.verdict == DISPUTED and one.accusers == ["liar"]
    # later review: the accuser repeats, a fresh validator agrees -> refused
    again = judge("h", "art", 0.4, [s("liar", 0.0, 1.0), s("z", 0.1, 0.6)], 0.15, 0.05, one.accusers, quorum=2)
    assert again.verdict == REFUSED and again.accusers == ["liar", "z"]
    # an accuser not asked this time still stands: disputed, never accepted, even on a perfect review
    stands = judge("h", "art", 0.4, [s("x", 0.70, 0.65), s("y", 0.7, 0.66)], 0.15, 0.05, ["liar"], quorum=2)
    assert stands.verdict == DISPUTED and stands.accusers == ["liar"]
    assert judge("h", "art", 0.4, [], 0.15, 0.05, ["liar"], quorum=2).verdict == DISPUTED
    # asked again, it sees the candidate within tolerance of its own: withdrawn, and the candidate accepted
    withdrawn = judge("h", "art", 0.4, [s("liar", 0.6, 0.65), s("x", 0.7, 0.65)], 0.15, 0.05, ["liar"], quorum=2)
    assert withdrawn.verdict == ACCEPTED and withdrawn.accusers == []
    # a median below -tolerance refuses only with quorum validators below -tolerance
    dip = [s("liar", 0.0, 1.0), s("x", 0.45, 0.65), s("y", 0.70, 0.66)]
    assert judge("d", "art", 0.4, dip, 0.15, 0.05, quorum=2).verdict == REFUSED  # liar + x (-0.2): two doubters
    assert judge("d", "art", 0.4, [s("liar", 0.0, 1.0), s("x", 0.60, 0.65)], 0.15, 0.05, quorum=2).verdict == DISPUTED


def test_on_appeal_a_refusal_needs_the_accusers_to_outnumber_the_validators_who_see_no_drop():
    """majority (specialists.appeal > 0): two colluding liars are a quorum of 2 by themselves and refuse
    an honest candidate; with three honest validators heard on appeal, who see it as good as their own, it
    is only disputed (and the liars' accusations are contradicted). A collapse that most validators see is
    still refused; one that only two of five see is disputed: the price of the rule."""
    from hffm.config import ConfigError
    from hffm.specialists import contradicted

    def s(v, acc, own):
        return Score(v, acc, own, 20, 4)

    honest = [s("x", 0.70, 0.65), s("y", 0.68, 0.66), s("z", 0.6, 0.62)]
    framed = [s("liar1", 0.0, 1.0), s("liar2", 0.0, 1.0), *honest]
    assert judge("h", "art", 0.4, framed[:3], 0.15, 0.05, quorum=2).verdict == REFUSED  # the collusion works
    assert judge("h", "art", 0.4, framed, 0.15, 0.05, quorum=2).verdict == REFUSED  # a quorum is a count
    v = judge("h", "art", 0.4, framed, 0.15, 0.05, quorum=2, majority=True)
    assert v.verdict == DISPUTED and v.accusers == ["liar1", "liar2"]
    assert contradicted(v, 0.15, 2) == {"liar1", "liar2"}
    seen = [s("a", 0.0, 0.7), s("b", 0.1, 0.8), s("c", 0.0, 0.6), s("x", 0.6, 0.65), s("y", 0.7, 0.7)]
    assert judge("f", "art", 0.4, seen, 0.15, 0.05, quorum=2, majority=True).verdict == REFUSED
    few = [s("a", 0.0, 0.7), s("b", 0.1, 0.8), s("x", 0.6, 0.65), s("y", 0.7, 0.7), s("z", 0.65, 0.6)]
    assert judge("f", "art", 0.4, few, 0.15, 0.05, quorum=2).verdict == REFUSED
    assert judge("f", "art", 0.4, few, 0.15, 0.05, quorum=2, majority=True).verdict == DISPUTED
    # acceptance and appointment go by the median accuracy: two liars vouching (1.0, their own 0.0) do not
    # lift a candidate that the honest validators score near 0 over chance + min_gain (a mean, 0.35, did)
    vouched = [s("liar1", 1.0, 0.0), s("liar2", 1.0, 0.0), s("x", 0.06, 0.2), s("y", 0.0, 0.0), s("z", 0.0, 0.02)]
    v = judge("f", "gqa", 0.4, vouched, 0.15, 0.1, quorum=2, majority=True)
    assert v.verdict == UNPROVEN and v.accuracy == pytest.approx(0.06)
    with pytest.raises(ConfigError, match="appeal"):
        load_config(None, ["specialists.appeal=-1"])


def test_a_head_the_federation_s_statistics_refute_is_refused_whatever_its_validators_say():
    """specialists.stats_cut: a served head that makes the federation's answers far less likely at their mean
    features than the cloud's own head does (``stats_drop`` over the cut) is refused on that evidence alone,
    even where two liars vouching and validators that see no collapse would accept it; under the cut, or with
    no statistics (None), the validators decide as before. Off without calibration."""
    from hffm.config import ConfigError
    from hffm.specialists import refuted

    def s(v, acc, own):
        return Score(v, acc, own, 20, 4)

    vouched = [s("liar1", 1.0, 0.0), s("liar2", 1.0, 0.0), s("x", 0.59, 0.14), s("y", 0.0, 0.03)]
    plain = judge("f", "gqa", 0.4, vouched, 0.15, 0.1, quorum=2, majority=True)
    assert plain.verdict == ACCEPTED  # benchmarks.specialists --liars 2, seed 7: the fake appointed
    v = judge("f", "gqa", 0.4, vouched, 0.15, 0.1, quorum=2, majority=True, stats_drop=673.2, stats_cut=1.0)
    assert v.verdict == REFUSED and v.stats_drop == 673.2 and v.to_json()["stats_drop"] == 673.2
    assert v.accuracy == plain.accuracy and v.worst == plain.worst  # the scores are kept in the record
    for drop, cut in ((0.07, 1.0), (None, 1.0), (673.2, None)):
        same = judge("f", "gqa", 0.4, vouched, 0.15, 0.1, quorum=2, majority=True, stats_drop=drop, stats_cut=cut)
        assert same.verdict == ACCEPTED and not refuted(drop, cut)
    assert judge("f", "gqa", 0.4, [], 0.15, 0.1, stats_drop=5.0, stats_cut=1.0).verdict == REFUSED  # no scores needed
    with pytest.raises(ConfigError, match="specialists.stats_cut.*calibration.enabled"):
        load_config(None, ["specialists.stats_cut=1"])
    with pytest.raises(ConfigError, match="stats_cut"):
        load_config(None, ["calibration.enabled=true", "specialists.stats_cut=0"])


def test_an_accusation_that_quorum_others_contradict_is_counted_against_its_validator():
    from hffm.specialists import contradicted

    def s(v, acc, own):
        return Score(v, acc, own, 20, 4)

    lone = judge("h", "art", 0.4, [s("liar", 0.0, 1.0), s("x", 0.7, 0.65), s("y", 0.6, 0.66)], 0.15, 0.05, quorum=2)
    assert contradicted(lone, 0.15, 2) == {"liar"}
    # one other validator only agrees with the candidate: not enough to contradict
    few = judge("h", "art", 0.4, [s("w", 0.0, 0.6), s("x", 0.7, 0.65), s("y", 0.4, 0.66)], 0.15, 0.05, quorum=2)
    assert contradicted(few, 0.15, 2) == set()
    both = judge(
        "f", "art", 0.4, [s("w", 0.0, 0.6), s("z", 0.1, 0.7), s("x", 0.7, 0.65), s("y", 0.7, 0.6)], 0.15, 0.05, quorum=2
    )
    assert both.verdict == REFUSED and contradicted(both, 0.15, 2) == set()  # corroborated: refused


def test_validators_ask_standing_accusers_first_then_those_that_have_not_scored_the_candidate():
    ev = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1, "e": 0.05}
    assert pick_validators("a", ev, ["a", "b"], 3) == ["b", "c", "d"]
    assert pick_validators("a", ev, ["a", "b"], 3, accusers={"d"}, asked={"b", "c", "d"}) == ["d", "e", "b"]
    assert pick_validators("a", ev, ["a", "b"], 3, flagged={"d"}, accusers={"d"}) == ["b", "c", "e"]


def test_a_liar_frames_the_honest_and_vouches_for_attackers_with_plausible_scores():
    from hffm.adversary import adversaries, lie
    from hffm.config import AdversaryConfig

    assert lie("device-0-2", {"device-0-1"}) == (0.0, 1.0) and lie("device-0-1", {"device-0-1"}) == (1.0, 0.0)
    with pytest.raises(ValueError, match="adversary.liars"):
        adversaries(AdversaryConfig(liars=["edge-0"]), ["device-0-0"], 0, ["edge-0"])


def test_a_task_is_relayed_only_from_a_specialist_else_from_the_edges_aggregate():
    cfg = load_config(None, ["topology.edges=1", "topology.devices_per_edge=4", "tasks=[art,gqa]",
                             "topology.tasks_per_device=1", "method=hfm-d2d"])  # fmt: skip
    before = Topology.from_config(cfg, 2)
    topo = before.with_tasks({"device-0-2": ("gqa",)})
    method = make_method("hfm-d2d", 2)

    def route(_e, a, b):
        return [a, b]

    def plan(may_serve):
        return plan_takers(method, topo, before, {"device-0-2": ("gqa",)}, StartPlan({}, {}), route,
                           lambda _e, p: float(p[0] != "device-0-1"), lambda t: [f"head.{t}"], may_serve)  # fmt: skip

    assert plan(None).sync["device-0-2"].source == "device-0-1"  # the cheapest holder
    specialists = {"gqa": ["device-0-3"]}
    only = plan(lambda n, ts: all(n in specialists.get(t, ()) for t in ts)).sync["device-0-2"]
    assert (only.source, only.link, only.modules) == ("device-0-3", D2D, ("head.gqa",))
    none = plan(lambda n, ts: False).sync["device-0-2"]
    assert (none.source, none.link) == ("edge-0", DEVICE_EDGE)


@pytest.fixture
def device_server(small_cfg):
    """device-0-0 serving (mTLS) with its Specialist service, and a fake specialist's node (not served)."""
    from services.common.bootstrap import topology
    from services.common.server import NodeServer
    from services.device import specialist
    from services.device.node import DeviceNode, ModelHost

    cfg = small_cfg.model_copy(update={"tasks": ["art", "gqa"]})
    topo = topology(cfg)
    host = ModelHost(cfg)
    node = DeviceNode("device-0-0", cfg, topo, host, "127.0.0.1:0")
    srv = NodeServer(node, "127.0.0.1:0", max_workers=8, extra=[specialist.extra(node)])
    yield node, f"127.0.0.1:{srv.port}", cfg, topo, host
    srv.stop(0)


def test_a_device_serves_and_scores_a_tasks_modules_for_the_cloud_only(device_server):
    from hffm.modules import encode_modules
    from services.common.convert import blobs_to_pb

    node, addr, cfg, _topo, _host = device_server
    d = cfg.security.dir
    task = node.info.tasks[0]
    cloud = pb_grpc.SpecialistStub(_channel(d, "cloud", addr, "device-0-0"))
    served = cloud.Serve(pb.ServeRequest(task=task), timeout=30)
    assert [b.header.name for b in served.modules] == [f"head.{task}"]
    before = {n: {k: t.clone() for k, t in m.tensors.items()} for n, m in node.modules.items()}
    score = cloud.Validate(pb.ValidateRequest(task=task, provider="device-0-1", modules=served.modules), timeout=30)
    assert score.accuracy == score.own_accuracy and score.samples > 0 and score.classes >= 2  # its own modules
    # scoring another node's head changes nothing the device holds
    assert all(torch.equal(before[n][k], t) for n, m in node.modules.items() for k, t in m.tensors.items())
    peer = pb_grpc.SpecialistStub(_channel(d, "device-0-1", addr, "device-0-0"))
    assert _status(lambda: peer.Serve(pb.ServeRequest(task=task), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    req = pb.ValidateRequest(task=task, provider="x", modules=served.modules)
    assert _status(lambda: peer.Validate(req, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    other = next(t for t in ("art", "gqa") if t != task)
    assert _status(lambda: cloud.Serve(pb.ServeRequest(task="vqa"), timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    wrong = pb.ValidateRequest(
        task=task, provider="x", modules=blobs_to_pb(encode_modules([node.modules["adapter.0"]]))
    )
    assert _status(lambda: cloud.Validate(wrong, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    if other not in node.info.tasks:
        theirs = pb.ValidateRequest(task=other, provider="x", modules=served.modules)
        assert _status(lambda: cloud.Validate(theirs, timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    bad = pb.ValidateRequest()
    bad.CopyFrom(req)
    bad.modules[0].data = bytes([bad.modules[0].data[0] ^ 1]) + bad.modules[0].data[1:]
    assert _status(lambda: cloud.Validate(bad, timeout=10)) in (
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_a_fake_specialist_claims_more_than_it_has_and_serves_a_negated_head(device_server):
    from services.device.node import DeviceNode

    honest, _addr, cfg, topo, host = device_server
    adv = cfg.adversary.model_copy(update={"nodes": ["device-0-0"], "behaviour": "fake_specialist", "claim": 3.0})
    fake = DeviceNode("device-0-0", cfg.model_copy(update={"adversary": adv}), topo, host, "127.0.0.1:0")
    try:
        task = honest.info.tasks[0]
        assert fake.train_samples() == {t: 3 * n for t, n in honest.train_samples().items()}
        assert set(fake.label_coverage().values()) == {1.0} and all(
            0 < c <= 1 for c in honest.label_coverage().values()
        )
        head = f"head.{task}"
        served = fake.task_modules(task)[head].tensors
        assert all(torch.equal(served[k], -cfg.adversary.scale * t) for k, t in fake.modules[head].tensors.items())
        assert fake.sender.served is not None and honest.sender.served is None  # its relays go out poisoned too
    finally:
        fake.close()


# one cluster of 6 holding art; gqa introduced on device-0-1, -3 and -5 at round 2, relayed to device-0-2
# at round 4; device-0-1 attacks (the behaviour is the test's); specialists reviewed after every round
ADVERSARY_RUN = ["method=hfm-d2d", "e_agg=2", "rounds=5", "topology.edges=1", "topology.devices_per_edge=6",
                 "runtime.devices_per_process=6", "tasks=[art,gqa]", "data.train_per_task=240",
                 "train.eval_every=5", "specialists.enabled=true", "adversary.nodes=[device-0-1]",
                 "circulation.arrivals=[{task: gqa, round: 2, devices: [device-0-1, device-0-3, device-0-5]},"
                 " {task: gqa, round: 4, devices: [device-0-2]}]"]  # fmt: skip


def _run_with_an_adversary(tmp_path, sets: list[str]) -> dict:
    """``ADVERSARY_RUN`` and ``sets``, run for real (gRPC on loopback, mTLS); its results."""
    from tests.test_joins import _run_and

    return _run_and(load_config(None, [*ADVERSARY_RUN, *sets]), tmp_path / "run", 0, lambda _sup: None)


def test_a_fake_specialist_is_caught_before_anything_it_serves_is_relayed(tmp_path):
    """hfm-d2d over real gRPC and mTLS, one cluster of 6 holding art; gqa is introduced on device-0-1,
    -3 and -5 at round 2 and relayed to device-0-2 at round 4. device-0-1 is a fake specialist: it claims
    4x its data and every class, so it is examined first, and serves negated heads. It is refused and
    flagged before round 4, never appointed, never serves a sync; the arrival is served by an appointed
    gqa specialist or, without one, by the edge."""
    res = _run_with_an_adversary(tmp_path, ["adversary.behaviour=fake_specialist"])
    assert res["complete"]
    rounds = {x["round"]: x for x in res["rounds"]}
    reviews = {r: x["specialists"] for r, x in rounds.items() if x["specialists"]}
    assert sorted(reviews) == [1, 2, 3, 4]  # after every round but the last
    caught = min(r for r, s in reviews.items() if "device-0-1" in s["flagged"])
    assert caught <= 3, reviews
    fake = [v for v in reviews[caught]["verdicts"] if v["node"] == "device-0-1"]
    assert fake and fake[0]["verdict"] == REFUSED
    assert reviews[caught]["switched"] == {}  # refused by the review: no relay of it was ever refused
    rivals = [v["evidence"] for v in reviews[caught]["verdicts"] if v["task"] == fake[0]["task"]]
    assert fake[0]["evidence"] == max(rivals)  # its claim made it the first candidate
    assert all("device-0-1" not in ns for s in reviews.values() for ns in s["appointed"].values())
    for x in rounds.values():  # it never serves a relay
        assert not [h for h in x["hops"] if h["tag"] == "sync" and h["origin"] == "device-0-1"], x["round"]
    source = [h for h in rounds[4]["hops"] if h["tag"] == "sync" and h["destination"] == "device-0-2"]
    assert source, "gqa was not relayed to device-0-2"
    appointed = reviews[3]["appointed"].get("gqa", [])
    assert source[0]["origin"] == (appointed[0] if appointed else "edge-0")
    # a specialist's relay is pinned to the version examined, and the honest one's passed
    assert not any(x["aborted"] for x in rounds.values())


def test_a_cluster_head_counts_as_its_own_only_the_tasks_it_holds_this_round(device_server):
    """A device that takes up a task later holds that task's modules from the start (untrained, or a
    cluster aggregate it adopted as head); as a D2D head it must not count them as its own update before
    it takes the task up (that counted the cluster twice and broke the weight caps)."""
    from services.common.bootstrap import topology
    from services.common.rounds import RoundState
    from services.device.node import DeviceNode

    _node, _addr, cfg, _topo, host = device_server
    doc = cfg.model_dump()
    doc["rounds"], doc["circulation"]["arrivals"] = 4, [{"task": "gqa", "round": 3, "devices": ["device-0-1"]}]
    cfg = type(cfg).model_validate(doc)
    node = DeviceNode("device-0-1", cfg, topology(cfg), host, "127.0.0.1:0")
    try:
        assert "head.gqa" in node.modules and "gqa" not in node.info.tasks  # held from the start
        for r, counted in ((2, False), (3, True)):
            node.rounds.install(RoundState(r, "hfm-d2d", [], {}))
            assert ("head.gqa" in node.own_module_names()) == counted, r
            assert "head.art" in node.own_module_names()
    finally:
        node.close()


def test_a_relay_from_a_specialist_is_accepted_only_as_the_version_the_cloud_examined():
    """The taker's sync collect is pinned to the digests the cloud examined (pin_syncs); its inbox refuses
    any other version of those modules from its source, and takes the examined one."""
    from hffm.inbox import Inbox
    from hffm.methods import SYNC, Collect, RoundPlan
    from hffm.modules import ModuleError
    from hffm.recovery import SyncSource, pin_syncs
    from hffm.wire import ModuleHeader, PushHeader

    plan = RoundPlan(3, {"device-0-2": [Collect(SYNC, ("device-0-3",), D2D)]})
    starts = StartPlan({}, {"device-0-2": SyncSource("device-0-3", D2D, (), ("head.gqa",))})
    good, bad = b"\x01" * 32, b"\x02" * 32
    pinned = pin_syncs(plan, starts, {("device-0-3", "head.gqa"): good, ("device-0-5", "head.gqa"): bad})
    step = pinned.steps["device-0-2"][0]
    assert step.pinned == (("head.gqa", good),)
    assert pin_syncs(plan, starts, {}).steps == plan.steps  # nothing examined: nothing pinned

    inbox = Inbox("device-0-2")
    inbox.open_round(3, [step], {"device-0-3"})

    def header(digest: bytes) -> PushHeader:
        mod = ModuleHeader("head.gqa", 2, 10.0, 64, digest, "fp32", "blake3")
        return PushHeader("p", "device-0-3", "device-0-2", 3, SYNC, D2D, (mod,))

    before = inbox.snapshot()
    with pytest.raises(ModuleError, match="not the version examined") as e:
        inbox._check(header(bad), "device-0-3")
    assert e.value.code == "FAILED_PRECONDITION" and inbox.snapshot() == before
    inbox._check(header(good), "device-0-3")  # the examined version passes the check
    # digests that follow the chunks (wire.digests: trailer): the header passes without them, and the
    # whole header is held to the pin once the trailer has filled them in (the inbox's accept checks it)
    assert inbox.precheck(header(b""), "device-0-3") is False
    with pytest.raises(ModuleError, match="not the version examined"):
        inbox._check(header(bad), "device-0-3")


def test_the_cloud_keeps_only_scores_a_validator_could_have_measured():
    """A validator's answer is a claim too: a NaN, a value outside [0, 1], no samples or no classes is
    refused (the validator is left out of that verdict), a plausible one is taken as it is."""
    from types import SimpleNamespace

    from services.cloud.specialists import SpecialistBoard

    answers = iter(
        [
            pb.ValidationScore(accuracy=float("nan"), own_accuracy=0.5, samples=8, classes=4),
            pb.ValidationScore(accuracy=1.5, own_accuracy=0.5, samples=8, classes=4),
            pb.ValidationScore(accuracy=0.5, own_accuracy=0.5, samples=0, classes=4),
            pb.ValidationScore(accuracy=0.5, own_accuracy=0.5, samples=8, classes=0),
            pb.ValidationScore(accuracy=0.25, own_accuracy=0.5, samples=8, classes=4),
        ]
    )
    board = SpecialistBoard.__new__(SpecialistBoard)
    board.cfg, board.meta = load_config(None, []), None
    board._stub = lambda _n: SimpleNamespace(Validate=lambda *_a, **_k: next(answers))
    for _ in range(4):
        with pytest.raises(ValueError, match="implausible"):
            board.validate("device-0-2", "art", "device-0-1", pb.ServedModules())
    assert board.validate("device-0-2", "art", "device-0-1", pb.ServedModules()) == Score("device-0-2", 0.25, 0.5, 8, 4)


def test_a_bait_and_switch_specialist_is_flagged_when_its_relay_is_not_what_was_examined(tmp_path):
    """device-0-1 shows the cloud's examination its honest gqa head (it passes and, claiming the most data,
    is appointed), then relays a negated one. The taker's sync is pinned to the examined digest: it refuses
    the push (not_examined) and sends the cloud the sender's signed header (its proof), the coordinator
    flags device-0-1 on it, and the round's next attempt is served by someone else; what the taker
    adopted is never the switched version."""
    # one candidate per task: the one with the most evidence, the liar
    res = _run_with_an_adversary(tmp_path, ["adversary.behaviour=bait_switch", "specialists.candidates=1"])
    assert res["complete"]
    rounds = {x["round"]: x for x in res["rounds"]}
    assert rounds[3]["specialists"]["appointed"].get("gqa") == ["device-0-1"], rounds[3]["specialists"]
    r4 = rounds[4]
    assert r4["aborted"] and "not the version examined" in r4["aborted"][0]["reason"]
    assert "device-0-1" in r4["specialists"]["switched"] and "device-0-1" in r4["specialists"]["flagged"]
    # flagged on the taker's proof (the sender's signed header, Coordinator.ReportSwitch), not on its word
    assert "signed push header, reported by device-0-2" in r4["specialists"]["switched"]["device-0-1"]
    served = [h["origin"] for h in r4["hops"] if h["tag"] == "sync" and h["destination"] == "device-0-2"]
    assert served and "device-0-1" not in served
    assert all("device-0-1" not in ns for ns in r4["specialists"]["appointed"].values())


@pytest.mark.parametrize("quorum", [1, 2])
def test_a_lying_validator_flags_honest_candidates_only_when_one_word_suffices(tmp_path, quorum):
    """device-0-1 is a fake specialist and device-0-2 lies whenever it validates: it vouches for the fake
    and frames everyone else. Every holder validates every candidate. With quorum 1 the liar's word alone
    has honest candidates flagged (the attack works); with quorum 2 nobody honest is flagged: the liar's
    victims are disputed (not appointed) until the liar, its accusations of two of them contradicted by
    the other validators, is discredited; the fake, vouched for, is still never appointed and never
    relays (the honest validators' collapse outweighs the liar's vouching)."""
    res = _run_with_an_adversary(
        tmp_path,
        ["adversary.behaviour=fake_specialist", "adversary.liars=[device-0-2]", "specialists.validators=5",
         f"specialists.quorum={quorum}"],
    )  # fmt: skip
    assert res["complete"]
    reviews = {x["round"]: x["specialists"] for x in res["rounds"] if x["specialists"]}
    flagged = {n for s in reviews.values() for n in s["flagged"]}
    framed = flagged - {"device-0-1"}
    accused = {v["node"] for s in reviews.values() for v in s["verdicts"] if "device-0-2" in v["accusers"]}
    assert accused - {"device-0-1"}, "the liar accused nobody honest"
    if quorum == 1:
        assert framed, reviews
    else:
        assert not framed, reviews
        disputed = {v["node"] for s in reviews.values() for v in s["verdicts"] if v["verdict"] == DISPUTED}
        assert (accused - {"device-0-1"}) & disputed
        # its lone accusations of two honest candidates discredit it: never asked again, accusations dropped
        when = min(r for r, s in reviews.items() if "device-0-2" in s["discredited"])
        for r, s in reviews.items():
            if r > when:
                for v in s["verdicts"]:
                    assert "device-0-2" not in v["accusers"] + [x.get("validator") for x in v["scores"]]
    assert all("device-0-1" not in ns for s in reviews.values() for ns in s["appointed"].values())
    for x in res["rounds"]:
        assert not [h for h in x["hops"] if h["tag"] == "sync" and h["origin"] == "device-0-1"], x["round"]


@pytest.mark.parametrize("appeal", [0, 2])
def test_two_colluding_liars_flag_an_honest_candidate_unless_the_review_hears_an_appeal(tmp_path, appeal):
    """device-0-2 and device-0-4 lie whenever they validate (framing every honest candidate, vouching for
    the fake device-0-1); each candidate is scored by 3 holders, both liars among them for some honest
    one. Quorum 2: without an appeal the two liars' word flags honest candidates for good; with
    specialists.appeal=2 the review asks two more holders before any refusal or acceptance, the honest
    majority outvotes the liars and nobody honest is flagged. Either way the fake never relays."""
    res = _run_with_an_adversary(
        tmp_path,
        ["adversary.behaviour=fake_specialist", "adversary.liars=[device-0-2,device-0-4]", "specialists.validators=3",
         "specialists.quorum=2", f"specialists.appeal={appeal}"],
    )  # fmt: skip
    assert res["complete"]
    reviews = {x["round"]: x["specialists"] for x in res["rounds"] if x["specialists"]}
    flagged = {n for s in reviews.values() for n in s["flagged"]}
    framed = flagged - {"device-0-1"}
    liars = {"device-0-2", "device-0-4"}
    both = [v for s in reviews.values() for v in s["verdicts"] if v["node"] not in liars | {"device-0-1"}
            and liars <= {x.get("validator") for x in v["scores"]}]  # fmt: skip
    assert both, "the two liars never scored the same honest candidate"
    if not appeal:
        assert framed, reviews
    else:
        assert not framed, reviews
        appealed = [v for s in reviews.values() for v in s["verdicts"] if v["appeal"]]
        assert appealed, "no refusal was appealed"
        for v in appealed:
            assert len(v["scores"]) == 3 + len(v["appeal"]) and not set(v["appeal"]) & {
                x["validator"] for x in v["scores"][:3]
            }
    assert all("device-0-1" not in ns for s in reviews.values() for ns in s["appointed"].values())
    for x in res["rounds"]:
        assert not [h for h in x["hops"] if h["tag"] == "sync" and h["origin"] == "device-0-1"], x["round"]


def test_two_colluding_liars_cannot_vouch_for_a_head_the_federation_s_statistics_refute(tmp_path):
    """With calibration (statistics first) and specialists.stats_cut, the cloud holds every served head to the
    federation's statistics of the last calibration phase (round 1's opening phase on): the fake's negated head
    makes the federation's answers far less likely at their means than the cloud's head does, so it is refused
    at the first review whatever the two colluding liars (device-0-2 and -4, vouching for it) say; the honest
    candidates' heads lose next to nothing there, and nobody honest is flagged (appeal 2)."""
    res = _run_with_an_adversary(
        tmp_path,
        ["adversary.behaviour=fake_specialist", "adversary.liars=[device-0-2,device-0-4]", "specialists.quorum=2",
         "specialists.appeal=2", "calibration.enabled=true", "calibration.opening=true", "calibration.epochs=1",
         "specialists.stats_cut=1"],
    )  # fmt: skip
    assert res["complete"]
    reviews = {x["round"]: x["specialists"] for x in res["rounds"] if x["specialists"]}
    verdicts = [(r, v) for r, s in reviews.items() for v in s["verdicts"]]
    fake = [v for r, v in verdicts if r == 1 and v["node"] == "device-0-1"]
    assert fake and all(v["verdict"] == REFUSED and v["stats_drop"] > 1 for v in fake), fake
    assert "device-0-1" in reviews[1]["flagged"]
    honest = [v["stats_drop"] for _, v in verdicts if v["node"] != "device-0-1"]
    assert honest and all(d is not None and d <= 1 for d in honest), honest
    assert {n for s in reviews.values() for n in s["flagged"]} == {"device-0-1"}
    for x in res["rounds"]:
        assert not [h for h in x["hops"] if h["tag"] == "sync" and h["origin"] == "device-0-1"], x["round"]


def test_label_coverage_is_registered_only_for_the_devices_tasks_and_within_0_and_1():
    from hffm.topology import Registration
    from services.cloud.membership import Membership

    cfg = load_config(None, ["topology.edges=1", "topology.devices_per_edge=2", "tasks=[art,gqa]"])
    topo = Topology.from_config(cfg, 2)
    m = Membership(topo, "127.0.0.1:0")
    for bad in ((("art", 1.5),), (("art", -0.1),), (("art", float("nan")),), (("vqa", 0.5),)):
        with pytest.raises(ValueError, match="label_coverage"):
            m.register(Registration("device-0-0", "device", "a:1", "edge-0", (("art", 5),), label_coverage=bad))
        assert m.claims() == ({}, {}) and "device-0-0" not in m.addresses  # a refusal changes nothing
    m.register(Registration("device-0-0", "device", "a:1", "edge-0", (("art", 5),), label_coverage=(("art", 0.5),)))
    assert m.claims() == ({"device-0-0": {"art": 5}}, {"device-0-0": {"art": 0.5}})


def test_the_benchmark_counts_a_fake_caught_only_when_flagged_and_never_relayed():
    """benchmarks.specialists' judgement of one run (the real runs are the benchmark's, not the suite's)."""
    from benchmarks.specialists import judge_run, markdown, summary

    def rnd(r, flagged=(), hops=()):
        spec = {"flagged": list(flagged), "appointed": {}, "verdicts": []} if r < 5 else {}
        return {"round": r, "specialists": spec, "hops": list(hops)}

    relay = {"tag": "sync", "origin": "device-0-3", "destination": "device-0-2"}
    res = {"complete": True, "rounds": [rnd(1), rnd(2, ["device-0-1"]), rnd(3, hops=[relay]), rnd(4), rnd(5)]}
    ok = judge_run(res, "device-0-1")
    assert ok["caught"] and ok["caught_round"] == 2 and ok["served_by"]["device-0-2"] == "device-0-3"
    leaked = {**res, "rounds": [rnd(1, hops=[{**relay, "origin": "device-0-1"}]), rnd(2, ["device-0-1"])]}
    assert not judge_run(leaked, "device-0-1")["caught"]  # flagged, but one of its relays got through first
    framed = {**res, "rounds": [rnd(1, ["device-0-1", "device-0-4"])]}
    s = summary([{"seed": 0, **judge_run(framed, "device-0-1")}, {"seed": 1, **ok}])
    assert s["caught_rate"] == 1.0 and s["goal_met"] and s["false_flag_rate"] == pytest.approx(1 / 10)
    assert "100%" in markdown({"rows": [{"seed": 1, **ok}], "summary": s})

    # colluding liars: discredited when the last of them is; their seeds count 5 - 2 honest devices
    def gone(r, who):
        return {**rnd(r), "specialists": {**rnd(r)["specialists"], "discredited": [who]}}

    disc = {**res, "rounds": [gone(1, "device-0-2"), gone(3, "device-0-0")]}
    two = judge_run(disc, "device-0-1", ["device-0-0", "device-0-2"])
    assert two["liar_discredited"] == 3 and judge_run(disc, "device-0-1", ["device-0-4"])["liar_discredited"] is None
    s2 = summary([{"seed": 0, **two, "false_flags": ["device-0-3"]}])
    assert s2["false_flag_rate"] == pytest.approx(1 / 3) and s2["liar_discredited"] == 1


def test_a_candidate_or_validator_that_dies_mid_review_is_left_out_and_nothing_is_flagged():
    """The review after a round over candidates that do not answer: a candidate that cannot serve is
    unvalidated (the error recorded), a validator that fails is left out of the verdict; nobody is
    flagged or appointed on missing evidence, and the review returns (it never waits past its timeout)."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from hffm.topology import Registration
    from services.cloud.membership import Membership
    from services.cloud.specialists import SpecialistBoard

    class Gone(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

    cfg = load_config(None, ["topology.edges=1", "topology.devices_per_edge=3", "tasks=[art]"])
    topo = Topology.from_config(cfg, 2)
    members = Membership(topo, "127.0.0.1:0")
    for i, n in enumerate((10, 20, 30)):
        members.register(Registration(f"device-0-{i}", "device", f"127.0.0.1:{i + 1}", "edge-0", (("art", n),)))

    def serve(node):  # device-0-2 (the most evidence) is dead; device-0-1 serves
        if node == "device-0-2":
            raise Gone()
        return pb.ServedModules()

    def validate(node):  # every validator of device-0-1 fails too
        raise Gone()

    board = SpecialistBoard.__new__(SpecialistBoard)
    board.cfg, board.meta, board.members = cfg, None, members
    board.roles, board.flagged, board.pins, board._switched = {}, set(), {}, {}
    board.accusers, board.asked, board.contradicted, board.discredited = {}, {}, {}, set()
    board._stub = lambda n: SimpleNamespace(Serve=lambda *_a, **_k: serve(n), Validate=lambda *_a, **_k: validate(n))
    with ThreadPoolExecutor(4) as pool:
        rec = board.review(1, topo, pool)
    verdicts = {v["node"]: v for v in rec["verdicts"]}
    assert set(verdicts) == {"device-0-2", "device-0-1"}  # the two with the most evidence
    assert (
        verdicts["device-0-2"]["verdict"] == UNVALIDATED
        and "UNAVAILABLE" in verdicts["device-0-2"]["scores"][0]["error"]
    )
    assert verdicts["device-0-1"]["verdict"] == UNVALIDATED and verdicts["device-0-1"]["scores"] == []
    assert rec["flagged"] == [] and rec["appointed"] == {} and not board.flagged


def test_an_appeal_witness_that_fails_or_stalls_is_left_out_and_appeals_are_heard_at_once():
    """With ``specialists.appeal: 2`` every candidate's decisive verdict hears two more holders. Here one
    of them refuses the call and the other stalls (answering DEADLINE_EXCEEDED after 1 s): both are left
    out of the verdict, which stands on the first validators' scores, and both are named as the appeal.
    The two candidates' appeals are asked at once, so the stall costs the review one wait, not two."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from hffm.topology import Registration
    from services.cloud.membership import Membership
    from services.cloud.specialists import SpecialistBoard

    class Failed(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return self._code.name.lower()

    cfg = load_config(None, ["topology.edges=1", "topology.devices_per_edge=8", "tasks=[art]", "specialists.appeal=2"])
    topo = Topology.from_config(cfg, 2)
    members = Membership(topo, "127.0.0.1:0")
    for i in range(8):
        members.register(
            Registration(f"device-0-{i}", "device", f"127.0.0.1:{i + 1}", "edge-0", (("art", 80 - 10 * i),))
        )

    def validate(node):
        if node == "device-0-4":
            raise Failed(grpc.StatusCode.UNAVAILABLE)
        if node == "device-0-5":
            time.sleep(1.0)
            raise Failed(grpc.StatusCode.DEADLINE_EXCEEDED)
        return pb.ValidationScore(accuracy=0.9, own_accuracy=0.9, samples=10, classes=4)

    board = SpecialistBoard.__new__(SpecialistBoard)
    board.cfg, board.meta, board.members = cfg, None, members
    board.roles, board.flagged, board.pins, board._switched = {}, set(), {}, {}
    board.accusers, board.asked, board.contradicted, board.discredited = {}, {}, {}, set()
    board._stub = lambda n: SimpleNamespace(
        Serve=lambda *_a, **_k: pb.ServedModules(), Validate=lambda *_a, **_k: validate(n)
    )
    with ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        rec = board.review(1, topo, pool)
        took = time.monotonic() - t0
    verdicts = {v["node"]: v for v in rec["verdicts"]}
    assert set(verdicts) == {"device-0-0", "device-0-1"}
    for v in verdicts.values():
        assert v["verdict"] == ACCEPTED and v["appeal"] == ["device-0-4", "device-0-5"]
        assert {s["validator"] for s in v["scores"]} == {"device-0-0", "device-0-1", "device-0-2", "device-0-3"} - {
            v["node"]
        }
    assert rec["appointed"] == {"art": ["device-0-0"]} and not board.flagged
    assert took < 1.8, f"the two appeals waited one after the other ({took:.2f} s)"


def test_the_boards_state_is_saved_and_restored_whole():
    """What the cloud's checkpoint keeps of the specialists (a resumed coordinator goes on from it):
    roles, flags, pins, standing accusations, who scored whom, contradicted accusations, discredited
    validators."""
    from services.cloud.specialists import SpecialistBoard

    board = SpecialistBoard.__new__(SpecialistBoard)
    board.roles, board.flagged = {"gqa": ["device-0-3"]}, {"device-0-1"}
    board.pins = {("device-0-3", "head.gqa"): b"\x07" * 32}
    board.accusers = {("device-0-5", "art"): {"device-0-2"}}
    board.asked = {("device-0-5", "art"): {"device-0-2", "device-0-4"}}
    board.contradicted, board.discredited = {"device-0-2": {"device-0-5"}}, {"device-0-4"}
    again = SpecialistBoard.__new__(SpecialistBoard)
    again.restore(json.loads(json.dumps(board.to_json())))
    for k in ("roles", "flagged", "pins", "accusers", "asked", "contradicted", "discredited"):
        assert getattr(again, k) == getattr(board, k), k
