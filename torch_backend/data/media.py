"""Media helpers, written once: uint8 <-> model-range conversion (one rounding rule), PNG and mp4
writing, frame grids and side-by-side layouts, and listing the clips of a folder or manifest.

Pixels: the VAE and DiT see float (3, T, H, W) in [-1, 1]; files and the analyzer see uint8
(T, H, W, 3). uint8 -> float is `x / 127.5 - 1` (data/decode.py::to_model_range); float -> uint8
clamps to [-1, 1], then `floor((x + 1) / 2 * 255 + 0.5)` (notes 3.1), everywhere.
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
import struct
import zlib
from fractions import Fraction
from typing import Iterable

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


# ---------------------------------------------------------------------------------------------
# Conversion


def to_video_tensor(clip: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1] (notes 3.1)."""
    from mugv.torch_backend.data.decode import to_model_range
    return torch.from_numpy(to_model_range(clip))


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3): clamp, then (x + 1) / 2 * 255 + 0.5, floored
    (notes 3.1)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).floor().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Files


def write_png(path: str | pathlib.Path, rgb: np.ndarray) -> pathlib.Path:
    """uint8 (H, W, 3) as an 8-bit RGB PNG (no filter; no imaging library needed). Creates the
    parent folder; returns the path."""
    rgb = np.ascontiguousarray(rgb)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def write_mp4(target: str | pathlib.Path | io.BytesIO, video: np.ndarray, fps: float, crf: int = 12,
              lossless: bool = False):
    """uint8 (T, H, W, 3) RGB -> H.264 (yuv420p) mp4 at a path (parent folder created) or into a
    BytesIO. yuv420p needs even sizes: odd ones are padded by one edge pixel. crf 12: samples and
    reconstructions to look at. `lossless` (x264 qp 0; `crf` ignored): the decoded frames are
    exactly the yuv420p conversion of `video`, whatever the encoder decides, so a dataset written
    twice decodes to the same frames. The generated training datasets use it: x264's lossy modes
    are not repeatable on frames as small as the demo's (distinct encodes and decodes of one clip
    in repeated writes: `python -P benchmarks/x264_repeatability.py`). Returns `target`."""
    t, h, w, _ = video.shape
    video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    write_mp4_frames(target, iter(video), fps, video.shape[2], video.shape[1], crf=crf, lossless=lossless)
    return target


