"""The federation's vocabulary, defined once: node ids and roles, module names, tasks, methods and link
kinds. Pure (no torch, no gRPC): every layer imports it.

Node ids: ``cloud``, ``edge-<e>``, ``device-<e>-<i>`` (edge e, index i in the cluster it was created
in). A device's id is its identity, not its place: membership may re-home it to another edge, and
its id stays. Module names: ``adapter.<layer>``, ``head.<task>``, and where configured ``prompt.<task>``
and ``modality.image`` / ``modality.text``; the same string in memory, on the wire, in safetensors
files, in metrics and in logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# ---- nodes --------------------------------------------------------------------------------------
CLOUD = "cloud"
ROLES = ("cloud", "edge", "device")
_EDGE = re.compile(r"edge-(\d+)")
_DEVICE = re.compile(r"device-(\d+)-(\d+)")


def edge_id(e: int) -> str:
    return f"edge-{e}"


def device_id(e: int, i: int) -> str:
    return f"device-{e}-{i}"


@dataclass(frozen=True)
class NodeId:
    """A parsed node id: its role, and for edges and devices the indices in the id."""

    role: str
    edge: int | None = None  # edge-<e>, device-<e>-<i>: e
    index: int | None = None  # device-<e>-<i>: i

    def __str__(self) -> str:
        if self.role == "cloud":
            return CLOUD
        if self.role == "edge":
            return edge_id(self.edge or 0)
        return device_id(self.edge or 0, self.index or 0)


@lru_cache(maxsize=4096)  # bounded: ids also come from callers; a NodeId is immutable
def parse_node_id(node: str) -> NodeId:
    """Parse ``node``; ``ValueError`` naming it when it is not a node id."""
    if node == CLOUD:
        return NodeId("cloud")
    if m := _EDGE.fullmatch(node):
        return NodeId("edge", int(m.group(1)))
    if m := _DEVICE.fullmatch(node):
        return NodeId("device", int(m.group(1)), int(m.group(2)))
    raise ValueError(f"{node!r} is not a node id (cloud, edge-<e>, device-<e>-<i>)")


def joining_edge(device: str) -> str | None:
    """The edge a device outside the membership names in its id (``device-<e>-<i>``: ``edge-<e>``), or
    None when ``device`` is not a device id."""
    try:
        nid = parse_node_id(device)
    except ValueError:
        return None
    return edge_id(nid.edge or 0) if nid.role == "device" else None


def role_of(node: str) -> str:
    """``cloud`` | ``edge`` | ``device`` of a node id (``unknown`` for anything else: a metric label)."""
    try:
        return parse_node_id(node).role
    except ValueError:
        return "unknown"


# ---- modules ------------------------------------------------------------------------------------
ADAPTER_PREFIX = "adapter."
HEAD_PREFIX = "head."
PROMPT_PREFIX = "prompt."
MODALITY_ADAPTERS = ("modality.image", "modality.text")  # model.modality_adapters


def adapter_name(layer: int) -> str:
    return f"{ADAPTER_PREFIX}{layer}"


def head_name(task: str) -> str:
    return f"{HEAD_PREFIX}{task}"


def is_head(module: str) -> bool:
    """Whether ``module`` is a task's classification head (the one kind of module the pooled features do not pass
    through: everything else, adapters, modality adapters and prompts, shapes them)."""
    return module.startswith(HEAD_PREFIX)


def prompt_name(task: str) -> str:
    return f"{PROMPT_PREFIX}{task}"


STATS_PREFIX = "stats."  # calibration: a device's feature statistics of a task (hffm/calibration.py)


def stats_name(task: str) -> str:
    return f"{STATS_PREFIX}{task}"


def stats_task(module: str) -> str | None:
    """The task of a feature-statistics module (``stats.<task>``), or None for any other name: statistics
    are not a task's module (they are never trained, relayed or served)."""
    return module[len(STATS_PREFIX) :] if module.startswith(STATS_PREFIX) else None


def task_of(module: str) -> str | None:
    """The task a module belongs to (heads, prompts), or None (shared modules: adapters, modality
    adapters)."""
    for prefix in (HEAD_PREFIX, PROMPT_PREFIX):
        if module.startswith(prefix):
            return module[len(prefix) :]
    return None


def update_weight(module: str, samples: dict[str, int]) -> float:
    """The weight a device's update of ``module`` carries in FedAvg: its training samples of the module's task
    (heads, prompts) or of all its tasks (shared modules), given per task in ``samples``; at least 1."""
    task = task_of(module)
    return float(max(samples.get(task, 0) if task else sum(samples.values()), 1))


# ---- tasks, methods, links ------------------------------------------------------------------------
# The synthetic data set's tasks and their answer labels (hffm/data.py renders them).
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
TASK_LABELS: dict[str, list[str]] = {
    "art": [*COLORS, *SHAPES],
    "gqa": [*COUNT_WORDS, "yes", "no"],
}
TASKS = tuple(TASK_LABELS)

# The tasks each data source defines (hffm/data): easy-VQA's question families; VQA v2's answer types;
# GQA's structural question types. hf-disk names its own (a column).
EASY_VQA_TASKS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "rectangle", "triangle"),
    "color": ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray"),
    "yesno": ("yes", "no"),
}
SOURCE_TASKS: dict[str, tuple[str, ...]] = {
    "synthetic": TASKS,
    "easy-vqa": tuple(EASY_VQA_TASKS),
    "vqa-v2": ("yesno", "number", "other"),
    "gqa": ("verify", "query", "choose", "logical", "compare"),
}

# Round plans by name (hffm/methods.py implements each; a test holds the two lists together).
METHODS = ("star", "hfm", "hfm-d2d", "edge-only", "edge-only-d2d")

# Aggregation rules by name (hffm/aggregation.py implements each; a test holds the two together).
AGGREGATION_RULES = ("fedavg", "median", "trimmed_mean", "krum", "bulyan")
# Each rule's own parameters: name -> (type, lowest, highest, default). Every rule also takes
# COMMON_AGGREGATION_PARAMS (hffm.aggregation; checked by hffm.config.rule_arguments, torch-free).
RULE_PARAMS: dict[str, dict[str, tuple[type, float, float, float]]] = {
    "fedavg": {},
    "median": {},
    "trimmed_mean": {"beta": (float, 0.0, 0.4999, 0.1)},
    "krum": {"f": (int, 0, 1_000_000, 1), "m": (int, 1, 1_000_000, 1)},
    "bulyan": {"f": (int, 0, 1_000_000, 1)},
}
COMMON_AGGREGATION_PARAMS = (
    "clip_norm",
    "flag_z",
    "update_z",
    "twin_cos",
    "structure",
    "subspace",
    "echo",
    "exclude_flagged",
)

# Link kinds (also metric and results labels).
DEVICE_EDGE = "device_edge"
EDGE_CLOUD = "edge_cloud"
DEVICE_CLOUD = "device_cloud"
D2D = "d2d"
LINK_KINDS = (DEVICE_EDGE, EDGE_CLOUD, DEVICE_CLOUD, D2D)


def trace_prefix(round_: int, attempt: int) -> str:
    """How a round attempt's trace files begin (``runtime.trace_dir``): ``r<round>``, ``r<round>a<attempt>``
    for a re-run attempt."""
    return f"r{round_}" + (f"a{attempt}" if attempt else "")
