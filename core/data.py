"""Data specs: buckets, task mixes, and the bucket arithmetic.

A bucket is one homogeneous batch shape (height, width, frames at a frame rate). Its batch size
is chosen so that every step carries about the same number of DiT tokens (`plan_buckets`), using
the VAE's 8x8x8 compression (`core/vae.py::latent_shape`) and the DiT patching
(`core/dit.py::video_tokens`). A video goes to the nearest bucket it can fill (`assign_bucket`):
the bucket whose aspect ratio is closest to the video's, then the largest such bucket whose size
and length the video covers without upscaling or looping.

The curriculum that runs (stages, their steps and learning rates) is `core/recipe.py`. Everything
here is data: no torch, no jax.
"""
from __future__ import annotations

import dataclasses
import math

from mugv.core import validate as v
from mugv.core.dit import DiTConfig, video_tokens
from mugv.core.vae import SPATIAL_FACTOR, latent_shape

# Aspect ratios the anchor serves (`mug_v/utils.py` sizes, notes 2.11), as width:height.
ASPECT_RATIOS: dict[str, float] = {"16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}
TASKS = ("t2i", "t2v", "i2v")
# Height and width are multiples of 16: the VAE divides by 8 and the DiT patch by 2 more.
SIZE_MULTIPLE = SPATIAL_FACTOR * 2


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """One batch shape. `frames` = 1 is an image bucket; `fps` is the rate frames are sampled at."""

    height: int
    width: int
    frames: int
    batch_size: int = 1
    fps: float = 24.0

    def __post_init__(self) -> None:
        v.positive_int(self, "height", "width", "frames", "batch_size")
        for name in ("height", "width"):
            if getattr(self, name) % SIZE_MULTIPLE:
                v.fail(self, name, f"a multiple of {SIZE_MULTIPLE} (VAE 8 x DiT patch 2)")
        v.in_range(self, "fps", 0, 240, lo_open=True)

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}@{self.fps:g}"

    def tokens(self, dit: DiTConfig) -> int:
        """DiT video tokens of one sample of this bucket."""
        return video_tokens(dit, latent_shape(self.frames, self.height, self.width))


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """Probabilities of text-to-image, text-to-video and image-to-video samples; they sum to 1."""

    t2i: float = 0.0
    t2v: float = 1.0
    i2v: float = 0.0

    def __post_init__(self) -> None:
        for name in TASKS:
            v.in_range(self, name, 0, 1)
        if abs(self.t2i + self.t2v + self.i2v - 1) > 1e-6:
            v.fail(self, "i2v", f"t2i + t2v + i2v = 1 (got {self.t2i + self.t2v + self.i2v:g})")


