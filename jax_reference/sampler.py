"""JAX sampling loop of the diffusion sampler (the oracle side of `torch_backend/sampler.py`;
formulas once in `mugv.core.sampler`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mugv.core import sampler
from mugv.core.sampler import FlowSamplerConfig
from mugv.jax_reference.flow import velocity

Array = jax.Array

__all__ = ["sample"]


def sample(model: Callable, cfg: FlowSamplerConfig, noise: Array, r=1.0,
           cond_latent: Optional[Array] = None, frame_mask: Optional[Array] = None) -> Array:
    """Run the Euler sampler to sigma = 0 and return the latents (fp32).

    model(x, t, x_mask) -> raw MUG-DiT output (2B, 48, T, H, W) for x = [z; z], whose first B
    samples are conditioned on the prompt and last B on the negative prompt.
    """
    latent_channels = noise.shape[1]

    def velocity_model(x, t, x_mask):
        return velocity(model(x, t, x_mask), latent_channels)

    f32 = jnp.float32
    state = sampler.init(jnp, cfg, noise.astype(f32), r,
                         None if cond_latent is None else cond_latent.astype(f32), frame_mask)
    while state.step < cfg.num_steps:
        state = sampler.step(jnp, cfg, state, velocity_model)
    return state.z
