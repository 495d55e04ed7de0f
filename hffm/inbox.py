"""The receiving side of a node's round: which pushes it expects, and their running aggregates.

An ``Inbox`` is opened for a round's attempt with the node's ``Collect`` steps. A push is checked
twice: ``precheck`` on its header before any byte is read (who calls, round and attempt, collect
step, sender, versions, weights, duplicates), and ``accept`` with its decoded modules, which hands
them to that step's aggregator all-or-nothing. A rejected push raises ``ModuleError`` and leaves
the inbox exactly as it was. A push repeated by a retrying client (same push id, same digests) is
acknowledged as a duplicate and counted once. ``leave_out`` is the coordinator's verdict on a sender
lost mid-round: its steps stop waiting for it, and a push from it that arrives later is stale.

The caller's identity is an input (``caller``: who the transport says is calling), never a header
field: a direct push must come from its sender; a relayed D2D push from its sender or from a member
the round registered (a relay). ``wait`` applies the step's quorum: every sender, or enough of them
once the deadline passed; ``Aggregate`` says who was counted and who was left out.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hffm.aggregation import Aggregator, LabelCheck, LabelReference, make_aggregator
from hffm.config import ModelConfig
from hffm.ids import D2D, role_of, stats_task, task_of
from hffm.methods import (
    JOIN_REF,
    JOIN_STATS,
    LABEL_CHECK,
    OPENING_TAGS,
    STATS,
    STATS_OF,
    SYNC,
    TRAINING_TAG,
    Collect,
)
from hffm.modules import Module, ModuleError, ModuleSet
from hffm.results import SenderScore
from hffm.wire import PushHeader, digests_follow

if TYPE_CHECKING:
    from hffm.calibration import Claim

NOT_EXAMINED = "is not the version examined"  # a pinned relay refused (the coordinator flags its sender)
# collect steps that take an earlier round's modules, kept at their version: a sync, and a label reference's
EARLIER_STATE = (SYNC, JOIN_REF)


class RoundAborted(RuntimeError):
    """The round's attempt was replaced by a new one while a step waited."""


@dataclass(frozen=True)
class Aggregate:
    """What a collect step aggregated: the modules, and whose pushes they count; and what the node adopts."""

    tag: str
    modules: ModuleSet
    counted: tuple[str, ...]  # senders folded in, in fold order (this node too with include_self)
    left_out: tuple[str, ...]  # senders that had not pushed when the quorum's deadline passed
    scores: tuple[SenderScore, ...] = ()  # outlier scores per module and sender (rules with flag_z)
    # sender -> module -> the weight it was folded with, where that is below what it pushed (Collect.weight_bounds,
    # or the samples its statistics claimed with the head check); sorted
    weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    # what the node adopts where that is not ``modules``: after the federation's statistics (FEDERATION), the
    # statistics of its own senders that its deferred label check kept, which it sends up to be calibrated on
    kept: ModuleSet | None = None

    @property
    def adopted(self) -> ModuleSet:
        return self.modules if self.kept is None else self.kept


@dataclass
class _Collection:
    step: Collect
    aggregator: Aggregator
    caps: dict[str, dict[str, float]]  # sender -> module -> largest weight it may claim
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)  # sender -> module -> weight counted at most
    accepted: dict[str, tuple[str, tuple[bytes, ...]]] = field(default_factory=dict)  # sender -> (push id, digests)
    dropped: dict[str, str] = field(default_factory=dict)  # sender left out by the coordinator -> why
    lowered: dict[str, dict[str, float]] = field(default_factory=dict)  # sender -> module -> weight folded, if lower
    closed: bool = False  # the aggregate was formed: later pushes are stale
    # a collect after the round's opening calibration phase: no push until the phase has ended (``rebase``), so
    # none is folded before its sender's statistics are in and the start it is scored against is calibrated
    waiting: bool = False
    newest: int = -1  # the newest module version accepted (a sync's aggregate keeps it)

    @property
    def complete(self) -> bool:
        return len(self.accepted) + len(self.dropped) == len(self.step.senders)

    def lower(self, sender: str, modules: list[Module], bounds: dict[str, float] | None) -> list[Module]:
        """``modules`` bounded (``_bounded``), remembering which weights that lowered (the record says so)."""
        out = _bounded(modules, bounds)
        self.lowered[sender] = {b.name: b.num_samples for a, b in zip(modules, out, strict=True) if b is not a}
        return out


