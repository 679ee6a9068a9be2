"""Torch sampling loop of the diffusion sampler (Euler + classifier-free guidance; formulas once in
`mugv.core.sampler`). Not the data's bucket sampler (`data/sampler.py`). Mirrors:
`core/sampler.py`, `jax_reference/sampler.py`, `parity_tests/test_sampler.py`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from mugv.core import sampler
from mugv.core.sampler import FlowSamplerConfig
from mugv.torch_backend.flow import velocity

__all__ = ["sample"]


def sample(model: Callable, cfg: FlowSamplerConfig, noise: Tensor, r=1.0,
           cond_latent: Optional[Tensor] = None, frame_mask: Optional[Tensor] = None) -> Tensor:
    """Run the Euler sampler to sigma = 0 and return the latents (fp32).

    model(x, t, x_mask) -> raw MUG-DiT output (2B, 48, T, H, W) for x = [z; z], whose first B
    samples are conditioned on the prompt and last B on the negative prompt. Autograd is left to
    the caller: run it under `torch.inference_mode()` to sample, with grad only to differentiate
    through the sampler (the parity test does).
    """
    latent_channels = noise.shape[1]

    def velocity_model(x, t, x_mask):
        return velocity(model(x, t, x_mask), latent_channels)

    state = sampler.init(torch, cfg, noise.float(), r,
                         None if cond_latent is None else cond_latent.float(), frame_mask)
    while state.step < cfg.num_steps:
        state = sampler.step(torch, cfg, state, velocity_model)
    return state.z
