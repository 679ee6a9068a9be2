"""Video and image decoding with PyAV: probe, fps resampling, cover resize and centre crop.

Frames are selected by index on a constant-frame-rate grid: output frame k at `target_fps` shows
source frame floor(k * source_fps / target_fps) (the same rule `core/data.py::frames_available`
counts with), so 30 -> 15 fps keeps every second frame and 8 -> 16 fps shows each frame twice.
The source rate is the manifest's `fps` when given, else the stream's average rate. Images (PNG,
JPEG) open as one-frame streams, so images and videos share this path.

Every failure is a `MediaError` whose `reason` is one short, countable category (see REASONS);
`detail` keeps FFmpeg's message.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import av
import numpy as np

REASONS = ("missing file", "empty file", "unreadable container", "no video stream",
           "decode error", "no frames", "too short", "too small")


class MediaError(Exception):
    """A media file cannot give the frames asked for; `reason` is one of REASONS."""

    def __init__(self, path: pathlib.Path, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What probing found: frame size, decodable frame count and frame rate."""

    height: int
    width: int
    num_frames: int
    fps: float
    codec: str


def probe(path: str | pathlib.Path, fps: float | None = None) -> MediaInfo:
    """Open `path`, decode every frame once (so truncated files fail here, not mid-training),
    and return its size, frame count and rate (`fps` overrides the stream's rate)."""
    path = pathlib.Path(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        count = 0
        try:
            for _ in container.decode(stream):
                count += 1
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {count} frames: {e}") from None
        if count == 0:
            raise MediaError(path, "no frames")
        if stream.frames and count < stream.frames:
            # an index written up front (faststart) promises frames the cut-off data lacks
            raise MediaError(path, "decode error", f"container lists {stream.frames} frames, "
                                                   f"only {count} decode (truncated?)")
        rate = fps if fps is not None else _stream_fps(stream)
        return MediaInfo(stream.height, stream.width, count, rate, stream.codec_context.name)


def read_frames(path: str | pathlib.Path) -> np.ndarray:
    """Every frame of `path` as uint8 (T, H, W, 3) RGB at its own size: what the analyzer reads.
    Failures are the classified MediaError of `probe`."""
    path = pathlib.Path(path)
    with open_video(path) as container:
        frames = []
        try:
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {len(frames)} frames: {e}") from None
    if not frames:
        raise MediaError(path, "no frames")
    return np.stack(frames)


def source_indices(num_frames: int, source_fps: float, target_fps: float, start: int = 0) -> np.ndarray:
    """Source frame indices of `num_frames` output frames at `target_fps`, from `start`."""
    k = np.arange(num_frames, dtype=np.float64)
    # 1e-9: exact ratios (30 -> 15 fps) must not lose a frame to floating-point rounding
    return start + np.floor(k * source_fps / target_fps + 1e-9).astype(np.int64)


def decode_clip(path: str | pathlib.Path, num_frames: int, height: int, width: int,
                target_fps: float, source_fps: float | None = None, start: int = 0) -> np.ndarray:
    """uint8 array (num_frames, height, width, 3), RGB: fps-resampled, cover-resized, centre-cropped.

    Arguments:
      num_frames, height, width, target_fps: the bucket's shape and rate.
      source_fps: the clip's rate (manifest override); the stream's average rate when None.
      start: first source frame (0 = the clip's start).
    """
    path = pathlib.Path(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        rate = source_fps if source_fps is not None else _stream_fps(stream)
        if num_frames == 1 or stream.frames == 1:
            wanted = np.full(num_frames, start, dtype=np.int64)
        else:
            wanted = source_indices(num_frames, rate, target_fps, start)
        size = cover_size(stream.height, stream.width, height, width)
        picked: dict[int, np.ndarray] = {}
        last = int(wanted[-1])
        needed = set(wanted.tolist())
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in needed:
                    # AREA averages the source pixels under each output pixel: downscaling without
                    # aliasing; it equals bilinear when upscaling.
                    rgb = frame.reformat(width=size[1], height=size[0], format="rgb24",
                                         interpolation="AREA").to_ndarray()
                    picked[index] = centre_crop(rgb, height, width)
                if index >= last:
                    break
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {index + 1} frames: {e}") from None
        if last not in picked:
            raise MediaError(path, "too short", f"needs source frame {last}, has {index + 1} frames")
        return np.stack([picked[int(i)] for i in wanted])


def cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the smallest resize of (src_h, src_w), aspect kept, that covers (height, width)."""
    scale = max(height / src_h, width / src_w)
    # ceil, and never below the target: the crop must always fit
    return max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))


def centre_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre (height, width) window of a (H, W, C) frame."""
    top = (frame.shape[0] - height) // 2
    left = (frame.shape[1] - width) // 2
    return frame[top:top + height, left:left + width]


def to_model_range(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1], the VAE's input (notes 3.1)."""
    return (clip.astype(np.float32).transpose(3, 0, 1, 2) / 127.5 - 1.0)


class open_video:
    """Context manager opening a video container with a classified `MediaError` on failure
    (missing, empty, unreadable, no video stream): what every reader of user videos uses."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self):
        if not self.path.exists():
            raise MediaError(self.path, "missing file")
        if self.path.stat().st_size == 0:
            raise MediaError(self.path, "empty file")
        try:
            self.container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise MediaError(self.path, "unreadable container", str(e)) from None
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams}) or ["none"]
            self.container.close()
            raise MediaError(self.path, "no video stream", f"streams: {', '.join(kinds)}")
        self.container.streams.video[0].thread_type = "AUTO"
        return self.container

    def __exit__(self, *exc):
        self.container.close()
        return False


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 24.0
