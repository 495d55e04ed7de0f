"""Specialists (the paper's Section V-C): nodes that persistently provide a task's modules, chosen from
evidence and cross-validated before anything they serve is relayed. Pure: the coordinator gathers the
evidence (registrations) and the validators' scores (``Specialist.Validate`` over gRPC) and asks this
module who is a candidate, who validates whom, and what the verdicts are.

- **Evidence** for task T on device S: its share of T's registered training samples among T's holders
  times its label coverage (the fraction of T's answer classes its partition holds, as it registered
  them). A claim, so only a way to pick whom to examine: no claim makes a specialist.
- **Candidates**: the ``candidates`` holders of T with the most evidence (ties: by id), not flagged before.
- **Validators** of S for T: other holders of T, other candidates first, then by evidence. Each scores
  S's modules for T (``head.T``, ``prompt.T``) with its own adapters on its own test split (the data
  nobody else trains on), and its own modules for T on the same data.
- **Verdict**: margin = S's accuracy minus the validator's own, per validator; its median over the
  validators, and the worst of them. A validator whose margin is below ``-2 tolerance`` **accuses** S
  (its accuracy collapses on that validator's data: test splits are non-IID, often one class, so a
  poisoned head can score higher than the validator's own on one and far lower on another, and a median
  of three hides the collapse); accusations stand across reviews until the accuser, asked again, sees
  S within ``tolerance`` of its own (withdrawn). ``refused`` (S flagged: never a relay source again)
  when ``quorum`` distinct validators accuse it, or when its median margin is below ``-tolerance`` with
  ``quorum`` validators below ``-tolerance``. ``quorum`` = 1 is one witness's word: a lying validator
  can then have any honest candidate flagged; with 2 (the default) one liar cannot, and a candidate with
  fewer accusers is ``disputed``: not appointed (nothing relayed from it), examined again by its
  accusers first and validators that have not scored it yet, until a second witness refuses it or the
  accusation is withdrawn. Only margins: a validator's own modules may score below 1 / classes on its
  data, and a candidate as bad as they are is not refused for it. ``accepted`` when not refused or
  disputed, S's median accuracy is at least chance + ``min_gain`` (proven better than guessing), its
  median margin at least ``-min_gain`` and its worst at least ``-tolerance`` (as good as its validators'
  own, for each of them); ``unproven`` otherwise (early rounds, when nobody is better than chance yet: an
  untrained module, poisoned or not, is not told apart from an honest untrained one, so nothing is
  relayed from it).
- **Appeal** (``appeal`` > 0): before a decisive verdict — a refusal (a flag for good) or an acceptance
  (a role whose relays others adopt) — up to ``appeal`` more holders of T that did not score S in this
  review score it too, and the verdict is taken on every score; a refusal then also needs the accusers to
  **outnumber** the review's validators that see S within ``tolerance``. A quorum is a count, so
  ``quorum`` colluding liars meet it among themselves and have any honest candidate they score flagged
  for good; the appeal asks the honest majority. Likewise liars vouching for a fake can make up most of
  a review in which no honest validator's data shows the collapse; more witnesses, any one of whom may
  see it (the worst margin), keep it from a role. The price: a fake whose collapse only a minority of
  validators see (test splits of one class) is disputed, not refused (still never appointed, so nothing
  is relayed from it).
- **Discredited validators**: an accusation is *contradicted* when the candidate is not refused and at
  least ``quorum`` other validators of the same review see it within ``tolerance`` of their own. A
  validator with contradicted accusations against ``discredit`` distinct candidates (over the run) is no
  longer asked, and its standing accusations are dropped: a liar framing every candidate it scores is
  found after its second victim, while an honest validator that alone sees a fake's collapse on its
  one-class data accuses that one node. A liar that frames a single candidate keeps it disputed.
- **Specialists** of T: the ``per_task`` accepted candidates with the highest median validation accuracy
  (conflicts between candidates are settled by measured accuracy, not by claims). Roles are re-evaluated
  every review: a specialist whose data or module no longer holds up loses the role.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

ACCEPTED, REFUSED, DISPUTED, UNPROVEN, UNVALIDATED = "accepted", "refused", "disputed", "unproven", "unvalidated"


@dataclass(frozen=True)
class Score:
    """One validator's measurement of a candidate's modules for a task."""

    validator: str
    accuracy: float  # the candidate's modules, on the validator's test split
    own_accuracy: float  # the validator's own modules, on the same data
    samples: int
    classes: int  # the task's answer classes (chance = 1 / classes)


@dataclass
class Verdict:
    node: str
    task: str
    evidence: float
    verdict: str = UNVALIDATED
    accuracy: float | None = None  # median over validators
    margin: float | None = None  # median of (accuracy - validator's own)
    worst: float | None = None  # the lowest of them
    accusers: list[str] = field(default_factory=list)  # standing accusations after this review
    appeal: list[str] = field(default_factory=list)  # validators asked on appeal (before a refusal or acceptance)
    scores: list[dict] = field(default_factory=list)
    # nats its served head lost at the federation's answer means against the cloud's head (specialists.stats_cut)
    stats_drop: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def evidence(
    holders: Mapping[str, Iterable[str]],
    samples: Mapping[str, Mapping[str, int]],
    coverage: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """task -> device -> its data share among the task's holders x its label coverage (both as registered)."""
    out: dict[str, dict[str, float]] = {}
    for task, nodes in holders.items():
        nodes = sorted(nodes)
        total = sum(max(0, samples.get(n, {}).get(task, 0)) for n in nodes)
        out[task] = {
            n: (samples.get(n, {}).get(task, 0) / total if total else 0.0)
            * min(1.0, max(0.0, coverage.get(n, {}).get(task, 1.0)))
            for n in nodes
        }
    return out


