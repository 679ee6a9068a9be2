"""Per-clip scores and the filters that judge them; every rejection keeps its reason.

A scorer is a name, a function of the clip's frames and a (min, max) range read from the
FilterConfig; `decide` compares each score with its range. A scorer that cannot run here (RAFT
without torchvision, the aesthetic predictor (`aesthetic.py`) without weights) leaves its score None and records why in
`skipped`, so a report never shows an unmeasured filter as passed silently.

Frames come from two decodes (media.py): `small` frames at the detection width for black/frozen
frames, and `grabbed` frames at the sizes the scorers asked for (`frames_wanted`).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from mugv.core.curation import FilterConfig
from mugv.torch_backend.data.curation.media import grey

SCORES = ("duration", "short_side", "aspect", "black", "frozen", "sharpness", "motion", "aesthetic")


@dataclasses.dataclass(frozen=True)
class ClipFrames:
    """What the scorers see of one clip: [start, end) frame indices in the source, its duration,
    native size, small frames (detection width) and the grabbed frames by source index."""

    start: int
    end: int
    duration: float
    height: int
    width: int
    small: np.ndarray
    grabbed: dict


def key_frame_indices(start: int, end: int, count: int) -> list[int]:
    """`count` frames spread over [start, end), away from the ends (transitions blur them)."""
    n = end - start
    return sorted({start + min(n - 1, int((k + 0.5) * n / count)) for k in range(count)})


def motion_pair_starts(start: int, end: int, pairs: int) -> list[int]:
    """First frames of `pairs` consecutive-frame pairs spread over [start, end)."""
    n = end - start
    if n < 2:
        return []
    return sorted({start + min(n - 2, int((k + 1) * (n - 1) / (pairs + 1))) for k in range(pairs)})


def frames_wanted(start: int, end: int, cfg: FilterConfig, key_frames: int = 3) -> dict[int, int | None]:
    """Source frame index -> width to decode at (None = native) for this clip's scorers."""
    wanted: dict[int, int | None] = {}
    for i in motion_pair_starts(start, end, cfg.motion_pairs):
        wanted[i] = wanted[i + 1] = cfg.motion_width
    for i in key_frame_indices(start, end, key_frames):
        wanted[i] = None   # native wins; a motion pair shrinks it to its partner's size
    return wanted


def sharpness(frames: list[np.ndarray]) -> float:
    """Mean Laplacian variance of the grey frames: the paper's sharpness measure (OpenCV's 3x3
    aperture on uint8 luma, variance of the float response)."""
    return float(np.mean([cv2.Laplacian(grey(f), cv2.CV_64F).var() for f in frames]))


