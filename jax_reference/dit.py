"""MUG-DiT in equinox: the numerical oracle of the diffusion transformer, fp32-first.

One readable module that follows ../shared/reference/mugv-forward-notes.md section 1 ("notes 1.x")
step by step, one sample at a time (`dit_forward` vmaps over the batch). Parameters live under the
canonical names of `core/dit.py::dit_schema`: the attribute path of a leaf in the module tree is its
canonical name, which is what `dit_from_params` / `dit_to_params` use.

Public API (the torch backend's parity tests rely on it):
- `init_dit(cfg, key)`: random init following each `ParamSpec.init` of the schema;
- `dit_from_params(cfg, params)` / `dit_to_params(model)`: canonical {name: array} <-> module;
- `dit_forward(model, x, timestep, text, text_mask, x_mask, fps, frame_indice)`: the forward of the
  DiT contract (batch-level);
- `dit_apply(cfg, params, ...)`: the same as a pure function of the params dict, for `jax.grad`.

Notes vs goldens (the official code's own output, ../shared/reference/goldens): following the
notes as written reproduces every golden case to <= 2.6e-6 of max|out| (table row 1e-5); the
math agrees everywhere. Two places where the notes and the goldens differ in detail:
- frame_indice: notes section 1 allows (1 or B, T+2) rows; the goldens (JSON `observations`) show
  the official forward needs B or B/2 rows ((1, T+2) only works for B = 2). The contract asks
  callers for B rows, so this oracle never relies on either.
- float32 rounding of the timestep sinusoid: the notes say "computed in fp32"; the goldens show
  the bits of torch's float32 exp matter. XLA's exp rounds 17 of the 128 sinusoid frequencies one
  ulp away from torch's, and at t ~ 900 one ulp moves cos/sin by ~5e-5, which is the whole gap
  between 2.5e-6 and the official float32-vs-float64 spread of 6e-7 (with torch's frequency
  table substituted, the cases tested are within 7e-7). See docs/dit.md.
Points the notes leave open, decided here:
- text without any real token: cross-attention contributes 0 before `proj` (the official varlen
  call would attend to an empty key block, i.e. add no attention term);
- patch_size[0] > 1 (never used by MUG-V): a patch frame takes the x_mask of its first latent frame.
"""
from __future__ import annotations

from typing import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from mugv.core.dit import DiTConfig, check_forward_inputs, dit_schema, patch_grid
from mugv.core.rope import rope_angles, sinusoidal_embedding
from mugv.jax_reference.layers import (MLP, AffineLayerNorm, Linear, RMSNorm, apply_rope, attention,
                                       gelu_tanh, layer_norm, modulate)


# ---------------------------------------------------------------------------------------------
# Modules (attribute names = canonical parameter names)


