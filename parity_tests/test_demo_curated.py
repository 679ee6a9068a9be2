"""`mugv demo --curated`'s training split (jobs/generate_data.py::curate_train) without the demo:
the sources hold only training compositions, the curated manifest holds no held-out one, and the
defects planted in the sources are rejected. A few seconds on 2 cores (4 sources of 4 shots)."""
from __future__ import annotations

import json
import pathlib

import pytest

from mugv.torch_backend.data.analyzer import parse_caption
from mugv.torch_backend.data.curation.evaluate import label_clips
from mugv.torch_backend.data.manifest import read_manifest
from mugv.torch_backend.data.product_sources import SourcesSpec
from mugv.torch_backend.jobs.generate_data import (DemoData, SOURCE_SIZE, curate_train, curated_shot_frames,
                                                   curated_sources_spec, held_out_in_manifest)

DATA = DemoData()
# defect_rate 0.8 plants more than the demo's 0.45 so that 12 shots after the first source carry
# each filter's defect; the demo's shot lengths, size and rate
SPEC = SourcesSpec(sources=4, shots=4, shot_frames=curated_shot_frames(DATA), size=SOURCE_SIZE, fps=DATA.fps,
                   defect_rate=0.8, seed=5)
FILTER_OF = {"blur": "sharpness", "static": "motion", "shake": "motion"}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_curated")
    result = curate_train(DATA, root, log=lambda s: None, spec=SPEC)
    truth = json.loads((root / "sources" / "truth.json").read_text())
    clips = [c for c in map(json.loads, open(root / "curated" / "curation.jsonl")) if "key" in c]
    return root, result, truth, clips


def test_sources_and_manifest_hold_only_training_compositions(curated):
    root, result, truth, _ = curated
    comps = DATA.compositions()
    train, kept_out = {tuple(t) for t in comps["train"]}, {tuple(t) for t in comps["eval"] + comps["val"]}
    for name, src in truth["sources"].items():
        for shot in src["shots"]:
            p = parse_caption(shot["caption"])
            triple = (p["colour"], p["shape"], p["motion"])
            assert triple in train, f"{name}: shot caption {shot['caption']!r} is not a training composition"
    rows = read_manifest(result["manifest"])
    assert rows, f"{result['manifest']}: empty"
    for e in rows:
        p = parse_caption(e.caption)
        assert (p["colour"], p["shape"], p["motion"]) not in kept_out, f"{e.sample_id}: {e.caption!r} is held out"
    assert held_out_in_manifest(DATA, result["manifest"]) == []


def test_held_out_check_finds_a_held_out_caption(tmp_path):
    colour, shape, motion = DATA.compositions()["eval"][0]
    from mugv.torch_backend.jobs.generate_data import caption
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"id": "x", "path": "x.mp4", "caption": caption(colour, shape, motion)}) + "\n")
    assert held_out_in_manifest(DATA, bad) == [caption(colour, shape, motion)]


def test_planted_defects_are_rejected_and_kept_clips_are_long_enough(curated):
    _, result, truth, clips = curated
    labels = label_clips(truth, clips)
    planted = {d: 0 for d in FILTER_OF}
    for c in clips:
        lab = labels.get(c["key"])
        if lab is None or lab["defect"] not in FILTER_OF:
            continue
        planted[lab["defect"]] += 1
        assert c["decision"] != "kept" and FILTER_OF[lab["defect"]] in c["reasons"], \
            f"{c['key']}: planted {lab['defect']} shot not rejected by {FILTER_OF[lab['defect']]} ({c['reasons']})"
    assert all(planted.values()), f"seed {SPEC.seed} should plant every filter's defect, planted {planted}"
    # duplicates: one member of each near-duplicate group is kept (which copies are grouped at all
    # is dedup's recall, measured in docs/curation.md, not asserted on one draw)
    groups = {}
    for c in clips:
        if c.get("dup_group"):
            groups.setdefault(c["dup_group"], []).append(c["decision"])
    assert groups, f"seed {SPEC.seed} should group some planted duplicate"
    for g, decisions in groups.items():
        assert decisions.count("kept") <= 1, f"duplicate group {g}: {decisions}"
    # every kept clip holds the DiT's clip length (the reason for curated_shot_frames)
    for e in read_manifest(result["manifest"]):
        start = e.start_s or 0.0
        end = e.end_s if e.end_s is not None else truth["sources"][pathlib.Path(e.path).name]["duration"]
        assert (end - start) * DATA.fps >= DATA.frames - 1e-6, f"{e.sample_id}: {start}-{end} s"
    assert result["counts"]["kept"] == len(read_manifest(result["manifest"]))


