"""Long raw "source" videos for `mugv curate`, with planted defects and the truth recorded.

Each source strings several product shots (`product_videos.render`) together with hard cuts,
fades through black and cross-dissolves, like edited footage. Some shots carry a defect that a
curation filter should catch:

  blur        every frame Gaussian-blurred (sigma 2.5 px): the sharpness filter.
  static      a static scene with the sensor noise only: the motion-minimum filter.
  shake       the whole frame jumps by 5-9 px every frame: the motion-maximum filter.
  exact_dup   the same pixels as an earlier clean shot (another source): dedup.
  near_dup    an earlier clean shot brightened by 6%, shifted 1 px and re-encoded: dedup.

`truth.json` lists per source the transitions (kind, centre time) and per shot its time range
(the frames outside any transition), scene, defect and, for a duplicate, the original shot;
`captions.jsonl` gives each shot's caption with its time range, as a caption file of real footage would.
`generate_sources(..., draw_scene=f)` draws each shot's scene and caption with `f(rng)` instead of
the full generator's vocabulary (the demo: only its training compositions, its caption format).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import numpy as np
from scipy import ndimage

from mugv.torch_backend.data.media import write_mp4
from mugv.torch_backend.data.product_videos import MOTIONS, Scene, random_scene, render

TRANSITIONS = ("cut", "fade", "dissolve")
DEFECTS = ("blur", "static", "shake", "exact_dup", "near_dup")
GRADUAL_FRAMES = 8  # frames a fade or dissolve takes (half a second at 16 fps)


@dataclasses.dataclass(frozen=True)
class SourcesSpec:
    """What to generate: `sources` files of `shots` shots each, every shot `shot_frames` frames
    (a range, drawn per shot) at `fps`, `size` px square; `defect_rate` of the shots (after the
    first source, so duplicates have an original) carry a defect; `motion_frames`: each shot
    moves as fast per frame as a clip of that many frames (product_videos.render)."""

    sources: int = 6
    shots: int = 4
    shot_frames: tuple[int, int] = (40, 64)
    size: int = 64
    fps: float = 16.0
    defect_rate: float = 0.45
    seed: int = 0
    motion_frames: int | None = None   # render's motion_frames: None, a shot's motion spans the shot


def _moving_scene(rng: np.random.Generator) -> Scene:
    scene = random_scene(rng)
    if scene.motion == "static":   # clean shots move; "static" is a planted defect
        scene = dataclasses.replace(scene, motion=MOTIONS[1 + int(rng.integers(len(MOTIONS) - 1))])
    return scene


def _shake(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: each frame shifted 5-9 px in a random direction from the previous one."""
    out, pos = np.empty_like(clip), np.zeros(2)
    pad = np.pad(clip, ((0, 0), (16, 16), (16, 16), (0, 0)), mode="reflect")
    for k in range(len(clip)):
        angle = rng.uniform(0, 2 * np.pi)
        pos = np.clip(pos + rng.uniform(5, 9) * np.array([np.cos(angle), np.sin(angle)]), -14, 14)
        dy, dx = (16 + np.round(pos)).astype(int)
        out[k] = pad[k, dy:dy + clip.shape[1], dx:dx + clip.shape[2]]
    return out


def _shot_pixels(rng, spec: SourcesSpec, defect: str | None, library: list,
                 draw_scene: Callable) -> tuple[np.ndarray, Scene, dict | None, str]:
    """(pixels, scene, original shot of a duplicate or None, caption) of one shot."""
    frames = int(rng.integers(spec.shot_frames[0], spec.shot_frames[1] + 1))
    if defect in ("exact_dup", "near_dup"):
        clip, scene, origin, text = library[int(rng.integers(len(library)))]
        if defect == "near_dup":
            clip = np.clip(clip.astype(np.float64) * 1.06 + 2, 0, 255).astype(np.uint8)
            clip = np.roll(clip, 1, axis=2)
        return clip, scene, origin, text
    scene, text = draw_scene(rng)
    if defect == "static":   # a fixed caption keeps the motion the shot was meant to have
        scene = dataclasses.replace(scene, motion="static")
    text = scene.caption(0) if text is None else text
    clip = render(scene, int(rng.integers(2 ** 31)), spec.size, frames, spec.motion_frames)
    if defect == "blur":
        clip = ndimage.gaussian_filter(clip.astype(np.float64), (0, 2.5, 2.5, 0)).round().astype(np.uint8)
    elif defect == "shake":
        clip = _shake(clip, rng)
    return clip, scene, None, text


def _default_scene(rng: np.random.Generator) -> tuple[Scene, None]:
    """Any moving scene of the full vocabulary, captioned from the shot as rendered (None)."""
    return _moving_scene(rng), None