class PatchEmbed(eqx.Module):
    """Conv3d(in -> h, kernel = stride = patch) after zero-padding the END of T, H, W up to a
    multiple of the patch (notes 1.2). Written as a reshape + einsum, which is what a conv with
    kernel == stride computes. Tokens come out f-major, then row, then column (w fastest)."""

    weight: Float[Array, "h c pt ph pw"]
    bias: Float[Array, " h"]

    def __call__(self, x: Float[Array, "c t hh ww"]) -> Float[Array, "n h"]:
        pt, ph, pw = self.weight.shape[2:]
        c, t, hh, ww = x.shape
        tp, hp, wp = -(-t // pt), -(-hh // ph), -(-ww // pw)
        x = jnp.pad(x, ((0, 0), (0, tp * pt - t), (0, hp * ph - hh), (0, wp * pw - ww)))
        patches = x.reshape(c, tp, pt, hp, ph, wp, pw)
        tokens = jnp.einsum("cTaHbWd,ocabd->THWo", patches, self.weight) + self.bias
        return tokens.reshape(tp * hp * wp, -1)


class SelfAttention(eqx.Module):
    """QKV (bias) -> per-head RMSNorm on q, k -> 3D RoPE on q, k -> full softmax attention -> proj
    (notes 1.11). Canonical qkv rows are head-major (head, which, dim)."""

    qkv: Linear
    q_norm: RMSNorm
    k_norm: RMSNorm
    proj: Linear
    num_heads: int = eqx.field(static=True)

    def __call__(self, x: Float[Array, "l h"], angles: Float[Array, "l half"]) -> Float[Array, "l h"]:
        length, hidden = x.shape
        qkv = self.qkv(x).reshape(length, self.num_heads, 3, hidden // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Normalise first, then rotate (the official order).
        q = apply_rope(self.q_norm(q), angles)
        k = apply_rope(self.k_norm(k), angles)
        return self.proj(attention(q, k, v).reshape(length, hidden))


class CrossAttention(eqx.Module):
    """Video tokens (queries) attend to the sample's real text tokens: q from x, [k|v] from text
    (canonical kv rows head-major (head, which, dim)), per-head RMSNorm on q and k, NO RoPE
    (notes 1.12)."""

    q: Linear
    kv: Linear
    q_norm: RMSNorm
    k_norm: RMSNorm
    proj: Linear
    num_heads: int = eqx.field(static=True)

    def __call__(self, x: Float[Array, "l h"], text: Float[Array, "lt h"],
                 text_mask: Bool[Array, " lt"]) -> Float[Array, "l h"]:
        length, hidden = x.shape
        d = hidden // self.num_heads
        q = self.q_norm(self.q(x).reshape(length, self.num_heads, d))
        kv = self.kv(text).reshape(text.shape[0], self.num_heads, 2, d)
        k, v = self.k_norm(kv[:, :, 0]), kv[:, :, 1]
        return self.proj(attention(q, k, v, key_mask=text_mask).reshape(length, hidden))


class Block(eqx.Module):
    """One MUG-DiT block (notes 1.10): AdaLN -> self-attn -> gated residual; affine LN ->
    cross-attn -> residual; AdaLN -> MLP (GELU tanh) -> gated residual."""

    scale_shift_table: Float[Array, "6 h"]
    self_attn: SelfAttention
    cross_attn_norm: AffineLayerNorm
    cross_attn: CrossAttention
    mlp: MLP
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "l h"], modulation: Float[Array, "l 6 h"],
                 angles: Float[Array, "l half"], text: Float[Array, "lt h"],
                 text_mask: Bool[Array, " lt"]) -> Float[Array, "l h"]:
        # AdaLN-single (notes 1.5): the shared t_block output plus this layer's table, then the
        # six rows in the official order.
        mod = self.scale_shift_table + modulation
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
        x = x + gate_msa * self.self_attn(modulate(layer_norm(x, self.eps), shift_msa, scale_msa), angles)
        x = x + self.cross_attn(self.cross_attn_norm(x), text, text_mask)
        x = x + gate_mlp * self.mlp(modulate(layer_norm(x, self.eps), shift_mlp, scale_mlp), gelu_tanh)
        return x


class FinalLayer(eqx.Module):
    """Non-affine LN, modulated by (table + raw conditioning c) — no SiLU, no linear (notes 1.14) —
    then Linear(h -> prod(patch) * out_channels)."""

    scale_shift_table: Float[Array, "2 h"]
    linear: Linear
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "n h"], cond: Float[Array, "n h"]) -> Float[Array, "n p"]:
        shift, scale = self.scale_shift_table[0] + cond, self.scale_shift_table[1] + cond
        return self.linear(modulate(layer_norm(x, self.eps), shift, scale))


