"""What nodes report about a round (typed), the round records built from them once, ``results.json``
(its schema: docs/results.md), and the accuracy/bytes plot."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hffm.ids import LINK_KINDS


# ---- what nodes report (core types; services/common/convert.py maps them to and from protobuf) ----
@dataclass(frozen=True)
class Transfer:
    """One hop of one module: sender -> receiver. ``origin``/``destination`` name the push it belongs
    to (they differ from sender/receiver on relayed D2D hops)."""

    sender: str
    receiver: str
    module: str
    link: str
    bytes: int
    tag: str
    origin: str
    destination: str


@dataclass(frozen=True)
class TaskScore:
    task: str
    split: str  # "local" (the node's own test split) | "global" (the task's global test set)
    correct: int  # predictions equal to the label
    total: int
    score: float | None = None  # summed VQA accuracy (min(#annotators who gave the answer / 3, 1)); None: exact match

    @property
    def accuracy(self) -> float:
        """VQA accuracy where the data set has human answers, else exact-match accuracy."""
        if not self.total:
            return 0.0
        return (self.score if self.score is not None else self.correct) / self.total


@dataclass(frozen=True)
class SenderScore:
    """How far one sender's copy of one module sits from the others' (``flag_z``): ``distance`` to the
    copies' coordinate-wise median, ``norm`` of its update (copy minus the node's own module at the start
    of the round, or minus that median where the node has none), ``cosine`` between its update and the
    median's, ``z`` the larger robust z-score (median and MAD over the senders) of distance and norm,
    ``twin`` the highest cosine of its whole update (every module it sent) with another sender's,
    ``update_z`` the same robust z-score as ``z`` for its whole update (``update_z``: the distance and
    norm of every scored module it sent, as one vector), ``structure`` how far its whole update is from
    independent noise (``structure``: its matrices' top singular value's share of their update, over what
    independent noise of any size would give; 0 where not scored), ``subspace`` how much of it lies along the
    other senders' main directions, over what chance gives (``subspace``; 0 where not scored), ``echo`` the
    cosine of its whole update with the collecting node's last step (``echo``; 0 where not scored)."""

    module: str
    sender: str
    distance: float
    norm: float
    cosine: float
    z: float
    flagged: bool
    excluded: bool
    twin: float = 0.0  # the highest cosine of the sender's whole update with another sender's (twin_cos)
    update_z: float = 0.0  # the robust z-score of the sender's whole update (update_z)
    label_t: float = 0.0  # how far its per-answer mean features are from the others' (calibration.label_t)
    head_drop: float = 0.0  # how much less likely its heads find its reported answers than the start's (head_check)
    structure: float = 0.0  # its update's top singular values' share over independent noise's (structure)
    subspace: float = 0.0  # how much of its update lies along the other senders' main directions, over chance
    echo: float = 0.0  # the cosine of its whole update with the collecting node's last step (echo)


@dataclass(frozen=True)
class AggregateRecord:
    """What one collect step of one node adopted: whose pushes it counted, who was left out."""

    node: str
    tag: str
    counted: tuple[str, ...]
    left_out: tuple[str, ...]
    scores: tuple[SenderScore, ...] = ()  # outlier scores (aggregation.params.flag_z), else empty
    # sender -> module -> the weight it was folded with, where lower than it pushed
    weights: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class NodeReport:
    """One node's account of one round."""

    node: str
    round: int
    attempt: int = 0
    sent: list[Transfer] = field(default_factory=list)
    scores: list[TaskScore] = field(default_factory=list)
    aggregates: list[AggregateRecord] = field(default_factory=list)
    train_loss: float = 0.0
    train_samples: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0
    undelivered: list[str] = field(default_factory=list)  # receivers of its sends that were lost


# ---- a round's record in results.json (docs/results.md documents every field) -----------------------
@dataclass
class RoundRecord:
    method: str
    round: int
    attempt: int
    e_agg: int
    cloud_aggregation: bool
    accuracy: dict[str, dict[str, float | None]]
    loss: float | None
    train_samples: int
    bytes_by_link: dict[str, int]
    bytes_by_module: dict[str, int]
    bytes_by_link_module: dict[str, dict[str, int]]
    bytes_total: int
    transfers: int
    hops: list[dict[str, Any]]
    aggregates: list[dict[str, Any]]
    wall_s: float
    left_out: list[str] = field(default_factory=list)  # members not answering at the start: sat it out
    modeled: dict[str, Any] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # node -> why it was left out mid-round
    aborted: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts: attempt, reason, lost
    synced: dict[str, str] = field(default_factory=dict)  # node -> the node it took current modules from
    arrivals: dict[str, list[str]] = field(default_factory=dict)  # device -> tasks it took up this round
    departed: list[str] = field(default_factory=list)  # devices that left (Leave) since the last round
    # the specialist review after this round (specialists.enabled): appointed, flagged, verdicts
    specialists: dict[str, Any] = field(default_factory=dict)
    # node -> task -> split -> its own modules' accuracy (the pooled ``accuracy`` above, node by node)
    node_accuracy: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """A record read back (a resumed coordinator's checkpoint)."""
        return cls(**d)