def candidates(ev: Mapping[str, float], k: int, flagged: Iterable[str] = ()) -> list[str]:
    """The ``k`` nodes with the most evidence (> 0), ties by id, none of ``flagged``."""
    out = sorted((n for n, e in ev.items() if e > 0 and n not in set(flagged)), key=lambda n: (-ev[n], n))
    return out[:k]


def validators(
    node: str,
    ev: Mapping[str, float],
    cands: Iterable[str],
    k: int,
    flagged: Iterable[str] = (),
    accusers: Iterable[str] = (),
    asked: Iterable[str] = (),
) -> list[str]:
    """Up to ``k`` holders of the task other than ``node`` to score it: its standing ``accusers`` first
    (an accusation is repeated or withdrawn), then those that have not scored it yet (``asked``: those
    that have), each group the other candidates first, then by evidence (ties by id); never a flagged node."""
    bad = set(flagged) | {node}
    cands = [c for c in cands if c not in bad and c in ev]
    rest = sorted((n for n in ev if n not in bad and n not in cands), key=lambda n: (-ev[n], n))
    order = cands + rest
    accusing, done = set(accusers), set(asked)
    first = [n for n in order if n in accusing]
    fresh = [n for n in order if n not in first and n not in done]
    again = [n for n in order if n not in first and n in done]
    return (first + fresh + again)[:k]


def judge(
    node: str,
    task: str,
    ev: float,
    scores: Iterable[Score],
    tolerance: float,
    min_gain: float,
    accusers: Iterable[str] = (),
    quorum: int = 1,
    majority: bool = False,
    stats_drop: float | None = None,
    stats_cut: float | None = None,
) -> Verdict:
    """The verdict on ``node``'s modules for ``task`` from its validators' ``scores``, given the
    ``accusers`` standing from earlier reviews (see the module's text). ``majority``: a refusal also needs
    the accusers to outnumber this review's validators that see no drop (the appeal's rule). ``stats_drop``
    over ``stats_cut`` (its served head against the federation's statistics: evidence, not a vote) refuses it
    whatever the validators say; under the cut, or unknown (None), the validators decide."""
    scores = list(scores)
    standing = set(accusers)
    v = Verdict(node, task, ev, scores=[asdict(s) for s in scores], accusers=sorted(standing), stats_drop=stats_drop)
    if not scores:
        if refuted(stats_drop, stats_cut):
            v.verdict = REFUSED
        elif standing:
            v.verdict = DISPUTED
        return v
    margins = {s.validator: s.accuracy - s.own_accuracy for s in scores}
    standing -= {n for n, m in margins.items() if m >= -tolerance}  # asked again, it sees no drop: withdrawn
    standing |= {n for n, m in margins.items() if m < -2 * tolerance}
    doubters = sum(m < -tolerance for m in margins.values())
    # the median: with a mean, two liars vouching (1.0) lifted a fake that honest validators scored near 0
    # over chance + min_gain (measured: benchmarks.specialists --liars 2)
    acc = statistics.median(s.accuracy for s in scores)
    margin = statistics.median(margins.values())
    worst = min(margins.values())
    chance = 1.0 / max(1, max(s.classes for s in scores))
    v.accuracy, v.margin, v.worst, v.accusers = acc, margin, worst, sorted(standing)
    clear = sum(m >= -tolerance for m in margins.values())
    outvoted = majority and max(len(standing), doubters) <= clear
    if refuted(stats_drop, stats_cut):
        v.verdict = REFUSED
    elif not outvoted and (len(standing) >= quorum or (margin < -tolerance and doubters >= quorum)):
        v.verdict = REFUSED
    elif standing or margin < -tolerance:
        v.verdict = DISPUTED
    elif acc >= chance + min_gain and margin >= -min_gain and worst >= -tolerance:
        v.verdict = ACCEPTED
    else:
        v.verdict = UNPROVEN
    return v


