"""The per-source stage: one source file in, its JSON-ready records out (pure; no shared state).

`process_source` is what every executor maps over sources (in-process, a process pool or Ray
Data workers), so a local run and a cluster run compute the same records. It never raises for a
bad file: a `MediaError` becomes a source record with the reason (decode.REASONS), and the run
goes on.

Records (one JSON object each; `kind` says which):
  source  {source, status "ok"|"bad", reason, detail, duration, frames, fps, transitions,
           seconds (wall), cpu_seconds (this process, all its threads: the per-core cost)}
  clip    {key, source, start_s, end_s, start_frame, end_frame, fps, height, width, shot, piece,
           scores, skipped, failed, phash, thumb}
`key` = "<source>@<start_s>-<end_s>" (3 decimals): the resume key of a clip.
"""
from __future__ import annotations

import base64
import pathlib
import time

import cv2
import numpy as np

from mugv.core.curation import CurateConfig
from mugv.torch_backend.data.curation import dedup, media, scorers, shots
from mugv.torch_backend.data.decode import MediaError

THUMB_WIDTH = 96


def clip_key(source: str, start_s: float, end_s: float) -> str:
    return f"{source}@{start_s:.3f}-{end_s:.3f}"


def _thumb(rgb: np.ndarray) -> str:
    h = max(2, round(rgb.shape[0] * THUMB_WIDTH / rgb.shape[1]))
    small = cv2.resize(rgb, (THUMB_WIDTH, h), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    return base64.b64encode(png.tobytes()).decode() if ok else ""


def process_source(source: str, input_dir: str, cfg: CurateConfig) -> list[dict]:
    """Scan, split into shots/clips, score and judge one source (`source` relative to input_dir).
    Returns its clip records followed by its source record (written last: it marks it done)."""
    t0, c0 = time.perf_counter(), time.process_time()
    path = pathlib.Path(input_dir) / source
    try:
        scan = media.scan(path, cfg.shots.analysis_width)
        if scan.end_time < cfg.shots.min_duration_s:
            raise MediaError(path, "too short", f"{scan.end_time:.2f} s < min_duration_s "
                                                f"{cfg.shots.min_duration_s} s")
        clips, transitions = _clips(source, scan, cfg)
        _score(path, scan, clips, cfg)
    except MediaError as e:
        return [{"kind": "source", "source": source, "status": "bad", "reason": e.reason,
                 "detail": e.detail, "seconds": time.perf_counter() - t0,
                 "cpu_seconds": time.process_time() - c0}]
    return clips + [{"kind": "source", "source": source, "status": "ok", "reason": "", "detail": "",
                     "duration": scan.end_time, "frames": len(scan.frames), "fps": scan.fps,
                     "height": scan.height, "width": scan.width, "transitions": transitions,
                     "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}]


def _clips(source: str, scan: media.Scan, cfg: CurateConfig) -> tuple[list[dict], list[dict]]:
    found = shots.detect(scan.frames, cfg.shots)
    n = len(scan.frames)

    def at(i: int) -> float:
        return float(scan.times[i]) if i < n else scan.end_time

    transitions = [{"kind": t.kind, "start_s": at(t.start), "end_s": at(t.end), "score": t.score} for t in found]
    clips = []
    for shot, (a, b) in enumerate(shots.shot_ranges(n, found)):
        a, b = shots.trim_edges(a, b, scan.times, scan.end_time, cfg.shots.edge_trim_s,
                                after_transition=a > 0, before_transition=b < n)
        for piece, (s, e) in enumerate(shots.split_long(a, b, scan.times, scan.end_time, cfg.shots.max_duration_s)):
            clips.append({"kind": "clip", "key": clip_key(source, at(s), at(e)), "source": source,
                          "start_s": at(s), "end_s": at(e), "start_frame": s, "end_frame": e,
                          "fps": scan.fps, "height": scan.height, "width": scan.width,
                          "shot": shot, "piece": piece})
    return clips, transitions


def _score(path: pathlib.Path, scan: media.Scan, clips: list[dict], cfg: CurateConfig) -> None:
    """Fill in scores, skip reasons, failed filters, hashes and a thumbnail for each clip."""
    wanted: dict[int, int | None] = {}
    for c in clips:
        for i, w in scorers.frames_wanted(c["start_frame"], c["end_frame"], cfg.filters).items():
            wanted[i] = None if (i in wanted and wanted[i] is None) or w is None else w
    grabbed = media.grab(path, wanted)
    for c in clips:
        s, e = c["start_frame"], c["end_frame"]
        view = scorers.ClipFrames(s, e, c["end_s"] - c["start_s"], scan.height, scan.width,
                                  scan.frames[s:e], grabbed)
        scores, skipped = scorers.score(view, cfg.filters)
        c["scores"], c["skipped"] = scores, skipped
        c["failed"] = scorers.decide(scores, cfg.filters, cfg.shots.min_duration_s)
        keys = scorers.key_frame_indices(s, e, cfg.dedup.key_frames)
        c["phash"] = [f"{dedup.phash(scan.frames[i]):016x}" for i in keys]
        c["chroma"] = [dedup.chroma_layout(scan.frames[i]) for i in keys]
        c["thumb"] = _thumb(scan.frames[(s + e) // 2])
