"""Single-process pieces of context parallelism and the parallel-state helpers (fast, no launch).

The multi-process proofs (CP=2, TP=2+SP x CP=2, PP=2 x CP=2 equal one process) are in
parity_tests/test_parallel_layouts.py; here: the sequence sharding arithmetic the model uses, the
layer spec wrapping, strict state-dict loading, and `megatron_compat.initialize_parallel`'s
arguments.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("length, cp, tp_sp, padded", [(29, 2, 1, 30), (29, 2, 2, 32), (38, 2, 1, 38),
                                                       (50402, 8, 1, 50408), (7, 1, 1, 7)])
def test_sequence_shards_pad_and_split(length, cp, tp_sp, padded):
    """Every CP rank gets an equal contiguous chunk of the zero-padded sequence; the chunks put
    together are the sequence followed by zeros; the key mask hides exactly the padding."""
    from mugv.torch_backend.models.dit import SequenceShards
    x = torch.randn(2, length, 3) + 5  # (b, L, ...), never zero where real
    chunks = []
    for rank in range(cp):
        shards = SequenceShards(length, cp, rank, tp_sp)
        assert shards.padded == padded and shards.padding == padded - length
        chunks.append(shards.local(x, 1))
        assert chunks[-1].shape == (2, padded // cp, 3)
    whole = torch.cat(chunks, dim=1)
    assert torch.equal(whole[:, :length], x) and not whole[:, length:].any()
    mask = SequenceShards(length, cp, 0, tp_sp).key_mask(2, x.device)
    if padded == length:
        assert mask is None
    else:
        assert mask.shape == (2, padded) and int(mask.sum()) == 2 * length and mask[:, :length].all()


def test_ulysses_spec_wraps_self_attention_only():
    from mugv.torch_backend.models.attention import DotProductAttention
    from mugv.torch_backend.models.context_parallel import UlyssesAttention, ulysses_layer_spec
    from mugv.torch_backend.models.dit_layers import mugdit_layer_spec
    spec = mugdit_layer_spec(attention_backend="math")
    wrapped = ulysses_layer_spec(spec)
    core = wrapped.submodules.self_attn.submodules.core_attention
    assert core.module is UlyssesAttention
    assert core.params["inner"] is spec.submodules.self_attn.submodules.core_attention  # backend kept
    assert wrapped.submodules.cross_attn.submodules.core_attention.module is DotProductAttention
    assert spec.submodules.self_attn.submodules.core_attention.module is DotProductAttention  # a copy
    assert ulysses_layer_spec(wrapped) is wrapped
    inner = UlyssesAttention(core.params["inner"]).inner
    assert isinstance(inner, DotProductAttention) and inner.backend == "math"


@pytest.fixture()
def world_of_one():
    from mugv.torch_backend.parallel import megatron_compat
    megatron_compat.initialize_parallel(tp=1, timeout_s=120)
    yield
    megatron_compat.destroy_parallel()


def test_state_dict_loads_strict(world_of_one):
    """`load_state_dict(strict=True)` takes the model's own (canonical) state dict; it still
    reports a missing key, an unexpected key and a non-empty `_extra_state`."""
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs, random_params, torch_model, torch_run
    from mugv.torch_backend.models.dit import build_dit
    source = torch_model(random_params(CFG))
    state = source.state_dict()
    assert not [k for k in state if "extra_state" in k]
    model = build_dit(CFG, seed=5)
    assert not model.load_state_dict(state, strict=True).missing_keys
    inputs, weights = make_inputs("i2v"), loss_weights()
    assert np.array_equal(torch_run(model, inputs, weights)[0], torch_run(source, inputs, weights)[0])
    name = "layers.0.mlp.fc1.weight"
    with pytest.raises(RuntimeError, match=f'Missing key.*"{name}"'):
        model.load_state_dict({k: v for k, v in state.items() if k != name}, strict=True)
    with pytest.raises(RuntimeError, match='Unexpected key.*"layers.0.mlp.fc1.scale"'):
        model.load_state_dict({**state, "layers.0.mlp.fc1.scale": torch.ones(1)}, strict=True)
    with pytest.raises(RuntimeError, match="layers.0.mlp.fc1._extra_state"):
        model.load_state_dict({**state, "layers.0.mlp.fc1._extra_state": torch.ones(1)}, strict=True)


def test_initialize_parallel_arguments_named():
    from mugv.torch_backend.parallel import megatron_compat
    with pytest.raises(ValueError, match="vpp = 2: .* unless pp > 1"):
        megatron_compat.initialize_parallel(tp=1, vpp=2)
    with pytest.raises(ValueError, match="timeout_s = 0"):
        megatron_compat.initialize_parallel(tp=1, timeout_s=0)


def test_initialize_parallel_timeout_and_virtual_size(world_of_one):
    """The world created here and Megatron's subgroups carry timeout_s; no virtual size without vpp."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    assert ps.get_virtual_pipeline_model_parallel_world_size() is None

    def timeout_s(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    assert timeout_s(dist.distributed_c10d._get_default_group()) == 120
    assert timeout_s(ps.get_tensor_model_parallel_group()) == 120
    assert timeout_s(ps.get_context_parallel_group()) == 120
