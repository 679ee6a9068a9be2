"""QK-RMSNorm + interleaved RoPE kernel (`kernels/qk_rmsnorm_rope.py`) vs its torch reference and
the JAX oracle: output and the gradients of q and the norm weight, fp32 and fp16 (bf16 on a GPU).
q is a strided view of a fused qkv tensor, as the attention layer produces it."""
import numpy as np
import pytest
import torch

from mugv.core.dit import dit_config
from mugv.core.rope import rope_angles
from mugv.jax_reference import ops as jops
from mugv.kernels.qk_rmsnorm_rope import qk_rmsnorm_rope, qk_rmsnorm_rope_reference
from mugv.parity_tests.kernels.harness import check_against_jax, check_every_config, check_kernel

NAMES = ["out", "dq", "dweight"]
# (B, L, n_heads, head_dim, angle batch): head dim 72 (the 10B and debug models), 48 heads as at
# 10B, a head dim whose pair count (5) is not a power of two, shared (1) and per-sample angles.
SHAPES = [(2, 13, 3, 72, 2), (1, 3, 48, 72, 1), (2, 7, 5, 10, 1), (1, 9, 2, 24, 1)]


def _inputs(b, length, nh, d, ab):
    q = torch.randn(b, length, nh, d) * 2.0 + 0.1
    weight = 1.0 + 0.3 * torch.randn(d)
    angles = torch.rand(ab, length, d // 2) * 20.0
    return [q, weight, angles]


def _as_qkv_view(fn):
    """Run fn on q as the q slice of a (B, L, 3, H, d) tensor (non-contiguous token stride)."""
    def wrapped(q, weight, angles, **kw):
        qkv = torch.stack([q, q * 0.5, q * -2.0], dim=2)
        return fn(qkv[:, :, 0], weight, angles, **kw)
    return wrapped


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_qk_rmsnorm_rope_matches_reference(shape, dtype, device):
    if dtype == "bfloat16" and device.type != "cuda":
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; checked on the GPU")
    check_kernel(_as_qkv_view(qk_rmsnorm_rope), qk_rmsnorm_rope_reference, _inputs(*shape), dtype,
                 device, NAMES, constants=(2,))


def _as_head_major_qkv_view(fn):
    """Run fn on q as the q slice of a (B, L, H, 3, d) tensor: the model's fused projection rows
    (head, q|k|v, dim), so the head stride is 3 d (the kernel reads it without a copy)."""
    def wrapped(q, weight, angles, **kw):
        qkv = torch.stack([q * -1.5, q, q * 0.5], dim=3)
        return fn(qkv[:, :, :, 1], weight, angles, **kw)
    return wrapped


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_qk_rmsnorm_rope_head_major_view(shape, device):
    check_kernel(_as_head_major_qkv_view(qk_rmsnorm_rope), qk_rmsnorm_rope_reference,
                 _inputs(*shape), "float32", device, NAMES, constants=(2,))


def test_qk_rmsnorm_rope_matches_jax(device):
    q, weight, angles = _inputs(2, 5, 3, 72, 2)
    check_against_jax(qk_rmsnorm_rope, jops.qk_rmsnorm_rope, [q, weight, angles], NAMES, device,
                      constants=(2,))


def test_qk_rmsnorm_rope_with_core_rope_angles(device):
    """Angles exactly as core/rope.py produces them for the tiny DiT (grid 2x2x3 + start/end)."""
    cfg = dit_config("tiny")
    grid = (2, 2, 3)
    frame_indice = torch.arange(grid[0] + 2).reshape(1, -1).repeat(2, 1)
    angles = rope_angles(torch, cfg, grid, frame_indice).float()
    length = angles.shape[1]
    q = torch.randn(2, length, cfg.num_heads, cfg.head_dim)
    weight = 1.0 + 0.3 * torch.randn(cfg.head_dim)
    check_kernel(qk_rmsnorm_rope, qk_rmsnorm_rope_reference, [q, weight, angles], "float32",
                 device, NAMES, constants=(2,))
    assert np.isfinite(angles.numpy()).all()


def test_qk_rmsnorm_rope_rejects_bad_input(device):
    q, weight, angles = _inputs(1, 4, 2, 72, 1)
    with pytest.raises(ValueError, match="weight"):
        qk_rmsnorm_rope(q, weight[:36], angles)
    with pytest.raises(ValueError, match="angles"):
        qk_rmsnorm_rope(q, weight, angles[..., :30])
    with pytest.raises(ValueError, match="head_dim"):
        qk_rmsnorm_rope(q[..., :71], weight[:71], angles)


def test_qk_rmsnorm_rope_every_launch_config(device):
    check_every_config(_as_qkv_view(qk_rmsnorm_rope), qk_rmsnorm_rope_reference,
                       [_inputs(*SHAPES[0]), _inputs(*SHAPES[1])], ["token_tile", "token_tile_loop"], device,
                       NAMES, constants=(2,))