def refuted(stats_drop: float | None, stats_cut: float | None) -> bool:
    """Whether a served head's drop at the federation's answer means (``Verdict.stats_drop``) is over the cut:
    refused on that evidence alone."""
    return stats_drop is not None and stats_cut is not None and stats_drop > stats_cut


def contradicted(verdict: Verdict, tolerance: float, quorum: int) -> set[str]:
    """The validators whose accusation (margin below -2 tolerance) in ``verdict`` at least ``quorum``
    other validators of the same review contradict (margin at least -tolerance); none when refused."""
    if verdict.verdict == REFUSED:
        return set()
    margins = {s["validator"]: s["accuracy"] - s["own_accuracy"] for s in verdict.scores if "validator" in s}
    fine = {v for v, m in margins.items() if m >= -tolerance}
    return {v for v, m in margins.items() if m < -2 * tolerance and len(fine - {v}) >= quorum}


def appoint(verdicts: Iterable[Verdict], per_task: int) -> dict[str, list[str]]:
    """task -> its specialists: the ``per_task`` accepted candidates with the highest median validation
    accuracy (ties by id)."""
    out: dict[str, list[Verdict]] = {}
    for v in verdicts:
        if v.verdict == ACCEPTED:
            out.setdefault(v.task, []).append(v)
    return {
        t: [v.node for v in sorted(vs, key=lambda v: (-(v.accuracy or 0.0), v.node))[:per_task]]
        for t, vs in sorted(out.items())
    }


def switch_proof(header, caller: str, round_: int | None, pins: Mapping[tuple[str, str], bytes]) -> str:
    """What a refused relay's push ``header`` (a ``hffm.wire.PushHeader`` whose signature the caller
    checked) proves: the name of a module its sender sent in a version other than the one the cloud
    examined and pinned for it (``pins``: (specialist, module) -> digest). ``ModuleError`` when it
    proves nothing: a push to someone other than ``caller`` (the taker reporting it), not a relay (a
    sync), not of the round now running (pins change at every review), or every module as examined."""
    from hffm.methods import SYNC
    from hffm.modules import ModuleError

    if header.receiver != caller:
        raise ModuleError("PERMISSION_DENIED", "not_the_receiver", f"{caller} reports a push to {header.receiver}")
    if header.tag != SYNC:
        raise ModuleError("INVALID_ARGUMENT", "not_a_relay", f"a {header.tag!r} push is no specialist's relay")
    if round_ is None or header.round != round_:
        raise ModuleError("FAILED_PRECONDITION", "wrong_round", f"a push of round {header.round}, running {round_}")
    pinned = [m for m in header.modules if (header.sender, m.name) in pins]
    if not pinned:
        raise ModuleError("FAILED_PRECONDITION", "not_pinned", f"nothing of {header.sender} was examined and pinned")
    for m in pinned:
        if m.digest != pins[(header.sender, m.name)]:
            return m.name
    raise ModuleError("INVALID_ARGUMENT", "as_examined", f"{header.sender} sent every module as examined")
