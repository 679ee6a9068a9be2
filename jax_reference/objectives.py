"""JAX entry points of the training objectives and the sampler (the oracle side of
`torch_backend/objectives.py`): the formulas live once in `mugv.core.flow`, `mugv.core.preference`
and `mugv.core.sampler`; this module adds JAX's mechanics: taking the velocity out of the model
output, fp32 casting, `stop_gradient` on the frozen reference and the KTO reference point, and
the sampling loop.

Model output: MUG-DiT returns 2 x 24 = 48 channels (B, 48, T, H, W). Channels 0..23 are the
velocity v = x0 - eps; channels 24..47 are an untrained leftover (a "learned sigma" slot never in
any loss). Every function here takes the RAW model output and uses its first half
(mugv-forward-notes.md 1.15).

Value checks on masks (an all-False frame mask) run when the mask is concrete: call these
outside `jax.jit`, or with the mask as a static/closed-over argument, to keep them.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mugv.core import flow, preference, sampler
from mugv.core.flow import FlowConfig
from mugv.core.preference import PreferenceConfig
from mugv.core.sampler import FlowSamplerConfig

Array = jax.Array

__all__ = ["velocity", "sample_sigma", "noisy_latents", "flow_matching_loss", "dpo_loss",
           "kto_loss", "sample"]


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


def _diff(output, ref_output, x0, noise, frame_mask):
    """d = e_policy - e_ref per sample (B,), fp32, without cancellation (core.preference)."""
    target = flow.velocity_target(x0.astype(jnp.float32), noise.astype(jnp.float32))
    return preference.error_difference(jnp, velocity(output, x0.shape[1]),
                                       velocity(ref_output, x0.shape[1]), target, frame_mask)


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



def dpo_loss(cfg: PreferenceConfig, out_w: Array, out_l: Array, ref_out_w: Array,
             ref_out_l: Array, x0_w: Array, x0_l: Array, noise: Array,
             frame_mask: Optional[Array] = None) -> tuple[Array, Array]:
    """Diffusion-DPO on raw model outputs: (scalar mean over pairs, per-pair losses (B,)).

    out_w/out_l: policy outputs on the preferred/rejected latents x0_w/x0_l noised with the SAME
    noise and sigma; ref_out_*: the frozen reference's outputs (stop_gradient here).
    """
    preference.check_pair_shapes(out_w=out_w, out_l=out_l, ref_out_w=ref_out_w, ref_out_l=ref_out_l)
    preference.check_pair_shapes(x0_w=x0_w, x0_l=x0_l, noise=noise)
    sg = jax.lax.stop_gradient
    diff_w = _diff(out_w, sg(ref_out_w), x0_w, noise, frame_mask)
    diff_l = _diff(out_l, sg(ref_out_l), x0_l, noise, frame_mask)
    per_pair = preference.dpo_loss(jnp, cfg, diff_w, diff_l)
    return jnp.mean(per_pair), per_pair


def kto_loss(cfg: PreferenceConfig, output: Array, ref_output: Array, x0: Array, noise: Array,
             desirable: Array, frame_mask: Optional[Array] = None,
             reference_point: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """Diffusion-KTO on raw model outputs: (scalar mean, per-sample losses (B,), z0).

    desirable: bool (B,). reference_point: z0 to use (e.g. averaged over data-parallel ranks);
    by default this batch's max(0, mean reward). Always under stop_gradient.
    """
    preference.check_pair_shapes(output=output, ref_output=ref_output)
    sg = jax.lax.stop_gradient
    reward = preference.kto_reward(_diff(output, sg(ref_output), x0, noise, frame_mask))
    if reference_point is None:
        reference_point = preference.kto_reference_point(jnp, reward)
    reference_point = sg(reference_point)
    per_sample = preference.kto_loss(jnp, cfg, reward, reference_point, desirable)
    return jnp.mean(per_sample), per_sample, reference_point


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
