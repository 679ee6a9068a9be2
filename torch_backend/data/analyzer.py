"""Scores a video against its caption: colour, shape and motion of the product in it.

This is the demo's quality metric and the preference labeller, so it reads what the product
generator (`product_videos.py`) draws and is meant to survive what a tiny model produces: 32-64 px,
blurred, noisy frames. Everything is measured relative to the frame and the clip, no fixed pixel
counts:

1. Segmentation. The background of each frame is modelled per row from the frame's left and
   right border columns (studio backgrounds are vertical ramps); a pixel's distance to its row's
   background is thresholded by Otsu's method over the clip, and each frame keeps its largest
   connected component, with small holes (specular highlights on a white background) filled and
   large ones (a torus) kept.
2. Colour: the saturation x value weighted circular mean hue of the object's pixels (shading
   scales RGB and so keeps hue; highlights and shadows carry little weight), then the nearest
   palette hue.
3. Shape: silhouette features averaged over frames - fill of the bounding box, height/width,
   a hole, taper (top width / bottom width) - against prototypes.
4. Motion: the object's centre and height tracks (height, not area: a turning cube changes width
   only) and its appearance change between frames: scale ratio -> zoom, a one-way horizontal
   track -> pan, a looping track -> orbit, in-place appearance change -> rotate, else static.

`score(video, caption)` gives per-attribute probabilities of the caption's value (soft, so
preference pairs can be ranked) and their mean.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np
from scipy import ndimage

from mugv.torch_backend.data.product_videos import COLOURS, MOTIONS, SHAPES


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Per-attribute probabilities (dicts over the vocabulary) and the features behind them."""

    colour: dict[str, float]
    shape: dict[str, float]
    motion: dict[str, float]
    features: dict[str, float]

    def best(self, attribute: str) -> str:
        probs = getattr(self, attribute)
        return max(probs, key=probs.get)


# --- caption parsing ----------------------------------------------------------------------------

_SHAPE_WORDS = {"cube": "cube", "box": "cube", "sphere": "sphere", "ball": "sphere", "orb": "sphere",
                "cylinder": "cylinder", "can": "cylinder", "cone": "cone", "torus": "torus",
                "ring": "torus", "donut": "torus", "doughnut": "torus"}
_MOTION_PATTERNS = (("zoom in", r"zoom(s|ing)? in"), ("zoom out", r"zoom(s|ing)? out"),
                    ("pan left", r"pan(s|ning)? (to the )?left"), ("pan right", r"pan(s|ning)? (to the )?right"),
                    ("orbit", r"orbit"), ("rotate", r"rotat|spin|turn"),
                    ("static", r"static|still|holds"))


def parse_caption(caption: str) -> dict[str, str | None]:
    """The colour, shape and motion a caption names (None where it names none)."""
    text = caption.lower()
    words = re.findall(r"[a-z]+", text)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS), None)
    motion = next((m for m, pattern in _MOTION_PATTERNS if re.search(pattern, text)), None)
    return {"colour": colour, "shape": shape, "motion": motion}


# --- segmentation ---------------------------------------------------------------------------------


def _background_distance(clip: np.ndarray) -> np.ndarray:
    """(T, H, W) distance of each pixel to its row's background colour (border median)."""
    t, h, w, _ = clip.shape
    border = max(1, w // 16)
    edges = np.concatenate([clip[:, :, :border], clip[:, :, w - border:]], axis=2)
    background = np.median(edges, axis=2, keepdims=True)              # (T, H, 1, 3)
    return np.sqrt(((clip - background) ** 2).sum(-1))


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[np.argmax(between)])


