"""Video VAE (8x8x8): config, parameter schema, frame/chunk arithmetic and loss formulas.

Framework-free: both backends (torch_backend/models/vae.py, jax_reference/vae.py) build their
parameters from `vae_schema` and take their frame bookkeeping from `padded_sources` /
`output_positions` / `decode_chunks`. Facts from ../shared/reference/mugv-forward-notes.md
section 3; overview in docs/vae.md.
"""
from __future__ import annotations

import dataclasses

from mugv.core import validate as v
from mugv.core.schema import Init, ParamSpec, Schema

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 8
TEMPORAL_GROUP = 8          # the temporal encoder sees independent groups of 8 frames
ENCODE_CHUNK_FRAMES = 48    # official encode chunk (6 latent frames)
DECODE_CHUNK_LATENTS = 6    # official decode chunk


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Both VAE stages. Defaults are the official model's (411,752,900 parameters)."""

    # spatial (SDXL-style 2D VAE, run per frame)
    spatial_channels: tuple[int, ...] = (128, 256, 512, 512)
    spatial_layers_per_block: int = 2
    spatial_norm_groups: int = 32
    spatial_scaling: float = 0.18215
    # temporal (3D conv VAE)
    temporal_filters: int = 128
    temporal_channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    temporal_res_blocks: int = 4
    temporal_norm_groups: int = 32
    latent_channels: int = 24
    image_channels: int = 3

    def __post_init__(self) -> None:
        v.int_tuple(self, "spatial_channels", length=4)
        v.int_tuple(self, "temporal_channel_mult", length=4)
        v.positive_int(self, "spatial_layers_per_block", "spatial_norm_groups", "temporal_filters",
                       "temporal_res_blocks", "temporal_norm_groups", "latent_channels", "image_channels")
        v.in_range(self, "spatial_scaling", 0, None, lo_open=True)
        for c in self.spatial_channels:
            if c % self.spatial_norm_groups:
                v.fail(self, "spatial_norm_groups", f"a divisor of every spatial channel count {self.spatial_channels}")
        for m in self.temporal_channel_mult:
            if (m * self.temporal_filters) % self.temporal_norm_groups:
                v.fail(self, "temporal_norm_groups", "a divisor of every temporal channel count")


VAE_SIZES: dict[str, dict] = {
    "official": {},
    # ../shared/reference/goldens/vae_tiny_seed0
    "golden": dict(spatial_channels=(8, 16, 32, 32), spatial_layers_per_block=1, spatial_norm_groups=4,
                   temporal_filters=8, temporal_res_blocks=1, temporal_norm_groups=4),
    # trains for a few minutes on 2 CPU cores at 32x32 (torch_backend/jobs/vae_train.py)
    "tiny": dict(spatial_channels=(16, 32, 32, 32), spatial_layers_per_block=1, spatial_norm_groups=8,
                 temporal_filters=8, temporal_res_blocks=1, temporal_norm_groups=4, latent_channels=8),
}


def vae_config(size: str = "official", **overrides) -> VAEConfig:
    if size not in VAE_SIZES:
        raise v.ConfigError(f"VAE size {size!r}: expected one of {sorted(VAE_SIZES)}")
    return VAEConfig(**{**VAE_SIZES[size], **overrides})


def latent_frames(num_frames: int) -> int:
    """Latent length of a `num_frames` clip: ceil(T / 8).

    T mod 8 == 1 prepends 7 copies of frame 0 (105 -> 112 -> 14); otherwise the last chunk is
    zero-padded in front to a multiple of 8 (12 -> 16 -> 2). Both give ceil(T / 8) (notes 3.6).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames = {num_frames}: expected >= 1")
    return -(-num_frames // TEMPORAL_FACTOR)


def front_padding(num_frames: int) -> tuple[int, str]:
    """How many frames encoding adds in front and how: (7, "repeat_first") when T mod 8 == 1,
    else (pad, "zeros") with pad = (8 - T mod 8) mod 8."""
    if num_frames % TEMPORAL_FACTOR == 1:
        return TEMPORAL_FACTOR - 1, "repeat_first"
    return (-num_frames) % TEMPORAL_FACTOR, "zeros"


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T_l, H_l, W_l) for a (T, H, W) pixel clip; H and W must be multiples of 8."""
    for name, n in (("height", height), ("width", width)):
        if n <= 0 or n % SPATIAL_FACTOR:
            raise ValueError(f"video {name} = {n}: expected a positive multiple of {SPATIAL_FACTOR}")
    return latent_frames(num_frames), height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


