"""The one config tree that drives every entry point (launcher, services, compose, Kubernetes).

A config is YAML on disk, validated by pydantic models with ``extra="forbid"`` so a typo is an
error naming the key. ``apply_overrides`` implements ``--set dotted.key=value``; values are parsed
as YAML scalars/lists (``--set tasks=[art,gqa]``, ``--set e_agg=2``).
"""

from __future__ import annotations

import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hffm.ids import AGGREGATION_RULES, COMMON_AGGREGATION_PARAMS, METHODS, RULE_PARAMS, SOURCE_TASKS, TASKS

D = Field  # every field says what it is: ``hffm config --explain`` prints these descriptions


def _one_of(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {list(known)}")
    return value


class ConfigError(ValueError):
    """A config file or an override is invalid; the message names the offending key."""


class _Strict(BaseModel):
    # no inf or nan anywhere: round_timeout_s=inf would end as a bare "Deadline Exceeded"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TopologyConfig(_Strict):
    """The federation the run starts with (membership may change between rounds)."""

    edges: int = D(3, ge=1, le=1000, description="edge servers (one cluster of devices each)")
    devices_per_edge: int = D(4, ge=1, le=1000, description="devices in each edge's cluster at start")
    tasks_per_device: int | Literal["all"] = D(
        "all",
        description="how many of the federation's tasks each device holds: 'all', or N (assigned round-robin "
        "by device index, so every task is held by some device of every edge when possible)",
    )
    joins: bool = D(
        False,
        description="devices outside this topology may join mid-run (id device-<e>-<i> of an existing edge e, "
        "a certificate from the federation's CA): admitted between rounds, onboarded by a sync; and members may "
        "leave (a device stopped by SIGTERM or SIGINT mid-run leaves cleanly: docs/circulation.md)",
    )
    max_joins: int = D(64, ge=0, description="devices admitted mid-run at most (a bound on what joiners can grow)")
    leave_timeout_s: float = D(
        300.0,
        gt=0,
        description="a device leaving waits this long at most for its last round to end and the "
        "coordinator to shut it down",
    )

    @field_validator("tasks_per_device")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'all'")
        return v


class ModelConfig(_Strict):
    """The frozen backbone and the trainable modules (Double-Adapters, heads)."""

    backbone: str = D(
        "tiny",
        description="'tiny': a seeded random ViltConfig from the fields below; otherwise a local directory "
        "holding a transformers ViLT checkpoint, loaded with from_pretrained (no hub)",
    )
    hidden_size: int = D(64, ge=8, description="tiny backbone: hidden size")
    num_layers: int = D(4, ge=1, description="tiny backbone: transformer layers (one Double-Adapter each)")
    num_heads: int = D(4, ge=1, description="tiny backbone: attention heads")
    intermediate_size: int = D(128, ge=8, description="tiny backbone: feed-forward size")
    image_size: int = D(32, ge=8, description="tiny backbone: image side in pixels")
    patch_size: int = D(8, ge=2, description="tiny backbone: patch side in pixels")
    max_text_len: int = D(16, ge=4, description="question tokens (padded or truncated)")
    bottleneck: int = D(256, ge=1, description="Double-Adapter bottleneck width (paper: 256)")
    head_hidden: int = D(128, ge=1, description="hidden width of each task head's MLP")
    head_classifier: Literal["learned", "etf"] = D(
        "learned",
        description="each head's answer layer: 'learned' (a linear layer, trained); 'etf' (FedETF, Li et al. "
        "ICCV 2023: a fixed simplex equiangular tight frame, the same on every node and never trained or sent, "
        "over the L2-normalised output of a learned projection, divided by model.etf_temperature; every answer "
        "keeps the same share of the head whatever answers a device holds; needs model.head_hidden >= a task's "
        "answers)",
    )
    etf_temperature: float = D(
        0.1, gt=0, le=10, description="model.head_classifier=etf: logits = cosine to each answer's vertex / this"
    )
    prompt_tokens: int = D(
        0,
        ge=0,
        le=256,
        description="per-task prompts: this many learned vectors (module prompt.<task>) appended to the "
        "backbone's input sequence for that task's questions (0: no prompts)",
    )
    modality_adapters: bool = D(
        False,
        description="modality-side adapters: a bottleneck adapter on the text embeddings (modality.text) and "
        "one on the image patch embeddings (modality.image), each its own module",
    )
    init_seed: int = D(1234, description="backbone, adapters and heads are initialised from this seed everywhere")
    initializer_range: float = D(
        0.2,
        gt=0,
        description="init std of the random tiny backbone (BERT's 0.02 gives an almost constant pooled "
        "output: nothing to adapt); ignored for checkpoints",
    )

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be divisible by model.num_heads")
        if self.image_size % self.patch_size:
            raise ValueError("model.image_size must be divisible by model.patch_size")
        return self


class VQAv2Config(_Strict):
    """``data.source: vqa-v2``: the official VQA v2 layout (questions JSON, annotations JSON, COCO images)."""

    train_questions: str = D("", description="v2_OpenEnded_mscoco_train2014_questions.json")
    train_annotations: str = D("", description="v2_mscoco_train2014_annotations.json")
    train_images: str = D("", description="directory of the training images (train2014/)")
    train_image_pattern: str = D(
        "COCO_train2014_{image_id:012d}.jpg", description="file name of an image in train_images, by image_id"
    )
    test_questions: str = D("", description="the evaluation split's questions (v2_..._val2014_questions.json)")
    test_annotations: str = D("", description="the evaluation split's annotations (v2_mscoco_val2014_annotations.json)")
    test_images: str = D("", description="directory of the evaluation images (val2014/)")
    test_image_pattern: str = D(
        "COCO_val2014_{image_id:012d}.jpg", description="file name of an image in test_images, by image_id"
    )
    top_k: int = D(
        3129,
        ge=1,
        description="answer vocabulary: the top-K multiple_choice_answers of the training annotations (per task); "
        "training questions outside it are dropped (the usual practice), test ones score 0 unless annotators agree",
    )
    tasks_by: Literal["answer_type", "none"] = D(
        "answer_type",
        description="answer_type: one task (and head) per annotation answer_type (yesno, number, other); "
        "none: one task 'vqa'",
    )


class GQAConfig(_Strict):
    """``data.source: gqa``: GQA's balanced questions JSON (keyed by question id) and its images."""

    train_questions: str = D("", description="train_balanced_questions.json")
    test_questions: str = D("", description="val_balanced_questions.json (or testdev_balanced_questions.json)")
    images: str = D("", description="directory of GQA's images (<imageId>.jpg)")
    image_pattern: str = D("{image_id}.jpg", description="file name of an image in images, by imageId")
    top_k: int = D(1843, ge=1, description="answer vocabulary: the top-K training answers (per task)")
    tasks_by: Literal["structural", "none"] = D(
        "structural",
        description="structural: one task per types.structural (verify, query, choose, logical, compare); "
        "none: one task 'gqa'",
    )


class HFDiskConfig(_Strict):
    """``data.source: hf-disk``: a Hugging Face ``datasets`` DatasetDict saved with ``save_to_disk``."""

    path: str = D("", description="the directory save_to_disk wrote")
    train_split: str = D("train", description="split to train on")
    test_split: str = D("test", description="split to test on")
    image_column: str = D("image", description="column of images (datasets Image feature, or file paths)")
    question_column: str = D("question", description="column of question strings")
    answer_column: str = D("answer", description="column of answer strings")
    task_column: str | None = D(
        None, description="column naming each row's task (then list the tasks in `tasks`); unset: one task 'vqa'"
    )
    answers: list[str] | None = D(
        None,
        description="the answer vocabulary (all tasks); unset: every training answer. An answer outside a given "
        "vocabulary is an error naming the row",
    )


class DataConfig(_Strict):
    """The data set (synthetic by default; real ones from local files) and its non-IID split over devices."""

    source: Literal["synthetic", "easy-vqa", "vqa-v2", "gqa", "hf-disk"] = D(
        "synthetic",
        description="synthetic: generated shapes (no files); easy-vqa: the easy-VQA package (pip install "
        "'hffm[easy-vqa]'); vqa-v2, gqa: the official files (data.vqa_v2.*, data.gqa.*); hf-disk: a datasets "
        "save_to_disk directory (data.hf_disk.*)",
    )
    alpha: float = D(0.1, gt=0, description="Dirichlet concentration of each label's split over devices")
    train_per_task: int = D(
        1200,
        ge=1,
        description="training samples of each task, split over the devices that start with it (real sources: "
        "at most this many, a seeded subset of the split's)",
    )
    local_test_per_device: int = D(
        64,
        ge=1,
        description="samples in each device's local test split (real sources: drawn from the test split "
        "with the device's label mix)",
    )
    global_test_per_task: int = D(
        256,
        ge=1,
        description="samples in each task's global test set (real sources: a seeded subset of the test "
        "split, at most this many)",
    )
    min_samples_per_device: int = D(8, ge=1, description="fewest training samples a device gets of a task")
    image_cache: int = D(
        4096, ge=0, description="real sources: prepared images a process keeps in memory (LRU; images load lazily)"
    )
    check_images: bool = D(
        True,
        description="real sources: before any process starts, open every image the run will use (a missing or "
        "unreadable one is an error naming the file and the question)",
    )
    vqa_v2: VQAv2Config = D(default_factory=VQAv2Config, description=VQAv2Config.__doc__)
    gqa: GQAConfig = D(default_factory=GQAConfig, description=GQAConfig.__doc__)
    hf_disk: HFDiskConfig = D(default_factory=HFDiskConfig, description=HFDiskConfig.__doc__)


class TrainConfig(_Strict):
    """Local training on devices."""

    local_epochs: int = D(1, ge=1, description="E_local: epochs over the local data per round")
    batch_size: int = D(32, ge=1, description="samples per optimisation step")
    optimizer: Literal["adamw", "sgd"] = D(
        "adamw",
        description="the local optimiser, made fresh every round: adamw, or sgd (with train.momentum). A fresh "
        "AdamW's first steps move every parameter with a non-zero gradient by about lr whatever the gradient's "
        "size, so a device that already fits its few answers still drifts; SGD's steps shrink with its loss",
    )
    lr: float = D(3e-3, gt=0, description="the local optimiser's learning rate (round 1's, with a schedule)")
    lr_schedule: Literal["constant", "cosine"] = D(
        "constant",
        description="the learning rate over rounds: constant (train.lr every round), or cosine (from train.lr in "
        "round 1 down to train.lr * train.lr_final in the last round, on a half cosine). Client drift on non-IID "
        "data scales with the step size, so a decaying rate lets a federation settle where a constant one keeps "
        "the devices' disagreement; centralised training follows the same schedule",
    )
    lr_final: float = D(0.1, gt=0, le=1, description="the cosine schedule's last-round rate, as a fraction of train.lr")
    momentum: float = D(0.0, ge=0, lt=1, description="SGD's momentum (train.optimizer=sgd only)")
    weight_decay: float = D(0.0, ge=0, description="the local optimiser's weight decay")
    prox_mu: float = D(
        0.0,
        ge=0,
        description="FedProx's mu: local loss + mu/2 ||w - w_start||^2 over the trained modules (0: plain FedAvg "
        "training; centralised training never uses it)",
    )
    restricted_softmax: float = D(
        1.0,
        ge=0,
        le=1,
        description="FedRS's alpha: during local training the logits of a task's answers absent from the "
        "device's own data are scaled by alpha (1: plain softmax, every bit as before; centralised training "
        "never uses it)",
    )
    logit_adjust: float = D(
        0.0,
        ge=0,
        description="logit adjustment's tau (balanced softmax): during local training tau * log(the device's own "
        "answer prior, counts + 1) is added to a task's logits, so a head learns what tells the answers apart "
        "rather than its device's label skew; evaluation uses the plain logits (0: plain softmax, every bit as "
        "before; centralised training never uses it)",
    )
    decorr: float = D(
        0.0,
        ge=0,
        description="FedDecorr's beta (Shi et al., ICLR 2023): during local training beta times the mean squared "
        "off-diagonal correlation between the batch's pooled features (times the batch size) is added to the loss, "
        "against the dimensional collapse a device's label-skewed data brings the shared adapters' features to "
        "(0: off, every bit as before; centralised training never uses it)",
    )
    head_only_share: float | None = D(
        None,
        gt=0,
        le=1,
        description="a task whose most common answer holds at least this share of the device's own training "
        "samples of it trains its head alone: its batches leave the shared modules (adapters, modality "
        "adapters) as they are. Such a device meets its loss with a near-constant output, and the shared "
        "modules are what it would bend to give one; its head still learns (null: off, every bit as before; "
        "centralised training never uses it)",
    )
    noop: bool = D(False, description="skip the optimisation step but keep every exchange (runtime benchmarks)")

    eval_every: int = D(
        1,
        ge=0,
        description="devices test their modules in rounds r with r % eval_every == 0 and in the last round; "
        "0: never (benchmarks of the exchange alone)",
    )

    @model_validator(mode="after")
    def _momentum_for_sgd(self) -> TrainConfig:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"train.momentum={self.momentum} is SGD's; train.optimizer is {self.optimizer!r}")
        return self


