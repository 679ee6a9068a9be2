"""Shot boundaries: hard cuts, fades through black and cross-dissolves, then clips from shots.

PySceneDetect's detectors, re-implemented on OpenCV-headless (its wheel requires the GUI
opencv-python, a second `cv2` that needs libGL; see docs/curation.md):

- ContentDetector: the mean |difference| of consecutive frames in HSV (H, S, V averaged, 0-255
  scale) >= `content_threshold` (27) is a cut.
- AdaptiveDetector: a difference >= `adaptive_ratio` (3) times the mean of its +-2 neighbours
  and >= `adaptive_min` (15) is a cut. It catches cuts between similar-looking shots that stay under 27, and
  leaves fast motion alone (the neighbours are high too).
- ThresholdDetector: a run of frames darker than `fade_threshold` (mean luma) is a fade; the
  transition extends while the luma keeps falling into and rising out of the run.
- Dissolves (MUG-V pairs its detector with a colour-structure classifier for gradual
  transitions; this is our version of that idea): frames `w` apart differ by >=
  `dissolve_threshold` and the middle frame is close to the average of the two ends (a
  cross-fade is exactly that average; a hard cut's middle frame equals one end, half the span
  away; a pan's middle frame is shifted, not blended). A "cut" inside a dissolve (one blended
  step can jump in hue, which is unstable at low saturation) merges into the dissolve.
- Colour structure (MUG-V's classifier for gradual transitions works on colour structure): where the
  hue distribution of the saturated pixels changes by >= `colour_threshold` across the same window
  and nothing above fired, a dissolve too. It finds the dissolves between look-alike shots (same
  background, another product) whose whole-frame change is small; motion keeps the distribution.

Clips are the frames between transitions, timed by presentation timestamps; shots shorter than
`min_duration_s` stay as rejected clips (so the report counts them); longer ones are cut into
equal pieces of at most `max_duration_s`.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from mugv.core.curation import ShotConfig

_ADAPTIVE_WINDOW = 2   # neighbours each side


@dataclasses.dataclass(frozen=True)
class Transition:
    """Frames [start, end) belong to no shot; a cut has start == end (the new shot's first frame)."""

    kind: str
    start: int
    end: int
    score: float


def hsv_differences(frames: np.ndarray) -> np.ndarray:
    """(T,) mean |HSV difference| of each frame to the previous one (0 for the first)."""
    hsv = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV) for f in frames]).astype(np.float32)
    diff = np.abs(np.diff(hsv, axis=0)).mean(axis=(1, 2))   # (T-1, 3) per-channel means
    return np.concatenate([[0.0], diff.mean(axis=1)])


def detect(frames: np.ndarray, cfg: ShotConfig) -> list[Transition]:
    """Transitions of a (T, h, w, 3) uint8 clip, in time order, not overlapping."""
    t = len(frames)
    if t < 2:
        return []
    d = hsv_differences(frames)
    found: list[Transition] = []
    # cuts: ContentDetector or AdaptiveDetector
    for i in range(1, t):
        nb = [d[j] for j in range(max(1, i - _ADAPTIVE_WINDOW), min(t, i + _ADAPTIVE_WINDOW + 1)) if j != i]
        ratio = d[i] / (np.mean(nb) + 1e-6) if nb else 0.0
        if d[i] >= cfg.content_threshold or (d[i] >= cfg.adaptive_min and ratio >= cfg.adaptive_ratio):
            found.append(Transition("cut", i, i, float(d[i])))
    # fades through black
    luma = frames.astype(np.float32).mean(axis=(1, 2, 3))
    dark = luma < cfg.fade_threshold
    i = 0
    while i < t:
        if dark[i]:
            j = i
            while j + 1 < t and dark[j + 1]:
                j += 1
            a, b = i, j + 1
            while a > 0 and luma[a - 1] > luma[a] + 1.0:
                a -= 1
            while b < t and luma[b] > luma[b - 1] + 1.0:
                b += 1
            if a > 0 and b < t:   # dark at the very start or end is not a transition
                found.append(Transition("fade", a, b, float(cfg.fade_threshold - luma[i:j + 1].min())))
            i = j + 1
        else:
            i += 1
    found.extend(_dissolves(frames, d, cfg, found))
    found.extend(_colour_changes(frames, cfg, found))
    return _merge(sorted(found, key=lambda x: (x.start, x.end)))


def _dissolves(frames: np.ndarray, d: np.ndarray, cfg: ShotConfig, known: list[Transition]) -> list[Transition]:
    w, t = cfg.dissolve_window, len(frames)
    if t < 2 * w + 1:
        return []
    f = frames.astype(np.float32)
    centres = np.arange(w, t - w)
    span = np.abs(f[centres + w] - f[centres - w]).mean(axis=(1, 2, 3))
    blend = np.abs(f[centres] - 0.5 * (f[centres + w] + f[centres - w])).mean(axis=(1, 2, 3))
    # evidence: a large change across the window that the middle frame explains as a blend
    evidence = np.where((span >= cfg.dissolve_threshold) & (blend <= 0.25 * span), span - 2 * blend, 0.0)
    return _peaks(evidence, centres, w, [tr for tr in known if tr.kind == "fade"], t)