def write_mp4_frames(target: str | pathlib.Path | io.BytesIO, frames: Iterable[np.ndarray], fps: float,
                     width: int, height: int, crf: int = 12, preset: str = "medium", lossless: bool = False) -> int:
    """Stream uint8 (H, W, 3) RGB frames (even `width` x `height`) into an H.264 mp4 without holding
    the clip in memory (re-encoding a range of a long source). `lossless`: x264 qp 0 (see
    `write_mp4`). Returns the frames written."""
    import av
    if not isinstance(target, io.IOBase):
        target = pathlib.Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with av.open(target if isinstance(target, io.IOBase) else str(target), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qp": "0", "preset": preset} if lossless else {"crf": str(crf), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
            written += 1
        for packet in stream.encode():
            container.mux(packet)
    return written


class written_atomically:
    """`with written_atomically(path) as tmp:` write to `tmp` (a hidden name in the same folder,
    same suffix), which replaces `path` only when the block ends without an exception: a process
    killed mid-write leaves the old file or none, never a truncated one under the final name."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")

    def __enter__(self) -> pathlib.Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Layouts


def frame_grid(videos: list[np.ndarray], labels: list[str] | None = None, max_frames: int = 6,
               scale: int = 3, pad: int = 2) -> np.ndarray:
    """uint8 (rows, cols, 3) image: one row per clip, `max_frames` evenly spaced frames, each
    upscaled `scale`x (nearest) so 32 px frames are visible; white gaps between cells."""
    t = min(len(v) for v in videos)
    pick = np.linspace(0, t - 1, min(max_frames, t)).round().astype(int)
    h, w = videos[0].shape[1] * scale, videos[0].shape[2] * scale
    grid = np.full((len(videos) * (h + pad) + pad, len(pick) * (w + pad) + pad, 3), 255, np.uint8)
    for r, video in enumerate(videos):
        for c, k in enumerate(pick):
            frame = video[k].repeat(scale, axis=0).repeat(scale, axis=1)
            grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = frame
    return grid


def side_by_side(original: np.ndarray, recon: np.ndarray, max_frames: int = 6) -> np.ndarray:
    """PNG layout: originals on the top row, reconstructions below, up to `max_frames` frames."""
    pick = np.linspace(0, len(original) - 1, min(max_frames, len(original))).round().astype(int)
    return np.concatenate([np.concatenate(list(original[pick]), axis=1),
                           np.concatenate(list(recon[pick]), axis=1)], axis=0)


# ---------------------------------------------------------------------------------------------
# Clips


def safe_name(name: str, limit: int = 120) -> str:
    """A manifest id or file name as ONE path component that stays inside its output folder:
    separators, `..`, control and other characters outside letters/digits/'._-' become '_', no
    leading dot, at most `limit` characters; when anything changed a short hash of the original is
    appended, so distinct ids stay distinct (`../../x` and `.._.._x` do not collide)."""
    import hashlib
    import re
    clean = re.sub(r"[^\w.\-]", "_", str(name)).lstrip(".")[:limit] or "_"
    if clean != name:
        clean += "-" + hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return clean


def output_path(folder: str | pathlib.Path, name: str, suffix: str) -> pathlib.Path:
    """`folder / (safe_name(name) + suffix)`, checked to resolve inside `folder`."""
    folder = pathlib.Path(folder)
    path = folder / (safe_name(name) + suffix)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"output name {name!r} resolves outside {folder}")
    return path


@dataclasses.dataclass(frozen=True)
class ClipSource:
    name: str
    path: pathlib.Path
    fps: float | None = None
    start_s: float | None = None   # a time range of the file (manifest rows from `mugv curate`)
    end_s: float | None = None


def list_clips(data: str | pathlib.Path) -> list[ClipSource]:
    """Video files of a folder (sorted), or the entries of a .jsonl/.csv manifest."""
    data = pathlib.Path(data)
    if data.is_dir():
        found = [ClipSource(p.stem, p) for p in sorted(data.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES]
    elif data.is_file():
        from mugv.torch_backend.data.manifest import read_manifest
        found = [ClipSource(e.sample_id, e.path, e.fps, e.start_s, e.end_s) for e in read_manifest(data)]
    else:
        raise FileNotFoundError(f"--data {data}: expected a folder of videos or a manifest file")
    if not found:
        raise FileNotFoundError(f"--data {data}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return found


def load_clip(src: ClipSource, num_frames: int | None, height: int, width: int, fps: float) -> np.ndarray:
    """uint8 (T, H, W, 3) at `fps`, cover-resized and centre-cropped (data pipeline decode).
    num_frames None: every frame the clip has at `fps`."""
    from mugv.core.data import frames_available
    from mugv.torch_backend.data.decode import decode_clip, probe
    if num_frames is None:
        info = probe(src.path, src.fps).clip(src.start_s, src.end_s, str(src.path))
        num_frames = frames_available(info.num_frames, info.fps, fps)
    return decode_clip(src.path, num_frames, height, width, target_fps=fps, source_fps=src.fps,
                       start_s=src.start_s, end_s=src.end_s)


def decode_each(sources: list, load, log=print, what: str = "clips") -> tuple[list, dict[str, int]]:
    """[(source, frames)] for every source `load(source)` decodes; a file it cannot (decode.py's
    MediaError: missing, empty, unreadable, no video stream, too short, ...) is skipped, named
    once in the log and counted by reason, and a summary line ends the pass: one bad video never
    stops a command, and none is dropped in silence. Returns (decoded, {reason: count})."""
    from mugv.torch_backend.data.decode import MediaError
    decoded, skipped = [], {}
    for src in sources:
        try:
            decoded.append((src, load(src)))
        except MediaError as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            log(f"[mugv] skipped {err}")
    if skipped:
        log(f"[mugv] {what}: {len(decoded)} decoded, {sum(skipped.values())} skipped "
            f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})")
    return decoded, skipped

