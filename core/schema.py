"""The parameter schema: the contract between the JAX oracle, the torch model and the checkpoints.

For a model config, the schema lists every parameter's canonical name, global shape, dtype, how it
is initialised and how it shards under tensor parallelism. Both backends build their parameters
from it and the checkpoint format stores one global array per entry.

Canonical layouts are chosen so that tensor-parallel slicing is always a *contiguous* split of one
axis into `tp` equal parts (fused qkv/kv rows are head-major, see `core/dit.py`); any layout change
relative to the official weights lives in the adapters in `checkpoints/`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Iterator, Sequence

DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "uint8")


@dataclasses.dataclass(frozen=True)
class Init:
    """How a parameter is drawn at initialisation (the backends draw; the rule lives here).

    kind: "normal" (mean + std * N(0, 1)), "zeros", "ones", or "uniform" (U(-std, std)).
    """

    kind: str = "normal"
    std: float = 0.02
    mean: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "zeros", "ones", "uniform"):
            raise ValueError(f"Init.kind = {self.kind!r}: expected normal, zeros, ones or uniform")
        if not (self.std >= 0 and math.isfinite(self.std)):
            raise ValueError(f"Init.std = {self.std!r}: expected a finite value >= 0")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter.

    name: canonical dotted name, e.g. "layers.3.self_attn.qkv.weight".
    shape: global (unsharded) shape.
    tp_axis: the axis split contiguously across tensor-parallel ranks, or None when replicated.
    sequence_parallel: replicated parameter whose gradient must be all-reduced over the
        tensor-parallel group when sequence parallelism is on (norms, modulation tables).
    layer: transformer layer index for per-layer parameters (pipeline stages own ranges), else None.
    trainable: False for buffers that are stored but never receive gradients.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    tp_axis: int | None = None
    sequence_parallel: bool = False
    layer: int | None = None
    init: Init = Init()
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"ParamSpec {self.name}: dtype {self.dtype!r} not in {DTYPES}")
        if self.tp_axis is not None and not 0 <= self.tp_axis < len(self.shape):
            raise ValueError(f"ParamSpec {self.name}: tp_axis {self.tp_axis} out of range for {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_shape(self, tp_size: int) -> tuple[int, ...]:
        """Shape of one tensor-parallel rank's slice."""
        if self.tp_axis is None or tp_size == 1:
            return self.shape
        dim = self.shape[self.tp_axis]
        if dim % tp_size:
            raise ValueError(
                f"parameter {self.name}: axis {self.tp_axis} of size {dim} does not divide into "
                f"tensor-parallel size {tp_size}")
        shape = list(self.shape)
        shape[self.tp_axis] = dim // tp_size
        return tuple(shape)

    def shard_index(self, tp_rank: int, tp_size: int) -> tuple[slice, ...]:
        """The slice of the global array held by `tp_rank` (all of it when replicated)."""
        index = [slice(0, n) for n in self.shape]
        if self.tp_axis is not None and tp_size > 1:
            part = self.shard_shape(tp_size)[self.tp_axis]
            index[self.tp_axis] = slice(tp_rank * part, (tp_rank + 1) * part)
        return tuple(index)

    def with_dtype(self, dtype: str) -> "ParamSpec":
        return dataclasses.replace(self, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Schema:
    """An ordered collection of `ParamSpec`s, addressable by name."""

    params: tuple[ParamSpec, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for p in self.params:
            if p.name in seen:
                raise ValueError(f"schema lists parameter {p.name} twice")
            seen.add(p.name)

    def __iter__(self) -> Iterator[ParamSpec]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no parameter named {name!r} in the schema")

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def as_dict(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def trainable_numel(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def select(self, names: Sequence[str]) -> "Schema":
        table = self.as_dict()
        return Schema(tuple(table[n] for n in names))

    def for_layers(self, layers: range) -> "Schema":
        """Parameters a pipeline stage owning `layers` holds (per-layer ones of those layers)."""
        return Schema(tuple(p for p in self.params if p.layer is None or p.layer in layers))

    def with_dtype(self, dtype: str) -> "Schema":
        return Schema(tuple(p.with_dtype(dtype) for p in self.params))

    def hash(self) -> str:
        """A digest of names, shapes, dtypes and shard axes: equal schemas, equal hashes."""
        rows = [[p.name, list(p.shape), p.dtype, p.tp_axis] for p in self.params]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
