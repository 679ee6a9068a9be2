"""Video VAE (8x8x8): config and frame/shape arithmetic.

Facts from ../shared/reference/mugv-forward-notes.md section 3.
"""
from __future__ import annotations

import dataclasses

from mugv.core import validate as v

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