def motion_farneback(pairs: list[tuple[np.ndarray, np.ndarray]], motion_width: int) -> float:
    """Mean optical-flow magnitude over the pairs, in pixels of a `motion_width`-wide frame.

    Flow runs at min(native, motion_width) and is rescaled, so sources narrower than
    `motion_width` are not enlarged (20x the work for nothing) yet share one threshold scale.
    Farneback parameters are OpenCV's tutorial ones (pyramid 0.5 x 3 levels, 15 px window).
    """
    mags = []
    for a, b in pairs:
        flow = cv2.calcOpticalFlowFarneback(grey(a), grey(b), None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mags.append(float(np.sqrt((flow ** 2).sum(-1)).mean()) * motion_width / a.shape[1])
    return float(np.mean(mags)) if mags else 0.0


def _same_size(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shrink the larger frame of a pair to the smaller one's size (a key frame is native)."""
    if a.shape == b.shape:
        return a, b
    small, large = (a, b) if a.shape[1] < b.shape[1] else (b, a)
    large = cv2.resize(large, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    return (small, large) if small is a else (large, small)


def raft_unavailable(cfg: FilterConfig) -> str | None:
    """Why RAFT cannot run here (None when it can)."""
    if not cfg.raft_weights:
        return "motion_method='raft' needs raft_weights (a local torchvision RAFT state dict)"
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # PyPI's torchvision fails to import beside the CPU torch 2.13 wheel
        return f"torchvision does not import here ({type(e).__name__}: {e})"
    return "RAFT through torchvision is not implemented yet (Farneback is)"


def black_fraction(small: np.ndarray) -> float:
    """Fraction of frames that are black: mean luma < 16 and luma std < 8 (flat and dark)."""
    g = small.astype(np.float32).mean(-1)
    return float(((g.mean(axis=(1, 2)) < 16) & (g.std(axis=(1, 2)) < 8)).mean())


def frozen_fraction(small: np.ndarray) -> float:
    """Fraction of consecutive pairs that are the same picture (mean |difference| < 0.1 grey
    levels: a repeated frame decodes identically; 0.5 caught slow turns of a small object on
    the 64 px generated sources, measured 0.1-0.4)."""
    if len(small) < 2:
        return 0.0
    diff = np.abs(np.diff(small.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    return float((diff < 0.1).mean())


def score(clip: ClipFrames, cfg: FilterConfig) -> tuple[dict[str, float | None], dict[str, str]]:
    """(scores by name, reason by name for each scorer that could not run)."""
    skipped: dict[str, str] = {}
    scores: dict[str, float | None] = {
        "duration": clip.duration,
        "short_side": float(min(clip.height, clip.width)),
        "aspect": clip.width / clip.height,
        "black": black_fraction(clip.small),
        "frozen": frozen_fraction(clip.small),
    }
    keys = [clip.grabbed[i] for i in key_frame_indices(clip.start, clip.end, 3) if i in clip.grabbed]
    scores["sharpness"] = sharpness(keys) if keys else None
    if cfg.motion_method == "raft":
        scores["motion"] = None
        skipped["motion"] = raft_unavailable(cfg) or ""
    else:
        pairs = [(clip.grabbed[i], clip.grabbed[i + 1]) for i in motion_pair_starts(clip.start, clip.end, cfg.motion_pairs)
                 if i in clip.grabbed and i + 1 in clip.grabbed]
        pairs = [_same_size(a, b) for a, b in pairs]
        scores["motion"] = motion_farneback(pairs, cfg.motion_width) if pairs else None
    scores["aesthetic"] = None
    if cfg.aesthetic_min is not None:
        if not cfg.aesthetic_weights:
            skipped["aesthetic"] = "no aesthetic_weights given (a local CLIP ViT-L/14 + LAION MLP head)"
        elif keys:
            from mugv.torch_backend.data.curation.aesthetic import aesthetic_score
            scores["aesthetic"] = aesthetic_score(keys, cfg.aesthetic_weights)
    return scores, skipped


def ranges(cfg: FilterConfig, min_duration_s: float) -> dict[str, tuple[float | None, float | None]]:
    """Each filter's kept range: the thresholds the report draws on the histograms."""
    return {
        "duration": (min_duration_s, None),
        "short_side": (float(cfg.min_short_side), None),
        "aspect": (cfg.aspect_min, cfg.aspect_max),
        "black": (None, cfg.black_max),
        "frozen": (None, cfg.frozen_max),
        "sharpness": (cfg.sharpness_min, cfg.sharpness_max),
        "motion": (cfg.motion_min, cfg.motion_max),
        "aesthetic": (cfg.aesthetic_min, None),
    }


def decide(scores: dict[str, float | None], cfg: FilterConfig, min_duration_s: float) -> list[dict]:
    """The failed filters, each {"filter", "value", "min", "max"}; empty = the clip passes.
    A score of None (scorer skipped) fails nothing: its skip reason is recorded instead."""
    failed = []
    for name, (lo, hi) in ranges(cfg, min_duration_s).items():
        v = scores.get(name)
        if v is None:
            continue
        # 1e-9: a clip of exactly min_duration_s frames must not fail by rounding of timestamps
        if (lo is not None and v < lo - 1e-9) or (hi is not None and v > hi + 1e-9):
            failed.append({"filter": name, "value": round(float(v), 4), "min": lo, "max": hi})
    return failed
