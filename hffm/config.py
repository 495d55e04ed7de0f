"""The one config tree that drives every entry point (launcher, services, compose, Kubernetes).

A config is YAML on disk, validated by pydantic models with ``extra="forbid"`` so a typo is an
error naming the key. ``apply_overrides`` implements ``--set dotted.key=value``; values are parsed
as YAML scalars/lists (``--set tasks=[art,gqa]``, ``--set e_agg=2``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("star", "hfm", "hfm-d2d", "edge-only", "edge-only-d2d")
KNOWN_TASKS = ("art", "gqa")


class ConfigError(ValueError):
    """A config file or an override is invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TopologyConfig(_Strict):
    edges: int = Field(3, ge=1, le=1000)
    devices_per_edge: int = Field(4, ge=1, le=1000)
    # How many of the federation's tasks each device holds: "all", or an int (assigned round-robin
    # by device index, so every task is held by some device of every edge when possible).
    tasks_per_device: int | Literal["all"] = "all"

    @field_validator("tasks_per_device")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'all'")
        return v


class ModelConfig(_Strict):
    # "tiny" builds a seeded random ViltConfig from the fields below; any other value is a local
    # directory holding a transformers ViLT checkpoint loaded with from_pretrained (no hub).
    backbone: str = "tiny"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(8, ge=2)
    max_text_len: int = Field(16, ge=4)
    bottleneck: int = Field(256, ge=1)  # Double-Adapter bottleneck (paper: 256)
    head_hidden: int = Field(128, ge=1)
    init_seed: int = 1234  # backbone, adapters and heads are initialised from this seed everywhere
    # Init std of the random tiny backbone. BERT's 0.02 gives near-uniform attention and an almost
    # constant pooled output (nothing to adapt); a wider init stands in for a pretrained backbone's
    # informative features. Ignored for checkpoints.
    initializer_range: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be divisible by model.num_heads")
        if self.image_size % self.patch_size:
            raise ValueError("model.image_size must be divisible by model.patch_size")
        return self


class DataConfig(_Strict):
    alpha: float = Field(0.1, gt=0)  # Dirichlet concentration of the label split over devices
    train_per_task: int = Field(1200, ge=1)  # samples of each task spread over its devices
    local_test_per_device: int = Field(64, ge=1)
    global_test_per_task: int = Field(256, ge=1)
    min_samples_per_device: int = Field(8, ge=1)


class TrainConfig(_Strict):
    local_epochs: int = Field(1, ge=1)  # E_local
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Skip the optimisation step but keep every exchange (benchmarks of the runtime itself).
    noop: bool = False
    # Devices test their modules in rounds r with r % eval_every == 0 and in the last round;
    # 0: never (benchmarks of the exchange alone).
    eval_every: int = Field(1, ge=0)


class WireConfig(_Strict):
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    chunk_bytes: int = Field(1 << 20, ge=1024, le=1 << 20)  # at most 1 MiB per gRPC message


