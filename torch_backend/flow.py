"""Torch mechanics of rectified flow (formulas once in `mugv.core.flow`): taking the velocity out
of the model output, fp32 casting, the training noise levels, x_t and the loss. Mirrors:
`core/flow.py`, `jax_reference/flow.py`, `parity_tests/test_flow.py`.

Model output: MUG-DiT returns 2 x 24 = 48 channels (B, 48, T, H, W). Channels 0..23 are the
velocity v = x0 - eps; channels 24..47 are an untrained leftover (a "learned sigma" slot never in
any loss). Every function here takes the RAW model output and uses its first half
(mugv-forward-notes.md 1.15), so callers never slice by hand.

Precision: the model may run in bf16; losses are computed in fp32 as the anchor does (2.6).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mugv.core import flow
from mugv.core.flow import FlowConfig

__all__ = ["velocity", "sample_sigma", "noisy_latents", "flow_matching_loss"]


def velocity(output: Tensor, latent_channels: Optional[int] = None) -> Tensor:
    """The velocity channels of a MUG-DiT output (B, 2C, T, H, W) -> (B, C, T, H, W), in fp32."""
    return output[:, : flow.velocity_channels(output.shape, latent_channels)].float()


def sample_sigma(cfg: FlowConfig, draw: Tensor, r=1.0) -> Tensor:
    """Training noise levels sigma (B,) in fp32 from per-sample draws (see core.flow.sample_sigma);
    the model's timestep is `flow.timestep_from_sigma(cfg, sigma)`."""
    return flow.sample_sigma(torch, cfg, draw.float(), r)


def noisy_latents(x0: Tensor, noise: Tensor, sigma: Tensor,
                  frame_mask: Optional[Tensor] = None) -> Tensor:
    """x_t (fp32) with conditioning frames (mask False) kept clean."""
    return flow.noisy_latents(torch, x0.float(), noise.float(), sigma.float(), frame_mask)


def flow_matching_loss(cfg: FlowConfig, output: Tensor, x0: Tensor, noise: Tensor,
                       frame_mask: Optional[Tensor] = None,
                       is_image: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rectified-flow loss: (scalar mean over samples, weighted per-sample losses (B,)).

    output: raw model output (B, 48, T, H, W); x0, noise: (B, 24, T, H, W); frame_mask: bool
    (B, T), True = frame in the loss; is_image: bool (B,), True = text-to-image sample (x0.3).
    """
    v = velocity(output, x0.shape[1])
    return flow.flow_matching_loss(torch, cfg, v, x0.float(), noise.float(), frame_mask, is_image)
