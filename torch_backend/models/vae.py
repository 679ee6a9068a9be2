"""MUG-V's two-stage video VAE in plain torch (production path; not tensor-parallel).

Module paths are the canonical names of `core/vae.py::vae_schema` (`spatial.encoder.down.0.res.0.
conv1.weight`), so `state_dict()` is the canonical dict. Facts: mugv-forward-notes.md section 3.

Encode: the 2D encoder runs per frame and stops after its mid block (x 0.18215); the temporal
encoder maps each group of 8 feature frames to one latent frame; mean/logvar -> (z - mean)/std.
Decode: z * std + mean -> temporal decoder over chunks of 6 latents -> 2D decoder per frame.
Memory: `encode`/`decode` stream over latent chunks and frame micro-batches, so peak activation
memory depends on `chunk_latents`/`frame_batch`, not on the clip length.

Kernel slot: every GroupNorm followed by SiLU (the ResBlocks' two pre-conv pairs and the three
`norm_out` + SiLU before a `conv_out`) is one `GroupNormSiLU` module whose op is chosen once,
by `use_kernels` (the Triton `kernels/groupnorm_silu.py` where verified on the GPU, else its
plain-torch reference, which computes exactly what `F.silu(nn.GroupNorm(x))` did before).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mugv.core import vae as spec
from mugv.core.vae import VAEConfig
from mugv.kernels.groupnorm_silu import groupnorm_silu_reference

SPATIAL_NORM_EPS = 1e-6   # diffusers' AutoencoderKL GroupNorms
TEMPORAL_NORM_EPS = 1e-5  # nn.GroupNorm default, used by the temporal VAE (notes 3.4)
LOGVAR_CLAMP = (-30.0, 20.0)


# --------------------------------------------------------------------------------- kernel slot
class GroupNormSiLU(nn.GroupNorm):
    """SiLU(GroupNorm(x)) as one op (the slot of `kernels/groupnorm_silu.py`). Its parameters are
    nn.GroupNorm's (`weight`, `bias`), so canonical names and checkpoints are unchanged; `op` has
    the kernels' signature op(x, weight, bias, groups, eps) and is set by `use_kernels`."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps)
        self.op = groupnorm_silu_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.bias, self.num_groups, self.eps)


def use_kernels(model: nn.Module, device, choice: str | None = None, op=None) -> dict[str, str]:
    """Set the op of every `GroupNormSiLU` in `model`, once: the Triton kernel where
    `kernels/registry.py::select` enables it on `device` (verified there, or forced by `choice` =
    a KernelConfig's `kernel_choice` / MUGV_KERNELS), else the reference. `op` overrides the
    choice (tests run the kernel in Triton's CPU interpreter this way). Returns
    {"groupnorm_silu": "triton" | "reference", "why": ...} for the run's record."""
    from mugv.kernels import registry
    if op is None:
        on_gpu = getattr(device, "type", str(device).split(":")[0]) == "cuda"
        used, why = registry.kernel_status("groupnorm_silu", device, choice) if on_gpu else \
            (False, f"reference: {device} device (kernels run on CUDA only)")
        if used:
            from mugv.kernels.groupnorm_silu import groupnorm_silu as op
        else:
            op = groupnorm_silu_reference
    else:
        why = f"given: {getattr(op, '__name__', op)}"
    for m in model.modules():
        if isinstance(m, GroupNormSiLU):
            m.op = op
    return {"groupnorm_silu": "reference" if op is groupnorm_silu_reference else "triton", "why": why}


