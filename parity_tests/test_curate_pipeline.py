"""`mugv curate` end to end: bad inputs counted, a manifest `mugv cache`/`train` read, scores
against the generator's truth, resume after a SIGKILL, the real clips, and the Ray executor."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mugv.core.curation import CurateConfig, embedded_curate_config
from mugv.torch_backend.data.curation import run
from mugv.torch_backend.data.curation.captions import balance_weights
from mugv.torch_backend.data.curation.evaluate import evaluate_on_truth
from mugv.torch_backend.data.decode import decode_clip, probe
from mugv.torch_backend.data.manifest import read_manifest
from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources, write_bad_inputs

SPEC = SourcesSpec(sources=3, shots=3, shot_frames=(36, 44), defect_rate=0.6, seed=33)  # plants blur, shake, 2 near dups


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    truth = generate_sources(root / "in", SPEC)
    bad = write_bad_inputs(root / "in" / "bad")
    report = run(embedded_curate_config(str(root / "in"), str(root / "out")))
    return root, truth, bad, report


def _rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_bad_inputs_are_counted_with_their_reason_and_the_run_goes_on(curated):
    root, truth, bad, report = curated
    rows = {r["source"]: r for r in _rows(root / "out" / "curation.jsonl") if r.get("decision") == "bad input"}
    got = {pathlib.Path(s).name: r["reason"] for s, r in rows.items()}
    assert got == bad, f"bad-input reasons {got}, expected {bad}"
    expected_counts = {}
    for reason in bad.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert report["bad_inputs"] == expected_counts, report["bad_inputs"]
    assert report["sources_ok"] == SPEC.sources and report["kept"] > 0, report


def test_manifest_is_read_by_the_training_data_path(curated):
    root, _, _, report = curated
    entries = read_manifest(root / "out" / "manifest.jsonl")
    assert len(entries) == report["kept"] == report["manifest_rows"], (len(entries), report["kept"])
    clips = {c["id"]: c for c in _rows(root / "out" / "curation.jsonl") if c.get("decision") == "kept"}
    for entry in entries[:3]:
        c = clips[entry.sample_id]
        info = probe(entry.path)
        want = c["end_frame"] - c["start_frame"]
        assert info.num_frames == want, f"{entry.sample_id}: re-encoded clip has {info.num_frames} frames, range has {want}"
        frames = decode_clip(entry.path, 17, 32, 32, 16.0)
        assert frames.shape == (17, 32, 32, 3)
        assert entry.caption == c["caption"] and entry.caption.endswith("product showcase.")
    weights = _rows(root / "out" / "weights.jsonl")
    assert {w["id"] for w in weights} == {e.sample_id for e in entries}
    assert abs(sum(w["weight"] for w in weights) / len(weights) - 1) < 1e-9, "weights have mean 1"
    # the manifest rows carry the same weights, which the sampler reads through the index
    assert {e.sample_id: e.weight for e in entries} == {w["id"]: w["weight"] for w in weights}


def test_every_clip_has_scores_and_a_decision_with_reasons(curated):
    root, _, _, _ = curated
    for c in _rows(root / "out" / "curation.jsonl"):
        if "key" not in c:
            continue
        assert c["decision"] in ("kept", "rejected"), c["key"]
        assert (c["decision"] == "rejected") == bool(c["reasons"]), f"{c['key']}: {c['decision']} with {c['reasons']}"
        assert c["scores"]["sharpness"] is not None and c["scores"]["motion"] is not None, c["key"]
    report_md = (root / "out" / "report.md").read_text()
    for png in ("hist_sharpness.png", "hist_motion.png"):
        assert png in report_md and (root / "out" / "report" / png).stat().st_size > 1000, png


def test_planted_defects_and_boundaries_are_found(curated):
    root, _, _, _ = curated
    result = evaluate_on_truth(root / "out", root / "in" / "truth.json")
    shots = result["shots"]["all"]
    assert shots["recall"] >= 0.9 and shots["precision"] >= 0.9, f"shot boundaries {result['shots']}"
    for name in ("sharpness", "motion"):
        f = result["filters"][name]
        assert f["actual"] > 0, f"seed {SPEC.seed} plants no defect for {name}: {f}"
        assert f["recall"] == 1.0 and f["precision"] == 1.0, f"{name}: {f}"
    d = result["filters"]["dedup"]
    assert d["planted"] > 0 and d["recall"] >= 0.5 and d["precision"] == 1.0, f"dedup {d}"


def test_balance_weights_are_inverse_frequency():
    captions = {"a": "A red cube, static shot", "b": "A red cube, static shot", "c": "A blue sphere, slow pan left"}
    w = balance_weights(captions)
    assert w["a"]["weight"] == pytest.approx(w["b"]["weight"]) and w["c"]["weight"] == pytest.approx(2 * w["a"]["weight"])
    assert w["c"]["attributes"] == {"colour": "blue", "shape": "sphere", "motion": "pan left"}


_CHILD = """
import sys
from mugv.core.curation import embedded_curate_config
from mugv.torch_backend.data.curation import run
run(embedded_curate_config(sys.argv[1], sys.argv[2], batch_size=1))
"""


def test_rerun_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    generate_sources(tmp_path / "in", SourcesSpec(sources=5, shots=2, shot_frames=(36, 40), defect_rate=0.3, seed=9))
    once = run(embedded_curate_config(str(tmp_path / "in"), str(tmp_path / "once"), batch_size=1))
    results = tmp_path / "killed" / "results.jsonl"
    env = dict(os.environ, PYTHONSAFEPATH="1")
    child = subprocess.Popen([sys.executable, "-P", "-c", _CHILD, str(tmp_path / "in"), str(tmp_path / "killed")], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if results.exists() and results.read_text().count('"kind": "source"') >= 2:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the child finished before it could be killed: make the sources longer"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done_before = results.read_text().count('"kind": "source"')
    assert 2 <= done_before < 5, f"killed after {done_before} of 5 sources"
    with open(results, "a") as f:
        f.write('{"kind": "clip", "key": "torn')           # a write cut short by the kill
    again = run(embedded_curate_config(str(tmp_path / "in"), str(tmp_path / "killed"), batch_size=1))
    assert again["timing"]["sources_resumed"] == done_before, again["timing"]
    for name in ("curation.jsonl", "manifest.jsonl", "weights.jsonl"):
        a, b = _rows(tmp_path / "once" / name), _rows(tmp_path / "killed" / name)
        assert a == b, f"{name} differs after resume: {len(a)} vs {len(b)} rows"
    for key in ("clips", "kept", "rejected_by_filter", "bad_inputs"):
        assert once[key] == again[key], (key, once[key], again[key])


def test_real_clips_through_the_whole_pipeline(shared_dir, tmp_path):
    clips = shared_dir / "data" / "clips"
    if not (clips / "horse.mp4").is_file():
        pytest.skip(f"no real clips in {clips}")
    report = run(CurateConfig(input_dir=str(clips), out_dir=str(tmp_path)))
    assert report["sources"] == report["sources_ok"] == 4, report
    assert "aesthetic" in report["skipped_scorers"], "the aesthetic scorer must say why it did not run"
    rows = [c for c in _rows(tmp_path / "curation.jsonl") if "key" in c]
    assert {pathlib.Path(c["source"]).stem for c in rows} == {"horse", "suv", "crush_027", "mugv_output_0"}
    for c in rows:
        s = c["scores"]
        assert s["sharpness"] > 0 and s["motion"] is not None and s["duration"] >= 2.0 - 1e-6, (c["key"], s)
        assert c["caption"], f"{c['key']}: captions.jsonl gives every real clip a caption"
    horse = next(c for c in rows if c["source"] == "horse.mp4")
    assert horse["scores"]["motion"] > 1.0, f"a galloping horse moves: motion {horse['scores']['motion']}"
    # whole-source clips go into the manifest as the source itself, parts as its time range;
    # decode's count of a range's frames (by timestamp) equals curation's frame range
    assert report["manifest_rows"] == report["kept"] and report["range_rows"] > 0, report
    kept = {c["id"]: c for c in rows if c["decision"] == "kept"}
    for entry in read_manifest(tmp_path / "manifest.jsonl"):
        c = kept[entry.sample_id]
        if entry.start_s is not None:
            n = probe(entry.path).clip(entry.start_s, entry.end_s).num_frames
            assert n == c["end_frame"] - c["start_frame"], (entry.sample_id, n, c["start_frame"], c["end_frame"])
            assert decode_clip(entry.path, 5, 32, 32, 8.0, start_s=entry.start_s, end_s=entry.end_s).shape == (5, 32, 32, 3)
    assert (tmp_path / "report.md").is_file()


def test_ray_executor_gives_the_local_results(curated, tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (optional: pip install 'mugv[ray]'); the local executor is the default")
    root, _, _, local = curated
    remote = run(embedded_curate_config(str(root / "in"), str(tmp_path), executor="ray"))
    assert _rows(tmp_path / "curation.jsonl") == _rows(root / "out" / "curation.jsonl")
    assert remote["kept"] == local["kept"]


def test_process_pool_gives_the_in_process_results(curated, tmp_path):
    root, _, _, local = curated
    pooled = run(embedded_curate_config(str(root / "in"), str(tmp_path), workers=2, batch_size=2))
    assert _rows(tmp_path / "curation.jsonl") == _rows(root / "out" / "curation.jsonl"), "workers=2 changed records"
    assert pooled["kept"] == local["kept"]


def test_cli_curates_and_refuses_a_resume_with_other_settings(curated, tmp_path, capsys):
    """`mugv curate` runs the pipeline and names its outputs; rerun on the same --out_dir with
    another filter setting is exit 2 naming the setting (records of two settings never mix), and
    the earlier outputs stay as they were."""
    from mugv.torch_backend.cli import main
    root = curated[0]
    out = tmp_path / "cli"
    args = ["curate", "--input_dir", str(root / "in"), "--out_dir", str(out), "--shots.min_duration_s", "0.5",
            "--filters.min_short_side", "32"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "[mugv] curate:" in said and "manifest.jsonl" in said and "curation.jsonl" in said
    before = (out / "curation.jsonl").read_bytes()
    assert main(args + ["--filters.sharpness_min", "5"]) == 2
    err = capsys.readouterr().err
    assert "written with other ['filters']" in err and "sharpness_min" in err
    assert (out / "curation.jsonl").read_bytes() == before
    assert main(["curate", "--input_dir", str(tmp_path / "nowhere"), "--out_dir", str(out)]) == 2
    assert "--input_dir" in capsys.readouterr().err


def test_banded_dedup_finds_the_all_pairs_groups(curated):
    """LSH banding against all pairs on the generated sources (every clip's key-frame hashes,
    pHash alone so more pairs come near the radius): with 9 bands > max_distance 8 the groups are
    equal by the pigeonhole argument; with 4 bands of 16 bits they are equal here too, and what
    4 bands may miss is bounded by band_miss_probability (checked below)."""
    from mugv.torch_backend.data.curation import dedup
    root, _, _, _ = curated
    sigs = {c["key"]: [int(h, 16) for h in c["phash"]] for c in _rows(root / "out" / "curation.jsonl") if "key" in c}
    full = dedup.group(sigs, 8.0)
    assert len(set(full.values())) >= 2, f"too few near-duplicate groups to compare: {full}"
    for bands in (9, 4):
        assert dedup.group(sigs, 8.0, bands=bands) == full, f"{bands} bands"
    n = len(sigs)
    assert len(dedup.candidate_pairs(sigs, 4)) < n * (n - 1) // 2, "banding compared every pair"


def test_band_guarantee_and_miss_probability():
    from mugv.torch_backend.data.curation import dedup
    rng = np.random.default_rng(0)
    edges = dedup.band_edges(4)
    for d in range(4):                                   # fewer flipped bits than bands: always found
        for _ in range(200):
            a = int(rng.integers(0, 2 ** 63))
            b = a ^ sum(1 << int(i) for i in rng.choice(64, size=d, replace=False))
            assert dedup.candidate_pairs({"a": [a], "b": [b]}, 4) == {("a", "b")}
    # tight: one flipped bit in every band hides the pair
    a = int(rng.integers(0, 2 ** 63))
    assert dedup.candidate_pairs({"a": [a], "b": [a ^ sum(1 << lo for lo, _ in edges)]}, 4) == set()
    assert dedup.band_miss_probability(3, 4) == 0.0
    # the inclusion-exclusion formula against random placements: within 5 binomial standard deviations
    trials = 20000
    for d in (4, 8):
        p = dedup.band_miss_probability(d, 4)
        hits = 0
        for _ in range(trials):
            bits = rng.choice(64, size=d, replace=False)
            hits += all(any(lo <= b < lo + w for b in bits) for lo, w in edges)
        assert abs(hits / trials - p) <= 5 * np.sqrt(p * (1 - p) / trials), (d, hits / trials, p)
