"""The embedded product-video dataset: short showcase clips rendered from named attributes.

Each clip shows one object (shape, colour, material) on a studio background, under one motion,
and its caption is built from those attributes, so a model trained on it can be checked against
its prompt by `analyzer.py`. Clips are real H.264 mp4 files plus a JSONL manifest, so training
runs the same decode path as on real data.

Motions, as seen in the frame (camera words describe the camera, so the content moves the
other way):
  static     nothing moves.
  rotate     the object turns about its vertical axis (a torus spins in the image plane); its
             centre and height stay put, its shading/stripes move.
  orbit      the object travels about one loop around the frame centre, turning as it goes.
  zoom in    the object grows steadily (x1.6-1.9); zoom out: it shrinks by the same factors.
  pan left   the camera moves left, so the object slides right by 30-40% of the frame width;
  pan right  the object slides left.

Rendering is numpy only: analytic silhouettes with Lambert shading, a specular lobe for glossy
and metallic materials, broad dark stripes so that rotation is visible, 2x supersampling for
anti-aliased edges.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mugv.torch_backend.data.media import write_mp4

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35), "orange": (235, 125, 25), "yellow": (225, 200, 30), "green": (40, 165, 55),
    "cyan": (30, 180, 195), "blue": (35, 70, 210), "purple": (125, 45, 180), "pink": (235, 105, 175),
}
MATERIALS = ("matte", "glossy", "metallic")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white studio": (232, 232, 228), "light grey": (185, 185, 188), "dark grey": (78, 78, 82),
    "beige": (220, 205, 180), "charcoal": (45, 45, 48),
}
MOTIONS = ("static", "rotate", "orbit", "zoom in", "zoom out", "pan left", "pan right")
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "static": ("static shot", "the camera holds still"),
    "rotate": ("slowly rotating in place", "the object rotates on a turntable"),
    "orbit": ("the camera orbits around it", "orbiting shot around the product"),
    "zoom in": ("the camera zooms in", "slow zoom in"),
    "zoom out": ("the camera zooms out", "slow zoom out"),
    "pan left": ("the camera pans left", "slow pan left"),
    "pan right": ("the camera pans right", "slow pan right"),
}
_LIGHT = np.array([-0.45, -0.6, 0.66]) / np.linalg.norm([-0.45, -0.6, 0.66])


@dataclasses.dataclass(frozen=True)
class Scene:
    """The attributes of one clip (what its caption states)."""

    shape: str
    colour: str
    material: str
    background: str
    motion: str

    def __post_init__(self) -> None:
        for field, allowed in (("shape", SHAPES), ("colour", COLOURS), ("material", MATERIALS),
                               ("background", BACKGROUNDS), ("motion", MOTIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Scene.{field} = {getattr(self, field)!r}: expected one of "
                                 f"{sorted(allowed)}")

    def caption(self, variant: int = 0) -> str:
        phrase = MOTION_PHRASES[self.motion][variant % len(MOTION_PHRASES[self.motion])]
        return (f"A {self.material} {self.colour} {self.shape} on a {self.background} background, "
                f"{phrase}, product showcase.")


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 material=MATERIALS[rng.integers(len(MATERIALS))],
                 background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 motion=MOTIONS[rng.integers(len(MOTIONS))])


def render(scene: Scene, seed: int, size: int = 64, frames: int = 33, motion_frames: int | None = None) -> np.ndarray:
    """uint8 (frames, size, size, 3) RGB clip of `scene`; `seed` fixes placement and speeds.
    motion_frames: the motion runs its course (pan travel, zoom gain) over this many frames,
    centred in the clip and continued at the same speed before and after (None: over `frames`),
    so a long shot moves as fast per frame as a `motion_frames`-frame clip."""
    rng = np.random.default_rng(seed)
    track = _trajectory(scene.motion, rng, frames, motion_frames or frames)
    ss = 2 * size  # supersampled grid
    yy, xx = np.mgrid[0:ss, 0:ss].astype(np.float64) + 0.5
    bg_top = np.array(BACKGROUNDS[scene.background], dtype=np.float64) * rng.uniform(1.0, 1.06)
    bg_bot = np.array(BACKGROUNDS[scene.background], dtype=np.float64) * rng.uniform(0.88, 0.96)
    ramp = (yy[:, :1] / ss)[..., None]
    background = np.clip(bg_top * (1 - ramp) + bg_bot * ramp, 0, 255) * np.ones((1, ss, 1))
    base = np.array(COLOURS[scene.colour], dtype=np.float64) * rng.uniform(0.92, 1.05)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        cx, cy, s, theta = (track[name][k] for name in ("cx", "cy", "s", "theta"))
        dx, dy = (xx - cx * ss) / (s * ss), (yy - cy * ss) / (s * ss)
        alpha, normal, tex = _SHAPES[scene.shape](dx, dy, theta)
        rgb = _shade(base, normal, tex, scene.material)
        img = background * (1 - alpha[..., None]) + rgb * alpha[..., None]
        img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
        img += rng.normal(0, 1.5, img.shape)  # sensor noise: keeps flat areas from being exact
        out[k] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


def _trajectory(motion: str, rng: np.random.Generator, frames: int, motion_frames: int | None = None) -> dict[str, np.ndarray]:
    """Per-frame centre (cx, cy as fractions of the frame), half-height s (fraction) and yaw;
    u, the motion's progress, goes 0 -> 1 over `motion_frames` (default `frames`) centred frames."""
    m = motion_frames or frames
    u = np.linspace(0.0, 1.0, frames) if m == frames else (np.arange(frames) - (frames - m) / 2) / max(m - 1, 1)
    cx = np.full(frames, 0.5 + rng.uniform(-0.05, 0.05))
    cy = np.full(frames, 0.5 + rng.uniform(-0.04, 0.04))
    theta = np.full(frames, rng.uniform(0, 2 * np.pi))
    s = np.full(frames, rng.uniform(0.17, 0.22))
    sign = rng.choice([-1.0, 1.0])
    if motion == "rotate":
        theta = theta + sign * rng.uniform(0.6, 1.0) * np.pi * u
    elif motion == "orbit":
        psi = rng.uniform(0, 2 * np.pi) + sign * 2 * np.pi * rng.uniform(0.9, 1.1) * u
        s = rng.uniform(0.13, 0.16) * (1 + 0.12 * np.cos(psi))
        cx = 0.5 + rng.uniform(0.17, 0.21) * np.sin(psi)
        cy = 0.5 + rng.uniform(0.05, 0.08) * np.cos(psi)
        theta = theta + psi
    elif motion in ("zoom in", "zoom out"):
        s0, gain = rng.uniform(0.12, 0.14), rng.uniform(0.6, 0.9)
        grow = s0 * (1 + gain * u)
        s = grow if motion == "zoom in" else grow[::-1].copy()
    elif motion in ("pan left", "pan right"):
        s = np.full(frames, rng.uniform(0.13, 0.16))
        travel = rng.uniform(0.3, 0.4)
        shift = (u - 0.5) * travel
        cx = 0.5 + (shift if motion == "pan left" else -shift)   # camera left -> content right
    return {"cx": cx, "cy": cy, "s": s, "theta": theta}


