"""core/memory.py: the per-GPU memory arithmetic behind docs/parallelism.md."""
from __future__ import annotations

import pytest

from mugv.core.dit import dit_config, dit_schema
from mugv.core.memory import estimate, min_gpus, params_per_rank, GIB
from mugv.core.parallel import ParallelConfig
from mugv.core.vae import latent_shape

CFG = dit_config("10B")
P720 = latent_shape(105, 720, 1280)


def test_unsharded_params_are_the_schema_total():
    assert params_per_rank(CFG, ParallelConfig()) == dit_schema(CFG).numel
    e = estimate(CFG, ParallelConfig(), 1, P720)
    assert e.parameters == 2 * dit_schema(CFG).numel and e.optimizer == 12 * dit_schema(CFG).numel


def test_tensor_parallel_divides_sharded_tensors_only():
    tp4 = params_per_rank(CFG, ParallelConfig(tensor_parallel=4))
    replicated = sum(p.numel for p in dit_schema(CFG) if p.tp_axis is None)
    assert tp4 == pytest.approx((dit_schema(CFG).numel - replicated) / 4 + replicated)


def test_activation_ordering_and_context_parallel():
    acts = {rc: estimate(CFG, ParallelConfig(), 1, P720, recompute=rc).activations
            for rc in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    # 52 bytes per token per hidden unit per block without recompute (docstring), 56 blocks
    seq, h = 50_402, 3456
    assert acts["none"] == pytest.approx(56 * (52 * seq * h + 300 * 2 * h * 2 + 4 * 48 * seq), rel=1e-9)
    cp2 = estimate(CFG, ParallelConfig(context_parallel=2), 2, P720, recompute="none").activations
    assert cp2 == pytest.approx(acts["none"] / 2, rel=0.01)


def test_distributed_optimizer_shards_over_data_parallel():
    one = estimate(CFG, ParallelConfig(tensor_parallel=2, sequence_parallel=True), 8, P720)
    dist = estimate(CFG, ParallelConfig(tensor_parallel=2, sequence_parallel=True, distributed_optimizer=True), 8, P720)
    assert dist.optimizer == pytest.approx(one.optimizer / 4)


def test_gpu_counts_in_docs():
    limit = 80e9 * 0.9
    assert min_gpus(CFG, P720, limit) == 4
    assert min_gpus(CFG, latent_shape(417, 720, 1280), limit) == 8