class RuntimeConfig(_Strict):
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    host: str = "127.0.0.1"
    devices_per_process: int = Field(4, ge=1)  # the launcher hosts several device servers per process
    register_timeout_s: float = Field(180.0, gt=0)
    round_timeout_s: float = Field(600.0, gt=0)
    rpc_timeout_s: float = Field(60.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    # When set, every node records each push it accepted and each aggregate it adopted, as
    # safetensors under <trace_dir>/<node>/ (an audit trail; the integration tests read it).
    trace_dir: str | None = None
    # The cloud waits this long after every node registered before round 1 (a grace period).
    start_delay_s: float = Field(0.0, ge=0)
    # After the run, every process keeps serving (metrics included) this long before it exits,
    # so a scraper sees the final values.
    linger_s: float = Field(0.0, ge=0)
    # False (Kubernetes): after the run every process stays up, idle, until it is terminated, so
    # a Deployment / StatefulSet does not restart it into a new run.
    exit_after_run: bool = True


class GeometryConfig(_Strict):
    """Where nodes stand (paper Section IV; the seed code's draws with seed 49)."""

    seed: int = 49
    area_m: float = Field(5000.0, gt=0)
    min_server_separation_m: float = Field(500.0, ge=0)
    cluster_center_radius_m: float = Field(1000.0, ge=0)  # cluster centre within this of its server
    device_radius_m: float = Field(500.0, gt=0)  # devices within this of their cluster centre
    d2d_range_m: float = Field(30.0, gt=0)  # D2D link when within this distance (else MST patch)


class LinkConfig(_Strict):
    tx_power_w: float = Field(gt=0)  # used for the rate (and the energy unless energy_power_w is set)
    bandwidth_hz: float = Field(gt=0)
    energy_power_w: float | None = Field(None, gt=0)  # the seed code's separate "energy" power


class BackhaulConfig(_Strict):
    delay_s: float = Field(0.1, ge=0)
    rate_bps: float = Field(4e6, gt=0)
    tx_power_w: float = Field(0.8, gt=0)


class ComputeConfig(_Strict):
    """Local training: T = c*D/f, E = kappa*c*D*f^2 (D = samples processed)."""

    cycles_per_sample: float = Field(1e7, ge=0)
    cpu_hz: float = Field(1e9, gt=0)
    kappa: float = Field(1e-28, ge=0)


class CostConfig(_Strict):
    """The wireless latency/energy model (docs/cost-model.md). ``paper`` reproduces the seed code's
    model, quirks included; ``corrected`` (default) fixes them."""

    profile: Literal["corrected", "paper"] = "corrected"
    noise_dbm_per_hz: float = -174.0
    pathloss: Literal["paper", "uma"] = "paper"  # beta0*(d/d0)^-alpha, or 3GPP UMa 128.1+37.6 log10(d_km)
    beta0_db: float = -30.0
    d0_m: float = Field(1.0, gt=0)
    pathloss_exponent: float = Field(3.0, gt=0)
    fading_seed: int = 49
    uplink: LinkConfig = Field(default_factory=lambda: LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6))
    downlink: LinkConfig = Field(default_factory=lambda: LinkConfig(tx_power_w=1.0, bandwidth_hz=1e6))
    d2d: LinkConfig = Field(default_factory=lambda: LinkConfig(tx_power_w=0.2, bandwidth_hz=8e6))
    backhaul: BackhaulConfig = Field(default_factory=BackhaulConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    # Charge every transfer as if a whole push were this many bytes (the seed code's 6 MB).
    module_bytes_override: int | None = Field(None, gt=0)


class D2DConfig(_Strict):
    head_policy: Literal["random", "central", "rotate"] = "random"
    probe_timeout_s: float = Field(1.0, gt=0)  # a head candidate not answering health within this is skipped


class HFFMConfig(_Strict):
    method: Literal["star", "hfm", "hfm-d2d", "edge-only", "edge-only-d2d"] = "hfm"
    rounds: int = Field(8, ge=1)
    e_agg: int = Field(2, ge=1)  # edges upload to the cloud every e_agg rounds (hfm)
    seed: int = 0
    tasks: list[str] = Field(default_factory=lambda: list(KNOWN_TASKS))
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wire: WireConfig = Field(default_factory=WireConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    geometry: GeometryConfig = Field(default_factory=GeometryConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    d2d: D2DConfig = Field(default_factory=D2DConfig)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one task is needed")
        unknown = [t for t in v if t not in KNOWN_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(KNOWN_TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError("tasks must be distinct")
        return v


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
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
    data = apply_overrides(_deep_merge(HFFMConfig().model_dump(mode="json"), data), overrides or [])
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
        for i, part in enumerate(parts):
            if model is None:
                raise ConfigError(f"{key}: unknown key ({'.'.join(parts[:i])} is not a section)")
            fields = _known_keys(model)
            if part not in fields:
                raise ConfigError(f"{key}: unknown key (known in this section: {sorted(fields)})")
            ann = fields[part].annotation
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


def resolve_torch_device(name: str) -> str:
    """``auto`` picks CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"runtime.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name
