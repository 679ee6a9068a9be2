"""The small layers MUG-DiT is built from, in equinox, fp32-first.

Each layer keeps its parameters under the attribute names of the canonical schema
(`core/dit.py::dit_schema`), so a parameter's path in the module tree *is* its canonical name
(`layers.0.self_attn.qkv.weight`); `jax_reference/dit.py` relies on that to load and save.
Facts: ../shared/reference/mugv-forward-notes.md section 1 (cited as "notes 1.x").
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


class Linear(eqx.Module):
    """y = x W^T + b with torch's (out, in) weight layout, so checkpoints need no transpose."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        return jnp.einsum("...i,oi->...o", x, self.weight) + self.bias


class MLP(eqx.Module):
    """fc2(act(fc1(x))). The embedders use SiLU; the block MLP and the text embedder use GELU in
    its tanh form (notes 1.18: the official code names approximate="tanh")."""

    fc1: Linear
    fc2: Linear

    def __call__(self, x: Array, activation) -> Array:
        return self.fc2(activation(self.fc1(x)))


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def layer_norm(x: Float[Array, "... h"], eps: float) -> Float[Array, "... h"]:
    """Non-affine LayerNorm over the last axis (torch semantics: biased variance, eps inside)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(eqx.Module):
    """LayerNorm with weight and bias (the block's `cross_attn_norm`, notes 1.10 step 3)."""

    weight: Float[Array, " h"]
    bias: Float[Array, " h"]
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "... h"]) -> Float[Array, "... h"]:
        return layer_norm(x, self.eps) * self.weight + self.bias


class RMSNorm(eqx.Module):
    """RMSNorm over the last axis (one head's features): x / sqrt(mean(x^2) + eps) * weight.

    The official code normalises in fp32 and casts back before the weight multiply; in this fp32
    oracle the cast is the identity, so we upcast explicitly only to keep that contract visible.
    """

    weight: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight


def modulate(x: Float[Array, "... h"], shift: Float[Array, "... h"],
             scale: Float[Array, "... h"]) -> Float[Array, "... h"]:
    """AdaLN modulation x * (1 + scale) + shift (notes 1.10 steps 1 and 4, 1.14)."""
    return x * (1 + scale) + shift


def apply_rope(x: Float[Array, "l heads d"], angles: Float[Array, "l half"]) -> Float[Array, "l heads d"]:
    """Interleaved RoPE (notes 1.13): pair q = features (2q, 2q+1) of every head rotates by
    angles[..., q]. The rotation runs in fp32, as the official complex64 product does."""
    dtype = x.dtype
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos = jnp.cos(angles)[:, None, :]  # broadcast over heads
    sin = jnp.sin(angles)[:, None, :]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(dtype)


def attention(q: Float[Array, "lq heads d"], k: Float[Array, "lk heads d"], v: Float[Array, "lk heads d"],
              key_mask: Bool[Array, " lk"] | None = None) -> Float[Array, "lq heads d"]:
    """Exact softmax attention with scale d^-1/2, for one sample.

    key_mask (True = real key) removes keys: their logits become the most negative float, so
    their weight is exactly 0 (as if dropped, which is what the official varlen call does). When a
    sample has no real key at all the output is 0 (the official empty key block would give no
    attention term either); the query then only keeps the projection bias downstream.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], dtype=q.dtype))
    logits = jnp.einsum("qhd,khd->hqk", q, k) * scale
    if key_mask is None:
        weights = jax.nn.softmax(logits, axis=-1)
    else:
        logits = jnp.where(key_mask[None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = jnp.where(jnp.any(key_mask), weights, jnp.zeros_like(weights))
    return jnp.einsum("hqk,khd->qhd", weights, v)
