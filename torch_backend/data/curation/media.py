"""Reading raw sources for curation: find them, decode with timestamps, classify what is broken.

Two passes over a source. `scan` decodes every frame once, shrunk to the detection width, with
its presentation time: shot detection, black/frozen frames, perceptual hashes and thumbnails need
no more, and decoding the whole file finds truncation (the same rule as `decode.probe`). `grab`
decodes again and keeps only the frames the scorers ask for, at the sizes they ask for (full
resolution for sharpness, the flow width for motion), so a 720p source never sits in memory whole.

Times, not frame counts: a clip is (start_s, end_s) from the frames' presentation timestamps, so
variable-frame-rate sources (phones, screen recordings) get the right ranges; frame indices are
used only inside one decode.
"""
from __future__ import annotations

import dataclasses
import pathlib

import av
import cv2
import numpy as np

from mugv.torch_backend.data.decode import MediaError, open_video
from mugv.torch_backend.data.media import write_mp4_frames

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def find_sources(input_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Video files under `input_dir` (recursively, sorted, so runs and resumes agree on order)."""
    root = pathlib.Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"curate: input_dir {root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


@dataclasses.dataclass
class Scan:
    """One decode of a source: small RGB frames (T, h, w, 3) uint8, their times (T,) in seconds
    from the first frame, the source's native size and average rate."""

    frames: np.ndarray
    times: np.ndarray
    height: int
    width: int
    fps: float
    codec: str

    @property
    def end_time(self) -> float:
        """When the last frame stops showing: its start plus the interval before it (the local
        rate; a variable-rate source's average rate would be wrong here)."""
        if len(self.times) == 0:
            return 0.0
        last = float(self.times[-1] - self.times[-2]) if len(self.times) > 1 else 1.0 / self.fps
        return float(self.times[-1]) + last


def _times(frames_pts: list, time_base, fps: float) -> np.ndarray:
    if any(p is None for p in frames_pts) or time_base is None:
        return np.arange(len(frames_pts)) / fps
    t = np.array([float(p * time_base) for p in frames_pts])
    return t - t[0]  # clips are timed from the first shown frame (mp4 edit lists may offset it)


def scan(path: pathlib.Path, width: int) -> Scan:
    """Decode every frame of `path`, shrunk to `width` (aspect kept, never enlarged)."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 24.0
        small, pts = [], []
        try:
            for frame in container.decode(stream):
                w = min(width, frame.width)
                h = max(2, round(frame.height * w / frame.width))
                small.append(frame.reformat(width=w, height=h, format="rgb24",
                                            interpolation="AREA").to_ndarray())
                pts.append(frame.pts)
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {len(small)} frames: {e}") from None
        if not small:
            raise MediaError(path, "no frames")
        if stream.frames and len(small) < stream.frames:
            raise MediaError(path, "decode error", f"container lists {stream.frames} frames, "
                                                   f"only {len(small)} decode (truncated?)")
        order = np.argsort(np.array([p if p is not None else i for i, p in enumerate(pts)]), kind="stable")
        frames = np.stack([small[i] for i in order])
        times = _times([pts[i] for i in order], stream.time_base, fps)
        return Scan(frames, times, stream.height, stream.width, fps, stream.codec_context.name)


def grab(path: pathlib.Path, wanted: dict[int, int | None]) -> dict[int, np.ndarray]:
    """Frames by index (decode order = presentation order for the codecs we meet), each RGB at
    the width asked (None = native). One decode, stopping after the last index wanted."""
    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    last = max(wanted)
    with open_video(path) as container:
        stream = container.streams.video[0]
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    w = wanted[index] or frame.width
                    w = min(w, frame.width)
                    h = max(2, round(frame.height * w / frame.width))
                    out[index] = frame.reformat(width=w, height=h, format="rgb24",
                                                interpolation="AREA").to_ndarray()
                if index >= last:
                    break
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {len(out)} wanted frames: {e}") from None
    return out


def write_clip(path: pathlib.Path, start_index: int, end_index: int, out: pathlib.Path, fps: float) -> int:
    """Re-encode frames [start_index, end_index) of `path` as H.264 mp4 at constant `fps` (the
    source's average rate): what `decode.py` reads. Written to `out.part` then renamed, so a
    killed run never leaves half a clip. Returns the frames written."""
    tmp = out.with_name(out.name + ".part")
    with open_video(path) as container:
        src = container.streams.video[0]
        width, height = src.width - src.width % 2, src.height - src.height % 2   # yuv420p: even sizes

        def frames():
            for index, frame in enumerate(container.decode(src)):
                if index >= end_index:
                    break
                if index >= start_index:
                    yield frame.to_ndarray(format="rgb24")[:height, :width]
        # constant integer rate: what decode.py reads back
        written = write_mp4_frames(tmp, frames(), max(1, int(round(fps))), width, height, crf=18, preset="fast")
    tmp.rename(out)
    return written


def grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of an RGB frame (BT.601, as OpenCV computes it)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