# ---------------------------------------------------------------------------------------------
# Parameter schema (canonical names; torch layouts: conv weights (out, in, *kernel), linear
# weights (out, in)). Both backends build exactly these parameters; checkpoints/official_vae.py
# maps them to and from the official `vae.pt` names.
# ---------------------------------------------------------------------------------------------

# The 2D encoder of SDXL ends in conv_out to 2 x 4 channels and its decoder starts with conv_in
# from 4; MUG-V never runs those (notes 3.2) but vae.pt stores them, so the schema keeps them as
# non-trainable "unused.*" entries: an import/export round trip is then exact and strict.
SDXL_LATENT_CHANNELS = 4
OFFICIAL_LOGVAR_INIT = 4.0   # notes 3.9: MUGVAE's training-only NLL log-variance starts at 4.0


def _conv(name: str, c_out: int, c_in: int, kernel: tuple[int, ...], bias: bool = True,
          trainable: bool = True) -> list[ParamSpec]:
    fan_in = c_in
    for k in kernel:
        fan_in *= k
    # PyTorch's default conv init (kaiming-uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)).
    specs = [ParamSpec(f"{name}.weight", (c_out, c_in, *kernel), trainable=trainable,
                       init=Init("uniform", std=fan_in ** -0.5))]
    if bias:
        specs.append(ParamSpec(f"{name}.bias", (c_out,), trainable=trainable, init=Init("zeros")))
    return specs


def _linear(name: str, c_out: int, c_in: int) -> list[ParamSpec]:
    return [ParamSpec(f"{name}.weight", (c_out, c_in), init=Init("uniform", std=c_in ** -0.5)),
            ParamSpec(f"{name}.bias", (c_out,), init=Init("zeros"))]


def _norm(name: str, c: int, trainable: bool = True) -> list[ParamSpec]:
    return [ParamSpec(f"{name}.weight", (c,), trainable=trainable, init=Init("ones")),
            ParamSpec(f"{name}.bias", (c,), trainable=trainable, init=Init("zeros"))]


def _resnet2d(name: str, c_in: int, c_out: int) -> list[ParamSpec]:
    p = _norm(f"{name}.norm1", c_in) + _conv(f"{name}.conv1", c_out, c_in, (3, 3))
    p += _norm(f"{name}.norm2", c_out) + _conv(f"{name}.conv2", c_out, c_out, (3, 3))
    if c_in != c_out:
        p += _conv(f"{name}.shortcut", c_out, c_in, (1, 1))
    return p


def _mid2d(name: str, c: int) -> list[ParamSpec]:
    p = _resnet2d(f"{name}.res.0", c, c) + _norm(f"{name}.attn.norm", c)
    for proj in ("q", "k", "v", "out"):
        p += _linear(f"{name}.attn.{proj}", c, c)
    return p + _resnet2d(f"{name}.res.1", c, c)


def _resnet3d(name: str, c_in: int, c_out: int) -> list[ParamSpec]:
    # Temporal ResBlocks have bias-free convs and a bias-free 1x1x1 shortcut (notes 3.4).
    p = _norm(f"{name}.norm1", c_in) + _conv(f"{name}.conv1", c_out, c_in, (3, 3, 3), bias=False)
    p += _norm(f"{name}.norm2", c_out) + _conv(f"{name}.conv2", c_out, c_out, (3, 3, 3), bias=False)
    if c_in != c_out:
        p += _conv(f"{name}.shortcut", c_out, c_in, (1, 1, 1), bias=False)
    return p


def temporal_channels(cfg: VAEConfig) -> tuple[int, ...]:
    """Channels of the temporal stage's four levels (filters x multiplier)."""
    return tuple(cfg.temporal_filters * m for m in cfg.temporal_channel_mult)