class WireConfig(_Strict):
    """How modules travel."""

    dtype: Literal["fp32", "fp16", "bf16"] = D("fp32", description="tensor dtype on the wire (fp16/bf16: half)")
    chunk_bytes: int = D(1 << 20, ge=1024, le=1 << 20, description="bytes per chunk message over gRPC (at most 1 MiB)")
    bulk_chunk_bytes: int = D(
        4 << 20,
        ge=1024,
        le=4 << 20,
        description="bytes per chunk message over the bulk transport (at most 4 MiB; fewer, larger chunks cost "
        "less per byte there, where gRPC's own stream is no faster with larger messages). A node accepts chunks "
        "of up to the larger of the two on either transport, as a D2D relay passes chunks on as they came",
    )
    digest: Literal["blake3", "sha256"] = D(
        "blake3", description="digest a sender computes of each module blob (receivers check either)"
    )
    digests: Literal["header", "trailer"] = D(
        "header",
        description="where a push carries its module digests: header (computed before the first byte), or "
        "trailer (computed on another thread while the chunks stream, then sent and signed after the last "
        "chunk; the header goes signed with them empty). Receivers take either",
    )
    transport: Literal["grpc", "bulk"] = D(
        "grpc",
        description="how pushes carry module bytes: grpc (ModuleExchange.Push), or bulk (the same messages in "
        "length-prefixed frames over TCP, TLS with security on; identity, checks and statuses as gRPC's; a "
        "node falls back to gRPC towards a receiver that serves no bulk endpoint)",
    )
    bulk_port: int = D(
        0,
        ge=0,
        le=65535,
        description="with wire.transport=bulk: the port a node's bulk listener takes on its gRPC host (0: any "
        "free port; nodes learn it over gRPC, ModuleExchange.BulkEndpoint). A fixed port suits one node per "
        "process (compose, Kubernetes)",
    )


