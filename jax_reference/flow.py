"""JAX mechanics of rectified flow (the oracle side of `torch_backend/flow.py`; formulas once in
`mugv.core.flow`): the velocity out of the model output, fp32 casting, noise levels, x_t, loss.

Model output: MUG-DiT returns 2 x 24 = 48 channels (B, 48, T, H, W). Channels 0..23 are the
velocity v = x0 - eps; channels 24..47 are an untrained leftover (a "learned sigma" slot never in
any loss). Every function here takes the RAW model output and uses its first half
(mugv-forward-notes.md 1.15).

Value checks on masks (an all-False frame mask) run when the mask is concrete: call these
outside `jax.jit`, or with the mask as a static/closed-over argument, to keep them.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mugv.core import flow
from mugv.core.flow import FlowConfig

Array = jax.Array

__all__ = ["velocity", "sample_sigma", "noisy_latents", "flow_matching_loss"]


def velocity(output: Array, latent_channels: Optional[int] = None) -> Array:
    """The velocity channels of a MUG-DiT output (B, 2C, T, H, W) -> (B, C, T, H, W), in fp32."""
    return output[:, : flow.velocity_channels(output.shape, latent_channels)].astype(jnp.float32)


def sample_sigma(cfg: FlowConfig, draw: Array, r=1.0) -> Array:
    """Training noise levels sigma (B,) in fp32 from per-sample draws (core.flow.sample_sigma)."""
    return flow.sample_sigma(jnp, cfg, draw.astype(jnp.float32), r)


def noisy_latents(x0: Array, noise: Array, sigma: Array,
                  frame_mask: Optional[Array] = None) -> Array:
    """x_t (fp32) with conditioning frames (mask False) kept clean."""
    f32 = jnp.float32
    return flow.noisy_latents(jnp, x0.astype(f32), noise.astype(f32), sigma.astype(f32), frame_mask)


def flow_matching_loss(cfg: FlowConfig, output: Array, x0: Array, noise: Array,
                       frame_mask: Optional[Array] = None,
                       is_image: Optional[Array] = None) -> tuple[Array, Array]:
    """Rectified-flow loss: (scalar mean over samples, weighted per-sample losses (B,)).

    output: raw model output (B, 48, T, H, W); x0, noise: (B, 24, T, H, W); frame_mask: bool
    (B, T), True = frame in the loss; is_image: bool (B,), True = text-to-image sample (x0.3).
    """
    v, f32 = velocity(output, x0.shape[1]), jnp.float32
    return flow.flow_matching_loss(jnp, cfg, v, x0.astype(f32), noise.astype(f32), frame_mask,
                                   is_image)
