"""The cloud's specialist board (Section V-C; the decisions are hffm/specialists.py's): after a round it
picks candidates per task from the registered evidence, fetches each candidate's modules for the task
(``Specialist.Serve``), has validators score them on their own test data (``Specialist.Validate``),
flags the refused and appoints the best accepted. The planner then relays a task's modules only from
its specialists, and nothing from a flagged node. Talks gRPC; decides nothing itself."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from hffm.config import HFFMConfig
from hffm.ids import head_name
from hffm.modules import ModuleError
from hffm.specialists import (
    ACCEPTED,
    REFUSED,
    Score,
    Verdict,
    appoint,
    candidates,
    contradicted,
    evidence,
    judge,
    refuted,
    validators,
)
from hffm.topology import Topology
from services.cloud.membership import Membership
from services.common.convert import blobs_from_pb
from services.common.node import NodeRuntime
from services.rpc import pb, pb_grpc

log = logging.getLogger("hffm.specialists")


class SpecialistBoard:
    def __init__(self, cfg: HFFMConfig, node: NodeRuntime, members: Membership) -> None:
        self.cfg, self.node, self.members = cfg, node, members
        self.meta = node.security.call_metadata()
        self.roles: dict[str, list[str]] = {}  # task -> its specialists (the last review's)
        self.flagged: set[str] = set()  # refused once: never a relay source again
        self.pins: dict[tuple[str, str], bytes] = {}  # (specialist, module) -> digest of the version examined
        self._switched: dict[str, str] = {}  # flagged during a round (a relay not examined), for the record
        self.accusers: dict[tuple[str, str], set[str]] = {}  # (candidate, task) -> standing accusations
        self.asked: dict[tuple[str, str], set[str]] = {}  # (candidate, task) -> validators that scored it
        self.contradicted: dict[str, set[str]] = {}  # validator -> candidates it accused, contradicted
        self.discredited: set[str] = set()  # validators no longer asked (hffm/specialists.py)

    def flag(self, node: str, why: str, switched: bool = True) -> None:
        """``node`` is flagged, no longer a specialist: it relayed something other than what was examined
        (``switched``: recorded in the next review's ``switched``), or a review refused it."""
        if node in self.flagged:
            return
        log.warning("flagged %s: %s", node, why)
        self.node.metrics.flagged.labels(node=self.node.node_id, sender=node, module="specialist").inc()
        self.flagged.add(node)
        if switched:
            self._switched[node] = why
        self.roles = {t: [n for n in ns if n != node] for t, ns in self.roles.items()}
        self.pins = {k: d for k, d in self.pins.items() if k[0] != node}

    def _stub(self, n: str) -> pb_grpc.SpecialistStub:
        return pb_grpc.SpecialistStub(self.node.channels.get(self.members.address(n), n))

    def serve(self, n: str, task: str) -> pb.ServedModules:
        return self._stub(n).Serve(
            pb.ServeRequest(task=task), timeout=self.cfg.specialists.timeout_s, metadata=self.meta
        )

    def validate(self, v: str, task: str, provider: str, served: pb.ServedModules) -> Score:
        r = self._stub(v).Validate(
            pb.ValidateRequest(task=task, provider=provider, modules=served.modules),
            timeout=self.cfg.specialists.timeout_s,
            metadata=self.meta,
        )
        if not (0 <= r.accuracy <= 1 and 0 <= r.own_accuracy <= 1 and r.samples > 0 and r.classes >= 1):
            raise ValueError(f"{v}: an implausible score {r}")  # NaN fails too: a score it could not have measured
        return Score(v, r.accuracy, r.own_accuracy, r.samples, r.classes)

    def review(
        self, round_: int, topo: Topology, pool: ThreadPoolExecutor, down: set[str] | frozenset[str] = ()
    ) -> dict:
        """Examine the candidates among ``topo``'s devices (those in ``down`` neither examined nor asked),
        then appoint; the round record's ``specialists``."""
        sc = self.cfg.specialists
        holders = {t: [n for n in ns if n not in down] for t, ns in topo.holders_by_task().items()}
        ev = evidence(holders, *self.members.claims())
        jobs = []
        unasked = self.flagged | self.discredited
        for task in sorted(ev):
            cands = candidates(ev[task], sc.candidates, self.flagged)
            jobs += [
                (task, c, validators(c, ev[task], cands, sc.validators, unasked,
                                     self.accusers.get((c, task), ()), self.asked.get((c, task), ())))
                for c in cands
            ]  # fmt: skip
        served = {(t, c): pool.submit(self.serve, c, t) for t, c, _ in jobs}
        errors: dict[tuple[str, str], str] = {}
        asks = {}
        digests: dict[tuple[str, str], bytes] = {}
        for t, c, vals in jobs:
            try:
                modules = served[(t, c)].result()
            except grpc.RpcError as err:  # it could not or would not serve: examined next time
                errors[(t, c)] = f"serve: {err.code().name}: {err.details()}"
                continue
            digests.update({(c, b.header.name): bytes(b.header.digest) for b in modules.modules})
            asks[(t, c)] = [(v, pool.submit(self.validate, v, t, c, modules)) for v in vals]
        first: dict[tuple[str, str], tuple[list[Score], Verdict]] = {}
        appeals: dict[tuple[str, str], list[tuple[str, Future]]] = {}
        drops = {(t, c): self.stats_drop(t, served[(t, c)].result()) for t, c, _ in jobs if (t, c) in asks}
        for t, c, _ in jobs:
            scores = self._scores(round_, t, c, asks.get((t, c), []))
            prior = self.accusers.get((c, t), ())
            drop = drops.get((t, c))
            verdict = judge(c, t, ev[t][c], scores, sc.tolerance, sc.min_gain, prior, sc.quorum, bool(sc.appeal),
                            drop, sc.stats_cut)  # fmt: skip
            first[(t, c)] = scores, verdict
            # a decisive verdict (a flag for good, or a role whose relays others adopt) hears more witnesses
            # first: every candidate's appeal is asked at once, so a stalled witness costs one timeout in all
            if sc.appeal and verdict.verdict in (REFUSED, ACCEPTED) and not refuted(drop, sc.stats_cut):
                asked = {v for v, _ in asks.get((t, c), [])}  # scored or failed: not asked twice
                modules = served[(t, c)].result()
                more = validators(c, ev[t], [], sc.appeal, unasked | asked)
                appeals[(t, c)] = [(v, pool.submit(self.validate, v, t, c, modules)) for v in more]
        verdicts: list[Verdict] = []
        for t, c, _ in jobs:
            scores, verdict = first[(t, c)]
            if (t, c) in appeals:
                scores = scores + self._scores(round_, t, c, appeals[(t, c)])
                prior = self.accusers.get((c, t), ())
                verdict = judge(c, t, ev[t][c], scores, sc.tolerance, sc.min_gain, prior, sc.quorum, True,
                                drops.get((t, c)), sc.stats_cut)  # fmt: skip
                verdict.appeal = [v for v, _ in appeals[(t, c)]]
            self.accusers[(c, t)] = set(verdict.accusers)
            self.asked.setdefault((c, t), set()).update(s.validator for s in scores)
            if (t, c) in errors:
                verdict.scores.append({"error": errors[(t, c)]})
            verdicts.append(verdict)
        discredited = self._discredit(verdicts) if sc.discredit else []
        refused = sorted({v.node for v in verdicts if v.verdict == REFUSED} - self.flagged)
        for n in refused:
            self.flag(n, f"refused as a specialist in the review after round {round_}", switched=False)
        switched, self._switched = self._switched, {}
        self.roles = appoint(verdicts, sc.per_task)
        self.pins = {(n, m): d for (n, m), d in digests.items() if any(n in ns for ns in self.roles.values())}
        log.info("round %d: specialists %s", round_, self.roles)
        return {
            "appointed": self.roles,
            "flagged": sorted({*refused, *switched}),
            "switched": switched,  # flagged during the round: what they relayed was not what was examined
            "discredited": discredited,  # validators no longer asked: their accusations stood alone
            "verdicts": [v.to_json() for v in verdicts],
        }

    def stats_drop(self, task: str, served: pb.ServedModules) -> float | None:
        """With ``specialists.stats_cut``: how many nats the served head of ``task`` loses against the cloud's own
        at the federation's answer means (the last calibration phase's statistics: ``NodeRuntime.federation``),
        averaged over the federation's samples (``hffm.calibration.head_drop``); None without statistics of the
        task, or where what it served is no head the cloud could load (its validators see that too)."""
        from hffm.calibration import head_drop

        if self.cfg.specialists.stats_cut is None:
            return None
        claim, name = self.node.federation.get(task), head_name(task)
        if claim is None or name not in self.node.modules:
            return None
        try:
            mods = blobs_from_pb(served.modules, self.node.spec)  # checked as a push's: digest, shapes, finite
        except (ModuleError, ValueError) as err:
            log.warning("the %s modules served for the review are unreadable: %s", task, err)
            return None
        if name not in mods:
            return None
        return head_drop({name: mods[name]}, {name: self.node.modules[name]}, {task: claim}, self.cfg.model)

    @staticmethod
    def _scores(round_: int, task: str, cand: str, asks: list[tuple[str, Future]]) -> list[Score]:
        """The scores of ``asks`` ((validator, its Validate future)) that came back plausible; a validator
        that fails or lies is left out of the verdict."""
        scores = []
        for v, fut in asks:
            try:
                scores.append(fut.result())
            except (grpc.RpcError, ValueError) as err:
                why = err.details() if isinstance(err, grpc.RpcError) else str(err)
                log.warning("round %d: %s could not validate %s for %s: %s", round_, v, cand, task, why)
        return scores

    def _discredit(self, verdicts: list[Verdict]) -> list[str]:
        """Validators newly discredited by this review's contradicted accusations; their standing
        accusations are dropped."""
        sc = self.cfg.specialists
        for v in verdicts:
            for who in contradicted(v, sc.tolerance, sc.quorum):
                self.contradicted.setdefault(who, set()).add(v.node)
        new = sorted(n for n, c in self.contradicted.items() if len(c) >= sc.discredit and n not in self.discredited)
        for n in new:
            log.warning("%s discredited as a validator: lone accusations of %s", n, sorted(self.contradicted[n]))
            self.node.metrics.flagged.labels(node=self.node.node_id, sender=n, module="validator").inc()
            self.discredited.add(n)
        if new:
            self.accusers = {k: a - self.discredited for k, a in self.accusers.items()}
        return new

    def to_json(self) -> dict:
        pins = [[n, m, d.hex()] for (n, m), d in sorted(self.pins.items())]
        accusers = [[n, t, sorted(a)] for (n, t), a in sorted(self.accusers.items()) if a]
        asked = [[n, t, sorted(a)] for (n, t), a in sorted(self.asked.items())]
        return {
            "roles": self.roles,
            "flagged": sorted(self.flagged),
            "pins": pins,
            "accusers": accusers,
            "asked": asked,
            "contradicted": {n: sorted(c) for n, c in sorted(self.contradicted.items())},
            "discredited": sorted(self.discredited),
        }

    def restore(self, doc: dict) -> None:
        self.roles = {t: list(ns) for t, ns in doc.get("roles", {}).items()}
        self.flagged = set(doc.get("flagged", []))
        self.pins = {(n, m): bytes.fromhex(d) for n, m, d in doc.get("pins", [])}
        self.accusers = {(n, t): set(a) for n, t, a in doc.get("accusers", [])}
        self.contradicted = {n: set(c) for n, c in doc.get("contradicted", {}).items()}
        self.discredited = set(doc.get("discredited", []))
        self.asked = {(n, t): set(a) for n, t, a in doc.get("asked", [])}
