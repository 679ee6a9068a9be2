"""Decoding, fps resampling, resize/crop and bucket assignment on generated files and on the real
clips in ../shared/data/clips; bad input skipped and counted; manifest errors name the line."""
from __future__ import annotations

import dataclasses
import json

import av
import numpy as np
import pytest

from mugv.core.data import BucketSpec, assign_bucket, frames_available
from mugv.torch_backend.data import dataset
from mugv.torch_backend.data.decode import MediaError, decode_clip, probe, source_indices
from mugv.torch_backend.data.manifest import ManifestError, read_manifest
from mugv.torch_backend.data.media import write_mp4

# The README of ../shared/data/clips: (height, width, frames, fps)
SHARED_CLIPS = {
    "mugv_output_0.mp4": (1280, 720, 110, 23.0),
    "crush_027.mp4": (480, 832, 114, 16.0),
    "horse.mp4": (480, 720, 49, 8.0),
    "suv.mp4": (360, 640, 600, 30.05),
}


def _coded_clip(frames: int, height: int, width: int, rng) -> np.ndarray:
    """Frames a decoder cannot mix up: frame i has its own random flat colour."""
    colours = rng.integers(30, 225, size=(frames, 3))
    # neighbouring frames must differ a lot so the nearest-colour match below is unambiguous
    colours[:, 0] = 30 + (np.arange(frames) * 53) % 190
    return np.broadcast_to(colours[:, None, None, :], (frames, height, width, 3)).astype(np.uint8)


def _which_frames(decoded: np.ndarray, reference: np.ndarray) -> list[int]:
    means = decoded.reshape(len(decoded), -1, 3).mean(1)
    ref = reference.reshape(len(reference), -1, 3).mean(1)
    return [int(np.argmin(((ref - m) ** 2).sum(1))) for m in means]


@pytest.mark.parametrize("src_fps,dst_fps", [(30, 15), (30, 12), (24, 16), (8, 16), (25, 25)])
def test_fps_resampling_picks_the_right_source_frames(tmp_path, src_fps, dst_fps):
    rng = np.random.default_rng(src_fps * 100 + dst_fps)
    clip = _coded_clip(37, 32, 48, rng)
    path = tmp_path / "coded.mp4"
    write_mp4(path, clip, src_fps, crf=18)
    info = probe(path)
    assert (info.height, info.width, info.num_frames, info.fps) == (32, 48, 37, src_fps)
    reference = decode_clip(path, 37, 32, 48, src_fps)       # identity: every frame once
    assert _which_frames(reference, reference) == list(range(37))
    n = frames_available(37, src_fps, dst_fps)
    expected_n = sum(1 for k in range(200) if int(np.floor(k * src_fps / dst_fps + 1e-9)) < 37)
    assert n == expected_n
    got = decode_clip(path, n, 16, 16, dst_fps)
    assert got.shape == (n, 16, 16, 3) and got.dtype == np.uint8
    assert _which_frames(got, reference) == source_indices(n, src_fps, dst_fps).tolist()
    with pytest.raises(MediaError, match="too short"):
        decode_clip(path, n + 1, 16, 16, dst_fps)


def test_lossless_writes_decode_to_the_same_frames(tmp_path):
    """The generated datasets' store: two lossless writes of one 32 px clip (the size where x264's
    crf mode gives a different file and different decoded frames on each write,
    benchmarks/x264_repeatability.py) decode to exactly the clip's yuv420p conversion."""
    from mugv.torch_backend.data.decode import read_frames
    from mugv.torch_backend.data.product_videos import Scene, render
    video = render(Scene(shape="cube", colour="red", material="matte", background="white studio",
                         motion="pan right"), 123, 32, 17)
    expected = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                         .to_ndarray(format="rgb24") for f in video])
    for k in range(3):
        got = read_frames(write_mp4(tmp_path / f"clip{k}.mp4", video, 8, lossless=True))
        np.testing.assert_array_equal(got, expected)


