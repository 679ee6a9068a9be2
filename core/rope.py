"""3D RoPE and sinusoidal embeddings of MUG-DiT, written once over an array namespace `xp`
(`numpy`, `jax.numpy` or `torch`: only arange, exp, cos, sin, concatenate, broadcast_to,
reshape and clip are used).

Facts: mugv-forward-notes.md 1.3 (timestep sinusoid) and 1.13 (3D RoPE).
"""
from __future__ import annotations

import math

import numpy as np

from mugv.core.dit import DiTConfig


def rope_frequencies(cfg: DiTConfig) -> np.ndarray:
    """The P = head_dim / 6 frequencies shared by the h, w and t axes: theta^(-k / P), k < P.

    Computed in float32 as the official code does (1 / theta^(2k / 2P)), shape (P,).
    """
    p = cfg.rope_pairs_per_axis
    exponent = np.arange(0, 2 * p, 2, dtype=np.float32) / np.float32(2 * p)
    return (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)


def token_positions(xp, grid_thw: tuple[int, int, int], frame_indice, time_end: int):
    """(h, w, t) RoPE positions of every token of the sequence [start, video..., end].

    Arguments:
        grid_thw: patch grid (T', H', W'); video tokens are ordered f-major, then row, then column.
        frame_indice: integer array (B, T'+2); video frame f sits at time frame_indice[:, f+1],
            the start token at frame_indice[:, 0] and the end token at frame_indice[:, -1].
    Returns:
        h, w: float arrays (L,) with L = T'H'W' + 2 (the same for every sample);
        t: float array (B, L), clamped to [0, time_end - 1] as the official tables are.
    Start sits at (0, 0, .) and end at (H'-1, W'-1, .).
    """
    tp, hp, wp = grid_thw
    f32 = xp.float32
    rows = xp.broadcast_to(xp.reshape(xp.arange(hp, dtype=f32), (1, hp, 1)), (tp, hp, wp))
    cols = xp.broadcast_to(xp.reshape(xp.arange(wp, dtype=f32), (1, 1, wp)), (tp, hp, wp))
    n = tp * hp * wp
    zero = xp.reshape(xp.arange(1, dtype=f32), (1,))
    h = xp.concatenate([zero, xp.reshape(rows, (n,)), zero + (hp - 1)])
    w = xp.concatenate([zero, xp.reshape(cols, (n,)), zero + (wp - 1)])
    fi = frame_indice
    b = fi.shape[0]
    frames = xp.broadcast_to(xp.reshape(fi[:, 1:-1], (b, tp, 1)), (b, tp, hp * wp))
    t = xp.concatenate([fi[:, :1], xp.reshape(frames, (b, n)), fi[:, -1:]], axis=1)
    t = xp.clip(t, 0, time_end - 1)
    return h, w, _as_float32(xp, t)


def rope_angles(xp, cfg: DiTConfig, grid_thw: tuple[int, int, int], frame_indice):
    """Rotation angles (B, L, head_dim / 2): pairs [0, P) from h, [P, 2P) from w, [2P, 3P) from t.

    Pair q rotates the adjacent features (2q, 2q+1) of every head by angle[..., q] (interleaved
    RoPE); the rotation itself is applied by the backends.
    """
    h, w, t = token_positions(xp, grid_thw, frame_indice, cfg.rope_time_end)
    freqs = rope_frequencies(cfg)
    b, length = t.shape
    p = freqs.shape[0]
    fr = xp.reshape(_asarray_like(xp, freqs, t), (1, 1, p))
    ah = xp.broadcast_to(xp.reshape(h, (1, length, 1)) * fr, (b, length, p))
    aw = xp.broadcast_to(xp.reshape(w, (1, length, 1)) * fr, (b, length, p))
    at = xp.reshape(t, (b, length, 1)) * fr
    return xp.concatenate([ah, aw, at], axis=-1)


def sinusoidal_embedding(xp, values, dim: int = 256, max_period: float = 10000.0):
    """[cos(v w_k), sin(v w_k)] with w_k = exp(-ln(max_period) k / (dim/2)), cos half FIRST.

    values: (B,) float (timesteps on the 0..1000 scale, or raw fps); returns (B, dim) float32.
    """
    half = dim // 2
    freqs = xp.exp(xp.arange(half, dtype=xp.float32) * (-math.log(max_period) / half))
    args = xp.reshape(values, (-1, 1)) * xp.reshape(freqs, (1, half))
    return xp.concatenate([xp.cos(args), xp.sin(args)], axis=-1)


def _as_float32(xp, x):
    """Integer positions -> float32 (explicit: strict dtype promotion refuses int * float)."""
    return x.to(xp.float32) if hasattr(x, "to") else x.astype(xp.float32)


def _asarray_like(xp, array: np.ndarray, like):
    """numpy constant -> the namespace's array on `like`'s device."""
    if hasattr(like, "device") and xp.__name__ == "torch":
        return xp.as_tensor(array, device=like.device)
    return xp.asarray(array)
