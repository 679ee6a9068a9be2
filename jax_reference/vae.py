"""MUG-V's two-stage video VAE in equinox: the numerical oracle for `torch_backend/models/vae.py`.

Same structure and names: a module's attribute path is its canonical parameter name
(`core/vae.py::vae_schema`), so `from_params` loads a canonical dict and `to_params` flattens a
model (or its gradient) back to one. Layouts are torch's (NCHW / NCDHW activations, OIHW /
OIDHW kernels), so no checkpoint transform is needed. fp32-first, no chunking beyond what the
model defines (the decoder's 6-latent chunks). Facts: mugv-forward-notes.md section 3.
"""
from __future__ import annotations

from typing import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mugv.core import vae as spec
from mugv.core.vae import VAEConfig

SPATIAL_NORM_EPS = 1e-6   # diffusers' AutoencoderKL GroupNorms
TEMPORAL_NORM_EPS = 1e-5  # nn.GroupNorm default in the temporal VAE
LOGVAR_CLAMP = (-30.0, 20.0)
_HI = jax.lax.Precision.HIGHEST


def _take(params: Mapping[str, Array], name: str) -> Array:
    if name not in params:
        raise KeyError(f"parameter {name!r} missing from the VAE parameters")
    return jnp.asarray(params[name], dtype=jnp.float32)