# --- silhouettes: each returns (alpha in {0,1}, unit normals (..., 3), texture factor) ----------


def _stripes(angle: np.ndarray, count: int) -> np.ndarray:
    """Broad dark bands: a pattern that survives blur and 32 px, so turning is visible."""
    return np.where(np.cos(count * angle) > 0.3, 0.55, 1.0)


def _sphere(dx, dy, theta):
    r2 = dx ** 2 + dy ** 2
    inside = r2 < 1
    nz = np.sqrt(np.clip(1 - r2, 0, 1))
    lon = np.arctan2(dx * np.cos(theta) + nz * np.sin(theta), -dx * np.sin(theta) + nz * np.cos(theta))
    return inside.astype(float), np.stack([dx, dy, nz], -1), _stripes(lon, 2)


def _cube(dx, dy, theta):
    a = 0.85
    phi = np.mod(theta, np.pi / 2)
    c, s = np.cos(phi), np.sin(phi)
    left, mid, right = -a * (c + s), a * (c - s), a * (c + s)
    inside = (np.abs(dy) <= a) & (dx >= left) & (dx <= right)
    n1 = np.array([-s, 0.0, c])
    n2 = np.array([c, 0.0, s])
    normal = np.where((dx < mid)[..., None], n1, n2) * np.ones(dx.shape + (1,))
    return inside.astype(float), normal, np.ones_like(dx)