class RuntimeConfig(_Strict):
    """Processes, addresses and time limits."""

    device: str = D("auto", description="torch device: auto (CUDA when present) | cpu | cuda | cuda:N")
    host: str = D("127.0.0.1", description="address the local launcher's processes listen on")
    devices_per_process: int = D(4, ge=1, description="device servers the local launcher hosts in one process")
    start_method: Literal["zygote", "exec"] = D(
        "zygote",
        description="how the local launcher starts its processes (the command lines compose and Kubernetes run): "
        "forked from a zygote process that imported torch and the nodes once (each process skips ~2 s of CPU "
        "importing), or exec'd as fresh interpreters",
    )
    register_timeout_s: float = D(
        180.0, gt=0, description="how long nodes wait for their upstream and the cloud for all nodes"
    )
    round_timeout_s: float = D(
        600.0, gt=0, description="longest a round's step may wait (a collect's default deadline)"
    )
    rpc_timeout_s: float = D(60.0, gt=0, description="deadline of one control or push RPC")
    torch_threads: int = D(1, ge=1, description="torch intra-op threads per process")
    precision: Literal["fp32", "bf16", "fp16"] = D(
        "fp32",
        description="compute precision of the backbone's forward and backward passes (torch autocast: training, "
        "testing and feature statistics): fp32, bf16, or fp16 (CUDA only; with loss scaling in training). The modules, "
        "the optimiser's state and what travels stay fp32 (wire.dtype sets the wire); bf16 on a GPU needs one "
        "that has it (Ampere or newer)",
    )
    trace_dir: str | None = D(
        None,
        description="when set, every node records each push it accepted and each aggregate it adopted as "
        "safetensors under <trace_dir>/<node>/ (an audit trail)",
    )
    start_delay_s: float = D(
        0.0, ge=0, description="the cloud waits this long after every node registered before round 1"
    )
    linger_s: float = D(0.0, ge=0, description="processes keep serving (metrics included) this long after the run")
    exit_after_run: bool = D(
        True,
        description="false (Kubernetes): after the run every process stays up, idle, until terminated, so a "
        "StatefulSet does not restart it into a new run",
    )


class GeometryConfig(_Strict):
    """Where nodes stand (paper Section IV; the seed code's draws with seed 49)."""

    seed: int = D(49, description="seed of the position draws")
    area_m: float = D(5000.0, gt=0, description="side of the square area")
    min_server_separation_m: float = D(500.0, ge=0, description="least distance between edge servers")
    cluster_center_radius_m: float = D(1000.0, ge=0, description="a cluster's centre lies within this of its server")
    device_radius_m: float = D(500.0, gt=0, description="devices lie within this of their cluster centre")
    d2d_range_m: float = D(30.0, gt=0, description="D2D link when within this distance (else a spanning-tree patch)")


class LinkConfig(_Strict):
    """One wireless link kind."""

    tx_power_w: float = D(gt=0, description="transmit power: the rate's (and the energy's unless energy_power_w)")
    bandwidth_hz: float = D(gt=0, description="bandwidth")
    energy_power_w: float | None = D(None, gt=0, description="the seed code's separate power for energy")


class BackhaulConfig(_Strict):
    """Edge/device to cloud: a fixed delay plus size over rate."""

    delay_s: float = D(0.1, ge=0, description="fixed delay per transfer")
    rate_bps: float = D(4e6, gt=0, description="rate in bits per second")
    tx_power_w: float = D(0.8, gt=0, description="transmit power (energy)")


class ComputeConfig(_Strict):
    """Local training: T = c*D/f, E = kappa*c*D*f^2 (D = samples processed)."""

    cycles_per_sample: float = D(1e7, ge=0, description="c: cycles per training sample")
    cpu_hz: float = D(1e9, gt=0, description="f: the device's clock")
    kappa: float = D(1e-28, ge=0, description="kappa: effective switched capacitance")


class CostConfig(_Strict):
    """The wireless latency/energy model (docs/cost-model.md). ``paper`` reproduces the seed code's
    model, quirks included; ``corrected`` (default) fixes them."""

    profile: Literal["corrected", "paper"] = D("corrected", description="corrected, or the seed code's model")
    noise_dbm_per_hz: float = D(-174.0, description="noise power spectral density")
    pathloss: Literal["paper", "uma"] = D(
        "paper", description="paper: beta0*(d/d0)^-alpha; uma: 3GPP UMa 128.1+37.6 log10(d_km)"
    )
    beta0_db: float = D(-30.0, description="path gain at the reference distance")
    d0_m: float = D(1.0, gt=0, description="reference distance")
    pathloss_exponent: float = D(3.0, gt=0, description="alpha")
    fading_seed: int = D(49, description="seed of the Rayleigh fading draws")
    uplink: LinkConfig = D(
        default_factory=lambda: LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6), description="device -> edge"
    )
    downlink: LinkConfig = D(
        default_factory=lambda: LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6), description="edge -> device"
    )
    d2d: LinkConfig = D(
        default_factory=lambda: LinkConfig(tx_power_w=0.2, bandwidth_hz=8e6), description="device -> device"
    )
    backhaul: BackhaulConfig = D(default_factory=BackhaulConfig, description="to and from the cloud")
    compute: ComputeConfig = D(default_factory=ComputeConfig, description="local training")
    module_bytes_override: int | None = D(
        None, gt=0, description="charge every transfer as if a push were this many bytes (the seed code's 6 MB)"
    )


class D2DConfig(_Strict):
    """Device-to-device clusters."""

    head_policy: Literal["random", "central", "rotate"] = D(
        "random", description="cluster head each round: random (seeded) | central (least path latency) | rotate"
    )
    probe_timeout_s: float = D(
        1.0, gt=0, description="a device not answering a health check within this sits out the round"
    )


