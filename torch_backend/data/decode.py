"""Video and image decoding with PyAV: probe, fps resampling, cover resize and centre crop.

Frames are selected by index on a constant-frame-rate grid: output frame k at `target_fps` shows
source frame floor(k * source_fps / target_fps) (the same rule `core/data.py::frames_available`
counts with), so 30 -> 15 fps keeps every second frame and 8 -> 16 fps shows each frame twice.
The source rate is the manifest's `fps` when given, else the stream's average rate. Images (PNG,
JPEG) open as one-frame streams, so images and videos share this path.

Time ranges (manifest `start_s` / `end_s`, seconds from the first shown frame, as `mugv curate`
writes them): a clip is the frames whose presentation time t satisfies start_s <= t < end_s.
`probe` keeps every frame's time so `MediaInfo.clip` counts a range's frames without decoding
again; `decode_clip` seeks to the keyframe before start_s, decodes forward, treats the first frame
at or after start_s as index 0 of the resampling grid and stops at end_s, so a source's range
trains without being re-encoded.

Every failure is a `MediaError` whose `reason` is one short, countable category (see REASONS);
`detail` keeps FFmpeg's message.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib

import av
import numpy as np

REASONS = ("missing file", "empty file", "unreadable container", "no video stream",
           "decode error", "no frames", "too short", "too small", "range outside file")

# Frame times are compared with this slack: they are multiples of the stream's time base (1/90000 s
# at the finest we meet, 1.1e-5 s), and curate writes them as the same float products, so 1e-6 s
# absorbs float rounding and can never move a frame across a range edge.
TIME_EPS = 1e-6


class MediaError(Exception):
    """A media file cannot give the frames asked for; `reason` is one of REASONS."""

    def __init__(self, path: pathlib.Path, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What probing found: frame size, decodable frame count and frame rate; `times` (each
    frame's presentation time from the first frame, seconds) when probed from a file."""

    height: int
    width: int
    num_frames: int
    fps: float
    codec: str
    times: tuple[float, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def end_time(self) -> float:
        """When the last frame stops showing: its time plus the interval before it (the same
        rule curation's clips end by)."""
        t = self.times
        return t[-1] + ((t[-1] - t[-2]) if len(t) > 1 else 1.0 / self.fps)

    def clip(self, start_s: float | None, end_s: float | None, where: str = "") -> "MediaInfo":
        """The info of the range [start_s, end_s) (None = the file's start / end). A range that
        starts at or after the file's end, or ends more than half a frame after it, is a
        MediaError "range outside file" naming `where` (the manifest line) and the field."""
        if start_s is None and end_s is None:
            return self
        end = self.end_time
        half_frame = 0.5 * (end - self.times[0]) / len(self.times)
        path = pathlib.Path(where or "?")
        if start_s is not None and start_s >= end - TIME_EPS:
            raise MediaError(path, "range outside file", f"{where}: field 'start_s' = {start_s} is at or "
                                                         f"after the file's end ({end:.3f} s)")
        if end_s is not None and end_s > end + half_frame:
            raise MediaError(path, "range outside file", f"{where}: field 'end_s' = {end_s} is after the "
                                                         f"file's end ({end:.3f} s)")
        lo = -math.inf if start_s is None else start_s - TIME_EPS
        hi = math.inf if end_s is None else end_s - TIME_EPS
        times = tuple(t for t in self.times if lo <= t < hi)
        if not times:
            raise MediaError(path, "no frames", f"{where}: no frame in [{start_s}, {end_s}) s")
        return dataclasses.replace(self, num_frames=len(times), times=times)


def probe(path: str | pathlib.Path, fps: float | None = None) -> MediaInfo:
    """Open `path`, decode every frame once (so truncated files fail here, not mid-training),
    and return its size, frame count and rate (`fps` overrides the stream's rate)."""
    path = pathlib.Path(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        count, times = 0, []
        try:
            for frame in container.decode(stream):
                count += 1
                times.append(frame.time)
        except av.FFmpegError as e:
            raise MediaError(path, "decode error", f"after {count} frames: {e}") from None
        if count == 0:
            raise MediaError(path, "no frames")
        if stream.frames and count < stream.frames:
            # an index written up front (faststart) promises frames the cut-off data lacks
            raise MediaError(path, "decode error", f"container lists {stream.frames} frames, "
                                                   f"only {count} decode (truncated?)")
        rate = fps if fps is not None else _stream_fps(stream)
        if any(t is None for t in times):          # no timestamps: the constant-rate grid
            times = [i / rate for i in range(count)]
        times = sorted(times)
        return MediaInfo(stream.height, stream.width, count, rate, stream.codec_context.name,
                         tuple(t - times[0] for t in times))


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
                target_fps: float, source_fps: float | None = None, start: int = 0,
                start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """uint8 array (num_frames, height, width, 3), RGB: fps-resampled, cover-resized, centre-cropped.

    Arguments:
      num_frames, height, width, target_fps: the bucket's shape and rate.
      source_fps: the clip's rate (manifest override); the stream's average rate when None.
      start: first source frame counted from the clip's first frame (0 = the clip's start).
      start_s, end_s: the clip's time range in the file (seconds from its first frame; None = the
        file's start / end): frames before start_s are skipped after a seek, frames from end_s on
        are not part of the clip.
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
            for index, frame in enumerate(_frames_in_range(container, stream, start_s, end_s)):
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


def _frames_in_range(container, stream, start_s: float | None, end_s: float | None):
    """Decoded frames with start_s <= t < end_s (t from the file's first frame), in order.

    The first frame's time is read by decoding it (an mp4 edit list may start the stream at a
    non-zero time), then the container seeks to the keyframe at or before start_s and decodes
    forward. A demuxer that lands after start_s (it must not, but a broken index can) is caught
    by the first frame's time, and decoding restarts at the file's first frame."""
    frames = container.decode(stream)
    if start_s is None and end_s is None:
        yield from frames
        return
    first = next(frames, None)
    if first is None:
        return
    t0 = first.time or 0.0
    lo = -math.inf if start_s is None else start_s - TIME_EPS
    hi = math.inf if end_s is None else end_s - TIME_EPS
    if start_s and start_s > TIME_EPS and stream.time_base:
        container.seek(first.pts + int(start_s / stream.time_base), stream=stream, backward=True)
        frames = container.decode(stream)
        frame = next(frames, None)
        if frame is not None and (frame.time or 0.0) - t0 > start_s + TIME_EPS:   # landed past it
            container.seek(first.pts, stream=stream, backward=True)
            frames = container.decode(stream)
        elif frame is not None:
            frames = itertools.chain([frame], frames)
    else:
        frames = itertools.chain([first], frames)
    for frame in frames:
        t = (frame.time or 0.0) - t0
        if t < lo:
            continue
        if t >= hi:
            return
        yield frame


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