# H.265 is decoded by the same path, but the PyAV 18.1 wheel's libx265 *encoder* took 50 s on 20
# tiny frames and corrupted the heap at exit here, so no H.265 file is written in tests.
@pytest.mark.parametrize("codec,suffix", [("libx264", "mkv"), ("libvpx-vp9", "webm")])
def test_other_codecs_and_containers(tmp_path, codec, suffix):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    clip = _coded_clip(20, 32, 48, np.random.default_rng(5))
    path = tmp_path / f"clip.{suffix}"
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=20)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    for frame in clip:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    info = probe(path)
    assert (info.height, info.width, info.num_frames) == (32, 48, 20)
    assert info.fps == pytest.approx(20, abs=0.01)
    got = decode_clip(path, 10, 16, 16, 10.0)
    assert _which_frames(got, clip) == list(range(0, 20, 2))


def test_cover_resize_and_centre_crop_keep_the_middle(tmp_path):
    # a 2:1 frame whose red channel encodes the column: a square crop must show the middle half
    h, w = 48, 96
    ramp = np.linspace(20, 235, w)
    frame = np.zeros((h, w, 3), np.uint8)
    frame[..., 0] = ramp[None, :].round()
    frame[..., 1] = 128
    path = tmp_path / "wide.mp4"
    write_mp4(path, np.stack([frame] * 9), 24, crf=18)
    out = decode_clip(path, 9, 32, 32, 24).astype(np.float64)
    # cover resize 48x96 -> 32x64, crop columns 16..48 of 64 = source columns 24..72 of 96
    left, right = out[:, :, :2, 0].mean(), out[:, :, -2:, 0].mean()
    assert abs(left - ramp[24:28].mean()) < 8 and abs(right - ramp[68:72].mean()) < 8, (left, right)
    tall = decode_clip(path, 1, 32, 16, 24)
    assert tall.shape == (1, 32, 16, 3)


def test_bucket_assignment_arithmetic():
    buckets = (BucketSpec(32, 32, 1, 8), BucketSpec(32, 32, 17, 2, 16.0), BucketSpec(64, 64, 33, 1, 16.0),
               BucketSpec(48, 80, 17, 2, 16.0), BucketSpec(80, 48, 17, 2, 16.0))
    assert assign_bucket(buckets, 64, 64, 33, 16.0) == (2, "")           # largest it fills
    assert assign_bucket(buckets, 64, 64, 20, 16.0) == (1, "")           # too short for 33
    assert assign_bucket(buckets, 360, 640, 600, 30.05) == (3, "")       # 16:9 -> landscape
    assert assign_bucket(buckets, 1280, 720, 110, 23.0) == (4, "")       # 9:16 -> portrait
    assert assign_bucket(buckets, 64, 64, 1, 24.0) == (0, "")            # image
    idx, why = assign_bucket(buckets, 64, 64, 9, 16.0)
    assert idx is None and why.startswith("too short")
    idx, why = assign_bucket(buckets, 40, 70, 40, 16.0)
    assert idx is None and why.startswith("too small")
    # 17 frames at 16 fps need 16 / 16 * 30 + 1 = 31 source frames at 30 fps
    assert frames_available(31, 30.0, 16.0) == 17 and frames_available(30, 30.0, 16.0) == 16