def _join(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """Frames of the transition between the end of `a` and the start of `b` (replacing the last
    GRADUAL_FRAMES/2 frames of a and the first GRADUAL_FRAMES/2 of b for gradual kinds)."""
    h = GRADUAL_FRAMES // 2
    if kind == "cut":
        return np.concatenate([a, b])
    if kind == "fade":   # a fades to black, b fades in from black
        ramp = np.linspace(1, 0, h)[:, None, None, None]
        out_a = a[-h:] * ramp
        in_b = b[:h] * ramp[::-1]
        mid = np.concatenate([out_a, in_b]).round().astype(np.uint8)
    else:                # dissolve: a cross-fade
        w = np.linspace(0, 1, GRADUAL_FRAMES + 2)[1:-1, None, None, None]
        mid = (a[-GRADUAL_FRAMES:] * (1 - w) + b[:GRADUAL_FRAMES] * w).round().astype(np.uint8)
        return np.concatenate([a[:-GRADUAL_FRAMES], mid, b[GRADUAL_FRAMES:]])
    return np.concatenate([a[:-h], mid, b[h:]])


def generate_sources(out_dir: str | pathlib.Path, spec: SourcesSpec = SourcesSpec(),
                     draw_scene: Callable[[np.random.Generator], tuple[Scene, str | None]] = _default_scene) -> dict:
    """Write `source_XXX.mp4`, `captions.jsonl` and `truth.json` to out_dir; returns the truth.
    draw_scene(rng) -> (scene, caption) of a new shot, caption None = the scene's own as rendered
    (default: any moving scene of the full vocabulary, so a static defect is captioned static);
    duplicates repeat their original's scene and caption.

    Times are in seconds from the source's start: a shot's range is its frames not touched by a
    transition; a transition's `time` is its centre (a cut: the first frame of the new shot).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    library: list = []          # clean shots, originals for duplicates
    truth, captions = {"spec": dataclasses.asdict(spec), "sources": {}}, []
    for s in range(spec.sources):
        name = f"source_{s:03d}.mp4"
        shots, transitions, video = [], [], None
        for k in range(spec.shots):
            defect = None
            if s > 0 and rng.random() < spec.defect_rate:
                defect = DEFECTS[int(rng.integers(len(DEFECTS)))]
            clip, scene, origin, text = _shot_pixels(rng, spec, defect, library, draw_scene)
            if defect is None:
                library.append((clip, scene, {"source": name, "shot": k}, text))
            if video is None:
                start, video = 0, clip
            else:
                kind = TRANSITIONS[int(rng.integers(len(TRANSITIONS)))]
                join_at = len(video)
                video = _join(video, clip, kind)
                h = GRADUAL_FRAMES // 2
                t0, t1 = {"cut": (join_at, join_at), "fade": (join_at - h, join_at + h),
                          "dissolve": (join_at - 2 * h, join_at)}[kind]
                shots[-1]["end_frame"], start = t0, t1
                transitions.append({"kind": kind, "time": (t0 + t1) / 2 / spec.fps,
                                    "start": t0 / spec.fps, "end": t1 / spec.fps})
            shots.append({"start_frame": start, "end_frame": None, "defect": defect, "original": origin,
                          "scene": dataclasses.asdict(scene), "caption": text})
        shots[-1]["end_frame"] = len(video)
        for shot in shots:
            shot["start"] = shot.pop("start_frame") / spec.fps
            shot["end"] = shot.pop("end_frame") / spec.fps
            captions.append({"path": name, "start": shot["start"], "end": shot["end"],
                             "caption": shot["caption"]})
        write_mp4(out_dir / name, video, spec.fps, crf=18)
        truth["sources"][name] = {"frames": len(video), "duration": len(video) / spec.fps,
                                  "transitions": transitions, "shots": shots}
    with open(out_dir / "captions.jsonl", "w") as f:
        for row in captions:
            f.write(json.dumps(row) + "\n")
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def write_bad_inputs(out_dir: str | pathlib.Path, good: pathlib.Path | None = None) -> dict[str, str]:
    """Broken files a crawl meets, with the reason `mugv curate` should give each: zero bytes,
    an mp4 cut in half, random bytes named .mp4, audio only, a clip too short to make a shot."""
    import av
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    clip = render(random_scene(rng), 5, 32, 12)
    write_mp4(out_dir / "bad_short.mp4", clip, 16, crf=18)           # 0.75 s: below min_duration_s
    data = (good or out_dir / "bad_short.mp4").read_bytes()
    (out_dir / "bad_zero.mp4").write_bytes(b"")
    (out_dir / "bad_truncated.mp4").write_bytes(data[: len(data) // 2])
    (out_dir / "bad_random.mp4").write_bytes(rng.bytes(4096))
    write_audio_only(out_dir / "bad_audio.mp4")
    return {"bad_zero.mp4": "empty file", "bad_truncated.mp4": "unreadable container",
            "bad_random.mp4": "unreadable container", "bad_audio.mp4": "no video stream",
            "bad_short.mp4": "too short"}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write generated source videos with planted defects")
    parser.add_argument("out_dir")
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    generate_sources(a.out_dir, SourcesSpec(sources=a.sources, seed=a.seed))
    print(a.out_dir)


def write_audio_only(path: str | pathlib.Path) -> pathlib.Path:
    """An mp4 with one AAC tone and no video stream (bad input for every video reader)."""
    import av
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("aac", rate=16000)
    stream.layout = "mono"
    tone = np.sin(np.arange(8192) / 7).astype(np.float32)
    for i in range(8):
        frame = av.AudioFrame.from_ndarray(tone[None, i * 1024:(i + 1) * 1024], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return pathlib.Path(path)
