"""LoRA adapters for MUG-DiT: config, which linears they attach to, and their parameter schema.

Low-rank adaptation (Hu et al. 2021, arXiv 2106.09685, eq. 3): a frozen linear W gets a trainable
update, h = W x + (alpha / r) B A x, with A (r, in), B (out, r), B = 0 at the start so that the
adapted model starts equal to the base model. The anchor's training repo offers rank 64, alpha 32.

Names: the adapter of base linear `<base>` (e.g. `layers.3.self_attn.qkv`) is the pair
`<base>.lora_a.weight` (r, in) and `<base>.lora_b.weight` (out, r).

Tensor parallelism: A and B shard to match their base layer, so that no full-size activation or
weight is ever communicated (only r-wide activations are):
- column-parallel base (weight tp_axis 0, output features split): A replicated, B split on axis 0
  (each rank produces its own output features);
- row-parallel base (weight tp_axis 1, input features split): A split on axis 1 (each rank reads
  its own input features; the r-wide partial products are summed over TP), B replicated;
- replicated base (tp_axis None): A and B replicated.

Merging: W' = W + (alpha / r) B A in the canonical layout (`merge_arrays`); a row permutation of
W (the official fused-qkv order) permutes B's rows the same way, so merged weights export to the
official layout through the ordinary adapter.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Mapping

import numpy as np

from mugv.core import validate as v
from mugv.core.dit import DiTConfig, dit_schema
from mugv.core.schema import Init, ParamSpec, Schema

# The anchor's LoRA targets: attention qkv/proj, cross-attention q/kv/proj and the MLP of every block.
DEFAULT_TARGETS = ("self_attn.qkv", "self_attn.proj", "cross_attn.q", "cross_attn.kv",
                   "cross_attn.proj", "mlp.fc1", "mlp.fc2")
ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters.

    rank: r, the width of the low-rank update (anchor: 64).
    alpha: the update is scaled by alpha / rank (anchor: 32).
    targets: name patterns of the base linears to adapt. A pattern matches a linear's canonical
        module name (`layers.3.mlp.fc1`) when it equals it, ends it after a dot, or matches it as
        an fnmatch glob (`layers.[0-3].mlp.*`). Only linears (2-D weights) can be targets.
    dropout: dropout on the adapter's input (0 = none; tensor parallelism > 1 needs 0).
    base_dtype: dtype the frozen base weights are held in ("float32" or "bfloat16"); "bfloat16"
        halves the frozen weights' memory (the 10B model: 40 GB -> 20 GB).
    """

    rank: int = 64
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    base_dtype: str = "float32"

    def __post_init__(self) -> None:
        v.positive_int(self, "rank")
        v.in_range(self, "alpha", 0, None, lo_open=True)
        if (not isinstance(self.targets, tuple) or not self.targets
                or not all(isinstance(t, str) and t for t in self.targets)):
            v.fail(self, "targets", "a non-empty tuple of non-empty name patterns")
        v.in_range(self, "dropout", 0, 1, hi_open=True)
        v.one_of(self, "base_dtype", ("float32", "bfloat16"))

    @property
    def scale(self) -> float:
        """alpha / r, the factor of the low-rank update."""
        return self.alpha / self.rank


def matches(name: str, pattern: str) -> bool:
    """Does the base-linear module name `name` match the target `pattern` (see LoRAConfig.targets)?"""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One adapted linear: its canonical module name, features and the base weight's tp_axis."""

    name: str
    in_features: int
    out_features: int
    tp_axis: int | None
    layer: int | None

    @property
    def a_name(self) -> str:
        return f"{self.name}.lora_a.weight"

    @property
    def b_name(self) -> str:
        return f"{self.name}.lora_b.weight"


def lora_targets(cfg: DiTConfig, lora: LoRAConfig) -> tuple[LoRATarget, ...]:
    """The DiT linears `lora.targets` select, in schema order. Every pattern must select at least
    one linear (a typo would otherwise silently train nothing)."""
    linears = [p for p in dit_schema(cfg) if p.name.endswith(".weight") and len(p.shape) == 2]
    found: list[LoRATarget] = []
    used = {pattern: 0 for pattern in lora.targets}
    for p in linears:
        base = p.name[: -len(".weight")]
        hits = [pat for pat in lora.targets if matches(base, pat)]
        for pat in hits:
            used[pat] += 1
        if hits:
            out_f, in_f = p.shape
            found.append(LoRATarget(base, in_f, out_f, p.tp_axis, p.layer))
    unused = [pat for pat, n in used.items() if n == 0]
    if unused:
        names = sorted({p.name[: -len('.weight')].split('.', 2)[-1] if p.layer is not None
                        else p.name[: -len('.weight')] for p in linears})
        raise v.ConfigError(f"LoRAConfig.targets: pattern(s) {unused} match no linear layer of the "
                            f"DiT; linears are (per block, prefix layers.N.) {names}")
    return tuple(found)


def lora_schema(cfg: DiTConfig, lora: LoRAConfig) -> Schema:
    """The adapter parameters: per target, A (r, in) and B (out, r) with tp_axis matching the base
    layer (module docstring). Init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's default Linear init,
    as the PEFT library uses), B = 0 (so the adapted model starts as the base model)."""
    r = lora.rank
    specs: list[ParamSpec] = []
    for t in lora_targets(cfg, lora):
        a_axis = 1 if t.tp_axis == 1 else None
        b_axis = 0 if t.tp_axis == 0 else None
        specs.append(ParamSpec(t.a_name, (r, t.in_features), tp_axis=a_axis, layer=t.layer,
                               init=Init("uniform", std=1.0 / math.sqrt(t.in_features))))
        specs.append(ParamSpec(t.b_name, (t.out_features, r), tp_axis=b_axis, layer=t.layer,
                               init=Init("zeros")))
    return Schema(tuple(specs))


def is_adapter_name(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def merge_arrays(params: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray],
                 cfg: DiTConfig, lora: LoRAConfig, sign: float = 1.0) -> dict[str, np.ndarray]:
    """Canonical base arrays with the adapters folded in: W + sign * (alpha / r) B A per target
    (sign -1 unmerges). Computed in float64 and cast back to each weight's dtype. Every adapter of
    the schema must be given; arrays are global (unsharded)."""
    schema = lora_schema(cfg, lora).as_dict()
    missing, extra = sorted(set(schema) - set(adapters)), sorted(set(adapters) - set(schema))
    if missing or extra:
        raise KeyError(f"LoRA adapters: missing {missing[:6]}, extra {extra[:6]} for rank "
                       f"{lora.rank} targets {lora.targets}")
    out = dict(params)
    for t in lora_targets(cfg, lora):
        a, b = np.asarray(adapters[t.a_name]), np.asarray(adapters[t.b_name])
        for name, arr in ((t.a_name, a), (t.b_name, b)):
            if tuple(arr.shape) != schema[name].shape:
                raise ValueError(f"LoRA adapter {name}: shape {tuple(arr.shape)}, expected {schema[name].shape}")
        w = np.asarray(params[f"{t.name}.weight"])
        delta = sign * lora.scale * (b.astype(np.float64) @ a.astype(np.float64))
        out[f"{t.name}.weight"] = (w.astype(np.float64) + delta).astype(w.dtype)
    return out


def adapter_numel(cfg: DiTConfig, lora: LoRAConfig) -> int:
    """Trainable parameters of the adapters: r (in + out) per target."""
    return lora_schema(cfg, lora).numel
