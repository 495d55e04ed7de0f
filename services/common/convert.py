"""Translation between protobuf messages and the core's plain dataclasses (nothing else): the one place
per message type where the wire meets the core. Runtime state holds core types, never messages."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

from hffm.methods import STATS_OF, Calibrate, Collect, Evaluate, Quorum, Send, Stats, Step, Train
from hffm.modules import EncodedModule, ModuleError, ModuleSet, ModuleSpec, decode_module
from hffm.results import AggregateRecord, NodeReport, SenderScore, TaskScore, Transfer
from hffm.topology import Registration
from hffm.wire import ModuleHeader, PushHeader
from services.rpc import pb


def header_to_pb(h: PushHeader) -> pb.PushHeader:
    return pb.PushHeader(
        push_id=h.push_id,
        sender=h.sender,
        receiver=h.receiver,
        round=h.round,
        tag=h.tag,
        link=h.link,
        route=list(h.route),
        attempt=h.attempt,
        signature=h.signature,
        sender_cert=h.sender_cert,
        modules=[module_header_to_pb(m) for m in h.modules],
    )


def header_from_pb(h: pb.PushHeader) -> PushHeader:
    return PushHeader(
        push_id=h.push_id,
        sender=h.sender,
        receiver=h.receiver,
        round=h.round,
        tag=h.tag,
        link=h.link,
        route=tuple(h.route),
        attempt=h.attempt,
        signature=bytes(h.signature),
        sender_cert=bytes(h.sender_cert),
        modules=tuple(module_header_from_pb(m) for m in h.modules),
    )


def module_header_to_pb(m: ModuleHeader) -> pb.ModuleHeader:
    return pb.ModuleHeader(
        name=m.name,
        version=m.version,
        num_samples=m.num_samples,
        size_bytes=m.size_bytes,
        digest=m.digest,
        dtype=m.dtype,
        digest_alg=m.digest_alg,
    )


def module_header_from_pb(m: pb.ModuleHeader) -> ModuleHeader:
    return ModuleHeader(m.name, m.version, m.num_samples, m.size_bytes, bytes(m.digest), m.dtype, m.digest_alg)


def step_to_pb(s: Step) -> pb.Step:
    if isinstance(s, Train):
        return pb.Step(train=pb.TrainStep())
    if isinstance(s, Evaluate):
        return pb.Step(evaluate=pb.EvaluateStep())
    if isinstance(s, Stats):
        return pb.Step(stats=pb.StatsStep(tasks=list(s.tasks)))
    if isinstance(s, Calibrate):
        return pb.Step(calibrate=pb.CalibrateStep(tasks=list(s.tasks)))
    if isinstance(s, Send):
        return pb.Step(send=pb.SendStep(to=s.to, link=s.link, tag=s.tag, modules=list(s.modules), route=list(s.route)))
    if isinstance(s, Collect):
        q = s.quorum
        return pb.Step(
            collect=pb.CollectStep(
                tag=s.tag,
                senders=list(s.senders),
                link=s.link,
                include_self=s.include_self,
                rule=s.rule,
                params=dict(s.params),
                quorum=pb.Quorum(
                    min_senders=q.min_senders, min_fraction=q.min_fraction, deadline_s=q.deadline_s or 0.0
                ),
                weight_caps={sender: pb.ModuleWeights(module=dict(caps)) for sender, caps in s.weight_caps},
                own=list(s.own),
                pinned=dict(s.pinned),
                weight_bounds={sender: pb.ModuleWeights(module=dict(b)) for sender, b in s.weight_bounds},
            )
        )
    raise TypeError(f"not a step: {s!r}")


def step_from_pb(s: pb.Step) -> Step:
    kind = s.WhichOneof("kind")
    if kind == "train":
        return Train()
    if kind == "evaluate":
        return Evaluate()
    if kind == "stats":
        return Stats(tuple(s.stats.tasks))
    if kind == "calibrate":
        return Calibrate(tuple(s.calibrate.tasks))
    if kind == "send":
        return Send(s.send.to, s.send.link, s.send.tag, tuple(s.send.modules), tuple(s.send.route))
    if kind == "collect":
        c = s.collect
        q = c.quorum
        if q.min_senders < 0 or not 0 <= q.min_fraction <= 1 or q.deadline_s < 0:
            raise ValueError(f"collect {c.tag!r}: quorum out of range")
        return Collect(
            c.tag,
            tuple(c.senders),
            c.link,
            c.include_self,
            c.rule or "fedavg",
            tuple(sorted(c.params.items())),
            Quorum(q.min_senders, q.min_fraction or 1.0, q.deadline_s or None),
            tuple((sender, tuple(sorted(w.module.items()))) for sender, w in sorted(c.weight_caps.items())),
            tuple(c.own),
            tuple(sorted((m, bytes(d)) for m, d in c.pinned.items())),
            tuple((sender, tuple(sorted(w.module.items()))) for sender, w in sorted(c.weight_bounds.items())),
        )
    raise ValueError("step has no kind")


def report_to_pb(r: NodeReport) -> pb.RoundReport:
    return pb.RoundReport(
        node=r.node,
        round=r.round,
        attempt=r.attempt,
        sent=[
            pb.TransferRecord(
                sender=t.sender,
                receiver=t.receiver,
                module=t.module,
                link=t.link,
                bytes=t.bytes,
                tag=t.tag,
                origin=t.origin,
                destination=t.destination,
            )
            for t in r.sent
        ],
        metrics=[
            pb.TaskMetric(task=m.task, split=m.split, correct=m.correct, total=m.total, score=m.score) for m in r.scores
        ],
        aggregates=[
            pb.AggregateRecord(
                tag=a.tag,
                counted=a.counted,
                left_out=a.left_out,
                scores=[pb.SenderScore(**asdict(s)) for s in a.scores],
                weights=[
                    pb.FoldWeight(sender=s, module=m, weight=x) for s, w in a.weights.items() for m, x in w.items()
                ],
            )
            for a in r.aggregates
        ],
        train_loss=r.train_loss,
        train_samples=r.train_samples,
        wall_s=r.wall_s,
        train_s=r.train_s,
        undelivered=list(r.undelivered),
    )


def _plausible(m: pb.TaskMetric) -> bool:
    """A score a node could have measured: 0 <= correct <= total, 0 <= score <= total (finite). A node
    that reports more than it tested is not believed (its metric is dropped, the report kept)."""
    if not (0 <= m.correct <= m.total):
        return False
    return not m.HasField("score") or (math.isfinite(m.score) and 0.0 <= m.score <= m.total)


def _fold_weights(a: pb.AggregateRecord) -> dict[str, dict[str, float]]:
    """The lowered weights of one collect step that a node could have folded with: of a sender it counted, one
    per (sender, module), finite and >= 0; the rest are not believed (dropped, the report kept)."""
    out: dict[str, dict[str, float]] = {}
    counted = set(a.counted)
    for w in a.weights:
        if w.sender in counted and math.isfinite(w.weight) and w.weight >= 0 and w.module not in out.get(w.sender, {}):
            out.setdefault(w.sender, {})[w.module] = w.weight
    return out


def _sender_scores(a: pb.AggregateRecord, checked: set[str] = frozenset()) -> tuple[SenderScore, ...]:
    """The outlier scores of one collect step that a node could have measured: of a sender it counted
    in that step, one per (module, sender), distance and norm finite and ≥ 0, cosine in [-1, 1] or NaN
    (a zero update), z and update_z not NaN, label_t finite and ≥ 0, head_drop finite, structure and subspace
    finite and ≥ 0, echo in [-1, 1]. A node cannot incriminate a sender it did not aggregate, or poison the
    run's results with values no aggregation makes: such a score is dropped (the report kept). ``checked``:
    senders scored here though counted elsewhere (a deferred label check's, in the calibrated collect: the
    senders of the node's statistics collect)."""
    counted, seen, out = set(a.counted) | set(checked), set(), []
    for s in a.scores:
        key = (s.module, s.sender)
        if s.sender not in counted or key in seen:
            continue
        if not (math.isfinite(s.distance) and s.distance >= 0 and math.isfinite(s.norm) and s.norm >= 0):
            continue
        bad_twin = not (math.isnan(s.twin) or -1.0 - 1e-6 <= s.twin <= 1.0 + 1e-6)
        bad_z = math.isnan(s.z) or math.isnan(s.update_z) or not (math.isfinite(s.label_t) and s.label_t >= 0)
        bad_z = bad_z or not math.isfinite(s.head_drop)
        bad_z = bad_z or not all(math.isfinite(v) and v >= 0 for v in (s.structure, s.subspace))
        bad_z = bad_z or not -1.0 - 1e-6 <= s.echo <= 1.0 + 1e-6  # NaN fails too
        if not (math.isnan(s.cosine) or -1.0 - 1e-6 <= s.cosine <= 1.0 + 1e-6) or bad_z or bad_twin:
            continue
        seen.add(key)
        out.append(SenderScore(**{f.name: getattr(s, f.name) for f in fields(SenderScore)}))
    return tuple(out)


def report_from_pb(r: pb.RoundReport) -> NodeReport:
    stats_senders = {tag: {s for a in r.aggregates if a.tag == tag for s in a.counted} for tag in STATS_OF.values()}
    return NodeReport(
        node=r.node,
        round=r.round,
        attempt=r.attempt,
        sent=[
            Transfer(t.sender, t.receiver, t.module, t.link, t.bytes, t.tag, t.origin, t.destination) for t in r.sent
        ],
        scores=[
            TaskScore(m.task, m.split, m.correct, m.total, m.score if m.HasField("score") else None)
            for m in r.metrics
            if _plausible(m)
        ],
        aggregates=[
            AggregateRecord(
                r.node,
                a.tag,
                tuple(a.counted),
                tuple(a.left_out),
                _sender_scores(a, stats_senders[STATS_OF[a.tag]] if a.tag in STATS_OF else frozenset()),
                _fold_weights(a),
            )
            for a in r.aggregates
        ],
        train_loss=r.train_loss,
        train_samples=r.train_samples,
        wall_s=r.wall_s,
        train_s=r.train_s,
        undelivered=list(r.undelivered),
    )


def progress_to_pb(ev) -> pb.Progress:
    """A ``services.cloud.progress.ProgressEvent`` as the wire's ``Progress``."""
    return pb.Progress(
        phase=ev.phase,
        round=ev.round,
        rounds=ev.rounds,
        registered=ev.registered,
        expected=ev.expected,
        results_json=ev.results_json,
        message=ev.message,
    )


def blobs_to_pb(modules: list[EncodedModule]) -> list[pb.ModuleBlob]:
    """Whole modules in one message (a task's head or prompt: small; pushes stream anything else)."""
    return [pb.ModuleBlob(header=module_header_to_pb(ModuleHeader.of(em)), data=em.data) for em in modules]


def blobs_from_pb(blobs, spec: ModuleSpec) -> ModuleSet:
    """The modules of ``blobs``, each checked as a push's would be (digest, structure, shapes against
    ``spec``, finite values); ``ModuleError`` names what is wrong. A name twice is INVALID_ARGUMENT."""
    out: ModuleSet = {}
    for b in blobs:
        h = module_header_from_pb(b.header)
        if h.name in out:
            raise ModuleError("INVALID_ARGUMENT", "duplicate_module", f"module {h.name!r} twice")
        if h.size_bytes != len(b.data):
            why = f"{h.name}: {len(b.data)} bytes, its header says {h.size_bytes}"
            raise ModuleError("INVALID_ARGUMENT", "bad_size", why)
        out[h.name] = decode_module(
            bytearray(b.data),
            name=h.name,
            version=h.version,
            num_samples=h.num_samples,
            dtype=h.dtype,
            digest=h.digest,
            spec=spec,
            digest_alg=h.digest_alg,
        )
    return out


def registration_from_pb(info: pb.NodeInfo) -> Registration:
    return Registration(
        info.id,
        info.role,
        info.address,
        info.edge,
        tuple(sorted(info.train_samples.items())),
        tuple(sorted({(s.round, s.attempt) for s in info.states})),
        (info.position.x_m, info.position.y_m) if info.HasField("position") else None,
        tuple(sorted(info.label_coverage.items())),
    )