def segment(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (T, H, W) object masks of a float (T, H, W, 3) clip in [0, 255], and the
    (T, H, W) distance of each pixel to the background."""
    dist = _background_distance(clip)
    # Otsu splits object from background; the floor keeps noise out of an empty clip's mask
    threshold = max(_otsu(dist), 18.0)
    masks = np.zeros(dist.shape, dtype=bool)
    for k, d in enumerate(dist):
        labels, n = ndimage.label(d > threshold)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(d), labels, index=np.arange(1, n + 1))
        obj = labels == (1 + int(np.argmax(sizes)))
        # fill holes smaller than 6% of the object (highlights), keep larger ones (torus)
        holes, nh = ndimage.label(ndimage.binary_fill_holes(obj) & ~obj)
        if nh:
            hole_sizes = ndimage.sum_labels(np.ones_like(d), holes, index=np.arange(1, nh + 1))
            for j, size in enumerate(hole_sizes, start=1):
                if size < 0.06 * obj.sum():
                    obj |= holes == j
        masks[k] = obj
    return masks, dist


# --- features -------------------------------------------------------------------------------------

def _hue_xy(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue as a 2D vector scaled by chroma (the HSV hexagon flattened to a circle)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return r - 0.5 * (g + b), (np.sqrt(3) / 2) * (g - b)


_PALETTE_HUE = {name: float(np.arctan2(*_hue_xy(np.array(rgb, dtype=np.float64))[::-1]))
                for name, rgb in COLOURS.items()}


def _colour_probs(clip: np.ndarray, masks: np.ndarray) -> tuple[dict[str, float], float]:
    core = np.stack([ndimage.binary_erosion(m) if m.sum() > 30 else m for m in masks])
    pixels = clip[core]
    if len(pixels) == 0:
        return {c: 1 / len(COLOURS) for c in COLOURS}, float("nan")
    x, y = _hue_xy(pixels)
    chroma = np.sqrt(x ** 2 + y ** 2)
    # weight by chroma: grey highlights and near-black shadows carry no hue
    hue = float(np.arctan2((y * chroma).sum(), (x * chroma).sum()))
    diff = np.array([np.angle(np.exp(1j * (hue - h))) for h in _PALETTE_HUE.values()])
    logits = -0.5 * (np.degrees(diff) / 12.0) ** 2
    probs = np.exp(logits - logits.max())
    return dict(zip(COLOURS, (probs / probs.sum()).tolist())), float(np.degrees(hue))


def _silhouette(mask: np.ndarray, dist: np.ndarray) -> dict[str, float] | None:
    rows, cols = np.nonzero(mask)
    if len(rows) < 6:
        return None
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    h, w = bottom - top + 1, right - left + 1
    filled = ndimage.binary_fill_holes(mask)
    hole = 1 - mask.sum() / max(filled.sum(), 1)
    band = max(1, h // 4)
    widths = filled.sum(axis=1)
    top_w, bottom_w = widths[top:top + band].mean(), widths[bottom - band + 1:bottom + 1].mean()
    # a torus's hole may blur shut; its centre still stays nearer the background than the ring
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    disk = (yy - rows.mean()) ** 2 + (xx - cols.mean()) ** 2 <= (0.16 * min(h, w)) ** 2 + 0.5
    centre = dist[disk].mean() / max(np.median(dist[mask]), 1e-6)
    return {"fill": filled.sum() / (h * w), "aspect": h / w, "hole": hole, "centre": centre,
            "taper": top_w / max(bottom_w, 1e-6), "height": h, "cx": cols.mean(), "cy": rows.mean()}


# Prototype silhouettes (fill, log height/width, hole, taper, centre), the means of each feature
# over 150 rendered clips (seeds [1000, i]: clean and 32 px blurred, mixed); evaluation uses other
# seeds (docs/data.md). Scales say how far a feature wanders under blur and turning.
_SHAPE_FEATURES = ("fill", "aspect", "hole", "taper", "centre")
_SHAPE_PROTOTYPES = {
    "cube": (0.95, -0.2, 0.0, 1.0, 1.1),
    "sphere": (0.76, 0.0, 0.0, 0.97, 1.2),
    "cylinder": (0.89, 0.62, 0.0, 1.1, 1.15),
    "cone": (0.62, 0.3, 0.0, 0.33, 1.25),
    "torus": (0.75, 0.0, 0.1, 1.0, 0.5),
}
_SHAPE_SCALES = (0.06, 0.12, 0.06, 0.2, 0.25)


def _shape_probs(sil: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    feats = {k: float(np.median([s[k] for s in sil])) for k in _SHAPE_FEATURES}
    # a torus's hole shows best where the object is largest (zooms): judge the centre there
    heights = np.array([s["height"] for s in sil])
    large = [s["centre"] for s, h in zip(sil, heights) if h >= np.percentile(heights, 75)]
    feats["centre"] = float(np.median(large))
    f = np.array([feats[k] if k != "aspect" else np.log(feats[k]) for k in _SHAPE_FEATURES])
    scales = np.array(_SHAPE_SCALES)
    logits = np.array([-0.5 * (((f - np.array(p)) / scales) ** 2).sum() for p in _SHAPE_PROTOTYPES.values()])
    probs = np.exp(logits - logits.max())
    return dict(zip(_SHAPE_PROTOTYPES, (probs / probs.sum()).tolist())), feats


def _motion_probs(clip: np.ndarray, masks: np.ndarray, sil: list[dict[str, float]]
                  ) -> tuple[dict[str, float], dict[str, float]]:
    t, h, w, _ = clip.shape
    cx = np.array([s["cx"] for s in sil]) / w
    cy = np.array([s["cy"] for s in sil]) / h
    height = np.array([s["height"] for s in sil], dtype=np.float64)
    n = max(1, len(sil) // 6)
    scale = float(np.log(height[-n:].mean() / height[:n].mean()))
    net = float(cx[-n:].mean() - cx[:n].mean())
    x_range = float(np.percentile(cx, 95) - np.percentile(cx, 5))
    y_range = float(np.percentile(cy, 95) - np.percentile(cy, 5))
    # Appearance change inside the object minus the change of the background (noise, codec),
    # relative to the object's own contrast. A lag of ~1/8 clip lets slow turns add up over noise.
    lag = max(1, t // 8)
    both = masks[lag:] & masks[:-lag]
    neither = ~masks[lag:] & ~masks[:-lag]
    change = np.abs(clip[lag:] - clip[:-lag]).sum(-1)
    noise = float(change[neither].mean()) if neither.any() else 0.0
    contrast = float(np.abs(clip[masks] - np.median(clip[masks], axis=0)).sum(-1).mean()) + 1.0
    turn = float((change[both].mean() - noise) / contrast) if both.any() else 0.0
    feats = {"scale": scale, "net_x": net, "x_range": x_range, "y_range": y_range, "turn": turn}
    zoom = max(_step(abs(scale), 0.2, 0.04), 0.0)
    travel = _step(x_range, 0.12, 0.025)
    still = (1 - zoom) * (1 - travel)
    # each piece of evidence is a soft step sigmoid((value - threshold) / width); thresholds sit
    # between the generator's ranges (docs/data.md)
    logits = {
        "zoom in": 2 * _step(scale, 0.2, 0.04),
        "zoom out": 2 * _step(-scale, 0.2, 0.04),
        "pan left": _step(net, 0.15, 0.03) + _step(-y_range, -0.05, 0.012),
        "pan right": _step(-net, 0.15, 0.03) + _step(-y_range, -0.05, 0.012),
        "orbit": _step(y_range, 0.05, 0.012) + _step(x_range, 0.2, 0.03),
        "rotate": 2 * still * _step(turn, 0.08, 0.02),
        "static": 2 * still * _step(-turn, -0.08, 0.02),
    }
    v = np.array([logits[m] for m in MOTIONS]) * 4.0
    probs = np.exp(v - v.max())
    return dict(zip(MOTIONS, (probs / probs.sum()).tolist())), feats


def _step(value: float, threshold: float, width: float) -> float:
    return float(1 / (1 + np.exp(np.clip(-(value - threshold) / width, -50, 50))))


# --- public API -----------------------------------------------------------------------------------


def analyze(video: np.ndarray | str | pathlib.Path) -> Analysis:
    """Analyse a uint8/float (T, H, W, 3) RGB clip in [0, 255], or a video file."""
    if not isinstance(video, np.ndarray):
        video = _read(video)
    clip = np.asarray(video, dtype=np.float64)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 2:
        raise ValueError(f"video shape {clip.shape}: expected (T >= 2, H, W, 3) RGB")
    masks, dist = segment(clip)
    sil_all = [_silhouette(m, d) for m, d in zip(masks, dist)]
    keep = [i for i, s in enumerate(sil_all) if s is not None]
    if len(keep) < 2:
        uniform = lambda names: {n: 1 / len(names) for n in names}  # noqa: E731
        return Analysis(uniform(COLOURS), uniform(SHAPES), uniform(MOTIONS), {"found": 0.0})
    sil = [sil_all[i] for i in keep]
    colour, hue = _colour_probs(clip[keep], masks[keep])
    shape, shape_feats = _shape_probs(sil)
    motion, motion_feats = _motion_probs(clip[keep], masks[keep], sil)
    return Analysis(colour, shape, motion, {"found": len(keep) / len(clip), "hue": hue,
                                            **shape_feats, **motion_feats})


def score(video: np.ndarray | str | pathlib.Path, caption: str) -> dict[str, float]:
    """Probability the video shows each attribute the caption names, and their mean ("total")."""
    wanted = parse_caption(caption)
    result = analyze(video)
    out = {k: getattr(result, k)[v] for k, v in wanted.items() if v is not None}
    out["total"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def _read(path) -> np.ndarray:
    from mugv.torch_backend.data.decode import read_frames  # local: the analyzer on arrays needs no FFmpeg
    return read_frames(path)


# --- measuring the analyzer on the generator's clips ----------------------------------------------


def degrade(clip: np.ndarray, rng: np.random.Generator, factor: int = 2, blur: float = 1.0,
            noise: float = 4.0) -> np.ndarray:
    """What a tiny model's output looks like: box-downscaled by `factor`, Gaussian-blurred
    (sigma in output pixels), with Gaussian noise; uint8."""
    t, h, w, _ = clip.shape
    small = clip.astype(np.float64).reshape(t, h // factor, factor, w // factor, factor, 3).mean((2, 4))
    small = ndimage.gaussian_filter(small, (0, blur, blur, 0))
    return np.clip(small + rng.normal(0, noise, small.shape) + 0.5, 0, 255).astype(np.uint8)


def evaluate_clip(seed: int, i: int, size: int = 64, frames: int = 33) -> dict[str, bool]:
    """Hits of clip (seed, i) after an H.264 round trip, clean and degraded, per attribute."""
    import io
    import av
    from mugv.torch_backend.data.media import write_mp4
    from mugv.torch_backend.data.product_videos import random_scene, render

    def roundtrip(clip):
        buf = io.BytesIO()
        write_mp4(buf, clip, 16, crf=18)
        buf.seek(0)
        with av.open(buf) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    rng = np.random.default_rng([seed, i])
    scene = random_scene(rng)
    clip = render(scene, int(rng.integers(2 ** 31)), size, frames)
    hits = {}
    for condition, video in (("clean", roundtrip(clip)), ("degraded", roundtrip(degrade(clip, rng)))):
        result = analyze(video)
        for attribute in ("colour", "shape", "motion"):
            truth = getattr(scene, attribute)
            ok = result.best(attribute) == truth
            hits[f"{condition}/{attribute}"] = ok
            hits[f"{condition}/{attribute}/{truth}"] = ok
    return hits


def evaluate(count: int, seed: int, size: int = 64, frames: int = 33, workers: int = 1
             ) -> dict[str, dict[str, float]]:
    """Accuracy per attribute (and per class) on `count` random clips (seeds [seed, i]), each
    through an H.264 round trip: "clean" at `size`, and "degraded" (half size, blur, noise)."""
    import functools
    import multiprocessing
    job = functools.partial(evaluate_clip, seed, size=size, frames=frames)
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(job, range(count), chunksize=4)
    else:
        results = [job(i) for i in range(count)]
    hits: dict[str, list[bool]] = {}
    for result in results:
        for k, ok in result.items():
            hits.setdefault(k, []).append(ok)
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(hits.items())}


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="Analyzer accuracy on generated product clips")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(evaluate(args.count, args.seed, workers=args.workers), indent=1))