# ------------------------------------------------------------------------------------ 2D stage
class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, c_in, SPATIAL_NORM_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNormSiLU(groups, c_out, SPATIAL_NORM_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention2D(nn.Module):
    """Single-head self-attention over the h*w positions of one frame, with residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=SPATIAL_NORM_EPS)
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.norm(x).reshape(n, c, h * w).transpose(1, 2)              # (n, hw, c)
        # SDPA picks a memory-efficient kernel on the GPU (720p frames have 14,400 positions).
        a = F.scaled_dot_product_attention(self.q(t)[:, None], self.k(t)[:, None], self.v(t)[:, None])[:, 0]
        return x + self.out(a).transpose(1, 2).reshape(n, c, h, w)


class MidBlock2D(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attn = Attention2D(c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res[1](self.attn(self.res[0](x)))


class DownBlock2D(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock2D(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        # diffusers' Downsample2D(padding=0): pad one zero row/column at the bottom/right, stride 2
        self.downsample = nn.Conv2d(c_out, c_out, 3, stride=2) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.res:
            x = r(x)
        if self.downsample is not None:
            x = self.downsample(F.pad(x, (0, 1, 0, 1)))
        return x


class UpBlock2D(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock2D(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        self.upsample = nn.Conv2d(c_out, c_out, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.res:
            x = r(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class SpatialEncoder(nn.Module):
    """SDXL-VAE encoder up to and including its mid block (conv_norm_out/conv_out never run)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        sc, g = cfg.spatial_channels, cfg.spatial_norm_groups
        self.conv_in = nn.Conv2d(cfg.image_channels, sc[0], 3, padding=1)
        self.down = nn.ModuleList([
            DownBlock2D(sc[max(i - 1, 0)], c, cfg.spatial_layers_per_block, g, i < len(sc) - 1)
            for i, c in enumerate(sc)])
        self.mid = MidBlock2D(sc[-1], g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down:
            x = block(x)
        return self.mid(x)


class SpatialDecoder(nn.Module):
    """SDXL-VAE decoder from its mid block on (conv_in never runs)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g = cfg.spatial_channels[::-1], cfg.spatial_norm_groups
        self.mid = MidBlock2D(rev[0], g)
        self.up = nn.ModuleList([
            UpBlock2D(rev[max(i - 1, 0)], c, cfg.spatial_layers_per_block + 1, g, i < len(rev) - 1)
            for i, c in enumerate(rev)])
        self.norm_out = GroupNormSiLU(g, rev[-1], SPATIAL_NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(x)
        for block in self.up:
            x = block(x)
        return self.conv_out(self.norm_out(x))


class SpatialVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = SpatialEncoder(cfg)
        self.decoder = SpatialDecoder(cfg)


# ------------------------------------------------------------------------------ temporal stage
class TimeConv3d(nn.Conv3d):
    """The official `CausalConv3d`: zero padding of P = (k_t - 1) + (1 - s_t) frames in time split
    floor(P/2) in front and the rest behind (symmetric for k=3, s=1: NOT causal), k//2 in space
    (notes 3.3). The padding is explicit; the Conv3d itself pads nothing."""

    def __init__(self, c_in: int, c_out: int, kernel: int, time_stride: int = 1, bias: bool = True):
        super().__init__(c_in, c_out, kernel, stride=(time_stride, 1, 1), bias=bias)
        p = (kernel - 1) + (1 - time_stride)
        s = kernel // 2
        self._pad = (s, s, s, s, p // 2, p - p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._pad))


class ResBlock3D(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, c_in, TEMPORAL_NORM_EPS)
        self.conv1 = TimeConv3d(c_in, c_out, 3, bias=False)
        self.norm2 = GroupNormSiLU(groups, c_out, TEMPORAL_NORM_EPS)
        self.conv2 = TimeConv3d(c_out, c_out, 3, bias=False)
        self.shortcut = TimeConv3d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Level3D(nn.Module):
    """ResBlocks then an optional time resampling conv (`down`: stride 2; `up`: x2 channels for
    depth-to-space)."""

    def __init__(self, c_in: int, c_out: int, blocks: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.res = nn.ModuleList([ResBlock3D(c_in if j == 0 else c_out, c_out, groups) for j in range(blocks)])
        if down:
            self.down = TimeConv3d(c_out, c_out, 3, time_stride=2)
        if up:
            self.up = TimeConv3d(c_out, 2 * c_out, 3)


class ResStack3D(nn.Module):
    def __init__(self, c: int, blocks: int, groups: int):
        super().__init__()
        self.res = nn.ModuleList([ResBlock3D(c, c, groups) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.res:
            x = r(x)
        return x


def depth_to_space_time(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channel c*2 + s goes to frame 2*tau + s (notes 3.7)."""
    b, c2, t, h, w = x.shape
    return x.reshape(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, 2 * t, h, w)


class TemporalEncoder(nn.Module):
    """8 feature frames -> 1 frame of 2 x latent_channels moments (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        tc, g, n = spec.temporal_channels(cfg), cfg.temporal_norm_groups, cfg.temporal_res_blocks
        self.conv_in = TimeConv3d(cfg.spatial_channels[-1], tc[0], 3, bias=False)
        self.levels = nn.ModuleList([
            Level3D(tc[max(i - 1, 0)], c, n, g, down=i < len(tc) - 1) for i, c in enumerate(tc)])
        self.mid = ResStack3D(tc[-1], n, g)
        self.norm_out = GroupNormSiLU(g, tc[-1], TEMPORAL_NORM_EPS)
        self.conv_out = TimeConv3d(tc[-1], 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            for r in level.res:
                x = r(x)
            if hasattr(level, "down"):
                x = level.down(x)
        x = self.mid(x)
        return self.conv_out(self.norm_out(x))


class TemporalDecoder(nn.Module):
    """Latent frames -> 8x as many feature frames: nearest x2, then depth-to-space x2 twice."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        tc, g, n = spec.temporal_channels(cfg), cfg.temporal_norm_groups, cfg.temporal_res_blocks
        self.conv_in = TimeConv3d(cfg.latent_channels, tc[-1], 3)
        self.mid = ResStack3D(tc[-1], n, g)
        self.upsample = ResBlock3D(tc[-1], tc[-1], g)
        # levels are listed 0..3 (canonical indices) but run 3..0
        ins = {i: (tc[i + 1] if i + 1 < len(tc) else tc[-1]) for i in range(len(tc))}
        self.levels = nn.ModuleList([
            Level3D(ins[i], tc[i], n, g, up=i in spec.DEPTH_TO_SPACE_LEVELS) for i in range(len(tc))])
        self.norm_out = GroupNormSiLU(g, tc[0], TEMPORAL_NORM_EPS)
        self.conv_out = TimeConv3d(tc[0], cfg.spatial_channels[-1], 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        x = self.upsample(x.repeat_interleave(2, dim=2))   # nearest x2 in time, then a ResBlock
        for level in reversed(self.levels):
            for r in level.res:
                x = r(x)
            if hasattr(level, "up"):
                x = depth_to_space_time(level.up(x))
        return self.conv_out(self.norm_out(x))


class TemporalVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = TimeConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = TimeConv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = TemporalDecoder(cfg)


class _Stored(nn.Module):
    """Holds official tensors that never run (see core/vae.py SDXL_LATENT_CHANNELS) as buffers."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))


# ------------------------------------------------------------------------------------ the VAE
class VideoVAE(nn.Module):
    """The full VAE. `state_dict()` keys are exactly `vae_schema(cfg).names`.

    Public API (pixels in [-1, 1], layout (B, C, T, H, W)):
      posterior(video) -> (mean, logvar), raw moments (logvar clamped to [-30, 20]);
      encode(video, sample) -> normalised latent (z - latent_mean) / latent_std;
      decode(latent, num_frames) -> video, the exact inverse of both frame rules;
      forward(video) -> (recon, mean, logvar) for training (reparameterised sample).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial = SpatialVAE(cfg)
        self.temporal = TemporalVAE(cfg)
        lc, cf, sl = cfg.latent_channels, cfg.spatial_channels[-1], spec.SDXL_LATENT_CHANNELS
        self.register_buffer("latent_mean", torch.zeros(lc))
        self.register_buffer("latent_std", torch.ones(lc))
        self.logvar = nn.Parameter(torch.tensor(spec.OFFICIAL_LOGVAR_INIT))
        self.unused = nn.Module()
        self.unused.encoder_norm_out = _Stored(weight=(cf,), bias=(cf,))
        self.unused.encoder_conv_out = _Stored(weight=(2 * sl, cf, 3, 3), bias=(2 * sl,))
        self.unused.decoder_conv_in = _Stored(weight=(cf, sl, 3, 3), bias=(cf,))

    # -- stages (each usable alone; the parity tests compare them one by one) --
    def encode_spatial(self, frames: torch.Tensor, frame_batch: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, C, H/8, W/8) features x 0.18215, `frame_batch` frames at a time."""
        return _batched(lambda f: self.spatial.encoder(f) * self.cfg.spatial_scaling, frames, frame_batch)

    def decode_spatial(self, feats: torch.Tensor, frame_batch: int | None = None) -> torch.Tensor:
        """(N, C, h, w) features -> (N, 3, 8h, 8w) pixels (undoes the 0.18215 scaling first)."""
        return _batched(lambda f: self.spatial.decoder(f / self.cfg.spatial_scaling), feats, frame_batch)

    def encode_temporal(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, C, 8, h, w) independent groups of 8 feature frames -> mean, logvar (G, lc, 1, h, w)."""
        moments = self.temporal.quant_conv(self.temporal.encoder(groups))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_CLAMP)

    def decode_temporal(self, z: torch.Tensor) -> torch.Tensor:
        """(B, lc, t, h, w) un-normalised latents decoded jointly -> (B, C, 8t, h, w) features."""
        return self.temporal.decoder(self.temporal.post_quant_conv(z))

    # -- whole clips --
    def posterior(self, video: torch.Tensor, chunk_latents: int | None = spec.DECODE_CHUNK_LATENTS,
                  frame_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior moments (B, lc, T_l, h, w) of a (B, 3, T, H, W) video.

        Latent j depends only on the padded frames 8j..8j+7 (core/vae.py::padded_sources), so the
        clip is processed `chunk_latents` latents at a time (None: all at once), and within a chunk
        each stage call takes at most `frame_batch` source frames over all B clips (None:
        core/vae.py::frames_per_call, a pixel budget); the result depends on neither.
        """
        _check_video(video, self.cfg.image_channels)
        b, _, t, height, width = video.shape
        frame_batch = frame_batch or spec.frames_per_call(height, width)
        sources = spec.padded_sources(t)
        n_lat = len(sources) // spec.TEMPORAL_GROUP
        step = n_lat if chunk_latents is None else chunk_latents
        means, logvars = [], []
        for j0 in range(0, n_lat, step):
            srcs = sources[j0 * spec.TEMPORAL_GROUP:(j0 + step) * spec.TEMPORAL_GROUP]
            needed = sorted({s for s in srcs if s != spec.ZERO_FRAME})
            pix = video[:, :, needed].transpose(1, 2).flatten(0, 1)             # (B n, 3, H, W)
            feats = self.encode_spatial(pix, frame_batch).unflatten(0, (b, len(needed)))
            zero = feats.new_zeros(feats[:, 0].shape)
            where = {s: i for i, s in enumerate(needed)}
            seq = torch.stack([zero if s == spec.ZERO_FRAME else feats[:, where[s]] for s in srcs], dim=2)
            groups = seq.unflatten(2, (-1, spec.TEMPORAL_GROUP)).transpose(1, 2).flatten(0, 1)
            per_call = max(1, frame_batch // spec.TEMPORAL_GROUP)
            moments = [self.encode_temporal(groups[i:i + per_call]) for i in range(0, groups.shape[0], per_call)]
            mean = torch.cat([m for m, _ in moments])                                # (B g, lc, 1, h, w)
            logvar = torch.cat([v for _, v in moments])
            means.append(mean[:, :, 0].unflatten(0, (b, -1)).transpose(1, 2))
            logvars.append(logvar[:, :, 0].unflatten(0, (b, -1)).transpose(1, 2))
        return torch.cat(means, dim=2), torch.cat(logvars, dim=2)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean[:, None, None, None]) / self.latent_std[:, None, None, None]

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std[:, None, None, None] + self.latent_mean[:, None, None, None]

    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               **chunking) -> torch.Tensor:
        """Normalised latent. The official encode samples the posterior (sample=True); the mean
        (sample=False) is what the goldens hold."""
        mean, logvar = self.posterior(video, **chunking)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.normalize(z)

    def decode(self, latent: torch.Tensor, num_frames: int, frame_batch: int | None = None,
               normalized: bool = True) -> torch.Tensor:
        """(B, lc, T_l, h, w) latent -> (B, 3, num_frames, 8h, 8w) video.

        Latents are decoded in the official chunks of 6 (the temporal decoder mixes a chunk) and
        each chunk's frames are kept only where they reconstruct an input frame
        (core/vae.py::output_positions): both padding rules are inverted exactly, unlike the
        official generic decode for T mod 8 == 1 with several chunks.
        """
        err = spec.latent_shape_error(tuple(latent.shape), self.cfg.latent_channels, num_frames)
        if err:
            raise ValueError(err)
        z = self.denormalize(latent) if normalized else latent
        frame_batch = frame_batch or spec.frames_per_call(8 * z.shape[3], 8 * z.shape[4])
        positions = spec.output_positions(num_frames)
        out, done = None, 0
        for chunk in spec.decode_chunks(z.shape[2]):
            lo, hi = spec.TEMPORAL_GROUP * chunk.start, spec.TEMPORAL_GROUP * chunk.stop
            keep = [p - lo for p in positions if lo <= p < hi]
            if not keep:
                continue
            feats = self.decode_temporal(z[:, :, chunk.start:chunk.stop])[:, :, keep]
            b, n = feats.shape[0], feats.shape[2]
            pix = self.decode_spatial(feats.transpose(1, 2).flatten(0, 1), frame_batch)
            pix = pix.unflatten(0, (b, n)).transpose(1, 2)
            if out is None:
                # The clip is allocated once and filled chunk by chunk: concatenating a list of
                # chunks at the end held the decoded video twice, so the peak grew with its length.
                out = pix.new_empty(pix.shape[:2] + (num_frames,) + pix.shape[3:])
            out[:, :, done:done + n] = pix
            done += n
        return out

    def forward(self, video: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training step: (reconstruction, posterior mean, posterior logvar), reparameterised."""
        mean, logvar = self.posterior(video)
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator,
                                                             device=mean.device, dtype=mean.dtype)
        return self.decode(z, video.shape[2], normalized=False), mean, logvar


def _batched(fn, x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None or x.shape[0] <= batch:
        return fn(x)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)], dim=0)


def _check_video(video: torch.Tensor, channels: int) -> None:
    err = spec.video_shape_error(tuple(video.shape), channels)
    if err:
        raise ValueError(err)
    if not video.is_floating_point():
        raise ValueError(f"video dtype {video.dtype}: expected a floating-point tensor in [-1, 1]")


def init_vae(cfg: VAEConfig, seed: int = 0) -> VideoVAE:
    """A VideoVAE with every schema entry drawn by its `Init` rule from a seeded generator."""
    model = VideoVAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for p in spec.vae_schema(cfg):
            t = state[p.name]
            if p.init.kind == "zeros":
                t.zero_()
            elif p.init.kind == "ones":
                t.fill_(1.0)
            elif p.init.kind == "uniform":
                t.uniform_(-p.init.std, p.init.std, generator=gen)
            else:
                t.normal_(p.init.mean, p.init.std, generator=gen) if p.init.std > 0 else t.fill_(p.init.mean)
    return model


def num_params(model: nn.Module) -> int:
    return sum(math.prod(t.shape) for t in model.state_dict().values())
