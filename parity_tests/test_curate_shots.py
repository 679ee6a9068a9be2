"""Shot detection on generated sources (cuts, fades, dissolves), timestamps of variable-rate
video, long-shot splitting, and perceptual-hash dedup."""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import av
import numpy as np

from mugv.core.curation import ShotConfig, embedded_curate_config
from mugv.torch_backend.data.curation import dedup, media, shots
from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources
from mugv.torch_backend.data.media import write_mp4
from mugv.torch_backend.data.product_videos import Scene, render


def test_shot_detection_recall_on_generated_sources(tmp_path):
    truth = generate_sources(tmp_path, SourcesSpec(sources=3, shots=3, shot_frames=(36, 44), defect_rate=0.0, seed=7))
    cfg = embedded_curate_config(str(tmp_path), str(tmp_path / "out")).shots
    missed, extra, total = [], [], 0
    for name, t in truth["sources"].items():
        scan = media.scan(tmp_path / name, cfg.analysis_width)
        found = shots.detect(scan.frames, cfg)
        centres = [(scan.times[min(f.start, len(scan.times) - 1)] + scan.times[min(f.end, len(scan.times) - 1)]) / 2
                   for f in found]
        total += len(t["transitions"])
        for tr in t["transitions"]:
            if not any(abs(c - tr["time"]) <= 0.3 for c in centres):
                missed.append((name, tr["kind"], tr["time"]))
        for f, c in zip(found, centres):
            if not any(abs(c - tr["time"]) <= 0.3 for tr in t["transitions"]):
                extra.append((name, f.kind, round(float(c), 3)))
    kinds = {tr["kind"] for t in truth["sources"].values() for tr in t["transitions"]}
    assert kinds == {"cut", "fade", "dissolve"}, f"the seed must plant every kind, got {kinds}"
    assert not missed, f"missed transitions (source, kind, time s) of {total}: {missed}"
    assert not extra, f"false boundaries (source, kind, time s): {extra}"


def _vfr_mp4(path, first, second, durations_ms):
    """Two shots with per-frame durations (ms): a variable-frame-rate mp4 (time base 1/1000)."""
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = first.shape[2], first.shape[1], "yuv420p"
    stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
    pts = 0
    for frame_rgb, dur in zip(np.concatenate([first, second]), durations_ms):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
        pts += dur
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_variable_frame_rate_clip_times_come_from_timestamps(tmp_path):
    a = render(Scene("cube", "red", "matte", "white studio", "pan left"), 1, 64, 30)
    b = render(Scene("sphere", "blue", "glossy", "charcoal", "zoom in"), 2, 64, 30)
    # the first shot at 20 fps (50 ms), the second at 40 fps (25 ms): 1.5 s + 0.75 s
    durations = [50] * 30 + [25] * 30
    path = tmp_path / "vfr.mp4"
    _vfr_mp4(path, a, b, durations)
    scan = media.scan(path, 64)
    assert len(scan.frames) == 60, f"decoded {len(scan.frames)} frames of 60"
    steps = np.round(np.diff(scan.times) * 1000).astype(int)
    assert set(steps[:29].tolist()) == {50} and set(steps[30:].tolist()) == {25}, \
        f"frame durations from timestamps: {sorted(set(steps.tolist()))}, expected 50 then 25 ms"
    found = shots.detect(scan.frames, ShotConfig(analysis_width=64))
    assert [f.kind for f in found] == ["cut"] and found[0].start == 30, found
    cut_time = float(scan.times[found[0].start])
    # frame count / average rate would put the cut at 30 / (60 / 2.25 s) = 1.125 s
    assert abs(cut_time - 1.5) < 1e-3, f"cut at {cut_time:.3f} s, expected 1.500 s (timestamps)"
    assert abs(scan.end_time - 2.25) < 1e-3, f"source ends at {scan.end_time:.3f} s, expected 2.250"


def test_long_shots_split_into_pieces_of_at_most_max_duration():
    times = np.arange(100) / 10.0                       # 10 s at 10 fps
    pieces = shots.split_long(0, 100, times, 10.0, max_s=3.0)
    lengths = [(times[e] if e < 100 else 10.0) - times[s] for s, e in pieces]
    assert len(pieces) == 4 and max(lengths) <= 3.0 + 1e-9, f"pieces {pieces}, lengths {lengths}"
    assert pieces[0][0] == 0 and pieces[-1][1] == 100 and all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


def _dissolve(a: np.ndarray, b: np.ndarray, frames: int = 8) -> np.ndarray:
    w = np.linspace(0, 1, frames + 2)[1:-1, None, None, None]
    mid = (a[-frames:] * (1 - w) + b[:frames] * w).round().astype(np.uint8)
    return np.concatenate([a[:-frames], mid, b[frames:]])