class QuorumConfig(_Strict):
    """How many senders a collect step needs; defaults: all of them, waiting up to the round's timeout."""

    min_senders: int = D(0, ge=0, description="at least this many senders (0: use min_fraction alone)")
    min_fraction: float = D(1.0, gt=0, le=1, description="at least this fraction of the step's senders")
    deadline_s: float | None = D(
        None, gt=0, description="aggregate whoever came after this long, if enough did (default: round_timeout_s)"
    )


class TierAggregation(_Strict):
    """One tier's rule, in place of ``aggregation.rule`` and ``aggregation.params`` (nothing inherited
    from them: a tier that sets ``rule`` names all of its parameters)."""

    rule: str | None = D(None, description="this tier's rule (null: aggregation.rule)")
    params: dict[str, float] = D(default_factory=dict, description="this tier's rule's parameters")


class AggregationTiers(_Strict):
    """Rules per tier: the cloud's collects, the edges', and the devices' (D2D cluster heads)."""

    cloud: TierAggregation = D(default_factory=TierAggregation, description="the cloud's collect steps")
    edge: TierAggregation = D(default_factory=TierAggregation, description="every edge's collect steps")
    head: TierAggregation = D(default_factory=TierAggregation, description="devices' collect steps (cluster heads)")


class AggregationConfig(_Strict):
    """How every collect step aggregates (carried by the plan to every node)."""

    rule: str = D("fedavg", description=f"aggregation rule: {' | '.join(AGGREGATION_RULES)}")
    params: dict[str, float] = D(
        default_factory=dict,
        description="the rule's parameters: trimmed_mean beta (0.1); krum f (1), m (1: Krum, >1: Multi-Krum); "
        "bulyan f (1); any rule clip_norm (clip each update to this L2 norm first), flag_z (flag copies this many "
        "robust z-scores out, module by module), update_z (flag senders whose whole update, every module they sent as "
        "one vector, is this many robust z-scores out: honest non-IID heads stand out alone, attackers' whole "
        "updates do), twin_cos (flag senders whose whole update has this cosine or more with another's: "
        "colluders sending one vector; the same update twice, or a zero one from the node's start, is 1: free "
        "riders), structure (flag senders whose update's matrices are this close to "
        "independent noise: the median over them of their top singular value's share over noise's, about 1 for "
        "noise of any size, 8 or more for honest training: a free rider hiding in noise), subspace (flag senders "
        "whose update's matrices lie this little along the other senders' main directions, over chance: about 1 "
        "for noise of any shape, one random direction included, 3 or more for honest training), echo (flag senders "
        "whose whole update has this cosine or more with the node's last step, its start minus its previous "
        "training collect's: a free rider echoing the federation's last step), exclude_flagged (1: leave the "
        "flagged out)",
    )
    quorum: QuorumConfig = D(default_factory=QuorumConfig, description="senders needed and how long to wait")
    claim_bound: float | None = D(
        None,
        ge=1,
        description="a device's own update counts with at most claim_bound x the median of its task's registered "
        "claims (a device that registers more samples buys no more influence than that); null: as registered",
    )
    server_lr: float = D(
        1.0,
        gt=0,
        le=10,
        description="the cloud's server learning rate (FedOpt): global + server_lr x (aggregate - global) at every "
        "cloud aggregation (1: the aggregate itself, every bit as before; no cloud in edge-only)",
    )
    tiers: AggregationTiers = D(
        default_factory=AggregationTiers,
        description="a rule per tier in place of rule/params (e.g. the median at edges, FedAvg at a 2-edge cloud)",
    )

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        return _one_of(v, AGGREGATION_RULES, "rule")

    @model_validator(mode="after")
    def _params(self) -> AggregationConfig:
        try:
            rule_arguments(self.rule, self.params)
        except ValueError as err:
            raise ValueError(f"params: {err}") from None
        for tier in AggregationTiers.model_fields:
            t: TierAggregation = getattr(self.tiers, tier)
            if t.rule is None:
                if t.params:
                    raise ValueError(f"tiers.{tier}.params: set without tiers.{tier}.rule")
                continue
            _one_of(t.rule, AGGREGATION_RULES, f"tiers.{tier}.rule")
            try:
                rule_arguments(t.rule, t.params)
            except ValueError as err:
                raise ValueError(f"tiers.{tier}.params: {err}") from None
        return self

    def tier_rules(self) -> dict[str, tuple[str, tuple[tuple[str, float], ...]]]:
        """tier -> (rule, sorted params) for the tiers that set their own rule (the others keep ``rule``)."""
        return {
            tier: (t.rule, tuple(sorted(t.params.items())))
            for tier in AggregationTiers.model_fields
            if (t := getattr(self.tiers, tier)).rule is not None
        }