class MUGDiT(eqx.Module):
    """The whole MUG-DiT. Call it on ONE sample; `dit_forward` is the batched contract."""

    start_token: Float[Array, " h"]
    end_token: Float[Array, " h"]
    patch_embed: PatchEmbed
    t_embedder: MLP
    fps_embedder: MLP
    t_block: Linear
    text_embedder: MLP
    layers: list[Block]
    final_layer: FinalLayer
    cfg: DiTConfig = eqx.field(static=True)

    def conditioning(self, timestep: Float[Array, ""], fps: Float[Array, ""]):
        """(c, c0): the timestep + fps conditioning at t and at t = 0 (notes 1.3, 1.4, 1.6)."""
        cfg = self.cfg
        dtype = self.patch_embed.weight.dtype

        def embed(mlp: MLP, value):
            # Sinusoid of the unscaled value (0..1000 or raw fps), computed in fp32, cos first.
            e = sinusoidal_embedding(jnp, value.astype(jnp.float32)[None], cfg.freq_dim)[0]
            return mlp(e.astype(dtype), jax.nn.silu)

        fps_emb = embed(self.fps_embedder, fps)
        c = embed(self.t_embedder, timestep) + fps_emb
        c0 = embed(self.t_embedder, jnp.zeros_like(timestep)) + fps_emb
        return c, c0

    def embed_text(self, text: Float[Array, "lt d"]) -> Float[Array, "lt h"]:
        """LN (no affine) -> fc1 -> GELU tanh -> fc2 -> LN (no affine), per token (notes 1.7)."""
        eps = self.cfg.norm_eps
        return layer_norm(self.text_embedder(layer_norm(text, eps), gelu_tanh), eps)

    def __call__(self, x: Float[Array, "c t hh ww"], timestep: Float[Array, ""],
                 text: Float[Array, "lt d"], text_mask: Bool[Array, " lt"],
                 x_mask: Bool[Array, " t"], fps: Float[Array, ""],
                 frame_indice: Int[Array, " tp2"]) -> Float[Array, "co t hh ww"]:
        cfg = self.cfg
        dtype = self.patch_embed.weight.dtype
        _, t, hh, ww = x.shape
        grid = patch_grid(cfg, (t, hh, ww))
        tp, hp, wp = grid
        n_video = tp * hp * wp

        # Conditioning and its AdaLN-single projection, at t and at t = 0 (notes 1.5, 1.6).
        c, c0 = self.conditioning(timestep, fps)
        m = self.t_block(jax.nn.silu(c)).reshape(6, -1)
        m0 = self.t_block(jax.nn.silu(c0)).reshape(6, -1)

        # Token mask (notes 1.8): [start, video tokens by patch frame, end]; True -> t, False -> t=0.
        # Start and end tokens always take the t = 0 branch.
        frame_mask = x_mask[:: cfg.patch_size[0]]
        video_mask = jnp.repeat(frame_mask, hp * wp)
        false = jnp.zeros((1,), dtype=bool)
        token_mask = jnp.concatenate([false, video_mask, false])
        modulation = jnp.where(token_mask[:, None, None], m[None], m0[None])  # (L, 6, h)

        # Padded text positions are zeroed so that nothing (not even inf/nan) can leak from them;
        # the attention mask then gives them weight exactly 0.
        text = jnp.where(text_mask[:, None], text.astype(dtype), jnp.zeros((), dtype))
        text = self.embed_text(text)

        # Sequence [start, video..., end] and its 3D RoPE angles (notes 1.9, 1.13). Positions are
        # small integers, exact in float32 (core/rope works in floats).
        tokens = self.patch_embed(x.astype(dtype))
        seq = jnp.concatenate([self.start_token[None], tokens, self.end_token[None]])
        angles = rope_angles(jnp, cfg, grid, frame_indice.astype(jnp.float32)[None])[0]

        for layer in self.layers:
            seq = layer(seq, modulation, angles, text, text_mask)

        # Final layer on the video tokens only, modulated by raw c / c0 per token (notes 1.14).
        video = seq[1:-1]
        cond = jnp.where(video_mask[:, None], c[None], c0[None])
        out = self.final_layer(video, cond)
        return unpatchify(cfg, out, grid, (t, hh, ww)).astype(jnp.float32)


def unpatchify(cfg: DiTConfig, out: Float[Array, "n p"], grid: tuple[int, int, int],
               thw: tuple[int, int, int]) -> Float[Array, "co t hh ww"]:
    """Features ((pt, ph, pw), C) of token (f, i, j), C fastest -> (C, T, H, W), cropped to the input
    size (notes 1.15)."""
    tp, hp, wp = grid
    pt, ph, pw = cfg.patch_size
    co = cfg.out_channels
    x = out.reshape(tp, hp, wp, pt, ph, pw, co)
    x = jnp.transpose(x, (6, 0, 3, 1, 4, 2, 5)).reshape(co, tp * pt, hp * ph, wp * pw)
    t, hh, ww = thw
    return x[:, :t, :hh, :ww]


