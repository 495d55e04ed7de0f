"""Translation between protobuf messages and the core's plain dataclasses (nothing else)."""

from __future__ import annotations

from hffm.methods import Collect, Evaluate, Send, Step, Train
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
        modules=[
            pb.ModuleHeader(
                name=m.name,
                version=m.version,
                num_samples=m.num_samples,
                size_bytes=m.size_bytes,
                sha256=m.sha256,
                dtype=m.dtype,
            )
            for m in h.modules
        ],
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
        modules=tuple(
            ModuleHeader(m.name, m.version, m.num_samples, m.size_bytes, bytes(m.sha256), m.dtype) for m in h.modules
        ),
    )


def step_to_pb(s: Step) -> pb.Step:
    if isinstance(s, Train):
        return pb.Step(train=pb.TrainStep())
    if isinstance(s, Evaluate):
        return pb.Step(evaluate=pb.EvaluateStep())
    if isinstance(s, Send):
        return pb.Step(send=pb.SendStep(to=s.to, link=s.link, tag=s.tag, modules=list(s.modules), route=list(s.route)))
    if isinstance(s, Collect):
        return pb.Step(
            collect=pb.CollectStep(tag=s.tag, senders=list(s.senders), link=s.link, include_self=s.include_self)
        )
    raise TypeError(f"not a step: {s!r}")


def step_from_pb(s: pb.Step) -> Step:
    kind = s.WhichOneof("kind")
    if kind == "train":
        return Train()
    if kind == "evaluate":
        return Evaluate()
    if kind == "send":
        return Send(s.send.to, s.send.link, s.send.tag, tuple(s.send.modules), tuple(s.send.route))
    if kind == "collect":
        c = s.collect
        return Collect(c.tag, tuple(c.senders), c.link, c.include_self)
    raise ValueError("step has no kind")