def test_shared_clips_probe_decode_and_buckets(shared_dir):
    clips = shared_dir / "data" / "clips"
    buckets = (BucketSpec(48, 80, 17, 2, 16.0), BucketSpec(80, 48, 17, 2, 16.0),
               BucketSpec(64, 64, 17, 2, 16.0), BucketSpec(64, 80, 17, 2, 16.0),
               BucketSpec(64, 64, 1, 4, 16.0))
    # horse is 3:2: log-nearer 80:48 (5:3) than 80:64 (5:4)
    expect_bucket = {"mugv_output_0.mp4": 1, "crush_027.mp4": 0, "horse.mp4": 0, "suv.mp4": 0}
    for name, (h, w, frames, fps) in SHARED_CLIPS.items():
        info = probe(clips / name)
        assert (info.height, info.width, info.num_frames) == (h, w, frames), name
        assert info.fps == pytest.approx(fps, abs=0.01), name
        assert info.codec == "h264"
        b, why = assign_bucket(buckets, h, w, frames, info.fps)
        assert b == expect_bucket[name], (name, why)
        spec = buckets[b]
        out = decode_clip(clips / name, spec.frames, spec.height, spec.width, spec.fps)
        assert out.shape == (17, spec.height, spec.width, 3)
        assert 20 < out.mean() < 235 and out.std() > 5, name       # real content, not padding
    # horse: 49 frames at 8 fps give 98 frames at 16 fps (each shown twice)
    assert frames_available(49, 8.0, 16.0) == 98
    horse = decode_clip(clips / "horse.mp4", 6, 48, 80, 16.0)
    assert np.array_equal(horse[0], horse[1]) and np.array_equal(horse[2], horse[3])
    assert not np.array_equal(horse[1], horse[2])
    # the manifest beside the clips is a dataset; the png is an image for image buckets
    index = dataset.build_index(clips / "captions.jsonl", buckets)
    assert index.skipped == []
    by_id = {(it.entry.path.name, index.buckets[it.bucket].frames) for it in index.items}
    assert {n for n, f in by_id if f == 17} == set(expect_bucket)
    assert {n for n, f in by_id if f == 1} == set(expect_bucket)   # each also gives an image
    # i2v reference: the manifest's image when given, else the clip's first frame
    item = next(it for it in index.items if it.entry.path.name == "horse.mp4" and it.bucket == 0)
    ref = dataset.load_reference(item, buckets[0])
    assert ref.shape == (3, 1, 48, 80)
    np.testing.assert_array_equal(ref[:, 0], dataset.load_item(item, buckets[0])[:, 0])
    with_ref = dataclasses.replace(item, entry=dataclasses.replace(item.entry, reference=clips / "mugv_sample.png"))
    assert not np.array_equal(dataset.load_reference(with_ref, buckets[0]), ref)
    image = probe(clips / "mugv_sample.png")
    assert image.num_frames == 1 and (image.height, image.width) == (1248, 704)
    frame = decode_clip(clips / "mugv_sample.png", 1, 64, 64, 16.0)
    assert frame.shape == (1, 64, 64, 3)


def _audio_only(path):
    from mugv.torch_backend.data.product_sources import write_audio_only
    write_audio_only(path)


def test_bad_inputs_are_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(7)
    good = _coded_clip(33, 64, 64, rng)
    write_mp4(tmp_path / "good.mp4", good, 16, crf=18)
    write_mp4(tmp_path / "good2.mp4", good, 16, crf=18)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.mp4").write_bytes(rng.bytes(4096))
    _audio_only(tmp_path / "audio.mp4")
    write_mp4(tmp_path / "short.mp4", good[:5], 16, crf=18)
    rows = ["good", "zero", "truncated", "random", "audio", "short", "missing", "good2"]
    with open(tmp_path / "m.jsonl", "w") as f:
        for name in rows:
            f.write(json.dumps({"id": name, "path": f"{name}.mp4", "caption": f"clip {name}"}) + "\n")
    buckets = (BucketSpec(32, 32, 17, 2, 16.0),)
    with caplog.at_level("WARNING"):
        index = dataset.build_index(tmp_path / "m.jsonl", buckets)
    assert [it.entry.sample_id for it in index.items] == ["good", "good2"]
    reasons = {sid: reason for sid, reason, _ in index.skipped}
    assert reasons == {"zero": "empty file", "truncated": "unreadable container",
                       "random": "unreadable container", "audio": "no video stream",
                       "short": "too short", "missing": "missing file"}
    assert index.skip_counts == {"empty file": 1, "unreadable container": 2, "no video stream": 1,
                                 "too short": 1, "missing file": 1}
    for sid in reasons:            # each skip is in the log with its reason
        assert any(f"skip {sid}" in r.getMessage() for r in caplog.records), sid
    assert "6 skipped" in index.report()
    # a file broken after indexing: dropped from its batch and counted, the run goes on
    (tmp_path / "good2.mp4").write_bytes(b"")
    failures = __import__("collections").Counter()
    batch = dataset.load_batch(index, [0, 1], 0, "t2v", failures)
    assert batch.sample_ids == ["good"] and batch.pixels.shape == (1, 3, 17, 32, 32)
    assert failures == {"empty file": 1}


def test_truncated_faststart_file_is_a_decode_error(tmp_path):
    clip = _coded_clip(24, 32, 32, np.random.default_rng(3))
    path = tmp_path / "fs.mp4"
    container = av.open(str(path), "w", format="mp4", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for frame in clip:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])      # the index up front survives, the data not
    with pytest.raises(MediaError) as err:
        probe(path)
    assert err.value.reason == "decode error"


