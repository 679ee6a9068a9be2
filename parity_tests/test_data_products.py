"""The embedded product-video dataset (real mp4 files + manifest through the real decode path) and
the analyzer that scores a clip against its caption, on clean and on degraded (32 px, blurred,
noisy) clips. The full measurement (200+ clips) is `python -m mugv.torch_backend.data.analyzer`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mugv.core.data import BucketSpec
from mugv.torch_backend.data import analyzer, dataset
from mugv.torch_backend.data import product_videos as pv
from mugv.torch_backend.data.decode import probe
from mugv.torch_backend.data.media import write_mp4


def _scenes(n: int) -> list[pv.Scene]:
    colours, backgrounds = list(pv.COLOURS), list(pv.BACKGROUNDS)
    return [pv.Scene(pv.SHAPES[i % 5], colours[(3 * i) % 8], pv.MATERIALS[i % 3], backgrounds[(2 * i + 1) % 5],
                     pv.MOTIONS[i % 7]) for i in range(n)]


def test_generated_dataset_is_real_video_with_a_manifest(tmp_path):
    manifest = pv.generate_dataset(tmp_path, 6, seed=21, size=64, frames=17, fps=16.0)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    attrs = [json.loads(line) for line in (tmp_path / "attributes.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["id"] for r in rows] == [a["id"] for a in attrs]
    for row, attr in zip(rows, attrs):
        info = probe(tmp_path / row["path"])
        assert (info.height, info.width, info.num_frames, info.codec) == (64, 64, 17, "h264")
        parsed = analyzer.parse_caption(row["caption"])
        assert parsed == {k: attr[k] for k in ("colour", "shape", "motion")}, row["caption"]
        assert attr["material"] in row["caption"] and attr["background"] in row["caption"]
    index = dataset.build_index(manifest, (BucketSpec(32, 32, 9, 2, 16.0), BucketSpec(64, 64, 17, 2, 16.0)))
    assert index.skipped == [] and {it.bucket for it in index.items} == {1}
    # deterministic per (seed, i); rerunning keeps the files and the manifest
    before = (tmp_path / "clips" / "000003.mp4").read_bytes()
    again = pv.generate_dataset(tmp_path, 6, seed=21, size=64, frames=17, fps=16.0)
    assert again.read_text() == manifest.read_text()
    assert (tmp_path / "clips" / "000003.mp4").read_bytes() == before
    clip = pv.render(pv.Scene("cube", "red", "matte", "beige", "static"), seed=1, size=32, frames=5)
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    with pytest.raises(ValueError, match=r"Scene.colour = 'teal'"):
        pv.Scene("cube", "teal", "matte", "beige", "static")


def test_caption_parsing():
    assert analyzer.parse_caption("A shiny Red ball, the camera zooms in slowly") == \
        {"colour": "red", "shape": "sphere", "motion": "zoom in"}
    assert analyzer.parse_caption("blue ring, panning to the left") == \
        {"colour": "blue", "shape": "torus", "motion": "pan left"}
    assert analyzer.parse_caption("a vase on marble") == {"colour": None, "shape": None, "motion": None}
    for motion, phrases in pv.MOTION_PHRASES.items():
        for p in phrases:
            assert analyzer.parse_caption(p)["motion"] == motion, p


def test_analyzer_on_clean_and_degraded_clips():
    """14 clips (every motion twice, every shape and colour at least once) after an H.264 round
    trip, clean at 64 px and degraded to 32 px with blur and noise."""
    import io
    import av
    scenes = _scenes(14)
    wrong = {"clean": {}, "degraded": {}}
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([77, i])
        clip = pv.render(scene, seed=1000 + i, size=64, frames=25)
        for condition, video in (("clean", clip), ("degraded", analyzer.degrade(clip, rng))):
            buf = io.BytesIO()
            write_mp4(buf, video, 16, crf=18)
            buf.seek(0)
            with av.open(buf) as container:
                decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            result = analyzer.analyze(decoded)
            for attribute in ("colour", "shape", "motion"):
                if result.best(attribute) != getattr(scene, attribute):
                    wrong[condition].setdefault(attribute, []).append(
                        (getattr(scene, attribute), result.best(attribute), scene))
            if condition == "clean":
                s = analyzer.score(decoded, scene.caption())
                assert s["total"] > 0.6, (scene, s)
                # a caption with another colour, shape and motion scores low
                other = pv.Scene(pv.SHAPES[(i + 2) % 5], list(pv.COLOURS)[(3 * i + 4) % 8], scene.material,
                                 scene.background, pv.MOTIONS[(i + 3) % 7])
                assert analyzer.score(decoded, other.caption())["total"] < s["total"] - 0.4, (scene, other)
    # measured on 1600 clips: clean >= 98 %, degraded >= 93.8 % per attribute (docs/data.md)
    assert not wrong["clean"], wrong["clean"]
    assert all(len(v) <= 2 for v in wrong["degraded"].values()), wrong["degraded"]


def test_analyzer_handles_an_empty_frame_and_bad_shapes():
    blank = np.full((6, 32, 32, 3), 120, np.uint8)
    result = analyzer.analyze(blank)
    assert result.features["found"] == 0.0
    assert abs(sum(result.motion.values()) - 1) < 1e-9
    with pytest.raises(ValueError, match=r"expected \(T >= 2, H, W, 3\)"):
        analyzer.analyze(np.zeros((1, 8, 8, 3), np.uint8))