def test_colour_structure_finds_a_dissolve_between_look_alike_shots(tmp_path):
    """Another product on the same background, both shots moving: the whole-frame tests see a
    small change (under dissolve_threshold) and miss the dissolve; the hue distribution of the
    saturated pixels changes completely and finds it. One shot with the same motion is not split."""
    a = render(Scene("cone", "red", "matte", "light grey", "rotate"), 1, 64, 40)
    b = render(Scene("cone", "blue", "matte", "light grey", "rotate"), 2, 64, 40)
    write_mp4(tmp_path / "pair.mp4", _dissolve(a, b), 16, crf=18)
    frames = media.scan(tmp_path / "pair.mp4", 64).frames          # 72 frames, dissolve over 32..39
    cfg = embedded_curate_config(str(tmp_path), str(tmp_path / "out")).shots
    without = shots.detect(frames, dataclasses.replace(cfg, colour_threshold=0.0))
    assert without == [], f"the pixel tests alone should miss this dissolve (else the test shows nothing): {without}"
    found = shots.detect(frames, cfg)
    assert [f.kind for f in found] == ["dissolve"] and abs((found[0].start + found[0].end) / 2 - 35.5) <= 2, found
    for motion in ("rotate", "zoom in", "pan right"):   # zoom: the coloured area grows, its hues stay
        long_shot = render(Scene("cone", "red", "matte", "light grey", motion), 1, 64, 72, motion_frames=40)
        write_mp4(tmp_path / "one.mp4", long_shot, 16, crf=18)
        assert shots.detect(media.scan(tmp_path / "one.mp4", 64).frames, cfg) == [], motion


def test_edge_trim_drops_frames_next_to_transitions_only():
    times = np.arange(100) / 16.0                       # 6.25 s at 16 fps
    # a shot after a transition and before another: 4 frames (0.25 s) off each side
    assert shots.trim_edges(20, 60, times, 6.25, 0.25, True, True) == (24, 56)
    # the source's own start and end stay
    assert shots.trim_edges(0, 60, times, 6.25, 0.25, False, True) == (0, 56)
    assert shots.trim_edges(20, 100, times, 6.25, 0.25, True, False) == (24, 100)
    assert shots.trim_edges(20, 60, times, 6.25, 0.0, True, True) == (20, 60)
    # a shot trimming would empty stays whole (the length filter rejects it, and the report counts it)
    assert shots.trim_edges(20, 26, times, 6.25, 0.25, True, True) == (20, 26)
    # variable frame rate: by presentation time, not frame count (20 fps, then 40 fps)
    vfr = np.concatenate([np.arange(30) * 0.05, 1.5 + np.arange(30) * 0.025])
    assert shots.trim_edges(10, 50, vfr, 2.25, 0.1, True, True) == (12, 46)


def _roundtrip(clip, tmp_path, name):
    write_mp4(tmp_path / name, clip, 16, crf=18)
    return media.scan(tmp_path / name, 64).frames


def test_phash_finds_exact_and_near_duplicates_and_keeps_distinct(tmp_path):
    scenes = [Scene("cube", "red", "matte", "light grey", "rotate"), Scene("torus", "green", "glossy", "beige", "pan left"),
              Scene("cone", "yellow", "metallic", "light grey", "zoom out")]
    clips = [render(s, 10 + i, 64, 17) for i, s in enumerate(scenes)]
    near = np.roll(np.clip(clips[0].astype(np.float64) * 1.06 + 2, 0, 255).astype(np.uint8), 1, axis=2)
    decoded = {"orig": _roundtrip(clips[0], tmp_path, "a.mp4"), "exact": _roundtrip(clips[0], tmp_path, "b.mp4"),
               "near": _roundtrip(near, tmp_path, "c.mp4"), "other1": _roundtrip(clips[1], tmp_path, "d.mp4"),
               "other2": _roundtrip(clips[2], tmp_path, "e.mp4")}
    sigs = {k: [dedup.phash(v[i]) for i in (2, 8, 14)] for k, v in decoded.items()}
    dist = {k: dedup.signature_distance(sigs["orig"], s) for k, s in sigs.items()}
    assert dist["exact"] == 0, f"exact copy hashes differ by {dist['exact']} bits"
    assert dist["near"] <= 8, f"near copy (6% brighter, 1 px shift, re-encoded) at {dist['near']} bits > 8"
    assert min(dist["other1"], dist["other2"]) > 16, f"distinct shots only {dist} bits apart"
    chroma = {k: [dedup.chroma_layout(v[i]) for i in (2, 8, 14)] for k, v in decoded.items()}
    groups = dedup.group(sigs, max_distance=8, chroma=chroma, max_chroma=12)
    assert groups == {"exact": "exact", "near": "exact", "orig": "exact"}, groups
    # a recoloured copy (red -> green) keeps its grey structure: pHash alone calls it a copy
    recoloured = _roundtrip(clips[0][..., [1, 0, 2]], tmp_path, "f.mp4")
    sigs["recoloured"] = [dedup.phash(recoloured[i]) for i in (2, 8, 14)]
    chroma["recoloured"] = [dedup.chroma_layout(recoloured[i]) for i in (2, 8, 14)]
    assert dedup.signature_distance(sigs["orig"], sigs["recoloured"]) <= 8, "pHash is (nearly) blind to hue"
    assert dedup.chroma_distance(chroma["orig"], chroma["recoloured"]) > 12
    assert "recoloured" not in dedup.group(sigs, 8, chroma, 12), "a different colour is not a duplicate"
    drop = dedup.keep_one(groups, {"orig": (5.0,), "exact": (5.0,), "near": (9.0,)})
    assert drop == {"orig", "exact"}, f"the sharpest member must stay: dropped {drop}"