# ---------------------------------------------------------------------------------------------
# Building from canonical parameters


def _build(cfg: DiTConfig, get: Callable[[str], Array]) -> MUGDiT:
    """Assemble the module from a getter of canonical names (init and loading share this)."""

    def linear(name: str) -> Linear:
        return Linear(get(f"{name}.weight"), get(f"{name}.bias"))

    def mlp(name: str) -> MLP:
        return MLP(linear(f"{name}.fc1"), linear(f"{name}.fc2"))

    def block(i: int) -> Block:
        pre = f"layers.{i}"
        eps, heads = cfg.norm_eps, cfg.num_heads
        return Block(
            scale_shift_table=get(f"{pre}.scale_shift_table"),
            self_attn=SelfAttention(linear(f"{pre}.self_attn.qkv"),
                                    RMSNorm(get(f"{pre}.self_attn.q_norm.weight"), eps),
                                    RMSNorm(get(f"{pre}.self_attn.k_norm.weight"), eps),
                                    linear(f"{pre}.self_attn.proj"), heads),
            cross_attn_norm=AffineLayerNorm(get(f"{pre}.cross_attn_norm.weight"),
                                            get(f"{pre}.cross_attn_norm.bias"), eps),
            cross_attn=CrossAttention(linear(f"{pre}.cross_attn.q"), linear(f"{pre}.cross_attn.kv"),
                                      RMSNorm(get(f"{pre}.cross_attn.q_norm.weight"), eps),
                                      RMSNorm(get(f"{pre}.cross_attn.k_norm.weight"), eps),
                                      linear(f"{pre}.cross_attn.proj"), heads),
            mlp=mlp(f"{pre}.mlp"),
            eps=eps,
        )

    return MUGDiT(
        start_token=get("start_token"),
        end_token=get("end_token"),
        patch_embed=PatchEmbed(get("patch_embed.weight"), get("patch_embed.bias")),
        t_embedder=mlp("t_embedder"),
        fps_embedder=mlp("fps_embedder"),
        t_block=linear("t_block"),
        text_embedder=mlp("text_embedder"),
        layers=[block(i) for i in range(cfg.depth)],
        final_layer=FinalLayer(get("final_layer.scale_shift_table"), linear("final_layer.linear"),
                               cfg.norm_eps),
        cfg=cfg,
    )


def init_dit(cfg: DiTConfig, key: Array, dtype=jnp.float32) -> MUGDiT:
    """Random MUG-DiT following each `ParamSpec.init` of `dit_schema(cfg)`.

    One standard-normal and one U(-1, 1) vector as long as the whole model are drawn from `key`
    and each parameter takes its own slice of them (in schema order): two RNG calls instead of one
    per parameter keeps initialisation fast on a CPU, and the draw stays a pure function of `key`.
    """
    schema = dit_schema(cfg)
    key_normal, key_uniform = jax.random.split(key)
    normal = np.asarray(jax.random.normal(key_normal, (schema.numel,), jnp.float32))
    uniform = np.asarray(jax.random.uniform(key_uniform, (schema.numel,), jnp.float32, -1.0, 1.0))
    params: dict[str, np.ndarray] = {}
    offset = 0
    for spec in schema:
        rows = slice(offset, offset + spec.numel)
        offset += spec.numel
        init = spec.init
        if init.kind == "zeros":
            value = np.zeros(spec.numel, np.float32)
        elif init.kind == "ones":
            value = np.ones(spec.numel, np.float32)
        elif init.kind == "uniform":
            value = np.float32(init.std) * uniform[rows]
        else:
            value = np.float32(init.mean) + np.float32(init.std) * normal[rows]
        params[spec.name] = value.reshape(spec.shape)
    return _build(cfg, lambda name: jnp.asarray(params[name], dtype))