def rule_arguments(rule: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check an aggregation rule's parameters (no torch: health checks load config too) and return
    ``(its own arguments with defaults, the common ones: clip_norm, flag_z, update_z, twin_cos, structure,
    subspace, echo, exclude_flagged)``.
    ValueError naming the rule and the parameter."""
    if rule not in RULE_PARAMS:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {sorted(RULE_PARAMS)}")
    own = RULE_PARAMS[rule]
    unknown = set(params) - set(own) - set(COMMON_AGGREGATION_PARAMS)
    if unknown:
        raise ValueError(
            f"aggregation rule {rule!r} takes no parameters {sorted(unknown)}; it takes "
            f"{sorted([*own, *COMMON_AGGREGATION_PARAMS])}"
        )
    args: dict[str, Any] = {}
    for k, (typ, lo, hi, default) in own.items():
        v = params.get(k, default)
        if typ is int and float(v) != int(v):
            raise ValueError(f"aggregation rule {rule!r}: {k} must be an integer, got {v}")
        v = typ(v)
        if not lo <= v <= hi:
            raise ValueError(f"aggregation rule {rule!r}: {k} must be in [{lo}, {hi}], got {v}")
        args[k] = v
    common: dict[str, Any] = {
        "clip_norm": None,
        "flag_z": None,
        "update_z": None,
        "twin_cos": None,
        "structure": None,
        "subspace": None,
        "echo": None,
        "exclude_flagged": False,
    }
    for k in ("clip_norm", "flag_z", "update_z", "structure", "subspace"):
        if k in params:
            v = float(params[k])
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"aggregation rule {rule!r}: {k} must be finite and > 0, got {params[k]}")
            common[k] = v
    for k in ("twin_cos", "echo"):
        if k in params:
            v = float(params[k])
            if not 0 < v <= 1:
                raise ValueError(f"aggregation rule {rule!r}: {k} must be in (0, 1], got {params[k]}")
            common[k] = v
    exclude = params.get("exclude_flagged", 0)
    if exclude not in (0, 1):
        raise ValueError(f"aggregation rule {rule!r}: exclude_flagged must be 0 or 1, got {exclude}")
    if exclude and all(common[k] is None for k in ("flag_z", "update_z", "twin_cos", "structure", "subspace", "echo")):
        raise ValueError(
            f"aggregation rule {rule!r}: exclude_flagged needs flag_z, update_z, twin_cos, structure, subspace or "
            "echo (what flags a sender)"
        )
    common["exclude_flagged"] = bool(exclude)
    return args, common


class SecurityConfig(_Strict):
    """Link security: mTLS on every gRPC link with identities from certificates (docs/security.md)."""

    tls: bool = D(
        True,
        description="mTLS on every link; false: plaintext, identities taken on trust from call metadata "
        "(every process logs a warning)",
    )
    federation: str = D("hffm", description="the federation's name: the <federation> in every identity URI")
    dir: str | None = D(
        None,
        description="directory with ca.crt, crl.pem and <node>.key/<node>.crt; hffm run makes a throwaway CA "
        "under <out>/pki when unset",
    )
    cert_days: int = D(30, ge=1, description="validity of the certificates hffm run and hffm pki issue")

    @field_validator("federation")
    @classmethod
    def _federation(cls, v: str) -> str:
        if not v or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("letters, digits, - and _ only")
        return v


class CheckpointConfig(_Strict):
    """Durable state: every node saves its modules at the end of each round it completes, the cloud also
    the results so far, the membership and what every node holds (docs/reliability.md)."""

    dir: str | None = D(
        None,
        description="directory of the nodes' checkpoints (<dir>/<node>/); hffm run uses <out>/state; unset in "
        "a service: the cloud uses <out>/state, other nodes keep their round ends in memory only",
    )
    keep: int = D(3, ge=1, description="round ends each node keeps (a resumed coordinator may name an older one)")


class FaultsConfig(_Strict):
    """How a run survives nodes that die, stall or restart (docs/reliability.md)."""

    max_attempts: int = D(
        4, ge=1, description="attempts of one round before the run fails (a lost edge, head or relay aborts one)"
    )
    retry_delay_s: float = D(
        2.0, ge=0, description="pause before re-planning an aborted attempt (restarted nodes come back meanwhile)"
    )
    resume_wait_s: float = D(
        60.0, ge=0, description="a resumed cloud waits up to this long for every member to answer before going on"
    )
    slow_probe_timeout_s: float = D(
        10.0,
        gt=0,
        description="a node whose health check ran out of time (d2d.probe_timeout_s) is asked once more with "
        "this deadline before it sits the round out (a loaded host is slow, not gone; a refused one is gone)",
    )
    rejoin_wait_s: float = D(
        0.0,
        ge=0,
        description="a round waits up to this long for members lost in earlier rounds to answer again (restarting) "
        "before it starts without them",
    )
    restart: bool = D(True, description="hffm run restarts a process that died (compose: restart: on-failure)")
    max_restarts: int = D(5, ge=0, description="restarts of one process in one hffm run")
    restart_delay_s: float = D(1.0, ge=0, description="hffm run waits this long before restarting a process")


DEPTHS = ("personal", "head", "edge", "cloud")
PATHS = ("star", "direct", "d2d")


class CirculationRule(_Strict):
    """Where the modules matching ``modules`` are aggregated, how often and by which path (the paper's
    Section V-A). Devices train every module every round; a rule says which of them leave the device."""

    modules: str = D(description="module name pattern (fnmatch: 'head.*', 'adapter.[0-5]', 'head.vqa')")
    depth: str = D(
        "cloud",
        description="the deepest tier that aggregates them: personal (never leave the device) | head (the "
        "D2D cluster head) | edge | cloud",
    )
    path: str = D(
        "direct",
        description="star: device <-> cloud | direct: device <-> edge (<-> cloud) | d2d: device <-> cluster head "
        "over multi-hop D2D (head <-> edge <-> cloud)",
    )
    every: int = D(1, ge=1, description="rounds between aggregations at the first tier (the edge or the head)")
    cloud_every: int | None = D(
        None, ge=1, description="rounds between cloud aggregations (depth cloud; null: e_agg, star: every)"
    )
    rule: str | None = D(None, description="the aggregation rule of these modules' collect steps (null: aggregation's)")
    params: dict[str, float] = D(default_factory=dict, description="that rule's parameters")

    @model_validator(mode="after")
    def _check(self) -> CirculationRule:
        _one_of(self.depth, DEPTHS, "depth")
        _one_of(self.path, PATHS, "path")
        if self.depth == "personal":
            return self
        if self.path == "star" and self.depth != "cloud":
            raise ValueError(f"path: star goes device <-> cloud, so depth must be cloud (not {self.depth})")
        if self.path == "d2d" and self.depth == "edge":
            raise ValueError(
                "depth: with path d2d an edge has one sender per cluster (its head): use depth head, or cloud"
            )
        if self.depth == "head" and self.path != "d2d":
            raise ValueError("depth: head is a D2D cluster head, so path must be d2d")
        if self.cloud_every is not None and self.cloud_every % self.every:
            raise ValueError(f"cloud_every ({self.cloud_every}) must be a multiple of every ({self.every})")
        if self.rule is not None:
            _one_of(self.rule, AGGREGATION_RULES, "rule")
            try:
                rule_arguments(self.rule, self.params)
            except ValueError as err:
                raise ValueError(f"params: {err}") from None
        elif self.params:
            raise ValueError("params: set without rule")
        return self


class TaskArrival(_Strict):
    """A task that arrives mid-run (the paper's Section V-B): ``devices`` hold it from ``round`` on. The
    task's first arrival introduces it (its modules start from their initial values); a later one's
    devices are relayed its modules by the cheapest holder before they train it (docs/circulation.md)."""

    task: str = D(description="a task of `tasks`; nobody holds it before its first arrival")
    round: int = D(ge=2, description="the first round these devices hold it")
    devices: list[str] = D(min_length=1, description="ids of devices of the starting topology that take it up")


class CirculationConfig(_Strict):
    """Per-module circulation: rules matched in order against module names (the first match wins);
    modules no rule matches follow ``method`` (each of the five methods is such a rule for every module:
    docs/circulation.md)."""

    rules: list[CirculationRule] = D(default_factory=list, description="the rules, first match wins")
    relay: Literal["cheapest", "head", "none"] = D(
        "cheapest",
        description="who serves a device that holds no current modules (a newcomer, a restart, a device that "
        "missed rounds) in D2D methods: cheapest: the holder of its cluster's current state with the least "
        "modeled D2D latency, among those whose latest accuracy on its tasks is within relay_tolerance of "
        "the best; head: the round's cluster head first; none: a device that holds no round end at all "
        "starts from its initial modules (no relay; any method), one that holds an older one is synced as by head",
    )
    arrivals: list[TaskArrival] = D(
        default_factory=list,
        description="tasks that arrive mid-run: each {task, round, devices}; a task listed here is nobody's "
        "at start, its data is split over the devices that will take it up",
    )
    relay_tolerance: float = D(
        0.05, ge=0, le=1, description="cheapest: how far below the best holder's latest accuracy a holder may be"
    )


class AdversaryConfig(_Strict):
    """Test and benchmark only: devices that poison the update they send (an honest node is never
    changed; docs/robustness.md). None by default."""

    nodes: list[str] = D(
        default_factory=list,
        description="device ids that attack (with topology.joins also ids a device may join under later, "
        "device-<e>-<i> of an existing edge)",
    )
    fraction: float = D(0.0, ge=0, le=1, description="and this fraction of all devices, chosen by seed")
    behaviour: Literal[
        "sign_flip",
        "scale",
        "noise",
        "free_ride",
        "echo",
        "label_flip",
        "alie",
        "ipm",
        "fake_specialist",
        "bait_switch",
        "absent",
    ] = D(
        "sign_flip",
        description="sign_flip: start - scale x update; scale: start + scale x update; noise: start + "
        "N(0, sigma^2) per value; free_ride: send what it received, untrained; echo: untrained, send start + "
        "scale x the last step it saw (start - the start of its previous training round; in its first, start "
        "itself): a free rider disguised as a plausible update; label_flip: train on "
        "labels y -> C-1-y; alie: start + mean - z std of the colluders' benign updates; ipm: start - "
        "epsilon x their mean; fake_specialist: trains and aggregates honestly, claims claim x its samples "
        "and every answer class (to be examined as a specialist), and serves heads negated and scaled by "
        "scale whenever it serves (a relay, a specialist's examination); bait_switch: the same, but shows the "
        "cloud's examination its honest modules and relays the poisoned ones; absent: no attack, the yardstick of a "
        "perfect defence: the device takes part holding no training data (it trains nothing, its statistics count "
        "no sample, its updates weigh 1 sample), as if a defence had left its data out from the start",
    )
    claim: float | None = D(
        None,
        ge=1,
        description="an attacker registers this many times its training samples and pushes its updates with "
        "that weight (buying influence over a weighted mean); null: 4 for fake_specialist and bait_switch (to be "
        "examined first: they register it, their updates and weights stay honest), 1 for the others",
    )
    liars: list[str] = D(
        default_factory=list,
        description="device ids that lie whenever the cloud has them validate a specialist (whatever the "
        "behaviour; they train honestly unless also attackers): they score an honest candidate 0 and their own "
        "modules 1 (framing it), an attacking candidate 1 and their own 0 (vouching for it)",
    )
    stats: Literal["trained", "honest", "empty", "inflated"] = D(
        "trained",
        description="label_flip with calibration: which labels its feature statistics report: those it trained on "
        "(trained), its data's true ones (honest: a liar hiding its flipped update behind honest statistics from "
        "calibration.label_t), none at all (empty: statistics of no sample, leaving the head check nothing "
        "to judge its heads by), or its data's true ones weighing what it registered (inflated: claim times its "
        "samples, the per-sample shares unchanged, so its weight is not held below its claim)",
    )
    scale: float = D(10.0, gt=0, description="how far sign_flip and scale push the update (echo: the last step)")
    sigma: float = D(1.0, gt=0, description="the noise behaviour's standard deviation")
    noise_rank: int | None = D(
        None,
        ge=1,
        description="the noise behaviour's noise in each matrix of a module made of this many random directions "
        "(rank), of the same expected size as independent noise of sigma (a free rider that knows the structure "
        "check: aggregation.params.structure); null: independent per value",
    )
    jitter: float = D(
        0.0,
        ge=0,
        description="echo: independent Gaussian noise added to each tensor's echoed step, this fraction of the "
        "step's norm (two echoers at one node are then not twins: twin_cos)",
    )
    z: float | None = D(
        None, ge=0, description="alie's z; null: Baruch et al.'s from the senders and attackers at the first aggregator"
    )
    epsilon: float = D(0.5, gt=0, description="ipm's epsilon: it sends start - epsilon x the colluders' mean update")


class LimitsConfig(_Strict):
    """What one client may hold of a node: a stalled or flooding peer is cut off with a status, the node
    keeps serving everyone else (docs/reliability.md)."""

    header_timeout_s: float = D(10.0, gt=0, description="a push stream must deliver its header within this")
    chunk_timeout_s: float = D(30.0, gt=0, description="longest wait for the next chunk of a push stream")
    max_streams: int = D(32, ge=1, description="push streams a node receives at once (beyond: RESOURCE_EXHAUSTED)")
    max_streams_per_peer: int = D(
        4, ge=1, description="push streams one caller may have open at a node at once (beyond: RESOURCE_EXHAUSTED)"
    )
    max_bytes_in_flight: int = D(
        1 << 30,
        ge=1024,
        description="module bytes a node assembles at once, as push headers declare them (beyond: RESOURCE_EXHAUSTED)",
    )
    max_watchers: int = D(8, ge=1, description="progress streams (Coordinator.Watch) the cloud serves at once")


class SpecialistsConfig(_Strict):
    """Specialists (Section V-C; hffm/specialists.py): after every ``every``-th round the cloud picks
    candidates per task from evidence (registered data share x label coverage), has other holders of the
    task score each candidate's modules on their own test data (Specialist.Validate), refuses and flags
    those far below, and appoints the best accepted ones. Relays of a task's modules come only from its
    specialists (else from the edge or cloud's aggregate); a flagged node never serves a relay."""

    enabled: bool = D(False, description="examine candidates and relay only from specialists")
    every: int = D(1, ge=1, description="review after every this many rounds")
    candidates: int = D(2, ge=1, description="holders examined per task (most evidence first)")
    per_task: int = D(1, ge=1, description="specialists appointed per task (best validation accuracy)")
    validators: int = D(3, ge=1, description="holders of the task that score each candidate")
    tolerance: float = D(
        0.15,
        ge=0,
        le=1,
        description="a validator whose margin (the candidate's accuracy minus its own) is below -2 tolerance "
        "accuses the candidate; refused (and flagged) on quorum accusers, or on a median margin below -tolerance "
        "with quorum validators below -tolerance",
    )
    quorum: int = D(
        2,
        ge=1,
        description="distinct validators whose word refuses (flags) a candidate; fewer make it disputed: not "
        "appointed, examined again by its accusers and fresh validators (1: one validator, perhaps a liar, "
        "suffices)",
    )
    appeal: int = D(
        0,
        ge=0,
        description="before a refusal (a flag for good) or an acceptance (a role that relays), up to this many more "
        "holders of the task score the candidate, and a refusal then needs its accusers to outnumber the "
        "review's validators that see it within tolerance: colluding liars, a quorum among themselves, are "
        "outvoted by the honest, and their vouching meets more witnesses (0: as before, no appeal)",
    )
    min_gain: float = D(
        0.1,
        ge=0,
        le=1,
        description="accepted only at chance + min_gain or better, and within min_gain of its validators' own",
    )
    discredit: int = D(
        2,
        ge=0,
        description="a validator whose accusations against this many distinct candidates were each contradicted "
        "by quorum other validators is no longer asked and its accusations are dropped (0: never)",
    )
    timeout_s: float = D(60.0, gt=0, description="each Serve / Validate call")
    stats_cut: float | None = D(
        None,
        gt=0,
        description="with calibration: a candidate whose served head makes the federation's answers less likely at "
        "their mean features (the last calibration phase's statistics) than the cloud's head of the task does, by "
        "more than this many nats on average over the federation's samples, is refused (flagged) whatever its "
        "validators say: evidence that no validator's vote outweighs (None: off)",
    )


class CalibrationConfig(_Strict):
    """Classifier calibration with virtual representations (CCVR, Luo et al. 2021; hffm/calibration.py), in
    every cloud round of star, hfm and hfm-d2d: once the devices hold the global modules, each sends per task and answer
    the count, sum and sums of squares of its training samples' features (the backbone's pooled output) up the
    tree; the cloud turns the totals into one Gaussian per answer, trains each task's head on features drawn
    from them, and sends the calibrated heads back down before the devices evaluate. Only the heads change;
    the statistics, not any sample, leave a device."""

    enabled: bool = D(False, description="calibrate the heads in every cloud round (star, hfm, hfm-d2d)")
    epochs: int = D(10, ge=1, description="epochs over the virtual features")
    lr: float = D(3e-3, gt=0, description="AdamW's learning rate for the heads' calibration")
    batch_size: int = D(32, ge=1, description="virtual features per step")
    factor: float = D(
        1.0, gt=0, description="virtual features drawn per answer, as a multiple of the samples the federation holds"
    )
    diagonal: bool = D(
        False,
        description="send per-coordinate variances instead of whole covariance matrices (d numbers per answer, "
        "not d x d: the paper-size hidden 768 makes a matrix 2.4 MB per answer; less accurate)",
    )
    pooled: bool = D(
        False,
        description="with diagonal: also send one d x d sum of outer products per task over all its answers; each "
        "answer is then drawn with its own variances and the task's pooled within-answer correlations (d x d "
        "per task, not per answer)",
    )
    shrink: float = D(
        1e-3,
        ge=0,
        description="added to each covariance's diagonal, times its mean variance (a rare answer's is singular)",
    )
    label_t: float | None = D(
        None,
        gt=0,
        description="check each sender's labels by its statistics wherever they are collected: a sender whose "
        "per-answer mean features are further than this from the other senders' (in units of sampling noise: "
        "about 1 for honest data, however skewed) is flagged and its statistics left out of the sum "
        "(label flipping, poisoned labels; hffm/calibration.py label_scores); null: no check",
    )
    head_check: float | None = D(
        None,
        gt=0,
        description="with label_t: check each device's training push against the statistics it last sent: a device "
        "whose pushed heads find the answers it reported less likely at their mean features than the heads it "
        "started the round from, by more than this (nats, per sample; honest training makes them more likely) is "
        "left out of that collect (a liar pairing honest statistics with a flipped update; hffm/calibration.py "
        "head_drop); null: no check",
    )
    opening: bool = D(
        False,
        description="a calibration phase in round 1 too, before any device trains: every device's statistics reach "
        "its collectors before its first training push, so the head check and the weights held to the statistics "
        "(head_check) and the label check's flags apply from that push on, not from the round after the first cloud "
        "round; with head_check a device synced into a later round (a joiner, one that lost its state) sends its "
        "statistics to its collector before it trains too (a device pushing with none there still weighs at most "
        "the median claim of its tasks there); and devices start training from heads calibrated on the initial "
        "features",
    )


class HFFMConfig(_Strict):
    """A whole run."""

    method: str = D("hfm", description=f"the round plan: {' | '.join(METHODS)}")
    rounds: int = D(8, ge=1, description="rounds to run")
    e_agg: int = D(2, ge=1, description="edges aggregate at the cloud every e_agg rounds (hfm, hfm-d2d)")
    seed: int = D(0, description="seed of the data, its split and local training")
    tasks: list[str] = D(
        default_factory=list,
        description="tasks of the federation (one head each); empty: every task of the data source "
        f"(synthetic: {list(TASKS)}; easy-vqa: {list(SOURCE_TASKS['easy-vqa'])}; vqa-v2: "
        f"{list(SOURCE_TASKS['vqa-v2'])}; gqa: {list(SOURCE_TASKS['gqa'])}; hf-disk: the task_column's values)",
    )
    topology: TopologyConfig = D(default_factory=TopologyConfig, description=TopologyConfig.__doc__)
    model: ModelConfig = D(default_factory=ModelConfig, description=ModelConfig.__doc__)
    data: DataConfig = D(default_factory=DataConfig, description=DataConfig.__doc__)
    train: TrainConfig = D(default_factory=TrainConfig, description=TrainConfig.__doc__)
    wire: WireConfig = D(default_factory=WireConfig, description=WireConfig.__doc__)
    runtime: RuntimeConfig = D(default_factory=RuntimeConfig, description=RuntimeConfig.__doc__)
    geometry: GeometryConfig = D(default_factory=GeometryConfig, description=GeometryConfig.__doc__)
    cost: CostConfig = D(default_factory=CostConfig, description="the wireless latency/energy model")
    d2d: D2DConfig = D(default_factory=D2DConfig, description=D2DConfig.__doc__)
    aggregation: AggregationConfig = D(default_factory=AggregationConfig, description=AggregationConfig.__doc__)
    security: SecurityConfig = D(default_factory=SecurityConfig, description=SecurityConfig.__doc__)
    checkpoint: CheckpointConfig = D(default_factory=CheckpointConfig, description=CheckpointConfig.__doc__)
    faults: FaultsConfig = D(default_factory=FaultsConfig, description=FaultsConfig.__doc__)
    limits: LimitsConfig = D(default_factory=LimitsConfig, description=LimitsConfig.__doc__)
    circulation: CirculationConfig = D(default_factory=CirculationConfig, description=CirculationConfig.__doc__)
    adversary: AdversaryConfig = D(default_factory=AdversaryConfig, description=AdversaryConfig.__doc__)
    specialists: SpecialistsConfig = D(default_factory=SpecialistsConfig, description=SpecialistsConfig.__doc__)
    calibration: CalibrationConfig = D(default_factory=CalibrationConfig, description=CalibrationConfig.__doc__)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _one_of(v, METHODS, "method")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("tasks must be distinct")
        return v

    @model_validator(mode="after")
    def _source_tasks(self) -> HFFMConfig:
        known = source_tasks(self.data)
        if not self.tasks:
            if known is None:
                raise ValueError("tasks: list the tasks (the values of data.hf_disk.task_column) to train")
            # assigned silently: validate_assignment would re-enter this validator
            object.__setattr__(self, "tasks", list(known))
            return self
        if known is not None:
            unknown = [t for t in self.tasks if t not in known]
            if unknown:
                raise ValueError(
                    f"tasks: unknown task(s) {unknown} of data source {self.data.source}; known: {list(known)}"
                )
        return self

    @model_validator(mode="after")
    def _calibration(self) -> HFFMConfig:
        """Calibration runs in the cloud rounds of the whole-set plans that have them; its label check with it."""
        if not self.calibration.enabled:
            if self.calibration.label_t is not None:
                raise ValueError("calibration.label_t: checks labels by the statistics; set calibration.enabled")
            if self.calibration.head_check is not None:
                raise ValueError("calibration.head_check: checks heads against the statistics; set calibration.enabled")
            if self.calibration.opening:
                raise ValueError("calibration.opening: a calibration phase in round 1; set calibration.enabled")
            if self.specialists.stats_cut is not None:
                raise ValueError("specialists.stats_cut: holds served heads to the statistics; set calibration.enabled")
            return self
        if self.calibration.pooled and not self.calibration.diagonal:
            raise ValueError(
                "calibration.pooled: pools the correlations beside per-answer variances; set calibration.diagonal"
            )
        if self.calibration.head_check is not None and self.calibration.label_t is None:
            raise ValueError(
                "calibration.head_check: checks heads against the statistics the label check holds; "
                "set calibration.label_t"
            )
        if self.method not in ("star", "hfm", "hfm-d2d"):
            raise ValueError(
                f"calibration.enabled: calibrates in the cloud rounds of star, hfm and hfm-d2d, not {self.method}'s"
            )
        if self.method == "hfm-d2d" and self.calibration.label_t is not None:
            raise ValueError(
                "calibration.label_t: in hfm-d2d a cluster head, itself a device, sums its cluster's statistics, "
                "so no trusted node holds each device's to check; use star or hfm"
            )
        if self.circulation.rules:
            raise ValueError("calibration.enabled: not with per-module schedules (circulation.rules)")
        return self

    @model_validator(mode="after")
    def _arrivals(self) -> HFFMConfig:
        """Each arrival names a task of ``tasks``, a round of the run and devices of the starting topology,
        none of them twice for one task; at least one task is somebody's at start."""
        seen: dict[str, set[str]] = {}
        t = self.topology
        for i, a in enumerate(self.circulation.arrivals):
            where = f"circulation.arrivals.{i}"
            if self.tasks and a.task not in self.tasks:
                raise ValueError(f"{where}.task: {a.task!r} is not one of tasks {self.tasks}")
            if a.round > self.rounds:
                raise ValueError(f"{where}.round: {a.round} is past the last round ({self.rounds})")
            for d in a.devices:
                m = re.fullmatch(r"device-(\d+)-(\d+)", d)
                if not m or int(m.group(1)) >= t.edges or int(m.group(2)) >= t.devices_per_edge:
                    raise ValueError(f"{where}.devices: {d!r} is not a device of the starting topology")
                if d in seen.setdefault(a.task, set()):
                    raise ValueError(f"{where}.devices: {d} takes up {a.task} twice")
                seen[a.task].add(d)
        if self.tasks and seen and not set(self.tasks) - set(seen):
            raise ValueError("circulation.arrivals: every task arrives mid-run; at least one must be held at start")
        return self


def source_tasks(data: DataConfig) -> tuple[str, ...] | None:
    """The tasks a data source defines, known from the config alone (None: hf-disk's task column, whose
    values only the data set knows)."""
    if data.source == "vqa-v2":
        return SOURCE_TASKS["vqa-v2"] if data.vqa_v2.tasks_by == "answer_type" else ("vqa",)
    if data.source == "gqa":
        return SOURCE_TASKS["gqa"] if data.gqa.tasks_by == "structural" else ("gqa",)
    if data.source == "hf-disk":
        return None if data.hf_disk.task_column else ("vqa",)
    return SOURCE_TASKS[data.source]


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if e["loc"] else msg)  # a whole-config check names its keys itself
    return "; ".join(parts)


def validate_config(data: dict[str, Any]) -> HFFMConfig:
    try:
        return HFFMConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> HFFMConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    # Layers: defaults <- file <- --set; a partial section keeps the defaults of its other keys.
    defaults = HFFMConfig().model_dump(mode="json")
    defaults["tasks"] = []  # the data source's own, unless the file or a --set names some
    data = apply_overrides(_deep_merge(defaults, data), overrides or [])
    return validate_config(data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known_keys(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a raw config mapping (returns a new mapping)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        # Check the key path against the schema before touching the data.
        model: type[BaseModel] | None = HFFMConfig
        parts = key.split(".")
        mapping = False  # inside a free mapping (aggregation.params): any key; the model checks it
        for i, part in enumerate(parts):
            if mapping:
                if i != len(parts) - 1:
                    raise ConfigError(f"{key}: unknown key ({'.'.join(parts[: i + 1])} is not a section)")
                break
            if model is None:
                raise ConfigError(f"{key}: unknown key ({'.'.join(parts[:i])} is not a section)")
            fields = _known_keys(model)
            if part not in fields:
                raise ConfigError(f"{key}: unknown key (known in this section: {sorted(fields)})")
            ann = fields[part].annotation
            mapping = typing.get_origin(ann) is dict
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


# The paper's module sizes: ViLT-B/32 dimensions (hidden 768, 12 layers), bottleneck 256 -> Double-Adapters
# of 9.46 M parameters (37.8 MB fp32), plus small heads. For the cost model and benchmarks; the
# backbone itself stays whatever model.backbone says.
PAPER_MODEL = [
    "model.hidden_size=768",
    "model.num_layers=12",
    "model.num_heads=12",
    "model.intermediate_size=3072",
    "model.bottleneck=256",
    "model.head_hidden=32",
]


def explain_config(cfg: HFFMConfig) -> list[tuple[str, str | None, str]]:
    """(dotted key, value as YAML or None for a section, description) for every field, in order."""
    rows: list[tuple[str, str | None, str]] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, f in type(model).model_fields.items():
            value = getattr(model, name)
            key = prefix + name
            if isinstance(value, BaseModel):
                rows.append((key, None, f.description or ""))
                walk(value, key + ".")
            else:
                shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                rows.append((key, shown, f.description or ""))

    walk(cfg, "")
    return rows


def dump_config(cfg: HFFMConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_config(cfg: HFFMConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file + rename): processes reading the same file while
    it is (re)written never see it empty or half-written. Unchanged content is not rewritten."""
    p = Path(path)
    text = dump_config(cfg)
    if p.is_file() and p.read_text() == text:
        return p
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(p)
    return p


def check_precision(precision: str, device: str) -> str:
    """``precision`` (runtime.precision) if ``device`` can compute in it, else a ConfigError naming the field.
    fp16 on a CPU is refused: torch has no fast fp16 kernels there (an epoch of the paper-size model took 42
    times fp32's here, docs/performance.md), while bf16 on a CPU is fast where the CPU has bf16 instructions."""
    import torch

    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError(f"runtime.precision: fp16 needs a CUDA device, not {device} (on a CPU use bf16 or fp32)")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"runtime.precision: bf16 is not supported by {device} ({name}); use fp16 or fp32")
    return precision


def resolve_torch_device(name: str, precision: str = "fp32") -> str:
    """The torch device ``name`` (runtime.device) stands for: ``auto`` picks CUDA when present, else CPU; a
    ConfigError naming the field when it cannot be had, or cannot compute in ``precision`` (runtime.precision,
    ``check_precision``)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {name!r} requested but CUDA is not available")
    elif name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"runtime.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    check_precision(precision, name)
    return name