def vae_schema(cfg: VAEConfig) -> Schema:
    """Every VAE parameter: canonical name, shape, init. Order = module construction order.

    Layout of the names (notes 3.2-3.7):
      spatial.encoder.{conv_in, down.i.res.j, down.i.downsample, mid}, spatial.decoder.{mid,
      up.i.res.j, up.i.upsample, norm_out, conv_out}; temporal.encoder.{conv_in, levels.i.res.j,
      levels.i.down, mid.res.j, norm_out, conv_out}, temporal.quant_conv, temporal.post_quant_conv,
      temporal.decoder.{conv_in, mid.res.j, upsample, levels.i.res.j, levels.i.up, norm_out,
      conv_out}; latent_mean/latent_std (buffers), logvar (training-only), unused.* (see above).
    """
    sc, nl = cfg.spatial_channels, cfg.spatial_layers_per_block
    c_feat = sc[-1]
    p: list[ParamSpec] = []
    # spatial encoder: per-frame, stops after the mid block
    p += _conv("spatial.encoder.conv_in", sc[0], cfg.image_channels, (3, 3))
    prev = sc[0]
    for i, c in enumerate(sc):
        for j in range(nl):
            p += _resnet2d(f"spatial.encoder.down.{i}.res.{j}", prev, c)
            prev = c
        if i < len(sc) - 1:
            p += _conv(f"spatial.encoder.down.{i}.downsample", c, c, (3, 3))
    p += _mid2d("spatial.encoder.mid", c_feat)
    # spatial decoder: starts at the mid block
    p += _mid2d("spatial.decoder.mid", c_feat)
    rev = sc[::-1]
    prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(nl + 1):
            p += _resnet2d(f"spatial.decoder.up.{i}.res.{j}", prev, c)
            prev = c
        if i < len(rev) - 1:
            p += _conv(f"spatial.decoder.up.{i}.upsample", c, c, (3, 3))
    p += _norm("spatial.decoder.norm_out", sc[0]) + _conv("spatial.decoder.conv_out", cfg.image_channels,
                                                           sc[0], (3, 3))
    # temporal encoder (levels 0..2 end in a stride-2 time conv)
    tc = temporal_channels(cfg)
    nr = cfg.temporal_res_blocks
    p += _conv("temporal.encoder.conv_in", tc[0], c_feat, (3, 3, 3), bias=False)
    prev = tc[0]
    for i, c in enumerate(tc):
        for j in range(nr):
            p += _resnet3d(f"temporal.encoder.levels.{i}.res.{j}", prev, c)
            prev = c
        if i < len(tc) - 1:
            p += _conv(f"temporal.encoder.levels.{i}.down", c, c, (3, 3, 3))
    for j in range(nr):
        p += _resnet3d(f"temporal.encoder.mid.res.{j}", prev, prev)
    lc = cfg.latent_channels
    p += _norm("temporal.encoder.norm_out", prev)
    p += _conv("temporal.encoder.conv_out", 2 * lc, prev, (1, 1, 1))
    p += _conv("temporal.quant_conv", 2 * lc, 2 * lc, (1, 1, 1))
    # temporal decoder: nearest x2 + ResBlock, then levels 3..1 with depth-to-space x2 after 3, 2
    p += _conv("temporal.post_quant_conv", lc, lc, (1, 1, 1))
    prev = tc[-1]
    p += _conv("temporal.decoder.conv_in", prev, lc, (3, 3, 3))
    for j in range(nr):
        p += _resnet3d(f"temporal.decoder.mid.res.{j}", prev, prev)
    p += _resnet3d("temporal.decoder.upsample", prev, prev)
    for i in reversed(range(len(tc))):
        for j in range(nr):
            p += _resnet3d(f"temporal.decoder.levels.{i}.res.{j}", prev, tc[i])
            prev = tc[i]
        if i in DEPTH_TO_SPACE_LEVELS:
            p += _conv(f"temporal.decoder.levels.{i}.up", 2 * prev, prev, (3, 3, 3))
    p += _norm("temporal.decoder.norm_out", prev)
    p += _conv("temporal.decoder.conv_out", c_feat, prev, (3, 3, 3))
    # latent normalisation (notes 3.5): z_n = (z - mean) / std, per channel; stored, not trained
    p.append(ParamSpec("latent_mean", (lc,), init=Init("zeros"), trainable=False))
    p.append(ParamSpec("latent_std", (lc,), init=Init("ones"), trainable=False))
    p.append(ParamSpec("logvar", (), init=Init("normal", std=0.0, mean=OFFICIAL_LOGVAR_INIT)))
    # stored by the official checkpoint, never run (see SDXL_LATENT_CHANNELS)
    p += _norm("unused.encoder_norm_out", c_feat, trainable=False)
    p += _conv("unused.encoder_conv_out", 2 * SDXL_LATENT_CHANNELS, c_feat, (3, 3), trainable=False)
    p += _conv("unused.decoder_conv_in", c_feat, SDXL_LATENT_CHANNELS, (3, 3), trainable=False)
    return Schema(tuple(p))