class Inbox:
    def __init__(
        self, node_id: str, head_check: tuple[float, ModelConfig] | None = None, statistics_first: bool = False
    ) -> None:
        """``head_check``: (calibration.head_check, the model's config) — each device's training push is
        checked against the statistics it sent this node last (``hffm.calibration.head_drop``).
        ``statistics_first`` (calibration.opening): every device sends its statistics before its first push,
        so a device pushing with none here (one that joined since the last, or whose statistics missed their
        deadline) weighs at most what a typical device's claim does (``_claimed``)."""
        self.node_id = node_id
        self.round: int | None = None
        self.attempt = 0
        self.registered: set[str] = set()
        self._collections: dict[str, _Collection] = {}
        # sender -> its label_t, for the senders this node's last label check (a statistics collect with
        # calibration.label_t) flagged: left out of its collects of training updates until a later check
        # clears them (the node saves them with each round end and sets them back from its base: NodeRuntime)
        self.mislabelled: dict[str, float] = {}
        self.head_check = head_check
        self.statistics_first = statistics_first
        # sender -> task -> what its last statistics here said (Claim), kept with head_check: its training pushes
        # are checked against them (saved with each round end and set back from the base, as the flags are)
        self.claims: dict[str, dict[str, Claim]] = {}
        # what this node's last label check of a closing phase's statistics judged against: a device synced into
        # the next round (a joiner) is checked against it as its statistics arrive (``_check_joiner``); saved with
        # each round end and set back from the base, as the flags are
        self.label_reference: LabelReference | None = None
        # device -> the round whose modules this node sent it this round to compute its join-stats under
        # (``JOIN_REF``, after an edge round), None where it had no reference's modules to send (``refer``)
        self.referred: dict[str, int | None] = {}
        # (round, where this node's devices train from in it: its training collects' reference, as ``rebase``
        # moved it) and their previous start, the other end of the last step an aggregator with ``echo``
        # compares each update with (the last start of an earlier round; in the first, the start before a
        # rebase moved it). In memory only: a restarted node scores no echo until it has one to compare with.
        self._start: tuple[int, ModuleSet] | None = None
        self._previous_start: ModuleSet = {}
        self._generation = 0
        self._cv = threading.Condition()

    # -- round lifecycle ------------------------------------------------------------------
    def open_round(
        self,
        round_: int,
        collects: list[Collect],
        registered: set[str],
        attempt: int = 0,
        reference: ModuleSet | None = None,
        mislabelled: dict[str, float] | None = None,
        claims: dict[str, dict[str, Claim]] | None = None,
    ) -> None:
        """Expect this round's (attempt's) pushes; whatever an earlier attempt collected is dropped and
        a step still waiting on it is aborted. ``mislabelled`` and ``claims``: the flags and the head check's
        claims the attempt starts from (its base round end's; None: as they are)."""
        with self._cv:
            if mislabelled is not None:
                self.mislabelled = dict(mislabelled)
            if claims is not None:
                self.claims = dict(claims)
            self.round = round_
            self.attempt = attempt
            self.registered = set(registered)
            if reference and any(c.tag.startswith(TRAINING_TAG) for c in collects):
                if self._start is not None and self._start[0] < round_:  # a re-attempt keeps its round's
                    self._previous_start = self._start[1]
                self._start = (round_, reference)
            self.referred = {}
            self._collections = {
                c.tag: _Collection(
                    c,
                    self._aggregator(c, reference),
                    {s: c.caps_of(s) for s, _ in c.weight_caps},
                    {s: c.bounds_of(s) for s, _ in c.weight_bounds},
                )
                for c in collects
            }
            opening = next((i for i, c in enumerate(collects) if c.tag in OPENING_TAGS), None)
            for c in collects[opening:] if opening is not None else ():
                self._collections[c.tag].waiting = c.tag not in OPENING_TAGS
            self._generation += 1
            self._cv.notify_all()

    def refer(self, devices: list[str], round_: int | None) -> None:
        """This node sends ``devices`` the modules of round ``round_`` (None: no label reference's) to compute their
        join-stats under (``JOIN_REF``): their labels are checked on arrival where that is its reference's round.
        Called before the sends, so no statistics computed under them can arrive first."""
        with self._cv:
            self.referred.update(dict.fromkeys(devices, round_))

    def _aggregator(self, c: Collect, reference: ModuleSet | None) -> Aggregator:
        agg = make_aggregator(c.rule, self._order(c), reference, dict(c.params))
        if c.tag.startswith(TRAINING_TAG) and "echo" in dict(c.params):  # the last step: this start - the one before
            agg.previous = dict(self._previous_start)
        if c.tag.startswith(TRAINING_TAG) or c.rule == LABEL_CHECK:  # the senders found mislabelled: left out
            agg.excluded = {s: t for s, t in self.mislabelled.items() if s in c.senders}
        if c.tag.startswith(TRAINING_TAG) and self.head_check is not None:
            start, built = dict(reference or {}), {}  # the start's heads built once for every sender
            agg.screen = lambda sender, modules: self._screen(sender, modules, start, built)
        return agg

    def _screen(self, sender: str, modules: list[Module], start: ModuleSet, built: dict) -> tuple[float, bool] | None:
        """A training push against its sender's last statistics here and the modules the round started from
        (the node's): (head_drop, over the cut), or None (no statistics from it yet, nothing comparable).
        Runs as the aggregator folds, under the inbox lock."""
        from hffm.calibration import head_drop  # the model's side of the package

        claims = self.claims.get(sender)
        if not claims or self.head_check is None:
            return None
        cut, model_cfg = self.head_check
        drop = head_drop({m.name: m for m in modules}, start, claims, model_cfg, built)
        return None if drop is None else (drop, drop > cut)

    def _claimed(self, sender: str, bounds: dict[str, float] | None, modules: list[Module]) -> dict[str, float] | None:
        """With the head check, ``bounds`` with each module of a training push weighing at most what ``sender``'s
        last statistics here claimed (at least 1): the head of a task at most the samples its claim of the task
        covers, every other module (the adapters, trained on all its tasks) at most the sum over the push's
        tasks, where each of them is claimed. A head is judged by the answers its sender reported, so the push
        counts for no more samples than it reported: a liar reporting no sample (nothing for the head check to
        judge) adds modules of weight 1, not its registered samples; an honest device's statistics cover
        exactly the samples it trains on, so its weights do not move. With ``statistics_first`` a device with no
        statistics here weighs at most the median of the other devices' claims of each task: a joiner counts as a
        typical device until its statistics come, whatever it registered."""
        if self.head_check is None:
            return bounds
        claims = self.claims.get(sender)
        if claims:
            claimed = _claimed_samples(claims)
        elif self.statistics_first and role_of(sender) == "device":
            claimed = self._typical_claims()
        else:
            return bounds
        tasks = {task_of(m.name) for m in modules} - {None}
        shared = sum(claimed[t] for t in tasks) if tasks and tasks <= claimed.keys() else math.inf
        out = dict(bounds or {})
        for m in modules:
            t = task_of(m.name)
            cap = shared if t is None else claimed.get(t, math.inf)
            if cap < math.inf:
                out[m.name] = min(out.get(m.name, math.inf), cap)
        return out

    def _typical_claims(self) -> dict[str, float]:
        """task -> the median over the devices with statistics here of the samples they claimed of it."""
        by_task: dict[str, list[float]] = {}
        for claims in self.claims.values():
            for t, n in _claimed_samples(claims).items():
                by_task.setdefault(t, []).append(n)
        return {t: statistics.median(v) for t, v in by_task.items()}

    def rebase(self, reference: ModuleSet) -> None:
        """The round's start moved within the round (an opening calibration phase: heads calibrated before anyone
        trains): each collect of the round that nothing has reached yet scores its senders against ``reference``
        and leaves out the senders flagged by now (the phase's label check)."""
        with self._cv:
            if self._start is not None and self._start[0] == self.round:  # where its devices train from now
                self._previous_start = self._previous_start or self._start[1]  # the first round: moved from
                self._start = (self.round, reference)
            for coll in self._collections.values():
                if not (coll.closed or coll.accepted or coll.aggregator.senders or coll.aggregator.pending):
                    coll.aggregator = self._aggregator(coll.step, reference)
                coll.waiting = False

    def abort_waits(self) -> None:
        """Every step waiting on this inbox raises ``RoundAborted`` (the node is closing)."""
        with self._cv:
            self._generation += 1
            self._cv.notify_all()

    def _order(self, c: Collect) -> list[str]:
        """The canonical fold order of a collect step: its senders (and this node) sorted."""
        return sorted({*c.senders, *([self.node_id] if c.include_self else [])})

    def snapshot(self) -> dict[str, object]:
        """A comparable view of the inbox state (tests use it to show rejections change nothing)."""
        with self._cv:
            return {
                "round": self.round,
                "attempt": self.attempt,
                "accepted": {t: dict(c.accepted) for t, c in self._collections.items()},
                "senders": {t: [*c.aggregator.senders, *c.aggregator.pending] for t, c in self._collections.items()},
            }

    # -- receiving ------------------------------------------------------------------------
    def _check(self, h: PushHeader, caller: str | None) -> tuple[_Collection, bool]:
        """The collection ``h`` feeds, and whether it repeats an accepted push. A header whose digests
        follow (``digests_follow``) is checked on all but its digests: the pins and whether a push of the
        same id repeats or conflicts wait for them (``accept`` checks the whole header)."""
        known = not digests_follow(h)
        if h.receiver != self.node_id:
            raise ModuleError(
                "INVALID_ARGUMENT", "wrong_receiver", f"push addressed to {h.receiver!r}, this is {self.node_id!r}"
            )
        if not caller:
            raise ModuleError("UNAUTHENTICATED", "no_identity", "the caller's identity is unknown")
        if caller != h.sender and not (h.link == D2D and caller in self.registered):
            raise ModuleError(
                "PERMISSION_DENIED", "sender_mismatch", f"{caller} may not push as {h.sender} on a {h.link} link"
            )
        if h.sender not in self.registered:
            raise ModuleError("PERMISSION_DENIED", "unregistered_sender", f"sender {h.sender!r} is not registered")
        if self.round is None:
            raise ModuleError("FAILED_PRECONDITION", "no_round", f"{self.node_id} has no open round")
        if h.round != self.round:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "wrong_round",
                f"push for round {h.round}, {self.node_id} is in round {self.round}",
            )
        if h.attempt != self.attempt:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "wrong_attempt",
                f"push for attempt {h.attempt} of round {h.round}; this node runs attempt {self.attempt}",
            )
        coll = self._collections.get(h.tag)
        if coll is None:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "unexpected_push",
                f"{self.node_id} collects nothing as {h.tag!r} in round {self.round}",
            )
        if coll.waiting:  # nobody honest can push yet: its sender has not had the calibrated heads
            raise ModuleError(
                "FAILED_PRECONDITION",
                "before_statistics",
                f"{self.node_id}/{h.tag} takes no push before the round's opening calibration phase has ended",
            )
        if h.sender not in coll.step.senders:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "unexpected_sender",
                f"{h.sender} is not a sender of {self.node_id}/{h.tag} this round",
            )
        if h.link != coll.step.link:
            raise ModuleError("INVALID_ARGUMENT", "wrong_link", f"link {h.link!r}, expected {coll.step.link!r}")
        held = self._collections.get(JOIN_STATS)
        if held is not None and h.tag.startswith(TRAINING_TAG) and h.sender in held.step.senders:
            if h.sender not in held.accepted:  # it sends them before it trains: a push before them skips the checks
                raise ModuleError(
                    "FAILED_PRECONDITION",
                    "before_statistics",
                    f"{h.sender} pushes to {self.node_id}/{h.tag} before its statistics ({JOIN_STATS})",
                )
        earlier = coll.step.tag in EARLIER_STATE
        for m in h.modules:  # a sync (a label reference too) carries an earlier round's state; anything else this one's
            if (m.version >= h.round) if earlier else (m.version != h.round):
                raise ModuleError(
                    "FAILED_PRECONDITION",
                    "wrong_version",
                    f"module {m.name} has version {m.version}, round is {h.round} ({h.tag})",
                )
        pinned = dict(coll.step.pinned)
        for m in h.modules if known else ():
            if m.name in pinned and m.digest != pinned[m.name]:
                raise ModuleError(
                    "FAILED_PRECONDITION",
                    "not_examined",
                    f"module {m.name} from {h.sender} {NOT_EXAMINED} (digest {m.digest.hex()[:16]}, "
                    f"examined {pinned[m.name].hex()[:16]})",
                )
        caps = coll.caps.get(h.sender)
        if caps is not None:
            if {m.name for m in h.modules} != set(caps):
                raise ModuleError(
                    "INVALID_ARGUMENT",
                    "incomplete_push",
                    f"{h.sender} must push exactly {sorted(caps)} to {h.tag}, got {[m.name for m in h.modules]}",
                )
            for m in h.modules:
                if not m.num_samples <= caps[m.name] * (1 + 1e-9):
                    raise ModuleError(
                        "INVALID_ARGUMENT",
                        "bad_weight",
                        f"module {m.name}: weight {m.num_samples} exceeds the {caps[m.name]:g} samples "
                        f"registered behind {h.sender}",
                    )
        prev = coll.accepted.get(h.sender)
        if h.sender in coll.dropped:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "stale_push",
                f"{self.node_id}/{h.tag}: {h.sender} was left out of this round ({coll.dropped[h.sender]})",
            )
        if coll.closed and prev is None:
            raise ModuleError(
                "FAILED_PRECONDITION",
                "stale_push",
                f"{self.node_id}/{h.tag} already aggregated without {h.sender} this round",
            )
        if prev is not None and not known and prev[0] == h.push_id:
            return coll, False  # a retry or a conflict: told apart by the digests, at ``accept``
        if prev is not None:
            digests = tuple(m.digest for m in h.modules)
            if prev == (h.push_id, digests):
                return coll, True
            raise ModuleError(
                "ALREADY_EXISTS",
                "conflicting_push",
                f"{h.sender} already pushed different modules to {h.tag} this round",
            )
        return coll, False

    def precheck(self, header: PushHeader, caller: str | None) -> bool:
        """Raise if the push cannot be accepted; True when it repeats one already accepted."""
        with self._cv:
            return self._check(header, caller)[1]

    def accept(self, header: PushHeader, modules: list[Module], caller: str | None) -> bool:
        """Fold the push in (all-or-nothing); True when it was a duplicate (nothing changed)."""
        with self._cv:
            coll, dup = self._check(header, caller)
            if dup:
                return True
            bounds = coll.bounds.get(header.sender)
            if coll.step.tag.startswith(TRAINING_TAG):
                bounds = self._claimed(header.sender, bounds, modules)
            folded = coll.lower(header.sender, modules, bounds)
            coll.aggregator.add(header.sender, folded)
            coll.accepted[header.sender] = (header.push_id, tuple(m.digest for m in header.modules))
            if coll.step.tag == JOIN_STATS and self.head_check is not None:
                # a synced device's statistics hold from its next push on: it sends them before it trains, and its
                # training push may come before this node's step has waited for them
                self.claims[header.sender] = _claims(folded)  # as the step's LabelCheck.claims will read them
                self._check_joiner(coll, header.sender, folded)
            coll.newest = max(coll.newest, *(m.version for m in header.modules))
            self._cv.notify_all()
            return False

    def _check_joiner(self, coll: _Collection, sender: str, modules: list[Module]) -> None:
        """A synced device's statistics (``join-stats``) checked for its labels as they arrive, against what this
        node's label check of the last round's closing phase judged its senders by (``label_reference``): the
        statistics its kept senders sent and the rest of the federation, computed under the modules the device
        was synced to where the last round was the reference's, else under the reference's modules this node sent
        it (``refer``: after an edge round). Flagged, the device is left out of this round's collects of training
        updates, which it cannot have pushed to yet (``_check`` refuses a push before its statistics); passing,
        it is cleared. The step's record scores it either way. Where its statistics are under other modules than
        the reference's (an edge round came between and this node held no reference modules to send) or there
        is no reference, its labels wait for the next calibration phase's check."""
        ref = self.label_reference
        agg = coll.aggregator
        if not isinstance(agg, LabelCheck) or ref is None or self.round is None:
            return
        under = self.referred[sender] if sender in self.referred else self.round - 1
        if under != ref.round:
            return
        from hffm.calibration import sums_of  # the model's side of the package

        t = ref.score(sums_of(modules))
        if t is None:
            return
        flagged = t > agg.cut
        targets = [agg] + [
            c.aggregator
            for c in self._collections.values()
            if c.step.tag.startswith(TRAINING_TAG) and sender in c.step.senders and not c.closed
        ]
        for a in targets:
            if flagged:
                a.excluded[sender] = t
            else:
                a.excluded.pop(sender, None)
        if not flagged:
            agg.passed[sender] = t

    def leave_out(self, round_: int, attempt: int, sender: str, reason: str) -> list[str]:
        """Stop waiting for ``sender`` in this round's attempt (the coordinator found it lost); returns
        the collect steps it was dropped from (those it had already pushed to keep its push)."""
        with self._cv:
            if (round_, attempt) != (self.round, self.attempt):
                return []
            tags = []
            for tag, coll in self._collections.items():
                if sender in coll.step.senders and sender not in coll.accepted and not coll.closed:
                    coll.dropped.setdefault(sender, reason)
                    tags.append(tag)
            self._cv.notify_all()
            return tags

    def add_own(self, tag: str, modules: ModuleSet) -> None:
        """A collect step with include_self: the node's own modules count like a sender's."""
        with self._cv:
            coll = self._collections[tag]
            coll.aggregator.add(
                self.node_id, coll.lower(self.node_id, list(modules.values()), coll.bounds.get(self.node_id))
            )

    def wait(self, tag: str, timeout_s: float) -> Aggregate:
        """Block until every sender of ``tag`` pushed, or until the quorum's deadline (default
        ``timeout_s``) if enough did; return the aggregate (version = round)."""
        with self._cv:
            coll = self._collections[tag]
            gen = self._generation
            q = coll.step.quorum
            wait_s = q.deadline_s if q.deadline_s is not None else timeout_s
            deadline = time.monotonic() + wait_s
            optional = tag == JOIN_STATS  # synced devices' statistics: whoever sent them by the deadline, or nobody
            while True:
                if self._generation != gen:
                    raise RoundAborted(f"{self.node_id}/{tag}: round {self.round} moved to attempt {self.attempt}")
                if coll.complete:
                    if optional:
                        break
                    if len(coll.accepted) < q.needed(len(coll.step.senders)) or not (
                        coll.accepted or coll.step.include_self
                    ):
                        raise ModuleError(
                            "FAILED_PRECONDITION",
                            "quorum_lost",
                            f"{self.node_id}/{tag}: {len(coll.accepted)} of {len(coll.step.senders)} senders "
                            f"pushed, {q.needed(len(coll.step.senders))} needed; lost {sorted(coll.dropped)}",
                        )
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(coll.step.senders) - set(coll.accepted))
                    if optional or (
                        len(coll.accepted) >= q.needed(len(coll.step.senders))
                        and (coll.accepted or coll.step.include_self)
                    ):
                        break
                    raise TimeoutError(f"{self.node_id}/{tag}: no push from {missing} after {wait_s:.0f}s")
                self._cv.wait(left)
            assert self.round is not None
            coll.closed = True
            # A sync adopts an earlier round's state and keeps its version: a node synced from its tier
            # (an edge from the cloud) may have to sync others next (its devices), and a sync carries
            # an earlier round's modules only. Any other aggregate is this round's.
            sync = coll.step.tag in EARLIER_STATE and coll.newest >= 0
            modules = (
                coll.aggregator.result(coll.newest if sync else self.round) if coll.accepted or not optional else {}
            )
            scores = list(coll.aggregator.scores)
            kept = None
            if coll.step.rule == LABEL_CHECK:
                assert isinstance(coll.aggregator, LabelCheck)
                self._checked(scores)
                if self.head_check is not None:
                    self.claims.update(coll.aggregator.claims())
                if tag == STATS and not coll.aggregator.defer:  # checked here and now (the cloud in star)
                    self.label_reference = coll.aggregator.label_reference(self.round)
            elif tag in STATS_OF and any(stats_task(n) for n in modules):
                # the federation's statistics came down: the deferred check of the same phase's statistics runs
                # now, and what this node adopts (and sends up again, CHECKED) is its senders' statistics without
                # those it flagged (``Aggregate.kept``); the aggregate itself is what came
                for other in self._collections.values():
                    mine = other.step.tag == STATS_OF[tag] and isinstance(other.aggregator, LabelCheck)
                    if mine and other.aggregator.defer and other.closed:
                        checked = other.aggregator.check(modules)
                        self._checked(checked)
                        scores += checked
                        kept = other.aggregator.kept(self.round)
                        # a closing phase's statistics are under the round's modules, the opening phase's under the
                        # modules the round started from (round 1's: the initial ones, round 0's)
                        under = self.round if STATS_OF[tag] == STATS else self.round - 1
                        self.label_reference = other.aggregator.label_reference(under)
            return Aggregate(
                tag,
                modules,
                tuple(coll.aggregator.senders),
                tuple(sorted(set(coll.step.senders) - set(coll.accepted))),
                tuple(scores),
                tuple((s, tuple(sorted(w.items()))) for s, w in sorted(coll.lowered.items()) if w),
                kept,
            )

    def _checked(self, scores: list[SenderScore]) -> None:
        """A label check's verdicts: re-evaluated at every check (a sender that passes is cleared)."""
        for sc in scores:
            if sc.flagged:
                self.mislabelled[sc.sender] = sc.label_t
            else:
                self.mislabelled.pop(sc.sender, None)


def _claims(modules: list[Module]) -> dict[str, Claim]:
    """task -> the claim of one sender's statistics modules."""
    from hffm.calibration import claims_of, sums_of  # the model's side of the package

    return claims_of(sums_of(modules))


def _claimed_samples(claims: dict[str, Claim]) -> dict[str, float]:
    """task -> the samples a sender's statistics claimed of it (at least 1)."""
    return {t: max(float(c.count.sum()), 1.0) for t, c in claims.items()}


def _bounded(modules: list[Module], bounds: dict[str, float] | None) -> list[Module]:
    """``modules`` with each weight at most its bound (``Collect.weight_bounds``); the tensors untouched."""
    if not bounds:
        return modules
    return [
        replace(m, num_samples=bounds[m.name]) if m.num_samples > bounds.get(m.name, m.num_samples) else m
        for m in modules
    ]
