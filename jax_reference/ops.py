"""Small fused-op oracles in jax.numpy, one per Triton kernel (`kernels/<op>.py`), fp32-first.

Each is the textbook formula written once, independent of the torch references, so the kernel
parity tests check the kernels against two implementations. Facts: mugv-forward-notes.md 1.10
(AdaLN sites, gated residual), 1.11 and 1.13 (QK-RMSNorm, interleaved 3D RoPE), 3.x (VAE GroupNorm).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _pick(table: Float[Array, "b k h"], index: Int[Array, "b l"]) -> Float[Array, "b l h"]:
    """Per-token row of a (B, K, h) modulation table."""
    return jnp.take_along_axis(table, index[..., None].astype(jnp.int32), axis=1)


def layer_norm(x: Float[Array, "... h"], eps: float) -> Float[Array, "... h"]:
    """Non-affine LayerNorm (biased variance, eps inside the root, as torch)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def adaln_modulate(x: Float[Array, "b l h"], shift: Float[Array, "b k h"], scale: Float[Array, "b k h"],
                   index: Int[Array, "b l"], eps: float = 1e-6) -> Float[Array, "b l h"]:
    """LN(x) * (1 + scale[b, index]) + shift[b, index]."""
    return layer_norm(x, eps) * (1 + _pick(scale, index)) + _pick(shift, index)


def gated_residual_modulate(x: Float[Array, "b l h"], y: Float[Array, "b l h"], gate: Float[Array, "b k h"],
                            shift: Float[Array, "b k h"], scale: Float[Array, "b k h"],
                            index: Int[Array, "b l"], eps: float = 1e-6):
    """(x', LN(x') * (1 + scale) + shift) with x' = x + gate * y, tables picked per token."""
    x_res = x + _pick(gate, index) * y
    return x_res, adaln_modulate(x_res, shift, scale, index, eps)


def qk_rmsnorm_rope(q: Float[Array, "b l n d"], weight: Float[Array, " d"], angles: Float[Array, "b l p"],
                    eps: float = 1e-6) -> Float[Array, "b l n d"]:
    """Per-head RMSNorm (times weight) then rotation of adjacent pairs (2p, 2p+1) by angle p."""
    normed = q * jax.lax.rsqrt(jnp.mean(jnp.square(q), axis=-1, keepdims=True) + eps) * weight
    pairs = normed.reshape(*normed.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(q.shape)


def groupnorm_silu(x: Float[Array, "b c ..."], weight: Float[Array, " c"], bias: Float[Array, " c"],
                   groups: int, eps: float = 1e-6) -> Float[Array, "b c ..."]:
    """SiLU(GroupNorm(x)): statistics over (channels of a group) x spatial, then affine per channel."""
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    mean = jnp.mean(g, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=-1, keepdims=True)
    normed = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.ndim - 2)
    return jax.nn.silu(normed * weight.reshape(affine_shape) + bias.reshape(affine_shape))
