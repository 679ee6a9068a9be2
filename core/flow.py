"""Rectified flow as MUG-V trains it, written once over an array namespace `xp`
(`numpy`, `jax.numpy` or `torch`). Random draws are arguments, never drawn here.

Conventions (mugv-forward-notes.md section 2):
- sigma in [0, 1] is the noise level, t = 1000 sigma the model's timestep; sigma = 1 is pure
  noise, sigma = 0 clean data (2.1).
- x_t = (1 - sigma) x0 + sigma eps, and the model predicts v* = x0 - eps, "data minus noise" (2.2).
  So dx/dsigma = -v and a sampler that lowers sigma by d adds +d v.
- Latents are (B, C, T, H, W); a frame mask (B, T) is True for frames being denoised and False
  for clean conditioning frames (image-to-video frame 0), which keep x0 and leave the loss (2.5).
- The loss of one sample is the mean squared error over C, H, W and its unmasked frames; the
  batch loss is the mean over samples of (task weight x per-sample loss) (2.6).
- Timesteps: sigma0 = sigmoid(loc + scale n) with n ~ N(0, 1) (logit-normal, 2.3) or uniform, then
  the resolution/length shift sigma' = r sigma0 / (1 + (r - 1) sigma0) (2.4).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mugv.core import validate


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """How training timesteps are drawn and how samples are weighted.

    Fields:
        num_timesteps: t scale; the model sees t = num_timesteps * sigma (1000 in MUG-V).
        sample_method: "logit_normal" (sigma0 = sigmoid(loc + scale n), the anchor's choice) or
            "uniform" (sigma0 = u, u ~ U[0, 1)).
        loc, scale: logit-normal parameters (0 and 1 in the anchor).
        shift: apply the resolution/length shift (the anchor's `use_timestep_transform=True`).
        base_resolution, base_frames, shift_scale: r = sqrt(H W / base_resolution^2)
            * sqrt(frames / base_frames) * shift_scale (512, 1, 1.0 in the anchor).
        image_weight: per-sample loss weight of text-to-image samples (0.3 in the anchor).
    """
    num_timesteps: int = 1000
    sample_method: str = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0
    shift: bool = True
    base_resolution: int = 512
    base_frames: int = 1
    shift_scale: float = 1.0
    image_weight: float = 0.3

    def __post_init__(self):
        validate.positive_int(self, "num_timesteps", "base_resolution", "base_frames")
        validate.one_of(self, "sample_method", ("logit_normal", "uniform"))
        validate.in_range(self, "loc")
        validate.in_range(self, "scale", lo=0.0, lo_open=True)
        validate.one_of(self, "shift", (True, False))
        validate.in_range(self, "shift_scale", lo=0.0, lo_open=True)
        validate.in_range(self, "image_weight", lo=0.0)


# ---------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------

def shift_ratio(cfg: FlowConfig, height: int, width: int, frames: int) -> np.float32:
    """r = sqrt(H W / base^2) * sqrt(frames / base_frames) * shift_scale, in float32.

    H and W are PIXEL sizes (latent x 8); `frames` counts LATENT frames (1 for an image).
    float32 as the training repo computes it; the inference repo passes H, W, frames as bf16
    tensors and so gets r = 7.0 instead of 7.0156 at 720p with 14 latent frames (notes 2.4).
    """
    for name, v in (("height", height), ("width", width), ("frames", frames)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"shift_ratio: {name} = {v!r}: expected a positive integer "
                             f"({'latent frames' if name == 'frames' else 'pixels'})")
    f32 = np.float32
    area = f32(height) * f32(width) / (f32(cfg.base_resolution) * f32(cfg.base_resolution))
    return f32(np.sqrt(area) * np.sqrt(f32(frames) / f32(cfg.base_frames)) * f32(cfg.shift_scale))


def timestep_shift(sigma, r):
    """sigma' = r sigma / (1 + (r - 1) sigma): maps [0, 1] onto itself, the identity at r = 1,
    and for r > 1 moves mass towards noise (larger, longer videos need more noise).

    sigma: float array (any shape); r: a positive scalar (python or numpy) or an array that
    broadcasts against sigma.
    """
    if isinstance(r, (int, float, np.floating, np.integer)):
        r = float(r)  # exact: r is a float32 value; keeps the framework's weak scalar typing
        if not r > 0:
            raise ValueError(f"timestep_shift: r = {r!r}: expected a positive number")
    return r * sigma / (1 + (r - 1) * sigma)


def logit_normal_sigma(xp, normal_draw, loc: float = 0.0, scale: float = 1.0):
    """sigma0 = sigmoid(loc + scale n) for standard normal draws n (B,): the first component of
    torch's LogisticNormal(loc, scale), which is what the anchor samples (notes 2.3)."""
    return _sigmoid(xp, loc + scale * normal_draw)


def sample_sigma(xp, cfg: FlowConfig, draw, r=1.0):
    """Training noise levels sigma (B,) from one draw per sample.

    draw: standard normal draws for "logit_normal", uniform [0, 1) draws for "uniform".
    r: the shift ratio from `shift_ratio` (ignored when cfg.shift is False).
    """
    if cfg.sample_method == "logit_normal":
        sigma = logit_normal_sigma(xp, draw, cfg.loc, cfg.scale)
    else:
        sigma = draw
    return timestep_shift(sigma, r) if cfg.shift else sigma


def timestep_from_sigma(cfg: FlowConfig, sigma):
    """The model's timestep t = num_timesteps * sigma (0..1000, 1000 = noise)."""
    return sigma * cfg.num_timesteps


# ---------------------------------------------------------------------------------------------
# Interpolation, target, loss
# ---------------------------------------------------------------------------------------------

def noisy_latents(xp, x0, noise, sigma, frame_mask=None):
    """x_t = (1 - sigma) x0 + sigma eps per sample; frames with mask False stay x0 (clean
    conditioning frames are noised at sigma = 0 in the anchor, notes 2.5).

    x0, noise: (B, C, T, H, W); sigma: (B,); frame_mask: bool (B, T) or None (all True).
    """
    _check_same_shape("noisy_latents", x0=x0, noise=noise)
    b = x0.shape[0]
    s = xp.reshape(sigma, (b,) + (1,) * (len(x0.shape) - 1))
    xt = (1 - s) * x0 + s * noise
    if frame_mask is None:
        return xt
    return xp.where(_frames(xp, frame_mask, x0), xt, x0)


def velocity_channels(output_shape, latent_channels=None) -> int:
    """MUG-DiT outputs 2C channels, the velocity first (notes 1.15): returns C, or raises naming
    the shape when the channel count is odd or is not 2 x latent_channels."""
    c2 = output_shape[1]
    if c2 % 2 or (latent_channels is not None and c2 != 2 * latent_channels):
        want = "an even number" if latent_channels is None else str(2 * latent_channels)
        raise ValueError(f"velocity: model output has {c2} channels (shape {tuple(output_shape)}): "
                         f"expected {want} (velocity first half, unused second half)")
    return c2 // 2


def velocity_target(x0, noise):
    """v* = x0 - eps (data minus noise), the rectified-flow regression target (notes 2.2)."""
    return x0 - noise


def masked_mean(xp, values, frame_mask=None):
    """Per-sample mean of `values` (B, C, T, H, W) over C, H, W and the frames with mask True: (B,).

    frame_mask: bool (B, T) or None (all frames). A sample whose mask is all False has nothing
    to average: that is an error naming the sample, not a NaN (checked whenever the mask is
    concrete, i.e. outside jax.jit).
    """
    if len(values.shape) != 5:
        raise ValueError(f"masked_mean: values have shape {tuple(values.shape)}: expected "
                         "(B, C, T, H, W)")
    b, c, t, h, w = values.shape
    per_frame = xp.sum(xp.reshape(values, (b, c, t, h * w)), axis=(1, 3))  # (B, T)
    if frame_mask is None:
        return xp.sum(per_frame, axis=1) / (c * t * h * w)
    check_frame_mask(frame_mask, (b, t))
    check_some_frames(frame_mask)
    m = _as_float_like(frame_mask, per_frame)
    return xp.sum(per_frame * m, axis=1) / (xp.sum(m, axis=1) * (c * h * w))


def masked_mse(xp, pred, target, frame_mask=None):
    """Per-sample mean of (pred - target)^2 over C, H, W and the unmasked frames: (B,).

    pred, target: (B, C, T, H, W) float; frame_mask: bool (B, T) or None (all frames).
    """
    _check_same_shape("masked_mse", pred=pred, target=target)
    return masked_mean(xp, (pred - target) ** 2, frame_mask)


def task_weights(xp, cfg: FlowConfig, is_image, like):
    """Per-sample weights (B,): cfg.image_weight for text-to-image samples, 1 otherwise.

    The anchor scales the WHOLE micro-batch by 0.3 when any sample is 't2i' (notes 2.6); with its
    micro-batch of 1 that is the same thing. Per sample is what it means, so per sample it is.
    `like` gives the float dtype/device.
    """
    if not _is_bool(is_image):
        raise ValueError(f"task_weights: is_image has dtype {is_image.dtype}: expected bool (B,)")
    if tuple(is_image.shape) != tuple(like.shape):
        raise ValueError(f"task_weights: is_image has shape {tuple(is_image.shape)}: expected "
                         f"{tuple(like.shape)}, one flag per sample")
    m = _as_float_like(is_image, like)
    return cfg.image_weight * m + (1 - m)  # exactly fp32(0.3) and 1


def flow_matching_loss(xp, cfg: FlowConfig, velocity, x0, noise, frame_mask=None, is_image=None):
    """The rectified-flow loss of a batch: (scalar, per-sample losses (B,)).

    velocity: the model's velocity (B, C, T, H, W) (its first C output channels);
    per-sample loss = masked_mse(velocity, x0 - noise); scalar = mean_b(weight_b * loss_b).
    """
    per_sample = masked_mse(xp, velocity, velocity_target(x0, noise), frame_mask)
    if is_image is not None:
        per_sample = per_sample * task_weights(xp, cfg, is_image, per_sample)
    return xp.mean(per_sample), per_sample


# ---------------------------------------------------------------------------------------------
# Helpers shared with sampler.py and preference.py
# ---------------------------------------------------------------------------------------------

def _softplus(xp, y):
    """log(1 + e^y) = max(y, 0) + log1p(e^-|y|): finite for any y, and its gradient
    (1 + sign y) / 2 - sign(y) e^-|y| / (1 + e^-|y|) keeps full relative precision in both tails.
    (y + |y|) / 2 is max(y, 0) exactly and exists in every namespace."""
    return 0.5 * (y + xp.abs(y)) + xp.log1p(xp.exp(-xp.abs(y)))


def _sigmoid(xp, x):
    """sigmoid(x) = exp(-softplus(-x)) (numpy has no sigmoid). Accurate to fp32 relative precision
    in both tails: 0.5 + 0.5 tanh(x / 2) would return 1 - 1 cancellations for x << 0, and KTO with
    beta ~ 1e3 lives in those tails."""
    return xp.exp(-_softplus(xp, -x))


def _is_bool(x) -> bool:
    return "bool" in str(getattr(x, "dtype", type(x)))


def _as_float_like(mask, like):
    """A bool array as `like`'s float dtype (torch has .to, numpy and jax have .astype)."""
    if hasattr(mask, "astype") and not hasattr(mask, "to"):
        return mask.astype(like.dtype)
    return mask.to(dtype=like.dtype, device=like.device)


def _frames(xp, frame_mask, like):
    """(B, T) frame mask -> (B, 1, T, 1, 1) for latents (B, C, T, H, W)."""
    b, t = frame_mask.shape
    check_frame_mask(frame_mask, (like.shape[0], like.shape[2]))
    return xp.reshape(frame_mask, (b, 1, t, 1, 1))


def host_array(x):
    """numpy copy of a concrete array (torch on any device, jax, numpy); None for a jax tracer
    (under jit the value is unknown, so value checks are skipped there)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except TypeError:  # jax TracerArrayConversionError is a TypeError
        return None


def check_frame_mask(frame_mask, shape) -> None:
    """frame_mask must be bool of `shape` (B, T) with at least one True frame per sample."""
    if not _is_bool(frame_mask):
        raise ValueError(f"frame_mask has dtype {frame_mask.dtype}: expected bool (B, T), "
                         "True for frames being denoised")
    if tuple(frame_mask.shape) != tuple(shape):
        raise ValueError(f"frame_mask has shape {tuple(frame_mask.shape)}: expected (B, T) = "
                         f"{tuple(shape)}")


def check_some_frames(frame_mask) -> None:
    """Error naming the samples whose frame_mask is all False (nothing to denoise or average)."""
    m = host_array(frame_mask)
    if m is None:
        return
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"frame_mask is all False for sample(s) {empty.tolist()}: every sample "
                         "needs at least one frame to denoise (the per-sample mean would be 0/0)")


def _check_same_shape(fn: str, **arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: shapes differ: {desc}")

