"""Parallel layout: tensor (+sequence), pipeline (+virtual stages), context (Ulysses) and data
parallel sizes, validated against the model and the world size before any work starts."""
from __future__ import annotations

import dataclasses

from mugv.core import validate as v
from mugv.core.dit import DiTConfig


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Sizes of each parallel dimension; data parallel is what is left of the world.

    tensor_parallel: Megatron TP size (heads, MLP and fused projections split).
    sequence_parallel: shard activations along the sequence inside TP regions (needs TP > 1).
    pipeline_parallel / virtual_pipeline: Megatron PP stages and interleaved chunks per stage.
    context_parallel: Ulysses all-to-all over the sequence (heads must divide TP x CP).
    distributed_optimizer: shard optimizer state over data-parallel ranks (Megatron).
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        v.positive_int(self, "tensor_parallel", "pipeline_parallel", "virtual_pipeline", "context_parallel")
        if self.sequence_parallel and self.tensor_parallel == 1:
            v.fail(self, "sequence_parallel", "False when tensor_parallel == 1 (it shards within TP groups)")
        if self.virtual_pipeline > 1 and self.pipeline_parallel == 1:
            v.fail(self, "virtual_pipeline", "1 unless pipeline_parallel > 1")
        v.in_range(self, "timeout_s", 1, None)

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel


class LayoutError(ValueError):
    """A parallel layout that cannot run this model on this many processes."""


def check_layout(par: ParallelConfig, dit: DiTConfig, world_size: int) -> int:
    """Validate before any work; returns the data-parallel size. Messages name the sizes."""
    if world_size % par.model_parallel:
        raise LayoutError(
            f"world size {world_size} is not a multiple of tensor_parallel {par.tensor_parallel} x "
            f"pipeline_parallel {par.pipeline_parallel} x context_parallel {par.context_parallel} "
            f"= {par.model_parallel}")
    heads_split = par.tensor_parallel * par.context_parallel
    if dit.num_heads % heads_split:
        raise LayoutError(
            f"num_heads {dit.num_heads} is not divisible by tensor_parallel {par.tensor_parallel} x "
            f"context_parallel {par.context_parallel} = {heads_split} (Ulysses gives each rank "
            f"num_heads / (TP x CP) heads)")
    stages = par.pipeline_parallel * par.virtual_pipeline
    if dit.depth % stages:
        raise LayoutError(
            f"depth {dit.depth} layers do not divide into pipeline_parallel {par.pipeline_parallel} x "
            f"virtual_pipeline {par.virtual_pipeline} = {stages} model chunks")
    if (dit.mlp_hidden % par.tensor_parallel) or (dit.hidden_size % par.tensor_parallel):
        raise LayoutError(f"hidden {dit.hidden_size} / MLP {dit.mlp_hidden} not divisible by "
                          f"tensor_parallel {par.tensor_parallel}")
    return par.data_parallel(world_size)