def test_the_demo_spec_targets_the_uncurated_clip_count():
    spec = curated_sources_spec(DATA)
    clean = spec.shots + (spec.sources - 1) * spec.shots * (1 - spec.defect_rate)   # expected clean shots
    assert DATA.count <= clean < DATA.count + spec.shots * (1 - spec.defect_rate) + 1e-9
    assert spec.shot_frames[0] >= DATA.frames + 16


@pytest.mark.parametrize("argv, curated", [(["demo"], False), (["demo", "--curated"], True),
                                           (["demo", "--curated", "--out", "x"], True),
                                           (["demo", "--curated", "false"], False),
                                           (["demo", "--quick", "--curated"], True)])
def test_cli_flag(argv, curated):
    from mugv.torch_backend.cli import commands
    command, cfg = commands.parse(argv)
    assert command == "demo" and cfg.curated is curated, (argv, cfg.curated)


def test_report_section_names_the_counts(curated, tmp_path):
    from mugv.torch_backend.experiments.demo_report import _curation_section
    _, result, _, _ = curated
    text = _curation_section({**result, "seen_in_train": [3, 4]}, tmp_path)
    c = result["counts"]
    assert f"**{c['kept']} kept**" in text and f"{c['clips']} clips" in text and result["report"] in text
    for name, n in c["rejected_by_filter"].items():
        assert f"| {name} | {n} |" in text, (name, text)
    assert "| cut |" in text and "| dissolve |" in text and "3 / 4" in text


def test_rows_spanning_transitions_counts_centres_and_edges():
    from mugv.torch_backend.data.curation.evaluate import rows_spanning_transitions
    truth = {"sources": {"s.mp4": {"duration": 6.0, "transitions": [
        {"kind": "cut", "time": 2.0, "start": 2.0, "end": 2.0},
        {"kind": "dissolve", "time": 4.25, "start": 4.0, "end": 4.5}]}}}
    rows = [{"path": "../sources/s.mp4", "start_s": 0.0, "end_s": 2.0},    # ends at the cut: clean
            {"path": "s.mp4", "start_s": 1.0, "end_s": 3.0},               # holds the cut
            {"path": "s.mp4", "start_s": 2.0, "end_s": 4.125},             # a dissolve's first frames
            {"path": "s.mp4", "start_s": 4.5}]                             # to the end: clean
    assert rows_spanning_transitions(truth, rows) == {"rows": 4, "transition_centre": 1, "transition_edge": 1,
                                                      "edge_depth_s": [0.125]}


@pytest.mark.parametrize("motion", ["zoom in", "pan left", "pan right", "rotate", "orbit"])
def test_long_shot_moves_at_the_clip_speed(motion):
    """render(motion_frames=17) on a 45-frame shot: its middle 17 frames follow exactly the
    trajectory of a 17-frame clip of the same seed (so the DiT sees the evaluation clips' speed)."""
    import numpy as np

    from mugv.torch_backend.data.product_videos import _trajectory
    clip = _trajectory(motion, np.random.default_rng(3), 17)
    shot = _trajectory(motion, np.random.default_rng(3), 45, 17)
    for name in clip:
        np.testing.assert_allclose(shot[name][14:31], clip[name], rtol=0, atol=1e-12, err_msg=f"{motion} {name}")
    spread = _trajectory(motion, np.random.default_rng(3), 45)   # the default: motion over the whole shot
    assert any(not np.allclose(spread[name][14:31], clip[name]) for name in clip), f"{motion}: control"


def test_diagnostic_drops_exactly_the_kept_clips_with_a_true_transition(curated, tmp_path):
    """`curated_drop_transitions`: the same curation (reused: the sources and run are finished),
    its manifest without the rows that hold or touch a true transition, nothing else dropped."""
    from mugv.torch_backend.data.curation.evaluate import transition_in_row
    root, result, truth, _ = curated
    again = curate_train(DATA, root, log=lambda s: None, spec=SPEC, drop_transitions=True)
    full = [json.loads(x) for x in result["manifest"].read_text().splitlines() if x.strip()]
    clean = [json.loads(x) for x in again["manifest"].read_text().splitlines() if x.strip()]
    with_transition = [r for r in full if transition_in_row(truth, r)]
    assert again["manifest"] != result["manifest"] and result["manifest"].exists()
    assert clean == [r for r in full if not transition_in_row(truth, r)]
    assert again["counts"]["dropped_with_transitions"] == len(with_transition) == \
        result["kept_rows"]["transition_centre"] + result["kept_rows"]["transition_edge"]
    assert with_transition, "the planted sources should give the detector at least one miss to drop"