def dit_from_params(cfg: DiTConfig, params: Mapping[str, Array]) -> MUGDiT:
    """Module from a canonical {name: array} dict. Every schema name must be present with its
    shape, and nothing else; errors name the parameter and both shapes. Arrays are used as given
    (numpy is converted), so this also works on traced values under `jax.grad`."""
    specs = dit_schema(cfg).as_dict()
    extra = sorted(set(params) - set(specs))
    missing = sorted(set(specs) - set(params))
    if missing:
        shown = ", ".join(f"{n} {specs[n].shape}" for n in missing[:8])
        raise KeyError(f"DiT params: {len(missing)} missing parameter(s): {shown}"
                       + (" ..." if len(missing) > 8 else ""))
    if extra:
        shown = ", ".join(f"{n} {tuple(np.shape(params[n]))}" for n in extra[:8])
        raise KeyError(f"DiT params: {len(extra)} parameter(s) not in the {cfg.depth}-layer schema: "
                       f"{shown}" + (" ..." if len(extra) > 8 else ""))
    for name, spec in specs.items():
        shape = tuple(np.shape(params[name]))
        if shape != spec.shape:
            raise ValueError(f"DiT params: parameter {name!r} has shape {shape}, expected {spec.shape}")

    def get(name: str) -> Array:
        value = params[name]
        return jnp.asarray(value) if isinstance(value, np.ndarray) else value

    return _build(cfg, get)


def dit_to_params(model: MUGDiT) -> dict[str, Array]:
    """Canonical {name: array} of a module: each leaf's attribute path is its name."""
    out: dict[str, Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        parts = [str(p.name) if hasattr(p, "name") else str(p.idx) for p in path]
        out[".".join(parts)] = leaf
    return out


# ---------------------------------------------------------------------------------------------
# The batched contract


def _check_inputs(cfg, x, timestep, text, text_mask, x_mask, fps, frame_indice) -> None:
    args = dict(x=x, timestep=timestep, text=text, text_mask=text_mask, x_mask=x_mask, fps=fps,
                frame_indice=frame_indice)

    def kind(a) -> str:
        dt = jnp.asarray(a).dtype
        return "bool" if dt == jnp.bool_ else "int" if jnp.issubdtype(dt, jnp.integer) else "float"
    check_forward_inputs(cfg, {k: tuple(jnp.shape(a)) for k, a in args.items()},
                         {k: kind(a) for k, a in args.items()}, where="dit_forward:")


def dit_forward(model: MUGDiT,
                x: Float[Array, "b ci t hh ww"],
                timestep: Float[Array, " b"],
                text: Float[Array, "b lt d"],
                text_mask: Bool[Array, "b lt"],
                x_mask: Bool[Array, "b t"],
                fps: Float[Array, " b"],
                frame_indice: Int[Array, "b tp2"]) -> Float[Array, "b co t hh ww"]:
    """The DiT forward of the contract (see docs/dit.md).

    Arguments:
        x: latents (B, in_channels, T, H, W), any T, H, W.
        timestep: (B,) on the 0..1000 scale (1000 = noise), already shifted.
        text: (B, L, text_dim) text-encoder states; text_mask: bool (B, L), True = real token.
        x_mask: bool (B, T), True = frame being denoised, False = clean conditioning frame.
        fps: (B,); frame_indice: integer (B, T' + 2) temporal RoPE positions of
            [start, patch frames..., end].
    Returns:
        float32 (B, out_channels, T, H, W); the first in_channels channels are the velocity.
    """
    _check_inputs(model.cfg, x, timestep, text, text_mask, x_mask, fps, frame_indice)
    return jax.vmap(model)(x, timestep, text, text_mask, x_mask, fps, frame_indice)


def dit_apply(cfg: DiTConfig, params: Mapping[str, Array], x, timestep, text, text_mask, x_mask,
              fps, frame_indice) -> Float[Array, "b co t hh ww"]:
    """`dit_forward` as a pure function of the canonical params dict (differentiable w.r.t. every
    parameter and the inputs with `jax.grad`)."""
    return dit_forward(dit_from_params(cfg, params), x, timestep, text, text_mask, x_mask, fps,
                       frame_indice)
