"""Configs of `mugv curate`: raw videos -> shots -> scores and filters -> dedup -> a manifest.

Framework-free (no torch, no OpenCV): the stage code lives in `torch_backend/data/curation/`.
Defaults are MUG-V's (arXiv 2510.17519, as public summaries of its data pipeline report them) where
the paper gives a number: sharpness (Laplacian variance) in [200, 2000], aesthetic >= 4.5, motion
amplitude (optical flow over three frame pairs) in [1, 20]. Where it gives none (clip lengths,
resolution, aspect, dedup radius) the default is ours and the field's comment says so. The
paper's thresholds are for 720p footage; `embedded_curate_config` holds the measured ones for the
64 px generated sources.
"""
from __future__ import annotations

import dataclasses

from mugv.core import validate

EXECUTORS = ("local", "ray")
MOTION_METHODS = ("farneback", "raft")


@dataclasses.dataclass(frozen=True)
class ShotConfig:
    """Shot splitting (PySceneDetect's detectors, re-implemented on OpenCV-headless).

    content_threshold: cut when the mean |HSV difference| of consecutive frames exceeds it
      (PySceneDetect ContentDetector's default, 27, on 0-255 channels).
    adaptive_ratio / adaptive_min: a difference of at least `adaptive_min` (AdaptiveDetector's
      min_content_val, 15) that is `adaptive_ratio` (3.0) times its +-2 neighbours' mean is a cut
      too: fast motion raises both, a cut only the one.
    fade_threshold: frames whose mean luma is below it are "black" (ThresholdDetector, 12).
    dissolve_threshold: a gradual transition when frames `dissolve_window` apart differ by more
      than this while no single step is a cut.
    dissolve_window: frames each side of a dissolve's centre.
    colour_threshold: a gradual transition too when the hue distribution of the saturated pixels
      (S > 60, V > 40 of 255) of the frames `dissolve_window` before and after a frame differs by at
      least this total variation (0-1; 0 turns it off) while no cut, fade or dissolve is there: the
      colour-structure check that finds dissolves between look-alike shots (same background, another
      product), whose whole-frame change stays under `dissolve_threshold`. Motion within a shot
      moves coloured pixels but keeps their hue distribution.
    min_duration_s / max_duration_s: shorter shots are rejected; longer ones are split into
      pieces of at most max_duration_s (ours: the paper's summaries give no numbers).
    analysis_width: frames are shrunk to this width for detection (aspect kept).
    edge_trim_s: seconds dropped from a shot's side that touches a detected transition (not the
      source's own start and end), before the length limits: a gradual transition found a few
      frames off, or one whose faint tail is under the threshold, leaves blended frames of the
      other shot there. 0 keeps PySceneDetect's boundaries.
    """

    content_threshold: float = 27.0
    adaptive_ratio: float = 3.0
    adaptive_min: float = 15.0
    fade_threshold: float = 12.0
    dissolve_threshold: float = 20.0
    dissolve_window: int = 4
    colour_threshold: float = 0.4
    min_duration_s: float = 2.0
    max_duration_s: float = 10.0
    analysis_width: int = 128
    edge_trim_s: float = 0.0

    def __post_init__(self) -> None:
        validate.in_range(self, "edge_trim_s", 0.0, None)
        validate.in_range(self, "colour_threshold", 0.0, 1.0)
        for f in ("content_threshold", "adaptive_min", "fade_threshold", "dissolve_threshold"):
            validate.in_range(self, f, 0.0, 255.0, lo_open=True)
        validate.in_range(self, "adaptive_ratio", 1.0, None)
        validate.positive_int(self, "dissolve_window", "analysis_width")
        validate.in_range(self, "min_duration_s", 0.0, None, lo_open=True)
        validate.in_range(self, "max_duration_s", self.min_duration_s, None)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Per-clip scores and the ranges a kept clip must fall in (a range end of None = open).

    sharpness_min / sharpness_max: Laplacian variance of the grey key frames at the source
      resolution (paper: [200, 2000]; above 2000 is noise or text overlays).
    motion_min / motion_max: mean optical-flow magnitude in pixels at `motion_width` over
      `motion_pairs` consecutive-frame pairs (paper: [1, 20], RAFT over three pairs).
    motion_method: "farneback" (OpenCV) or "raft" (torchvision, needs raft_weights).
    motion_width: frames are resized to this width before flow (pixels of flow scale with it).
    aesthetic_min: LAION aesthetic score >= 4.5 (paper); needs aesthetic_weights, a local
      directory with clip/ (CLIPVisionModelWithProjection) and head.safetensors (the LAION MLP);
      without one the scorer is skipped and the reason recorded.
    min_short_side: the smaller frame side in pixels (ours).
    aspect_min / aspect_max: width / height (ours: 9:21 portrait to 21:9 cinema).
    black_max: largest fraction of sampled frames that may be black (mean luma < 16, std < 8).
    frozen_max: largest fraction of sampled consecutive pairs that may be identical (a frozen
      stream; mean |difference| < 0.1 grey levels).
    """

    sharpness_min: float | None = 200.0
    sharpness_max: float | None = 2000.0
    motion_min: float | None = 1.0
    motion_max: float | None = 20.0
    motion_method: str = "farneback"
    motion_pairs: int = 3
    motion_width: int = 1280
    raft_weights: str = ""
    aesthetic_min: float | None = 4.5
    aesthetic_weights: str = ""
    min_short_side: int = 256
    aspect_min: float = 9 / 21
    aspect_max: float = 21 / 9
    black_max: float = 0.5
    frozen_max: float = 0.5

    def __post_init__(self) -> None:
        for lo, hi in (("sharpness_min", "sharpness_max"), ("motion_min", "motion_max")):
            for f in (lo, hi):
                if getattr(self, f) is not None:
                    validate.in_range(self, f, 0.0, None)
            if None not in (getattr(self, lo), getattr(self, hi)) and getattr(self, hi) < getattr(self, lo):
                validate.fail(self, hi, f">= {lo} = {getattr(self, lo)}")
        if self.aesthetic_min is not None:
            validate.in_range(self, "aesthetic_min", 0.0, 10.0)
        validate.one_of(self, "motion_method", MOTION_METHODS)
        validate.positive_int(self, "motion_pairs", "motion_width", "min_short_side")
        validate.in_range(self, "aspect_min", 0.0, None, lo_open=True)
        validate.in_range(self, "aspect_max", self.aspect_min, None)
        validate.in_range(self, "black_max", 0.0, 1.0)
        validate.in_range(self, "frozen_max", 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate removal by perceptual hashes (64-bit DCT pHash) of `key_frames` frames.

    max_distance: two clips are near duplicates when their key frames' mean nearest Hamming
      distance is at most this many of 64 bits (ours: 8; see dedup.py for what was measured).
    max_chroma: and their 8x8 Cr/Cb layouts differ by at most this (largest cell difference,
      0-255; ours: 12. Generated sources, seed 100: copies 2.8-7.0, distinct shots whose pHash is
      within 10 bits 19.6-107).
    bands: 0 compares all pairs of clips (O(n^2)); k > 0 splits each 64-bit hash into k bands and
      compares only clips with a key frame sharing a band value (LSH). With k > max_distance the
      groups equal all pairs' (a pair within max_distance has a key-frame pair differing in at most
      max_distance bits, which leave a band untouched); fewer, wider bands are faster at scale and
      can miss pairs whose nearest key frames differ in >= k bits (dedup.band_miss_probability).
    """

    enabled: bool = True
    key_frames: int = 5
    max_distance: float = 8.0
    max_chroma: float = 12.0
    bands: int = 0

    def __post_init__(self) -> None:
        validate.positive_int(self, "key_frames")
        validate.non_negative_int(self, "bands")
        if self.bands > 64:
            validate.fail(self, "bands", "0 (all pairs) or 1-64 bands of the 64-bit hash")
        validate.in_range(self, "max_distance", 0.0, 64.0)
        validate.in_range(self, "max_chroma", 0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    """`mugv curate`: a folder of raw videos -> manifest.jsonl + curation.jsonl + report.

    input_dir: folder searched recursively for videos (mp4, mkv, webm, mov, avi).
    out_dir: where the outputs go; results.jsonl there makes a rerun resume.
    executor: "local" (in-process, the default: Ray's start-up costs more than small runs take)
      or "ray" (Ray Data, streaming; `ray_address` picks a cluster, "" = a local Ray).
    batch_size: sources per batch appended to results.jsonl (a SIGKILL loses at most the batches
      in flight).
    workers: parallel decode processes for the local executor (1 = in-process; >1 spawns, so a
      script calling `run` needs the `if __name__ == "__main__":` guard).
    reencode: write each kept clip as its own mp4 (PyAV, H.264); else clips are source + time range.
    contact_examples: clips shown per filter in the report's contact sheets.
    captioner_dir: a local transformers VLM directory (processor + image-text-to-text model) that
      captions kept clips without a caption file row; "" = such clips are rejected ("caption").
    """

    input_dir: str = ""
    out_dir: str = ""
    shots: ShotConfig = ShotConfig()
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    executor: str = "local"
    ray_address: str = ""
    batch_size: int = 4
    workers: int = 1
    reencode: bool = False
    contact_examples: int = 4
    captioner_dir: str = ""

    def __post_init__(self) -> None:
        validate.one_of(self, "executor", EXECUTORS)
        validate.positive_int(self, "batch_size", "workers")
        validate.non_negative_int(self, "contact_examples")
        for f in ("input_dir", "out_dir", "captioner_dir"):
            if not isinstance(getattr(self, f), str):
                validate.fail(self, f, "a path string")


def embedded_curate_config(input_dir: str, out_dir: str, **overrides) -> CurateConfig:
    """Thresholds for the generated 64 px sources (`product_sources.py`), measured there.

    Calibrated on seed 100 (docs/curation.md gives the score ranges); the reported precision and
    recall use seed 0. Why they differ from the paper's:
    - sharpness: a 64 px product shot has a few soft edges on a flat studio background, so even
      sharp shots measure 18-1800 (a dark green cube on charcoal is the low end) and blurred
      ones 2.6-10.7; the paper's 200 would reject most sharp shots. Min 12, no max (no noise or
      text overlays to catch).
    - motion is in pixels of a 64 px frame (motion_width 64): clean shots 0.007-0.45 (the low
      end: slow turns of small objects), static 0.001-0.006, shaken 1.2-3.3. Min 0.015, max 0.8.
    - adaptive_min 8: a cut that swaps only the object (about a tenth of the frame) on the same
      background changes the mean HSV by 10-12, under PySceneDetect's 15.
    - shots are 2.5-4 s at 16 fps: min 1 s, max 4 s; aesthetic off (no CLIP weights offline).
    - edge_trim_s 0.25: on seed 100, 31 of 200 kept clips began or ended inside a true dissolve
      (0.5 s long), by 0.06-0.25 s (1-4 frames), after the detector placed its window a few frames
      off (`python -P benchmarks/curate_demo_sources.py DIR` prints the depths, "edge_depth_s").
    """
    shots = ShotConfig(adaptive_min=8.0, min_duration_s=1.0, max_duration_s=4.0, analysis_width=64,
                       edge_trim_s=0.25)
    filters = FilterConfig(sharpness_min=12.0, sharpness_max=None, motion_min=0.015, motion_max=0.8,
                           motion_width=64, aesthetic_min=None, min_short_side=32)
    return CurateConfig(input_dir=input_dir, out_dir=out_dir, shots=shots, filters=filters,
                        **{"reencode": True, **overrides})
