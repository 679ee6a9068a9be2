"""MUG-V's sampler as pure `init` / `step` functions over an array namespace `xp`: Euler steps
from noise (sigma = 1) to data (sigma = 0) over the shifted grid, classifier-free guidance against
a negative-prompt batch, and image-to-video conditioning frames reset after every step.

Facts (mugv-forward-notes.md 2.8-2.10):
- Grid: sigma_i = shift(1 - i / N), i = 0..N-1, then sigma_N = 0, so the last step ends exactly
  at clean data. Step i adds (sigma_i - sigma_{i+1}) * v (dx/dsigma = -v).
- The model sees t_i = 1000 sigma_i for the whole batch.
- CFG: one model call on [z; z] whose first half is conditioned on the prompt and second half on
  the negative prompt; v = v_u + s (v_c - v_u) with s = 4.0 by default.
- I2V: frames with mask False hold the clean conditioning latent; the model gets that mask as
  x_mask (zero-time modulation for them) and they are reset to it after every Euler update.

The model is passed in as a callable `model(x, t, x_mask) -> velocity`:
    x (2B, C, T, H, W) = [z; z], t (2B,), x_mask bool (2B, T); it returns the velocity
    (2B, C, T, H, W), i.e. the first C channels of MUG-DiT's 2C-channel output (the backends'
    `sample` wraps the DiT that way). Prompt and negative-prompt embeddings are closed over by it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from mugv.core import validate
from mugv.core.flow import _frames, check_some_frames, timestep_shift


@dataclasses.dataclass(frozen=True)
class FlowSamplerConfig:
    """num_steps: Euler steps (25 in the pipeline); guidance_scale: CFG scale s (4.0; 1.0 gives
    the conditional prediction); num_timesteps: the t scale the model sees (1000)."""
    num_steps: int = 25
    guidance_scale: float = 4.0
    num_timesteps: int = 1000

    def __post_init__(self):
        validate.positive_int(self, "num_steps", "num_timesteps")
        validate.in_range(self, "guidance_scale")


class SamplerState(NamedTuple):
    """z: current latents (B, C, T, H, W); step: steps taken; sigmas: float32 grid (N + 1,)
    ending at 0; frame_mask: bool (B, T) or None; cond: clean conditioning latents or None."""
    z: Any
    step: int
    sigmas: np.ndarray
    frame_mask: Any = None
    cond: Any = None


def sigma_grid(num_steps: int, r=1.0) -> np.ndarray:
    """float32 (num_steps + 1,): shift(1 - i / N) for i < N, then 0 (notes 2.8).

    At N = 25 and r = 7.0156: 1, 0.99410, 0.98776, ..., 0.37890, 0.22620, 0 (r = 7.0, the
    inference repo's bf16 value: ..., 0.37838, 0.22581, 0).
    """
    base = (1.0 - np.arange(num_steps, dtype=np.float64) / num_steps).astype(np.float32)
    shifted = timestep_shift(base, np.float32(r)).astype(np.float32)
    return np.concatenate([shifted, np.zeros(1, np.float32)])


def init(xp, cfg: FlowSamplerConfig, noise, r=1.0, cond_latent=None,
         frame_mask=None) -> SamplerState:
    """Start state: z = noise, with frames whose mask is False set to `cond_latent`.

    noise: (B, C, T, H, W) standard normal draws (passed in); r: the shift ratio
    (`flow.shift_ratio`); cond_latent: clean latents of the same shape whose masked-out frames
    condition the video (I2V: frame 0); frame_mask: bool (B, T), True = generate.
    """
    if (cond_latent is None) != (frame_mask is None):
        raise ValueError("init: pass cond_latent and frame_mask together (image-to-video) or "
                         f"neither; got cond_latent={'set' if cond_latent is not None else None}, "
                         f"frame_mask={'set' if frame_mask is not None else None}")
    z = noise
    if frame_mask is not None:
        if tuple(cond_latent.shape) != tuple(noise.shape):
            raise ValueError(f"init: cond_latent has shape {tuple(cond_latent.shape)}, noise "
                             f"{tuple(noise.shape)}: expected equal shapes")
        check_some_frames(frame_mask)
        z = xp.where(_frames(xp, frame_mask, noise), noise, cond_latent)
    return SamplerState(z, 0, sigma_grid(cfg.num_steps, r), frame_mask, cond_latent)


def guided_velocity(v_cond, v_uncond, scale: float):
    """v = v_u + s (v_c - v_u) (the anchor's order, notes 2.9)."""
    return v_uncond + scale * (v_cond - v_uncond)


def step(xp, cfg: FlowSamplerConfig, state: SamplerState, model: Callable) -> SamplerState:
    """One Euler step from sigma_i to sigma_{i+1}: z <- z + (sigma_i - sigma_{i+1}) v."""
    i = state.step
    if i >= cfg.num_steps:
        raise ValueError(f"step: state.step = {i}: all {cfg.num_steps} steps are done")
    z = state.z
    b = z.shape[0]
    sigma, sigma_next = float(state.sigmas[i]), float(state.sigmas[i + 1])
    t = xp.zeros_like(z[:, 0, 0, 0, 0]) + sigma * cfg.num_timesteps  # (B,), z's dtype and device
    if state.frame_mask is None:
        x_mask = xp.ones_like(z[:, 0, :, 0, 0]) > 0  # all True (B, T): T2V still needs it
    else:
        x_mask = state.frame_mask
    out = model(xp.concatenate([z, z], axis=0), xp.concatenate([t, t], axis=0),
                xp.concatenate([x_mask, x_mask], axis=0))
    if tuple(out.shape) != (2 * b,) + tuple(z.shape[1:]):
        raise ValueError(f"step: model returned shape {tuple(out.shape)}: expected the velocity "
                         f"{(2 * b,) + tuple(z.shape[1:])} for the [cond; uncond] batch (take the "
                         "first half of MUG-DiT's output channels)")
    v = guided_velocity(out[:b], out[b:], cfg.guidance_scale)
    z = z + (sigma - sigma_next) * v
    if state.frame_mask is not None:
        z = xp.where(_frames(xp, state.frame_mask, z), z, state.cond)
    return state._replace(z=z, step=i + 1)


def timesteps(cfg: FlowSamplerConfig, state: SamplerState) -> np.ndarray:
    """The t values the model sees, one per step (float32 (N,)): 1000, 994.1, ..., 225.8."""
    return (state.sigmas[:-1] * np.float32(cfg.num_timesteps)).astype(np.float32)
