"""Frozen ViLT backbone + Double-Adapters + per-task heads.

The trainable parts are *modules*, each with a name derived from where it sits: ``adapter.<layer>``
(the Double-Adapter of transformer layer ``<layer>``) and ``head.<task>``; where configured, also
``prompt.<task>`` (learned prompt vectors appended to the input sequence for that task's questions) and
the modality-side adapters ``modality.text`` and ``modality.image`` (on the text and the patch
embeddings, residual, zero-initialised up-projections). The same string names a
module in memory, on the wire, in safetensors files, in metrics and in logs.

Wiring (fixing the seed code, which discarded the feed-forward output): in each ViLT layer the
feed-forward output ``f = Dropout(Dense(intermediate))`` becomes ``f + A1(f) + A2(f)`` before the
layer's residual addition. With the adapters' up-projections zero-initialised the model computes
exactly what the frozen backbone computes.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from hffm.config import HFFMConfig, ModelConfig
from hffm.ids import (  # noqa: F401 - module names live in hffm.ids
    MODALITY_ADAPTERS,
    PROMPT_PREFIX,
    adapter_name,
    head_name,
    prompt_name,
    task_of,
)

# runtime.precision -> the dtype the backbone computes in under torch.autocast (None: plain fp32, no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BottleneckAdapter(nn.Module):
    """down-projection -> GELU -> up-projection (up zero-initialised: starts as the identity map)."""

    def __init__(self, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class DoubleAdapter(nn.Module):
    """Two parallel bottleneck adapters whose outputs are summed."""

    def __init__(self, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.a = BottleneckAdapter(hidden, bottleneck)
        self.b = BottleneckAdapter(hidden, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class TaskHead(nn.Module):
    """Answer classifier on the pooled output (ViLT's VQA head shape, smaller hidden)."""

    def __init__(self, hidden: int, head_hidden: int, num_labels: int) -> None:
        super().__init__()
        self.net = _head_mlp(hidden, head_hidden, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def _head_mlp(hidden: int, head_hidden: int, out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear to ``out``: every head's MLP on the pooled output."""
    return nn.Sequential(
        nn.Linear(hidden, head_hidden), nn.LayerNorm(head_hidden), nn.GELU(), nn.Linear(head_hidden, out)
    )


class ETFHead(nn.Module):
    """FedETF's head (Li et al., "No Fear of Classifier Biases", ICCV 2023): the MLP of ``TaskHead`` ending in
    a learned projection to ``head_hidden`` dimensions, L2-normalised, scored against a fixed simplex
    equiangular tight frame (one unit vertex per answer, every pair at cosine -1/(K-1)) and divided by a
    temperature. The frame is a non-persistent buffer made from a seed on every node: it is not in the
    module's state, so it is never trained, aggregated or sent. Under label skew a learned answer layer is
    where a device's prior goes (the answers it never sees are pushed down); a fixed one has none to learn."""

    def __init__(self, hidden: int, head_hidden: int, num_labels: int, temperature: float, seed: int) -> None:
        super().__init__()
        if num_labels < 2 or head_hidden < num_labels:
            raise ValueError(
                f"model.head_classifier=etf needs 2 <= answers <= model.head_hidden; a task has {num_labels} "
                f"answers and model.head_hidden is {head_hidden}"
            )
        self.net = _head_mlp(hidden, head_hidden, head_hidden)  # the last layer: the learned projection
        self.temperature = temperature
        self.register_buffer("frame", simplex_etf(head_hidden, num_labels, seed), persistent=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = nn.functional.normalize(self.net(pooled), dim=-1)
        return z @ self.frame.to(z.dtype).T / self.temperature


def simplex_etf(dim: int, classes: int, seed: int) -> torch.Tensor:
    """(classes, dim): ``classes`` unit vectors in ``dim`` >= ``classes`` dimensions with pairwise cosine
    -1/(classes-1), M = sqrt(K/(K-1)) U (I - 11^T/K) for U with orthonormal columns (a seeded QR), transposed."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, classes, generator=g, dtype=torch.float64))
    centred = torch.eye(classes, dtype=torch.float64) - 1.0 / classes
    return (math.sqrt(classes / (classes - 1)) * u @ centred).T.to(torch.float32).contiguous()


class AdaptedOutput(nn.Module):
    """Replaces ``ViltOutput``: keeps its dense/dropout (frozen) and adds the Double-Adapter."""

    def __init__(self, original: nn.Module, adapter: DoubleAdapter) -> None:
        super().__init__()
        self.dense = original.dense
        self.dropout = original.dropout
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        ffn = self.dropout(self.dense(hidden_states))
        return ffn + self.adapter(ffn) + input_tensor


class PromptTokens(nn.Module):
    """A task's prompt: ``n`` learned vectors appended to the backbone's input sequence (after the text
    and image tokens, attended to by both; no position embedding: they carry their own content)."""

    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n, hidden) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)


class ExtendedEmbeddings(nn.Module):
    """Replaces ``ViltEmbeddings`` where the model has modality adapters or prompts: the original's
    sequence (text tokens, then image tokens, token types added) with ``modality.text`` and
    ``modality.image`` added residually to their parts, and the current task's prompt appended (its mask
    ones). The trainable modules are looked up in the model's ``ModuleDict``, not registered twice."""

    def __init__(self, original: nn.Module, modules: nn.ModuleDict, modality: bool, prompts: bool) -> None:
        super().__init__()
        self.original = original
        self._modules_ref = [modules]  # a plain list: the backbone's state dict stays the backbone's
        self.modality, self.prompts = modality, prompts
        self.task: str | None = None  # set by HFFMModel.pooled for the batch it runs

    def forward(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, inputs_embeds,
                image_embeds, image_token_type_idx=None):  # fmt: skip
        emb, masks = self.original(
            input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, inputs_embeds, image_embeds,
            image_token_type_idx=image_token_type_idx,
        )  # fmt: skip
        mods = self._modules_ref[0]
        if self.modality:
            n_text = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            text, image = emb[:, :n_text], emb[:, n_text:]
            text = text + mods[MODALITY_ADAPTERS[1].replace(".", ":")](text)
            image = image + mods[MODALITY_ADAPTERS[0].replace(".", ":")](image)
            emb = torch.cat([text, image], dim=1)
        if self.prompts and self.task is not None:
            p = mods[prompt_name(self.task).replace(".", ":")](emb.shape[0]).to(emb.dtype)
            emb = torch.cat([emb, p], dim=1)
            masks = torch.cat(
                [masks, torch.ones(masks.shape[0], p.shape[1], dtype=masks.dtype, device=masks.device)], 1
            )
        return emb, masks


def _stable_seed(base: int, name: str) -> int:
    return (base * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def build_head(hidden: int, model_cfg: ModelConfig, task: str, answers: int) -> nn.Module:
    """``task``'s head over ``answers`` answers at its initial values (seeded by name, as on every node)."""
    name = head_name(task)
    torch.manual_seed(_stable_seed(model_cfg.init_seed, name))
    if model_cfg.head_classifier == "etf":
        seed = _stable_seed(model_cfg.init_seed, name + ":etf")
        return ETFHead(hidden, model_cfg.head_hidden, answers, model_cfg.etf_temperature, seed)
    return TaskHead(hidden, model_cfg.head_hidden, answers)


def build_trainable_modules(
    hidden: int, num_layers: int, model_cfg: ModelConfig, task_labels: dict[str, int]
) -> nn.ModuleDict:
    """All modules of the federation, initialised identically on every node (seeded by name).

    Keys are module names with ``.`` replaced by ``:`` (ModuleDict keys cannot contain dots).
    """
    mods: dict[str, nn.Module] = {}
    for layer in range(num_layers):
        name = adapter_name(layer)
        torch.manual_seed(_stable_seed(model_cfg.init_seed, name))
        mods[name.replace(".", ":")] = DoubleAdapter(hidden, model_cfg.bottleneck)
    if model_cfg.modality_adapters:
        for name in MODALITY_ADAPTERS:
            torch.manual_seed(_stable_seed(model_cfg.init_seed, name))
            mods[name.replace(".", ":")] = BottleneckAdapter(hidden, model_cfg.bottleneck)
    for task, n in task_labels.items():
        mods[head_name(task).replace(".", ":")] = build_head(hidden, model_cfg, task, n)
    if model_cfg.prompt_tokens:
        for task in task_labels:
            name = prompt_name(task)
            torch.manual_seed(_stable_seed(model_cfg.init_seed, name))
            mods[name.replace(".", ":")] = PromptTokens(model_cfg.prompt_tokens, hidden)
    return nn.ModuleDict(mods)


def tiny_vilt_config(model_cfg: ModelConfig, vocab_size: int):
    from transformers import ViltConfig

    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size,
        image_size=model_cfg.image_size,
        patch_size=model_cfg.patch_size,
        max_position_embeddings=max(model_cfg.max_text_len, 8),
        max_image_length=-1,  # keep every patch: no random patch sampling
        initializer_range=model_cfg.initializer_range,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def backbone_dims(cfg: HFFMConfig) -> tuple[int, int]:
    """(hidden_size, num_layers) of the configured backbone, without building it."""
    if cfg.model.backbone == "tiny":
        return cfg.model.hidden_size, cfg.model.num_layers
    from transformers import ViltConfig

    vc = ViltConfig.from_pretrained(_local_dir(cfg.model.backbone), local_files_only=True)
    return vc.hidden_size, vc.num_hidden_layers


def _local_dir(path: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model.backbone: {path!r} is neither 'tiny' nor a local checkpoint directory (no hub access)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model.backbone: {path!r} holds no config.json: not a checkpoint directory (save one with "
            "ViltModel.save_pretrained)"
        )
    return str(p)


def build_backbone(cfg: HFFMConfig, vocab_size: int):
    """A frozen ``ViltModel``: seeded random tiny config, or ``from_pretrained`` on a local dir."""
    from transformers import ViltModel

    if cfg.model.backbone == "tiny":
        torch.manual_seed(cfg.model.init_seed)
        backbone = ViltModel(tiny_vilt_config(cfg.model, vocab_size))
    else:
        backbone = ViltModel.from_pretrained(_local_dir(cfg.model.backbone), local_files_only=True)
        backbone.config.max_image_length = -1
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


class HFFMModel(nn.Module):
    """A frozen ViLT with Double-Adapters injected in every layer and one head per task."""

    def __init__(self, backbone: nn.Module, modules: nn.ModuleDict, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"runtime.precision: {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
        self.backbone = backbone
        self.trainable = modules
        self.precision = precision  # the backbone's compute precision (runtime.precision; see pooled)
        layers = backbone.encoder.layer
        for i, layer in enumerate(layers):
            key = adapter_name(i).replace(".", ":")
            if key not in modules:
                raise ValueError(f"no module {adapter_name(i)} for backbone layer {i}")
            layer.output = AdaptedOutput(layer.output, modules[key])
        modality = MODALITY_ADAPTERS[0].replace(".", ":") in modules
        prompts = any(k.startswith(PROMPT_PREFIX.replace(".", ":")) for k in modules)
        self._embeddings: ExtendedEmbeddings | None = None
        if modality or prompts:
            self._embeddings = ExtendedEmbeddings(backbone.embeddings, modules, modality, prompts)
            backbone.embeddings = self._embeddings

    # -- modules ---------------------------------------------------------------------------
    def module_names(self) -> list[str]:
        return [k.replace(":", ".") for k in self.trainable]

    def module(self, name: str) -> nn.Module:
        return self.trainable[name.replace(".", ":")]

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module(name).state_dict().items()}

    def load_module_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self.module(name).load_state_dict(state, strict=True)

    def trainable_parameters(self, names: Iterable[str]) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for n in names:
            params.extend(self.module(n).parameters())
        return params

    # -- forward ---------------------------------------------------------------------------
    def pooled(self, batch: dict[str, torch.Tensor], task: str | None = None) -> torch.Tensor:
        """The backbone's pooled output; ``task`` picks the prompt appended (model.prompt_tokens)."""
        if self._embeddings is not None:
            self._embeddings.task = task
        dtype = AUTOCAST_DTYPES[self.precision]
        with contextlib.nullcontext() if dtype is None else torch.autocast(batch["pixel_values"].device.type, dtype):
            out = self.backbone(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"),
                pixel_values=batch["pixel_values"],
                pixel_mask=batch["pixel_mask"],
            )
        return out.pooler_output.float()  # the heads and every statistic in fp32 (fp32: the same tensor)

    def forward(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return self.module(head_name(task))(self.pooled(batch, task))

    def train(self, mode: bool = True) -> HFFMModel:
        """Switch the trainable modules only: the frozen backbone stays in eval mode (dropout off), as
        ``build_backbone`` left it, and its ~150 submodules are not walked on every switch (two walks
        per device round were ~10 % of a tiny model's local round)."""
        self.training = mode
        self.trainable.train(mode)
        return self


def build_model(cfg: HFFMConfig, vocab_size: int, task_labels: dict[str, int]) -> HFFMModel:
    backbone = build_backbone(cfg, vocab_size)
    hidden, layers = backbone.config.hidden_size, backbone.config.num_hidden_layers
    mods = build_trainable_modules(hidden, layers, cfg.model, task_labels)
    return HFFMModel(backbone, mods, cfg.runtime.precision)


def initial_modules(cfg: HFFMConfig, names: list[str], task_labels: dict[str, int]):
    """The federation's round-0 modules (identical on every node), restricted to ``names``,
    built without the backbone (edges and the cloud never load it)."""
    from hffm.modules import Module

    hidden, layers = backbone_dims(cfg)
    mods = build_trainable_modules(hidden, layers, cfg.model, task_labels)
    out = {}
    for n in names:
        state = {k: v.detach().clone() for k, v in mods[n.replace(".", ":")].state_dict().items()}
        out[n] = Module(n, state, 0, 1.0)
    return out