def _cylinder(dx, dy, theta):
    r, h, cap = 0.62, 1.0, 0.25
    rel = np.clip(dx / r, -1, 1)
    body = (np.abs(dx) <= r) & (np.abs(dy) <= h)
    bottom = (rel ** 2 + ((dy - h) / (cap * r)) ** 2) <= 1
    top = (rel ** 2 + ((dy + h) / (cap * r)) ** 2) <= 1
    inside = body | bottom | top
    nz = np.sqrt(1 - rel ** 2)
    normal = np.stack([rel, np.zeros_like(dx), nz], -1)
    normal = np.where(top[..., None], np.array([0.0, -0.9, 0.44]), normal)
    tex = np.where(top, 1.0, _stripes(np.arcsin(rel) + theta, 2))
    return inside.astype(float), normal, tex


def _cone(dx, dy, theta):
    half_base, cap = 0.9, 0.22
    radius = half_base * np.clip((dy + 1) / 2, 0, 1)
    side = (dy >= -1) & (dy <= 1) & (np.abs(dx) <= radius)
    base = ((dx / half_base) ** 2 + ((dy - 1) / (cap * half_base)) ** 2) <= 1
    inside = side | base
    rel = np.clip(dx / np.maximum(radius, 1e-6), -1, 1)
    nz = np.sqrt(1 - rel ** 2)
    normal = np.stack([rel * 0.9, np.full_like(dx, -0.4), nz * 0.9], -1)
    return inside.astype(float), normal, _stripes(np.arcsin(rel) + theta, 2)


def _torus(dx, dy, theta):
    rho = np.sqrt(dx ** 2 + dy ** 2) + 1e-9
    centre, tube = 0.72, 0.28
    d = (rho - centre) / tube
    inside = np.abs(d) <= 1
    dc = np.clip(d, -1, 1)
    nz = np.sqrt(1 - dc ** 2)
    normal = np.stack([dc * dx / rho, dc * dy / rho, nz], -1)
    return inside.astype(float), normal, _stripes(np.arctan2(dy, dx) + theta, 3)


_SHAPES = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus}


def _shade(base: np.ndarray, normal: np.ndarray, tex: np.ndarray, material: str) -> np.ndarray:
    normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-9)
    lambert = np.clip(normal @ _LIGHT, 0, 1)
    half = _LIGHT + np.array([0.0, 0.0, 1.0])
    half = half / np.linalg.norm(half)
    ndoth = np.clip(normal @ half, 0, 1)
    if material == "matte":
        rgb, spec = base * (0.38 + 0.62 * lambert)[..., None], 0.0
    elif material == "glossy":
        rgb, spec = base * (0.34 + 0.6 * lambert)[..., None], 200 * ndoth ** 40
    else:  # metallic: banded reflections of the studio, a tinted highlight
        bands = 0.75 + 0.25 * np.cos(5 * normal[..., 1] + 2 * normal[..., 0])
        rgb = base * ((0.3 + 0.55 * lambert) * bands)[..., None]
        spec = 120 * ndoth ** 20
    rgb = rgb * tex[..., None] + np.asarray(spec)[..., None] * (0.6 + 0.4 * base / 255)
    return np.clip(rgb, 0, 255)


# --- files ----------------------------------------------------------------------------------------


def generate_dataset(out_dir: str | pathlib.Path, count: int, seed: int = 0, size: int = 64,
                     frames: int = 33, fps: float = 16.0) -> pathlib.Path:
    """Write `count` clips and `manifest.jsonl` (with the attributes) to `out_dir`; returns the
    manifest path. Clip i depends only on (seed, i), so a partial run can be extended."""
    out_dir = pathlib.Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        scene = random_scene(rng)
        render_seed, variant = int(rng.integers(2 ** 31)), int(rng.integers(2))
        name = f"clips/{i:06d}.mp4"
        if not (out_dir / name).exists():
            tmp = out_dir / (name + ".part")
            write_mp4(tmp, render(scene, render_seed, size, frames), fps, lossless=True)
            tmp.rename(out_dir / name)  # atomic: a killed run never leaves a half-written clip
        rows.append({"id": f"product_{i:06d}", "path": name, "caption": scene.caption(variant),
                     "fps": fps, "attributes": dataclasses.asdict(scene)})
    manifest = out_dir / "manifest.jsonl"
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "attributes"}) + "\n")
    with open(out_dir / "attributes.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"id": row["id"], **row["attributes"]}) + "\n")
    return manifest


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write the embedded product-video dataset")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--fps", type=float, default=16.0)
    a = parser.parse_args()
    print(generate_dataset(a.out_dir, a.count, a.seed, a.size, a.frames, a.fps))