def _peaks(score: np.ndarray, centres: np.ndarray, w: int, known: list[Transition], t: int) -> list[Transition]:
    """A dissolve [c - w, c + w) at each centre c whose score is > 0 and the largest within +-w
    (the first of equal ones), unless c lies within w frames of a `known` transition."""
    busy = np.zeros(t, dtype=bool)
    for tr in known:
        busy[max(0, tr.start - w):min(t, tr.end + w + 1)] = True
    out = []
    for k, c in enumerate(centres):
        if score[k] <= 0 or busy[c]:
            continue
        lo, hi = max(0, k - w), min(len(score), k + w + 1)
        if score[k] < score[lo:hi].max() or (score[lo:k] == score[k]).any():
            continue
        out.append(Transition("dissolve", int(c - w), int(c + w), float(score[k])))
    return out


_HUE_BINS = 18          # 10 degrees each
_SATURATED = (60, 40)  # S and V (0-255) above which a pixel's hue counts
_MIN_SATURATED = 0.003  # fraction of a frame's pixels that must be saturated for its hue to count


def hue_histograms(frames: np.ndarray) -> np.ndarray:
    """(T, 18) hue distribution of each frame's saturated pixels, each spread over its two
    neighbouring bins too (hue is circular, and a shade on a bin edge should not count as a change);
    NaN rows for frames with too few saturated pixels (grey scenes: no colour to compare)."""
    out = np.full((len(frames), _HUE_BINS), np.nan, dtype=np.float64)
    for i, f in enumerate(frames):
        hsv = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV).reshape(-1, 3)
        sat = (hsv[:, 1] > _SATURATED[0]) & (hsv[:, 2] > _SATURATED[1])
        if sat.mean() < _MIN_SATURATED:
            continue
        h = np.bincount((hsv[sat, 0].astype(np.int64) * _HUE_BINS) // 180, minlength=_HUE_BINS)[:_HUE_BINS]
        h = h / h.sum()
        out[i] = (h + np.roll(h, 1) + np.roll(h, -1)) / 3
    return out


def _colour_changes(frames: np.ndarray, cfg: ShotConfig, known: list[Transition]) -> list[Transition]:
    """Gradual transitions the pixel tests miss: the saturated pixels' hue distribution of the frames
    `dissolve_window` before and after a centre differs by >= `colour_threshold` (total variation),
    at a local maximum, away from the transitions already found."""
    w, t = cfg.dissolve_window, len(frames)
    if cfg.colour_threshold <= 0 or t < 2 * w + 1:
        return []
    hist = hue_histograms(frames)
    centres = np.arange(w, t - w)
    change = 0.5 * np.abs(hist[centres + w] - hist[centres - w]).sum(axis=1)
    change = np.where(np.isnan(change), 0.0, change)
    return _peaks(np.where(change >= cfg.colour_threshold, change, 0.0), centres, w, known, t)


def _merge(transitions: list[Transition]) -> list[Transition]:
    """Overlapping transitions become one (gradual kinds win over a cut found inside a fade)."""
    out: list[Transition] = []
    for tr in transitions:
        if out and tr.start <= out[-1].end:
            prev = out[-1]
            kind = prev.kind if prev.kind != "cut" else tr.kind
            out[-1] = Transition(kind, min(prev.start, tr.start), max(prev.end, tr.end), max(prev.score, tr.score))
        else:
            out.append(tr)
    return out


def shot_ranges(num_frames: int, transitions: list[Transition]) -> list[tuple[int, int]]:
    """Frame ranges [start, end) between the transitions (empty ones dropped)."""
    edges, start = [], 0
    for tr in transitions:
        if tr.start > start:
            edges.append((start, tr.start))
        start = max(start, tr.end)
    if num_frames > start:
        edges.append((start, num_frames))
    return edges


def trim_edges(start: int, end: int, times: np.ndarray, end_time: float, trim_s: float,
               after_transition: bool, before_transition: bool) -> tuple[int, int]:
    """[start, end) without the frames within `trim_s` seconds of a side that touches a transition:
    kept are the frames whose time is >= the shot's start + trim_s (when `after_transition`) and
    < its end - trim_s (when `before_transition`), by presentation time (variable frame rates
    alike). A shot that trimming would empty is returned whole (the length filter judges it)."""
    if trim_s <= 0:
        return start, end
    a, b = start, end
    if after_transition:
        a = int(np.searchsorted(times, times[start] + trim_s - 1e-9, side="left"))
    if before_transition:
        t_end = times[end] if end < len(times) else end_time
        b = int(np.searchsorted(times, t_end - trim_s - 1e-9, side="left"))
    return (a, b) if b > a else (start, end)


def split_long(start: int, end: int, times: np.ndarray, end_time: float, max_s: float) -> list[tuple[int, int]]:
    """[start, end) cut into the fewest equal pieces (by time) of at most `max_s` seconds."""
    t0 = times[start]
    t1 = times[end] if end < len(times) else end_time
    pieces = max(1, int(np.ceil((t1 - t0) / max_s - 1e-9)))
    if pieces == 1:
        return [(start, end)]
    bounds = [start] + [int(np.searchsorted(times, t0 + (t1 - t0) * k / pieces)) for k in range(1, pieces)] + [end]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