class Conv(eqx.Module):
    """N-d convolution (2D or 3D) with explicit per-axis (front, back) zero padding."""

    weight: Array
    bias: Array | None
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: tuple[tuple[int, int], ...] = eqx.field(static=True)

    @classmethod
    def load(cls, params, name: str, bias: bool = True, stride=None, padding=None) -> "Conv":
        w = _take(params, f"{name}.weight")
        nd = w.ndim - 2
        k = w.shape[2:]
        pad = padding if padding is not None else tuple((n // 2, n // 2) for n in k)
        return cls(w, _take(params, f"{name}.bias") if bias else None, tuple(stride or (1,) * nd), tuple(pad))

    def __call__(self, x: Array) -> Array:
        nd = self.weight.ndim - 2
        dn = ("NCHW", "OIHW", "NCHW") if nd == 2 else ("NCDHW", "OIDHW", "NCDHW")
        y = jax.lax.conv_general_dilated(x, self.weight, self.stride, self.padding, dimension_numbers=dn,
                                         precision=_HI)
        if self.bias is not None:
            y = y + self.bias.reshape((1, -1) + (1,) * nd)
        return y


def time_conv(params, name: str, kernel_bias: bool = True, time_stride: int = 1) -> Conv:
    """The official CausalConv3d padding: time P = (k-1) + (1-s), floor(P/2) in front (notes 3.3)."""
    k = _take(params, f"{name}.weight").shape[2]
    p = (k - 1) + (1 - time_stride)
    s = k // 2
    return Conv.load(params, name, bias=kernel_bias, stride=(time_stride, 1, 1),
                     padding=((p // 2, p - p // 2), (s, s), (s, s)))


class GroupNorm(eqx.Module):
    weight: Array
    bias: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    @classmethod
    def load(cls, params, name: str, groups: int, eps: float) -> "GroupNorm":
        return cls(_take(params, f"{name}.weight"), _take(params, f"{name}.bias"), groups, eps)

    def __call__(self, x: Array) -> Array:
        n, c = x.shape[:2]
        g = x.reshape(n, self.groups, -1)
        mean = g.mean(axis=-1, keepdims=True)
        var = jnp.square(g - mean).mean(axis=-1, keepdims=True)        # biased, as torch
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.ndim - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


class Linear(eqx.Module):
    weight: Array
    bias: Array

    @classmethod
    def load(cls, params, name: str) -> "Linear":
        return cls(_take(params, f"{name}.weight"), _take(params, f"{name}.bias"))

    def __call__(self, x: Array) -> Array:
        return jnp.einsum("...i,oi->...o", x, self.weight, precision=_HI) + self.bias


# ------------------------------------------------------------------------------------ 2D stage
class ResnetBlock2D(eqx.Module):
    norm1: GroupNorm
    conv1: Conv
    norm2: GroupNorm
    conv2: Conv
    shortcut: Conv | None

    @classmethod
    def load(cls, params, name: str, groups: int) -> "ResnetBlock2D":
        gn = lambda n: GroupNorm.load(params, f"{name}.{n}", groups, SPATIAL_NORM_EPS)  # noqa: E731
        sc = Conv.load(params, f"{name}.shortcut") if f"{name}.shortcut.weight" in params else None
        return cls(gn("norm1"), Conv.load(params, f"{name}.conv1"), gn("norm2"), Conv.load(params, f"{name}.conv2"), sc)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention2D(eqx.Module):
    norm: GroupNorm
    q: Linear
    k: Linear
    v: Linear
    out: Linear

    @classmethod
    def load(cls, params, name: str, groups: int) -> "Attention2D":
        return cls(GroupNorm.load(params, f"{name}.norm", groups, SPATIAL_NORM_EPS),
                   *(Linear.load(params, f"{name}.{p}") for p in ("q", "k", "v", "out")))

    def __call__(self, x: Array) -> Array:
        n, c, h, w = x.shape
        t = self.norm(x).reshape(n, c, h * w).transpose(0, 2, 1)
        q, k, v = self.q(t), self.k(t), self.v(t)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, precision=_HI) / jnp.sqrt(jnp.float32(c))
        a = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(scores, axis=-1), v, precision=_HI)
        return x + self.out(a).transpose(0, 2, 1).reshape(n, c, h, w)


class MidBlock2D(eqx.Module):
    res: list
    attn: Attention2D

    @classmethod
    def load(cls, params, name: str, groups: int) -> "MidBlock2D":
        return cls([ResnetBlock2D.load(params, f"{name}.res.{j}", groups) for j in range(2)],
                   Attention2D.load(params, f"{name}.attn", groups))

    def __call__(self, x: Array) -> Array:
        return self.res[1](self.attn(self.res[0](x)))


class Block2D(eqx.Module):
    """A down block (resnets, then pad bottom/right + stride-2 conv) or an up block (resnets,
    then nearest x2 + conv)."""

    res: list
    downsample: Conv | None = None
    upsample: Conv | None = None

    def __call__(self, x: Array) -> Array:
        for r in self.res:
            x = r(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
        return x


class SpatialEncoder(eqx.Module):
    conv_in: Conv
    down: list
    mid: MidBlock2D

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down:
            x = block(x)
        return self.mid(x)


class SpatialDecoder(eqx.Module):
    mid: MidBlock2D
    up: list
    norm_out: GroupNorm
    conv_out: Conv

    def __call__(self, x: Array) -> Array:
        x = self.mid(x)
        for block in self.up:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class SpatialVAE(eqx.Module):
    encoder: SpatialEncoder
    decoder: SpatialDecoder

    @classmethod
    def load(cls, params, cfg: VAEConfig) -> "SpatialVAE":
        g, nl, n = cfg.spatial_norm_groups, cfg.spatial_layers_per_block, len(cfg.spatial_channels)
        res = lambda name, k: [ResnetBlock2D.load(params, f"{name}.res.{j}", g) for j in range(k)]  # noqa: E731
        down = [Block2D(res(f"spatial.encoder.down.{i}", nl),
                        downsample=Conv.load(params, f"spatial.encoder.down.{i}.downsample", stride=(2, 2),
                                             padding=((0, 1), (0, 1))) if i < n - 1 else None)
                for i in range(n)]
        up = [Block2D(res(f"spatial.decoder.up.{i}", nl + 1),
                      upsample=Conv.load(params, f"spatial.decoder.up.{i}.upsample") if i < n - 1 else None)
              for i in range(n)]
        enc = SpatialEncoder(Conv.load(params, "spatial.encoder.conv_in"), down,
                             MidBlock2D.load(params, "spatial.encoder.mid", g))
        dec = SpatialDecoder(MidBlock2D.load(params, "spatial.decoder.mid", g), up,
                             GroupNorm.load(params, "spatial.decoder.norm_out", g, SPATIAL_NORM_EPS),
                             Conv.load(params, "spatial.decoder.conv_out"))
        return cls(enc, dec)


# ------------------------------------------------------------------------------ temporal stage
class ResBlock3D(eqx.Module):
    norm1: GroupNorm
    conv1: Conv
    norm2: GroupNorm
    conv2: Conv
    shortcut: Conv | None

    @classmethod
    def load(cls, params, name: str, groups: int) -> "ResBlock3D":
        gn = lambda n: GroupNorm.load(params, f"{name}.{n}", groups, TEMPORAL_NORM_EPS)  # noqa: E731
        sc = time_conv(params, f"{name}.shortcut", False) if f"{name}.shortcut.weight" in params else None
        return cls(gn("norm1"), time_conv(params, f"{name}.conv1", False), gn("norm2"),
                   time_conv(params, f"{name}.conv2", False), sc)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Level3D(eqx.Module):
    res: list
    down: Conv | None = None
    up: Conv | None = None


class ResStack3D(eqx.Module):
    res: list

    def __call__(self, x: Array) -> Array:
        for r in self.res:
            x = r(x)
        return x


def depth_to_space_time(x: Array) -> Array:
    """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channel c*2 + s goes to frame 2*tau + s (notes 3.7)."""
    b, c2, t, h, w = x.shape
    return x.reshape(b, c2 // 2, 2, t, h, w).transpose(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)


class TemporalEncoder(eqx.Module):
    conv_in: Conv
    levels: list
    mid: ResStack3D
    norm_out: GroupNorm
    conv_out: Conv

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for level in self.levels:
            for r in level.res:
                x = r(x)
            if level.down is not None:
                x = level.down(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class TemporalDecoder(eqx.Module):
    conv_in: Conv
    mid: ResStack3D
    upsample: ResBlock3D
    levels: list
    norm_out: GroupNorm
    conv_out: Conv

    def __call__(self, z: Array) -> Array:
        x = self.mid(self.conv_in(z))
        x = self.upsample(jnp.repeat(x, 2, axis=2))      # nearest x2 in time, then a ResBlock
        for level in reversed(self.levels):
            for r in level.res:
                x = r(x)
            if level.up is not None:
                x = depth_to_space_time(level.up(x))
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class TemporalVAE(eqx.Module):
    encoder: TemporalEncoder
    quant_conv: Conv
    post_quant_conv: Conv
    decoder: TemporalDecoder

    @classmethod
    def load(cls, params, cfg: VAEConfig) -> "TemporalVAE":
        g, nr, n = cfg.temporal_norm_groups, cfg.temporal_res_blocks, len(cfg.temporal_channel_mult)
        res = lambda name: [ResBlock3D.load(params, f"{name}.res.{j}", g) for j in range(nr)]  # noqa: E731
        gn = lambda name: GroupNorm.load(params, name, g, TEMPORAL_NORM_EPS)  # noqa: E731
        enc = TemporalEncoder(
            time_conv(params, "temporal.encoder.conv_in", False),
            [Level3D(res(f"temporal.encoder.levels.{i}"),
                     down=time_conv(params, f"temporal.encoder.levels.{i}.down", time_stride=2) if i < n - 1 else None)
             for i in range(n)],
            ResStack3D(res("temporal.encoder.mid")), gn("temporal.encoder.norm_out"),
            time_conv(params, "temporal.encoder.conv_out"))
        dec = TemporalDecoder(
            time_conv(params, "temporal.decoder.conv_in"), ResStack3D(res("temporal.decoder.mid")),
            ResBlock3D.load(params, "temporal.decoder.upsample", g),
            [Level3D(res(f"temporal.decoder.levels.{i}"),
                     up=time_conv(params, f"temporal.decoder.levels.{i}.up") if i in spec.DEPTH_TO_SPACE_LEVELS else None)
             for i in range(n)],
            gn("temporal.decoder.norm_out"), time_conv(params, "temporal.decoder.conv_out"))
        return cls(enc, time_conv(params, "temporal.quant_conv"), time_conv(params, "temporal.post_quant_conv"), dec)


# ------------------------------------------------------------------------------------ the VAE
class VideoVAE(eqx.Module):
    """The oracle VAE; see torch_backend/models/vae.py for the same API in production."""

    spatial: SpatialVAE
    temporal: TemporalVAE
    latent_mean: Array
    latent_std: Array
    logvar: Array
    unused: dict
    cfg: VAEConfig = eqx.field(static=True)

    @classmethod
    def from_params(cls, params: Mapping[str, Array], cfg: VAEConfig) -> "VideoVAE":
        """Build from a canonical {name: array} dict holding exactly `vae_schema(cfg)`."""
        names = set(spec.vae_schema(cfg).names)
        extra = sorted(set(params) - names)
        if extra:
            raise KeyError(f"parameters not in the VAE schema: {extra[:8]}")
        unused = {n[len("unused."):]: _take(params, n) for n in sorted(names) if n.startswith("unused.")}
        return cls(SpatialVAE.load(params, cfg), TemporalVAE.load(params, cfg), _take(params, "latent_mean"),
                   _take(params, "latent_std"), _take(params, "logvar"), unused, cfg)

    # -- stages --
    def encode_spatial(self, frames: Float[Array, "n c h w"]) -> Float[Array, "n f h8 w8"]:
        return self.spatial.encoder(frames) * self.cfg.spatial_scaling

    def decode_spatial(self, feats: Float[Array, "n f h w"]) -> Float[Array, "n c h8 w8"]:
        return self.spatial.decoder(feats / self.cfg.spatial_scaling)

    def encode_temporal(self, groups: Float[Array, "g f 8 h w"]) -> tuple[Array, Array]:
        moments = self.temporal.quant_conv(self.temporal.encoder(groups))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_CLAMP)

    def decode_temporal(self, z: Float[Array, "b l t h w"]) -> Float[Array, "b f t8 h w"]:
        return self.temporal.decoder(self.temporal.post_quant_conv(z))

    # -- whole clips --
    def posterior(self, video: Float[Array, "b c t h w"]) -> tuple[Array, Array]:
        """Raw posterior moments (B, lc, T_l, h, w): padded sequence P built by
        `core.vae.padded_sources`, each group of 8 encoded alone."""
        err = spec.video_shape_error(video.shape, self.cfg.image_channels)
        if err:
            raise ValueError(err)
        b, _, t, _, _ = video.shape
        feats = self.encode_spatial(video.transpose(0, 2, 1, 3, 4).reshape(b * t, *video.shape[1:2], *video.shape[3:]))
        feats = feats.reshape(b, t, *feats.shape[1:])                                   # (B, T, F, h, w)
        src = np.asarray(spec.padded_sources(t))
        seq = jnp.where((src >= 0)[None, :, None, None, None], feats[:, np.maximum(src, 0)], 0.0)
        g = len(src) // spec.TEMPORAL_GROUP
        groups = seq.reshape(b, g, spec.TEMPORAL_GROUP, *seq.shape[2:]).transpose(0, 1, 3, 2, 4, 5)
        mean, logvar = self.encode_temporal(groups.reshape(b * g, *groups.shape[2:]))
        unflat = lambda m: m[:, :, 0].reshape(b, g, *m.shape[1:2], *m.shape[3:]).transpose(0, 2, 1, 3, 4)  # noqa: E731
        return unflat(mean), unflat(logvar)

    def normalize(self, z: Array) -> Array:
        return (z - self.latent_mean[:, None, None, None]) / self.latent_std[:, None, None, None]

    def denormalize(self, z: Array) -> Array:
        return z * self.latent_std[:, None, None, None] + self.latent_mean[:, None, None, None]

    def decode(self, latent: Float[Array, "b l tl h w"], num_frames: int, normalized: bool = True) -> Array:
        """Inverse of both frame rules: decode 6-latent chunks, keep `core.vae.output_positions`."""
        err = spec.latent_shape_error(latent.shape, self.cfg.latent_channels, num_frames)
        if err:
            raise ValueError(err)
        z = self.denormalize(latent) if normalized else latent
        feats = jnp.concatenate([self.decode_temporal(z[:, :, c.start:c.stop])
                                 for c in spec.decode_chunks(z.shape[2])], axis=2)
        feats = feats[:, :, np.asarray(spec.output_positions(num_frames))]
        b, f, t, h, w = feats.shape
        pix = self.decode_spatial(feats.transpose(0, 2, 1, 3, 4).reshape(b * t, f, h, w))
        return pix.reshape(b, t, *pix.shape[1:]).transpose(0, 2, 1, 3, 4)

    def __call__(self, video: Array, noise: Array | None = None) -> tuple[Array, Array, Array]:
        """(reconstruction, mean, logvar); `noise` (same shape as mean) reparameterises the sample."""
        mean, logvar = self.posterior(video)
        z = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise
        return self.decode(z, video.shape[2], normalized=False), mean, logvar


def to_params(tree) -> dict[str, np.ndarray]:
    """Flatten a VideoVAE (or a gradient of one) back to canonical {name: array}."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for k in path:
            if isinstance(k, jax.tree_util.GetAttrKey):
                parts.append(k.name)
            elif isinstance(k, jax.tree_util.SequenceKey):
                parts.append(str(k.idx))
            elif isinstance(k, jax.tree_util.DictKey):
                parts.append(str(k.key))
            else:
                raise TypeError(f"unexpected path element {k!r}")
        out[".".join(parts)] = np.asarray(leaf)
    return out
