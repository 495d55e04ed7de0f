"""Modules: the unit of exchange, and their safetensors encoding.

A ``Module`` is a named set of fp32 tensors (one Double-Adapter or one task head) with the round
that produced it (``version``) and the number of samples behind it (its FedAvg weight). On the wire
a module is one safetensors blob (never pickle) in the configured wire dtype, identified by the
SHA-256 of its bytes. ``decode_module`` checks everything a receiver must check before the module
may touch any state: digest, header/metadata agreement, tensor names, shapes, dtype, finiteness.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class ModuleError(ValueError):
    """A module (or a push of modules) is rejected. ``code`` maps to a gRPC status code name,
    ``reason`` is a short bounded label (metrics)."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass
class Module:
    name: str
    tensors: dict[str, torch.Tensor]
    version: int
    num_samples: float

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


ModuleSet = dict[str, Module]

# name -> {param name -> shape}: what a receiver accepts for each module.
ModuleSpec = dict[str, dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class EncodedModule:
    name: str
    version: int
    num_samples: float
    dtype: str
    data: bytes
    sha256: bytes = field(repr=False)

    @property
    def size_bytes(self) -> int:
        return len(self.data)


def spec_of(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> ModuleSpec:
    return {name: {k: tuple(t.shape) for k, t in tensors.items()} for name, tensors in modules.items()}


def encode_module(module: Module, wire_dtype: str = "fp32") -> EncodedModule:
    dtype = WIRE_DTYPES[wire_dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.tensors.items()}
    meta = {
        "name": module.name,
        "version": str(module.version),
        "num_samples": repr(float(module.num_samples)),
        "dtype": wire_dtype,
    }
    data = st_save(tensors, metadata=meta)
    return EncodedModule(
        name=module.name,
        version=module.version,
        num_samples=float(module.num_samples),
        dtype=wire_dtype,
        data=data,
        sha256=hashlib.sha256(data).digest(),
    )


def expected_size_bound(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Largest plausible encoded size of a module of these shapes (fp32 + header slack)."""
    numel = sum(math.prod(s) for s in shapes.values())
    return numel * 4 + 16_384 + 256 * len(shapes)


def decode_module(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    version: int,
    num_samples: float,
    dtype: str,
    sha256: bytes,
    spec: ModuleSpec,
    computed_sha256: bytes | None = None,
) -> Module:
    """Verify and decode one module blob received with the given header fields.

    ``computed_sha256``: the digest of ``data`` when the caller already hashed it (incrementally, as
    chunks arrived); otherwise it is computed here."""
    if name not in spec:
        raise ModuleError("INVALID_ARGUMENT", "unknown_module", f"unknown module name {name!r}")
    if dtype not in WIRE_DTYPES:
        raise ModuleError("INVALID_ARGUMENT", "bad_dtype", f"module {name}: unsupported wire dtype {dtype!r}")
    digest = computed_sha256 if computed_sha256 is not None else hashlib.sha256(data).digest()
    if digest != sha256:
        raise ModuleError(
            "DATA_LOSS", "digest_mismatch", f"module {name}: SHA-256 of received bytes does not match header"
        )
    if not (math.isfinite(num_samples) and num_samples > 0):
        raise ModuleError("INVALID_ARGUMENT", "bad_weight", f"module {name}: num_samples must be > 0")
    try:
        tensors = st_load(bytes(data))
    except Exception as err:  # safetensors raises its own error types
        raise ModuleError("INVALID_ARGUMENT", "bad_encoding", f"module {name}: not a safetensors blob: {err}") from None
    want = spec[name]
    if set(tensors) != set(want):
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        raise ModuleError(
            "INVALID_ARGUMENT", "shape_mismatch", f"module {name}: tensors missing {missing}, unexpected {extra}"
        )
    wire = WIRE_DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(want[key]):
            raise ModuleError(
                "INVALID_ARGUMENT",
                "shape_mismatch",
                f"module {name}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(want[key])}",
            )
        if t.dtype != wire:
            raise ModuleError(
                "INVALID_ARGUMENT",
                "dtype_mismatch",
                f"module {name}: tensor {key} is {_DTYPE_NAMES.get(t.dtype, t.dtype)}, header says {dtype}",
            )
        t32 = t.to(torch.float32)
        if not all_finite(t32):
            raise ModuleError("INVALID_ARGUMENT", "non_finite", f"module {name}: tensor {key} has NaN or Inf")
        out[key] = t32
    return Module(name=name, tensors=out, version=version, num_samples=float(num_samples))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. One reduction (a sum is finite only if every element is); only when the
    sum is not finite — a NaN/Inf, or finite values overflowing the sum — the exact element-wise check
    decides."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def clone_modules(modules: ModuleSet) -> ModuleSet:
    return {
        n: Module(n, {k: v.detach().clone() for k, v in m.tensors.items()}, m.version, m.num_samples)
        for n, m in modules.items()
    }


def save_modules(modules: ModuleSet, path: str) -> None:
    """All modules in one safetensors file, keys ``<module>/<param>``, versions in the metadata."""
    from safetensors.torch import save_file

    flat = {f"{n}/{k}": v.detach().cpu().contiguous() for n, m in modules.items() for k, v in m.tensors.items()}
    meta = {f"{n}/version": str(m.version) for n, m in modules.items()}
    meta.update({f"{n}/num_samples": repr(float(m.num_samples)) for n, m in modules.items()})
    save_file(flat, path, metadata=meta)


def load_modules(path: str) -> ModuleSet:
    from safetensors import safe_open

    out: ModuleSet = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            name, param = key.split("/", 1)
            m = out.setdefault(
                name,
                Module(name, {}, int(meta.get(f"{name}/version", 0)), float(meta.get(f"{name}/num_samples", 1))),
            )
            m.tensors[param] = f.get_tensor(key)
    return out