def test_manifest_errors_name_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.mp4", "caption": "a red cube"}\n\n{"path": "b.mp4"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: field 'caption' is missing"):
        read_manifest(m)
    m.write_text('{"path": "a.mp4", "caption": "ok"}\n{"path": "b.mp4", "caption": "  "}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: field 'caption'"):
        read_manifest(m)
    m.write_text('{"path": "a.mp4", "caption": "ok", "fps": -3}\n')
    with pytest.raises(ManifestError, match=r":1: field 'fps' = -3"):
        read_manifest(m)
    m.write_text('{"path": "a.mp4", "caption": "ok"}\nnot json\n')
    with pytest.raises(ManifestError, match=r":2: not valid JSON"):
        read_manifest(m)
    c = tmp_path / "m.csv"
    c.write_text("path,caption,fps\na.mp4,a red cube,24\nb.mp4,,\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: field 'caption' is missing"):
        read_manifest(c)
    c.write_text("path,caption,fps\na.mp4,\"a red cube, turning\",24\n")
    (entry,) = read_manifest(c)
    assert entry.caption == "a red cube, turning" and entry.fps == 24.0 and entry.path == tmp_path / "a.mp4"


def test_manifest_with_a_bom_reads_and_latin1_is_named(tmp_path):
    """A UTF-8 byte-order mark (Windows editors) was rejected and Latin-1 bytes gave a bare
    UnicodeDecodeError without file or line (issue 26)."""
    m = tmp_path / "m.jsonl"
    m.write_bytes(b"\xef\xbb\xbf" + '{"path": "a.mp4", "caption": "caf\u00e9 cube"}\n'.encode())
    (entry,) = read_manifest(m)
    assert entry.caption == "caf\u00e9 cube"
    m.write_bytes('{"path": "a.mp4", "caption": "ok"}\n'.encode() + '{"path": "b.mp4", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not UTF-8 \(byte 0xe9 at column 34\)"):
        read_manifest(m)
    c = tmp_path / "m.csv"
    c.write_bytes(b"\xef\xbb\xbfpath,caption\na.mp4,a cube\n")
    (entry,) = read_manifest(c)
    assert entry.caption == "a cube"
    c.write_bytes("path,caption\na.mp4,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"m\.csv: not UTF-8"):
        read_manifest(c)


# --- time ranges (manifest start_s / end_s: curated clips of a long source, no re-encode) --------

def _small_gop_source(path, frames=70, fps=16, gop=6):
    """Coded frames in an H.264 mp4 with a keyframe every `gop` frames and B-frames, so a seek
    lands on a keyframe well before most starts and decoding must skip forward from it."""
    clip = _coded_clip(frames, 32, 32, np.random.default_rng(5))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.gop_size = gop
        s.options = {"crf": "10", "bf": "2", "sc_threshold": "0"}
        for f in clip:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return clip


def _range_equals_whole(path, start_s, end_s, fps):
    info = probe(path)
    times = np.array(info.times)
    k = int(np.searchsorted(times, start_s - 1e-6))                # first frame at or after start_s
    n = info.clip(start_s, end_s).num_frames
    assert n == int(((times >= start_s - 1e-6) & (times < end_s - 1e-6)).sum())
    out = frames_available(n, info.fps, fps)
    whole = decode_clip(path, out, 32, 32, fps, start=k)
    ranged = decode_clip(path, out, 32, 32, fps, start_s=start_s, end_s=end_s)
    assert np.array_equal(ranged, whole), f"range [{start_s}, {end_s}) at {fps} fps differs from the whole-file decode"
    with pytest.raises(MediaError, match="too short"):               # the range ends the clip
        decode_clip(path, out + 1, 32, 32, fps, start_s=start_s, end_s=end_s)
    return k, n


def test_a_range_decodes_the_same_frames_as_the_whole_file(tmp_path):
    path = tmp_path / "gop6.mp4"
    clip = _small_gop_source(path)
    with av.open(str(path)) as c:
        keys = sum(p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size)
    assert keys >= 10, f"only {keys} keyframes: the seek path would not be exercised"
    for start_s, end_s, fps in ((0.0, 1.0, 16.0), (1.3, 2.7, 16.0), (2.0625, 4.375, 8.0), (3.0, 70 / 16, 16.0)):
        k, n = _range_equals_whole(path, start_s, end_s, fps)
        got = _which_frames(decode_clip(path, n, 32, 32, 16.0, start_s=start_s, end_s=end_s), clip)
        assert got == list(range(k, k + n)), (start_s, end_s, got)


def test_ranges_of_generated_shots_equal_the_whole_file_and_fill_buckets(tmp_path):
    from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources
    truth = generate_sources(tmp_path / "src", SourcesSpec(sources=1, shots=4, shot_frames=(36, 44), defect_rate=0.0, seed=3))
    name, source = next(iter(truth["sources"].items()))
    path = tmp_path / "src" / name
    rows = []
    for i, shot in enumerate(source["shots"]):
        k, n = _range_equals_whole(path, shot["start"], shot["end"], 16.0)
        assert n == round((shot["end"] - shot["start"]) * 16), (shot, n)       # the generator's truth
        rows.append({"id": f"shot{i}", "path": name, "caption": shot["caption"],
                     "start_s": shot["start"], "end_s": shot["end"]})
    manifest = tmp_path / "src" / "ranges.jsonl"
    # a range shorter than the bucket (9 frames at 16 fps) is "too short"; one past the file's end
    # is skipped with the line and field named; the others are placed
    end = source["duration"]
    rows += [{"id": "short", "path": name, "caption": "x", "start_s": 0.0, "end_s": 0.25},
             {"id": "late", "path": name, "caption": "x", "start_s": end - 0.5, "end_s": end + 1.0},
             {"id": "after", "path": name, "caption": "x", "start_s": end + 0.5}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = dataset.build_index(manifest, (BucketSpec(32, 32, 9, 2, 16.0),))
    assert [it.entry.sample_id for it in index.items] == [f"shot{i}" for i in range(4)]
    skipped = {sid: (reason, detail) for sid, reason, detail in index.skipped}
    assert skipped["short"][0] == "too short"
    assert skipped["late"][0] == "range outside file" and "ranges.jsonl:6: field 'end_s'" in skipped["late"][1]
    assert skipped["after"][0] == "range outside file" and "ranges.jsonl:7: field 'start_s'" in skipped["after"][1]
    assert index.skip_counts == {"too short": 1, "range outside file": 2}
    batch = dataset.load_batch(index, [0, 1], 0, "t2v")
    shot = source["shots"][0]
    frames = round((shot["end"] - shot["start"]) * 16)          # 36-44 source frames: the middle 9
    first = decode_clip(path, 9, 32, 32, 16.0, start=int(round(shot["start"] * 16)) + (frames - 9) // 2)
    assert np.array_equal(batch.pixels[0].numpy(), dataset.to_model_range(first))


def test_bad_ranges_name_the_line_and_field(tmp_path):
    m = tmp_path / "m.jsonl"
    for fields, match in (('"start_s": 2.0, "end_s": 2.0', r":1: field 'end_s' = 2.0 is not after 'start_s' = 2.0"),
                          ('"start_s": 3, "end_s": 1.5', r":1: field 'end_s' = 1.5 is not after 'start_s' = 3"),
                          ('"start_s": -0.5', r":1: field 'start_s' = -0.5: expected a finite number of seconds >= 0"),
                          ('"end_s": "soon"', r":1: field 'end_s' = 'soon': expected a finite number"),
                          ('"end_s": NaN', r":1: field 'end_s' = nan: expected a finite number")):
        m.write_text('{"path": "a.mp4", "caption": "ok", ' + fields + '}\n')
        with pytest.raises(ManifestError, match=match):
            read_manifest(m)
    m.write_text('{"path": "a.mp4", "caption": "ok", "start_s": 1, "end_s": "2.5"}\n')
    (entry,) = read_manifest(m)
    assert (entry.start_s, entry.end_s) == (1.0, 2.5)


def test_a_longer_clip_gives_its_middle_frames():
    from mugv.core.data import centre_window_start
    assert centre_window_start(45, 17, 16.0, 16.0) == 14            # 14 before, 14 after
    assert centre_window_start(17, 17, 16.0, 16.0) == 0
    assert centre_window_start(46, 17, 16.0, 16.0) == 14            # an odd spare frame goes after
    assert centre_window_start(60, 17, 30.0, 15.0) == 13            # 17 at 15 fps span 33 of 30 fps frames
    assert centre_window_start(45, 1, 16.0, 16.0) == 0              # an image bucket: the first frame
    assert centre_window_start(0, 17, 16.0, 16.0) == 0              # unknown length: from the start