def round_record(
    method: str,
    round_: int,
    e_agg: int,
    cloud_aggregation: bool,
    reports: list[NodeReport],
    wall_s: float,
    attempt: int = 0,
    left_out: list[str] | None = None,
) -> RoundRecord:
    """One round's record from every node's report."""
    by_link = dict.fromkeys(LINK_KINDS, 0)
    by_module: dict[str, int] = defaultdict(int)
    by_link_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    transfers = 0
    hops: dict[tuple[str, ...], int] = defaultdict(int)
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    node_acc: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    loss_sum, samples = 0.0, 0
    for r in reports:
        for t in r.sent:
            by_link[t.link] = by_link.get(t.link, 0) + t.bytes
            by_module[t.module] += t.bytes
            by_link_module[t.link][t.module] += t.bytes
            transfers += 1
            hops[(t.sender, t.receiver, t.origin or t.sender, t.destination or t.receiver, t.tag, t.link)] += t.bytes
        for m in r.scores:
            cell = acc[m.task][m.split]
            cell[0] += m.score if m.score is not None else m.correct
            cell[1] += m.total
            node_acc[r.node].setdefault(m.task, {})[m.split] = m.accuracy if m.total else None
        loss_sum += r.train_loss * r.train_samples
        samples += r.train_samples
    return RoundRecord(
        method=method,
        round=round_,
        attempt=attempt,
        e_agg=e_agg,
        cloud_aggregation=cloud_aggregation,
        # device level = each device's modules on its own test split; global = the same modules on
        # the task's global test set. Pooled over devices (sample-weighted).
        accuracy={
            task: {split: (c / n if n else None) for split, (c, n) in splits.items()}
            for task, splits in sorted(acc.items())
        },
        loss=loss_sum / samples if samples else None,
        train_samples=samples,
        bytes_by_link=by_link,
        bytes_by_module=dict(sorted(by_module.items())),
        bytes_by_link_module={k: dict(sorted(v.items())) for k, v in by_link_module.items()},
        bytes_total=sum(by_link.values()),
        transfers=transfers,
        # every hop of every push, as the sending (or relaying) node recorded it
        hops=[
            {
                "sender": k[0],
                "receiver": k[1],
                "origin": k[2],
                "destination": k[3],
                "tag": k[4],
                "link": k[5],
                "bytes": b,
            }
            for k, b in sorted(hops.items())
        ],
        aggregates=[
            {
                "node": a.node,
                "tag": a.tag,
                "counted": list(a.counted),
                "left_out": list(a.left_out),
                "scores": [asdict(s) for s in a.scores],
                "weights": {s: dict(sorted(w.items())) for s, w in sorted(a.weights.items())},
            }
            for a in sorted((a for r in reports for a in r.aggregates), key=lambda a: (a.node, a.tag))
        ],
        wall_s=wall_s,
        left_out=sorted(left_out or []),
        node_accuracy={n: dict(sorted(t.items())) for n, t in sorted(node_acc.items())},
    )


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (a z of inf: a copy off the median of copies that agree
    exactly; a NaN loss or cosine) replaced by None, so results.json is strict JSON (null), which
    JavaScript and most readers require; Python's json would write Infinity and NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def detection_summary(rounds: list[dict[str, Any]], adversaries: Iterable[str]) -> dict[str, Any]:
    """results.json ``detection``: how the outlier flags of every collect step (``aggregates[j].scores``)
    compare with the configured adversaries. One event per (round, collecting node, scored sender):
    flagged when any of its modules was. Precision, recall (true positive rate) and false positive rate
    over those events; None where undefined (no flags, no adversaries, nothing scored)."""
    bad = set(adversaries)
    tp = fp = fn = tn = 0
    ever: set[str] = set()
    for r in rounds:
        for a in r.get("aggregates", []):
            by_sender: dict[str, bool] = {}
            for s in a.get("scores", []):
                by_sender[s["sender"]] = by_sender.get(s["sender"], False) or bool(s["flagged"])
            for sender, flagged in by_sender.items():
                if flagged:
                    ever.add(sender)
                if sender in bad:
                    tp, fn = tp + flagged, fn + (not flagged)
                else:
                    fp, tn = fp + flagged, tn + (not flagged)

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "adversaries": sorted(bad),
        "scored": tp + fp + fn + tn,
        "flagged": sorted(ever),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "false_positive_rate": ratio(fp, fp + tn),
    }


def write_results(
    path: str | Path, config: dict[str, Any], rounds: list[RoundRecord] | list[dict[str, Any]], **extra: Any
) -> None:
    """results.json, written atomically (readers never see a half-written file). ``rounds``: records, or
    their ``to_dict()`` made already."""
    doc = {"config": config, "rounds": [r if isinstance(r, dict) else r.to_dict() for r in rounds], **extra}
    atomic_write_bytes(Path(path), json.dumps(strict_json(doc), indent=2, allow_nan=False).encode())


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that it holds the old or the new content, never a part:
    a temp file beside it (created with ``mode``), fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def plot_accuracy(ax, rounds: list[dict[str, Any]]) -> None:
    """Accuracy per task and split over rounds (one colour per task; solid local, dashed global)."""
    xs = [r["round"] for r in rounds]
    for i, task in enumerate(sorted({t for r in rounds for t in r["accuracy"]})):
        for split, style in (("local", "-o"), ("global", "--s")):
            ys = [r["accuracy"].get(task, {}).get(split) for r in rounds]
            ax.plot(
                xs, [y if y is not None else float("nan") for y in ys], style, color=f"C{i}", label=f"{task} ({split})"
            )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no round was evaluated
        ax.legend(fontsize=8)


def plot_bytes_by_link(ax, rounds: list[dict[str, Any]]) -> None:
    """MB sent per round, stacked by link kind."""
    xs = [r["round"] for r in rounds]
    bottom = [0.0] * len(xs)
    for link in LINK_KINDS:
        ys = [r["bytes_by_link"].get(link, 0) / 1e6 for r in rounds]
        if any(ys):
            ax.bar(xs, ys, bottom=bottom, label=link)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("MB sent")
    ax.legend(fontsize=8)


def plot_results(results: dict[str, Any], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(ax1, rounds)
    ax1.set_title(f"accuracy — {rounds[0]['method'] if rounds else ''}")
    plot_bytes_by_link(ax2, rounds)
    ax2.set_title("bytes per round by link")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
