"""`mugv generate-data`: the embedded product-video dataset (mp4 + manifests) the demo trains on.

The vocabulary is cut down from the full product generator (`data/product_videos.py`) so that a
tiny DiT can learn it on a 2-core CPU in minutes: a few colours, shapes and motions, matte objects
on light backgrounds, 32x32 px, 17 frames. Captions are short ("a red sphere, the camera pans
left") so that the byte-level embedded text encoder keeps every word within its token budget.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mugv.core import validate as v


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The demo's clips: which attribute values appear, how many clips, their size and length.

    colours / shapes / motions: the vocabulary (names from data/product_videos.py).
    count: training clips; held_out: extra clips (other seeds) for the VAE's PSNR and as prompts.
    """

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("sphere", "cone", "cylinder")
    motions: tuple[str, ...] = ("zoom in", "pan left", "pan right")
    backgrounds: tuple[str, ...] = ("white studio", "light grey")
    count: int = 192
    held_out: int = 24
    size: int = 32
    frames: int = 17
    fps: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        from mugv.torch_backend.data import product_videos as pv
        for field, allowed in (("colours", pv.COLOURS), ("shapes", pv.SHAPES), ("motions", pv.MOTIONS),
                               ("backgrounds", pv.BACKGROUNDS)):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not values or any(x not in allowed for x in values):
                v.fail(self, field, f"a non-empty tuple of names from {sorted(allowed)}")
        v.positive_int(self, "count", "held_out", "size", "frames")
        v.non_negative_int(self, "seed")
        if self.size % 16:
            v.fail(self, "size", "a multiple of 16 (VAE 8 x DiT patch 2)")
        v.in_range(self, "fps", 0, 240, lo_open=True)

    @property
    def chance(self) -> dict[str, float]:
        return {"colour": 1 / len(self.colours), "shape": 1 / len(self.shapes), "motion": 1 / len(self.motions)}


def caption(colour: str, shape: str, motion: str, variant: int = 0) -> str:
    """A short caption the analyzer parses (data/analyzer.py::parse_caption)."""
    from mugv.torch_backend.data.product_videos import MOTION_PHRASES
    phrase = MOTION_PHRASES[motion][variant % len(MOTION_PHRASES[motion])]
    return f"a {colour} {shape}, {phrase}"


def generate(cfg: DemoData, out_dir: str | pathlib.Path, log=print) -> dict[str, pathlib.Path]:
    """Render the training and held-out clips as mp4 + manifests; clip i of a split depends only
    on (seed, split, i), and existing clips are kept (a re-run resumes). Returns the manifests."""
    from mugv.torch_backend.data.media import write_mp4
    from mugv.torch_backend.data.product_videos import Scene, render

    out = pathlib.Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    manifests = {}
    for split, n, tag in (("train", cfg.count, 0), ("held_out", cfg.held_out, 1)):
        rows = []
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, tag, i])
            pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
            scene = Scene(shape=pick(cfg.shapes), colour=pick(cfg.colours), material="matte",
                          background=pick(cfg.backgrounds), motion=pick(cfg.motions))
            render_seed, variant = int(rng.integers(2 ** 31)), int(rng.integers(2))
            name = f"clips/{split}_{i:05d}.mp4"
            if not (out / name).exists():
                tmp = out / (name + ".part.mp4")
                write_mp4(tmp, render(scene, render_seed, cfg.size, cfg.frames), cfg.fps, crf=18)
                tmp.rename(out / name)   # atomic: a killed run never leaves half a clip
            rows.append({"id": f"{split}_{i:05d}", "path": name, "fps": cfg.fps,
                         "caption": caption(scene.colour, scene.shape, scene.motion, variant),
                         "attributes": {"colour": scene.colour, "shape": scene.shape, "motion": scene.motion}})
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:   # the manifest (data/manifest.py fields only)
            for row in rows:
                f.write(json.dumps({k: x for k, x in row.items() if k != "attributes"}) + "\n")
        with open(out / f"{split}_attributes.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({"id": row["id"], **row["attributes"]}) + "\n")
        manifests[split] = path
        log(f"[mugv] data: {n} {split} clips ({cfg.size}x{cfg.size}, {cfg.frames} frames) -> {path}")
    return manifests


def generate_data(cfg) -> int:
    """`mugv generate-data` (cli/commands.py builds (DemoData, out))."""
    data, out = cfg
    generate(data, out)
    return 0

