"""Torch entry points of the training objectives and the sampler: the formulas live once in
`mugv.core.flow`, `mugv.core.preference` and `mugv.core.sampler`; this module adds torch's
mechanics: taking the velocity out of the model output, fp32 casting, detaching the frozen
reference and the KTO reference point, and the sampling loop. Mirror: `jax_reference/objectives.py`.

Model output: MUG-DiT returns 2 x 24 = 48 channels (B, 48, T, H, W). Channels 0..23 are the
velocity v = x0 - eps; channels 24..47 are an untrained leftover (a "learned sigma" slot never in
any loss). Every function here takes the RAW model output and uses its first half
(mugv-forward-notes.md 1.15), so callers never slice by hand.

Precision: the model may run in bf16; losses are computed in fp32 as the anchor does (2.6).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from mugv.core import flow, preference, sampler
from mugv.core.flow import FlowConfig
from mugv.core.preference import PreferenceConfig
from mugv.core.sampler import FlowSamplerConfig

__all__ = ["velocity", "sample_sigma", "noisy_latents", "flow_matching_loss", "dpo_loss",
           "kto_loss", "sample"]


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


def _diff(output, ref_output, x0, noise, frame_mask):
    """d = e_policy - e_ref per sample (B,), fp32, without cancellation (core.preference)."""
    target = flow.velocity_target(x0.float(), noise.float())
    return preference.error_difference(torch, velocity(output, x0.shape[1]),
                                       velocity(ref_output, x0.shape[1]), target, frame_mask)


def flow_matching_loss(cfg: FlowConfig, output: Tensor, x0: Tensor, noise: Tensor,
                       frame_mask: Optional[Tensor] = None,
                       is_image: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rectified-flow loss: (scalar mean over samples, weighted per-sample losses (B,)).

    output: raw model output (B, 48, T, H, W); x0, noise: (B, 24, T, H, W); frame_mask: bool
    (B, T), True = frame in the loss; is_image: bool (B,), True = text-to-image sample (x0.3).
    """
    v = velocity(output, x0.shape[1])
    return flow.flow_matching_loss(torch, cfg, v, x0.float(), noise.float(), frame_mask, is_image)



def dpo_loss(cfg: PreferenceConfig, out_w: Tensor, out_l: Tensor, ref_out_w: Tensor,
             ref_out_l: Tensor, x0_w: Tensor, x0_l: Tensor, noise: Tensor,
             frame_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO on raw model outputs: (scalar mean over pairs, per-pair losses (B,)).

    out_w/out_l: policy outputs on the preferred/rejected latents x0_w/x0_l noised with the SAME
    noise and sigma; ref_out_*: the frozen reference's outputs (detached here).
    """
    preference.check_pair_shapes(out_w=out_w, out_l=out_l, ref_out_w=ref_out_w, ref_out_l=ref_out_l)
    preference.check_pair_shapes(x0_w=x0_w, x0_l=x0_l, noise=noise)
    diff_w = _diff(out_w, ref_out_w.detach(), x0_w, noise, frame_mask)
    diff_l = _diff(out_l, ref_out_l.detach(), x0_l, noise, frame_mask)
    per_pair = preference.dpo_loss(torch, cfg, diff_w, diff_l)
    return per_pair.mean(), per_pair


def kto_loss(cfg: PreferenceConfig, output: Tensor, ref_output: Tensor, x0: Tensor, noise: Tensor,
             desirable: Tensor, frame_mask: Optional[Tensor] = None,
             reference_point: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-KTO on raw model outputs: (scalar mean, per-sample losses (B,), z0).

    desirable: bool (B,). reference_point: z0 to use (e.g. already averaged over data-parallel
    ranks, as the official code does); by default this batch's max(0, mean reward). Detached.
    """
    preference.check_pair_shapes(output=output, ref_output=ref_output)
    reward = preference.kto_reward(_diff(output, ref_output.detach(), x0, noise, frame_mask))
    if reference_point is None:
        reference_point = preference.kto_reference_point(torch, reward)
    reference_point = reference_point.detach()
    per_sample = preference.kto_loss(torch, cfg, reward, reference_point, desirable)
    return per_sample.mean(), per_sample, reference_point


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