# Temporal decoder levels whose last step is conv -> depth-to-space x2 in time (the official
# decoder is built with temporal_downsample=(False, True, True): level i > 0 upsamples when
# entry i - 1 is True). With the nearest x2 upsample block this gives x8 (notes 3.7).
DEPTH_TO_SPACE_LEVELS = (2, 3)


# ---------------------------------------------------------------------------------------------
# Frame bookkeeping: where each frame of the temporal encoder's input comes from, and which
# decoded frame reconstructs which input frame (notes 3.6, 3.8).
# ---------------------------------------------------------------------------------------------
ZERO_FRAME = -1


def padded_sources(num_frames: int, chunk_frames: int = ENCODE_CHUNK_FRAMES) -> tuple[int, ...]:
    """The temporal encoder's input sequence P, as input-frame indices (ZERO_FRAME = zeros).

    len(P) = 8 * latent_frames(T); latent j is encoded from P[8j : 8j + 8] alone.
    Rule (a), T mod 8 == 1: P = [0] * 7 + [0, 1, ..., T-1] (frame 0 encoded alone, as 8 copies).
    Rule (c), otherwise: the input is cut into chunks of `chunk_frames` (48 officially) and a
    chunk whose length is not a multiple of 8 (only the last) gets zero frames in front.
    The zeros are zero *features* after the 2D encoder, not black pixels.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames = {num_frames}: expected >= 1")
    if chunk_frames < TEMPORAL_GROUP or chunk_frames % TEMPORAL_GROUP:
        raise ValueError(f"chunk_frames = {chunk_frames}: expected a positive multiple of {TEMPORAL_GROUP}")
    if num_frames % TEMPORAL_FACTOR == 1:
        return (0,) * (TEMPORAL_FACTOR - 1) + tuple(range(num_frames))
    out: list[int] = []
    for start in range(0, num_frames, chunk_frames):
        stop = min(start + chunk_frames, num_frames)
        out += [ZERO_FRAME] * ((-(stop - start)) % TEMPORAL_GROUP) + list(range(start, stop))
    return tuple(out)


def output_positions(num_frames: int) -> tuple[int, ...]:
    """For each input frame t, the index into the 8 * T_l decoded frames that reconstructs it.

    The exact inverse of `padded_sources`: the last position of P whose source is t. This undoes
    both padding rules (the repeated copies of frame 0 and the zero frames are dropped). The
    official generic decode (`MUGAutoencoderPipeline.decode`) inverts only rule (c), so for
    T mod 8 == 1 and T > 41 it misaligns (goldens case t57); mugv does not reproduce that.
    """
    last: dict[int, int] = {}
    for i, src in enumerate(padded_sources(num_frames)):
        if src != ZERO_FRAME:
            last[src] = i
    return tuple(last[t] for t in range(num_frames))


# Source frames (of the clip's own height x width) one call of a VAE stage takes at most when the
# caller names no `frame_batch`: 2^21 pixels. The official VAE's fp32 encode peaked at 39.4 GiB for
# one 49 x 256 x 448 clip in one call (docs/benchmarks.md, issue 25's paths table), ~7 KiB a pixel,
# so a call stays near 14 GiB whatever the clip size or the number of clips batched: `mugv cache`
# encoding 16 clips at once ran out of an H100's 80 GB (2026-12-05). Frames are independent in the
# 2D stages and groups of 8 in the temporal one, so the bound changes no result.
CALL_PIXELS = 2 ** 21


def frames_per_call(height: int, width: int, pixels: int = CALL_PIXELS) -> int:
    """Frames of height x width a VAE stage call takes at most (>= 1)."""
    return max(1, pixels // (height * width))


def decode_chunks(num_latents: int, chunk_latents: int = DECODE_CHUNK_LATENTS) -> list[range]:
    """Latent index ranges decoded jointly. The temporal decoder mixes all latents of a chunk, so
    the chunk boundaries are part of the model: officially 6 latents from latent 0 (notes 3.8)."""
    if num_latents < 1:
        raise ValueError(f"num_latents = {num_latents}: expected >= 1")
    return [range(s, min(s + chunk_latents, num_latents)) for s in range(0, num_latents, chunk_latents)]


def video_shape_error(shape: tuple[int, ...], channels: int) -> str | None:
    """None when `shape` is a valid (B, C, T, H, W) pixel video, else a message naming the
    expected shape (both backends raise ValueError with it)."""
    shape = tuple(int(n) for n in shape)
    expected = (f"expected a video of shape (B, {channels}, T, H, W) with B, T >= 1 and H, W positive "
                f"multiples of {SPATIAL_FACTOR}")
    if len(shape) != 5:
        return f"video of shape {shape}: {expected} (got {len(shape)} dimensions)"
    b, c, t, h, w = shape
    if c != channels:
        return f"video of shape {shape}: {expected} (got {c} channels)"
    if b < 1 or t < 1:
        return f"video of shape {shape}: {expected} (empty batch or no frames)"
    if h <= 0 or w <= 0 or h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
        return f"video of shape {shape}: {expected} (got H = {h}, W = {w})"
    return None


def latent_shape_error(shape: tuple[int, ...], channels: int, num_frames: int) -> str | None:
    """None when `shape` is a valid (B, C_lat, T_l, h, w) latent of a `num_frames` clip."""
    shape = tuple(int(n) for n in shape)
    want = latent_frames(num_frames)
    expected = f"expected a latent of shape (B, {channels}, {want}, h, w) for num_frames = {num_frames}"
    if len(shape) != 5 or shape[1] != channels or shape[2] != want or min(shape) < 1:
        return f"latent of shape {shape}: {expected}"
    return None


# ---------------------------------------------------------------------------------------------
# Training objective, written once over an array namespace `xp` (numpy, torch or jax.numpy).
# MUG-V did not release its VAE losses (notes 3.9); this is latent diffusion's autoencoder loss
# (Rombach et al. 2022, `LPIPSWithDiscriminator`) without the perceptual term: an L1 NLL with a
# learned scalar log-variance, a KL to N(0, I) with a small weight, and an optional hinge-loss
# patch discriminator whose generator term is weighted adaptively.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    kl_weight: float = 1e-6
    disc_start: int | None = None     # step at which the discriminator term switches on; None = never
    disc_weight: float = 0.5          # multiplies the adaptive weight
    disc_factor: float = 1.0

    def __post_init__(self) -> None:
        v.in_range(self, "kl_weight", 0, None)
        v.in_range(self, "disc_weight", 0, None)
        v.in_range(self, "disc_factor", 0, None)
        if self.disc_start is not None:
            v.non_negative_int(self, "disc_start")


def reconstruction_nll(x, recon, logvar, xp):
    """sum(|x - recon| / exp(logvar) + logvar) / batch: the L1 error read as a Laplace-like NLL
    with one learned log-variance (LDM's `nll_loss`; it balances itself against the KL)."""
    rec = xp.abs(x - recon)
    return xp.sum(rec / xp.exp(logvar) + logvar) / x.shape[0]


def foreground_colour_error(x, recon, mask, xp):
    """Mean |mean colour of the foreground in x - in recon| over frames and channels.

    x, recon: (B, 3, ..., H, W); mask: (B, 1, ..., H, W), 1 on the product's pixels. The masked
    mean over (H, W) per frame and channel, then the mean absolute difference (frames without
    foreground count as zero error). Per-pixel L1 of a small object lets the decoder trade its
    colour for its edges: with the demo's four colours it blurred red towards the palette's mean
    (red reconstructed orange, hue 29 deg instead of 0; docs/vae.md "Red"); this term asks for
    the colour of the whole object directly."""
    count = xp.sum(mask, axis=(-2, -1))
    safe = count + (count == 0) * 1.0
    mean_x = xp.sum(x * mask, axis=(-2, -1)) / safe
    mean_r = xp.sum(recon * mask, axis=(-2, -1)) / safe
    return xp.mean(xp.abs(mean_x - mean_r))


def gaussian_kl(mean, logvar, xp):
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    return 0.5 * xp.sum(mean * mean + xp.exp(logvar) - 1.0 - logvar) / mean.shape[0]


def hinge_d_loss(logits_real, logits_fake, xp):
    """Discriminator hinge loss 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    relu = lambda z: 0.5 * (z + xp.abs(z))   # noqa: E731  (namespace-neutral max(z, 0))
    return 0.5 * (xp.mean(relu(1.0 - logits_real)) + xp.mean(relu(1.0 + logits_fake)))


def adaptive_weight(nll_grad_norm: float, gen_grad_norm: float, disc_weight: float) -> float:
    """LDM's balance of the adversarial term: ||grad_last nll|| / (||grad_last g|| + 1e-4), clipped
    to [0, 1e4], times `disc_weight` (gradients w.r.t. the decoder's last layer)."""
    return disc_weight * min(max(nll_grad_norm / (gen_grad_norm + 1e-4), 0.0), 1e4)