def aspect_size(base: int, aspect: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) with about base**2 pixels at width/height = `aspect`, rounded to `multiple`.

    `base` = 256 gives 1:1 -> 256x256, 16:9 -> 192x336, 9:16 -> 336x192.
    """
    if base <= 0 or base % multiple:
        raise ValueError(f"base = {base}: expected a positive multiple of {multiple}")
    if not aspect > 0:
        raise ValueError(f"aspect = {aspect}: expected width/height > 0")
    h = max(multiple, round(base / math.sqrt(aspect) / multiple) * multiple)
    w = max(multiple, round(base * math.sqrt(aspect) / multiple) * multiple)
    return h, w


def batch_size_for(tokens_per_sample: int, target_tokens: int, multiple: int = 1) -> int:
    """The multiple of `multiple` (>= `multiple`) whose tokens per step are nearest `target_tokens`.

    `multiple` is the data-parallel size (or a number it divides): every rank then gets the same
    number of samples from every bucket.
    """
    if tokens_per_sample <= 0 or target_tokens <= 0 or multiple <= 0:
        raise ValueError(f"tokens_per_sample={tokens_per_sample}, target_tokens={target_tokens}, "
                         f"multiple={multiple}: expected positive integers")
    k = target_tokens / (tokens_per_sample * multiple)
    lo = max(1, math.floor(k))
    best = min((lo, lo + 1), key=lambda n: abs(n * multiple * tokens_per_sample - target_tokens))
    return best * multiple


def plan_buckets(dit: DiTConfig, base_sizes: tuple[int, ...], frame_counts: tuple[int, ...],
                 target_tokens: int, aspects: tuple[str, ...] = tuple(ASPECT_RATIOS),
                 fps: float = 24.0, batch_multiple: int = 1) -> tuple[BucketSpec, ...]:
    """Every (base size, aspect, frame count) bucket with its token-balanced batch size."""
    unknown = [a for a in aspects if a not in ASPECT_RATIOS]
    if unknown:
        raise ValueError(f"aspects {unknown}: expected names from {sorted(ASPECT_RATIOS)}")
    out = []
    for base in base_sizes:
        for name in aspects:
            h, w = aspect_size(base, ASPECT_RATIOS[name])
            for f in frame_counts:
                shape = BucketSpec(h, w, f, 1, fps)
                bs = batch_size_for(shape.tokens(dit), target_tokens, batch_multiple)
                out.append(dataclasses.replace(shape, batch_size=bs))
    return tuple(out)


def frames_available(num_source_frames: int, source_fps: float, target_fps: float) -> int:
    """How many frames at `target_fps` a clip of `num_source_frames` at `source_fps` can give.

    Output frame k shows source frame floor(k * source_fps / target_fps) (the decode rule), so the
    count is the number of k with k * source_fps / target_fps < num_source_frames. Upsampling
    (8 -> 16 fps) shows each frame twice: 49 frames give 98.
    """
    if num_source_frames <= 0:
        return 0
    if not (source_fps > 0 and target_fps > 0):
        raise ValueError(f"source_fps={source_fps}, target_fps={target_fps}: expected > 0")
    if num_source_frames == 1:
        return 1
    # the same 1e-9 slack as the decoder's floor keeps exact ratios (30 -> 15 fps) exact
    return math.ceil((num_source_frames - 1e-9) * target_fps / source_fps)


def centre_window_start(num_source_frames: int, num_frames: int, source_fps: float, target_fps: float) -> int:
    """First source frame of the middle `num_frames` output frames at `target_fps` of a clip of
    `num_source_frames` at `source_fps` (the decode rule: output frame k shows source frame
    start + floor(k * source_fps / target_fps)). A clip longer than its bucket gives its middle,
    as the spatial crop gives the middle of the frame: a shot's first and last frames are the
    ones nearest its transitions. 0 when the clip is no longer than it must be, for an image
    bucket (one frame: a video's first, which is also what an i2v reference shows), and when the
    length is unknown (0)."""
    if num_source_frames <= 0 or num_frames <= 1:
        return 0
    span = math.floor((num_frames - 1) * source_fps / target_fps + 1e-9) + 1
    return max(0, (num_source_frames - span) // 2)


def assign_bucket(buckets: tuple[BucketSpec, ...], height: int, width: int, num_frames: int,
                  source_fps: float) -> tuple[int | None, str]:
    """Index of the nearest bucket a (height, width, num_frames @ source_fps) clip can fill.

    Nearest aspect ratio first (in log space, so 16:9 and 9:16 are equally far from 1:1), among
    those the buckets the clip covers in height, width (after a cover resize: the short side of
    the crop must not need upscaling) and length at the bucket's fps; of those, the one with the
    most pixels x frames. Images (num_frames == 1) go only to image buckets and videos only to
    video buckets. Returns (index, "") or (None, reason).
    """
    is_image = num_frames == 1
    pool = [i for i, b in enumerate(buckets) if (b.frames == 1) == is_image]
    if not pool:
        return None, f"no {'image' if is_image else 'video'} bucket in this stage"
    aspect = width / height
    dist = {i: abs(math.log(buckets[i].aspect / aspect)) for i in pool}
    best_aspect = min(dist.values())
    pool = [i for i in pool if dist[i] <= best_aspect + 1e-9]
    # cover resize: scale so the bucket fits inside, then the crop; no upscaling allowed
    fits = [i for i in pool if max(buckets[i].height / height, buckets[i].width / width) <= 1 + 1e-9]
    if not fits:
        smallest = min(pool, key=lambda i: buckets[i].height * buckets[i].width)
        return None, (f"too small: {width}x{height} cannot fill {buckets[smallest].width}x"
                      f"{buckets[smallest].height} without upscaling")
    long_enough = [i for i in fits
                   if frames_available(num_frames, source_fps, buckets[i].fps) >= buckets[i].frames]
    if not long_enough:
        shortest = min(fits, key=lambda i: buckets[i].frames)
        have = frames_available(num_frames, source_fps, buckets[shortest].fps)
        return None, (f"too short: {num_frames} frames at {source_fps:g} fps give {have} at "
                      f"{buckets[shortest].fps:g} fps, bucket needs {buckets[shortest].frames}")
    return max(long_enough, key=lambda i: (buckets[i].height * buckets[i].width * buckets[i].frames,
                                           -i)), ""


# ---------------------------------------------------------------------------------------------
# A default curriculum for the tiny CPU demo (64 px product clips), as data.
