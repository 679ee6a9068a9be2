"""The sampler is deterministic, resumable from its state dict (also after a SIGKILL of a real data
loop in a child process), and the same sequence for every data-parallel size; bucket specs,
token-balanced batch sizes and recipes validate themselves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mugv.core import data as core_data
from mugv.core.data import BucketSpec, TaskMix
from mugv.core.dit import dit_config
from mugv.core.validate import ConfigError
from mugv.torch_backend.data import sampler
from mugv.torch_backend.data.product_videos import generate_dataset

BUCKETS = (BucketSpec(32, 32, 1, 4, 16.0), BucketSpec(32, 32, 9, 4, 16.0), BucketSpec(64, 64, 17, 2, 16.0))


def _members(rng, sizes=(23, 13, 11)) -> dict[int, list[int]]:
    positions = rng.permutation(sum(sizes)).tolist()
    out, start = {}, 0
    for b, n in enumerate(sizes):
        out[b] = sorted(positions[start:start + n])
        start += n
    return out


def _run(plan, state, steps):
    out = []
    for _ in range(steps):
        batch, state = sampler.step(plan, state)
        out.append(batch)
    return out, state


def test_resume_from_any_step_gives_the_same_sequence():
    rng = np.random.default_rng(11)
    plan = sampler.SamplerPlan(BUCKETS, _members(rng), TaskMix(0.3, 0.5, 0.2), seed=5, world=2)
    full, _ = _run(plan, sampler.init(5), 40)
    for cut in rng.choice(np.arange(1, 40), size=4, replace=False):
        head, state = _run(plan, sampler.init(5), int(cut))
        state = json.loads(json.dumps(state))          # through a checkpoint file
        fresh = sampler.SamplerPlan(BUCKETS, plan.members, plan.task_mix, seed=5, world=2)
        tail, _ = _run(fresh, state, 40 - int(cut))
        assert head + tail == full, f"resume at step {cut} diverged"
    # the schedule really mixes kinds, tasks and buckets, and each batch is one bucket's
    assert {b.task for b in full} == {"t2i", "t2v", "i2v"}
    assert {b.bucket for b in full} == {0, 1, 2}
    for b in full:
        assert len(b.positions) == BUCKETS[b.bucket].batch_size
        assert set(b.positions) <= set(plan.members[b.bucket])
    # an epoch of a bucket visits each of its items at most once
    video_epoch = plan.epoch("video", 0)
    flat = [p for _, ps in video_epoch for p in ps]
    assert len(flat) == len(set(flat))
    other, _ = _run(sampler.SamplerPlan(BUCKETS, plan.members, plan.task_mix, seed=6), sampler.init(6), 40)
    assert other != full
    with pytest.raises(ValueError, match="seed"):
        sampler.step(plan, sampler.init(6))


@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_slices_concatenate_to_the_global_sequence(world):
    rng = np.random.default_rng(3)
    members = _members(rng)
    plan = sampler.SamplerPlan(BUCKETS, members, TaskMix(0.25, 0.75, 0.0), seed=1, world=world)
    batches, _ = _run(plan, sampler.init(1), 25)
    single, _ = _run(sampler.SamplerPlan(BUCKETS, members, TaskMix(0.25, 0.75, 0.0), seed=1),
                     sampler.init(1), 25)
    for b, s in zip(batches, single):
        joined = tuple(p for r in range(world) for p in b.rank_slice(r, world))
        assert joined == s.positions
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        sampler.SamplerPlan(BUCKETS, members, TaskMix(), seed=1, world=4)
    with pytest.raises(ValueError, match="world dividing the global batch"):
        batches[0].rank_slice(0, 3)


def test_bucket_specs_batches_and_recipes():
    dit = dit_config("tiny")
    buckets = core_data.plan_buckets(dit, (32, 64), (1, 17, 33), target_tokens=1000, batch_multiple=2)
    assert len(buckets) == 2 * 5 * 3
    for b in buckets:
        per = b.tokens(dit)
        assert b.batch_size % 2 == 0
        # nearest multiple of 2 samples to the target, never empty
        assert abs(b.batch_size * per - 1000) <= per or b.batch_size == 2, b   # half a step of 2
    one = core_data.plan_buckets(dit, (64,), (33,), target_tokens=640, aspects=("1:1",))[0]
    # 64x64x33 -> latent (5, 8, 8) -> patches (5, 4, 4) = 80 tokens -> 8 samples per 640 tokens
    assert (one.height, one.width, one.tokens(dit), one.batch_size) == (64, 64, 80, 8)
    assert core_data.aspect_size(256, 16 / 9) == (192, 336)
    assert core_data.aspect_size(256, 9 / 16) == (336, 192)
    with pytest.raises(ConfigError, match=r"BucketSpec.height = 40: expected a multiple of 16"):
        BucketSpec(40, 32, 17)
    with pytest.raises(ConfigError, match=r"TaskMix.i2v .*t2i \+ t2v \+ i2v = 1"):
        TaskMix(0.5, 0.5, 0.5)


# --- a real data loop, killed and resumed --------------------------------------------------------

_LOOP = textwrap.dedent("""
    import json, os, sys, time
    from mugv.core.data import BucketSpec, TaskMix
    from mugv.torch_backend.data import dataset, sampler
    manifest, state_path, log_path, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    buckets = (BucketSpec(32, 32, 1, 4, 16.0), BucketSpec(32, 32, 9, 2, 16.0))
    index = dataset.build_index(manifest, buckets)
    plan = sampler.SamplerPlan(buckets, index.members(), TaskMix(0.3, 0.7, 0.0), seed=9)
    state = json.load(open(state_path)) if os.path.exists(state_path) else sampler.init(9)
    # steps logged after the last saved state were lost with the process: drop them
    kept = [l for l in open(log_path)] if os.path.exists(log_path) else []
    kept = [l for l in kept if json.loads(l)["step"] < state["step"]]
    with open(log_path, "w") as f:
        f.writelines(kept)
    log = open(log_path, "a")
    while state["step"] < steps:
        batch, new_state = sampler.step(plan, state)
        loaded = dataset.load_batch(index, list(batch.positions), batch.bucket, batch.task)
        assert loaded.pixels.shape[0] == len(batch.positions)
        log.write(json.dumps({"step": batch.step, "ids": loaded.sample_ids}) + "\\n")
        log.flush()
        time.sleep(0.02)
        tmp = state_path + ".tmp"
        json.dump(new_state, open(tmp, "w"))
        os.replace(tmp, state_path)   # the checkpoint: atomic
        state = new_state
""")


def _child(args):
    return subprocess.Popen([sys.executable, "-c", _LOOP, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_data_loop_resumes_with_the_same_sample_ids(tmp_path):
    manifest = generate_dataset(tmp_path / "data", 10, seed=4, size=32, frames=9)
    steps = 30
    whole = _child([manifest, tmp_path / "s_whole.json", tmp_path / "whole.jsonl", steps])
    assert whole.wait(timeout=120) == 0, whole.stderr.read().decode()[-2000:]
    kill_at = int(np.random.default_rng(2024).integers(5, 20))
    proc = _child([manifest, tmp_path / "s.json", tmp_path / "run.jsonl", steps])
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "run.jsonl").exists() and len((tmp_path / "run.jsonl").read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = len((tmp_path / "run.jsonl").read_text().splitlines())
    assert killed_after < steps, "the loop finished before it could be killed"
    resumed = _child([manifest, tmp_path / "s.json", tmp_path / "run.jsonl", steps])
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()[-2000:]
    got = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert [g["step"] for g in got] == list(range(steps))
    assert got == want, f"killed after {killed_after} steps; sequences differ"


# --- weighted sampling (the manifest's `weight` field, written by `mugv curate`) ---------------

# The unweighted schedule of `_golden_plan()` printed by the sampler before weights existed:
# `git show 8d143a0:torch_backend/data/sampler.py > /tmp/old.py`, then this file's `_golden_plan`
# and 12 `sampler.step`s with /tmp/old.py imported as `sampler`. Unweighted manifests must keep it.
_UNWEIGHTED_GOLDEN = [
    (2, "t2v", (31, 10)), (2, "t2v", (13, 41)), (0, "t2i", (15, 17, 6, 24)), (1, "i2v", (23, 22, 25, 27)),
    (0, "t2i", (46, 11, 0, 5)), (1, "t2v", (8, 28, 12, 3)), (2, "i2v", (30, 39)), (2, "t2v", (19, 14)),
    (2, "t2v", (20, 38)), (1, "t2v", (21, 42, 45, 35)), (0, "t2i", (36, 4, 44, 18)), (1, "t2v", (23, 37, 22, 42))]


def _golden_plan(**kw):
    return sampler.SamplerPlan(BUCKETS, _members(np.random.default_rng(11)), TaskMix(0.3, 0.5, 0.2), seed=5, **kw)


def test_unweighted_plans_keep_the_schedule_they_had():
    got, state = _run(_golden_plan(), sampler.init(5), 12)
    assert [(b.bucket, b.task, b.positions) for b in got] == _UNWEIGHTED_GOLDEN
    assert state == {"seed": 5, "step": 12, "image": [0, 3], "video": [1, 1]}   # no new keys
    with pytest.raises(ValueError, match="weighted plan"):
        sampler.step(_golden_plan(), {**state, "drawn": [0, 0, 0]})


def _chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def _bound(df: int) -> float:
    """The chi-square quantile a multinomial statistic with `df` degrees of freedom exceeds with
    probability 1e-6 (the seeds are fixed, so a pass stays a pass; the level says how unlikely a
    correct sampler is to land outside)."""
    from scipy.stats import chi2
    return float(chi2.isf(1e-6, df))


def test_weighted_draws_follow_the_weights_per_bucket_and_within_buckets():
    """Two multinomial levels: the bucket of each video step (probability W_b / B_b, normalised)
    and the items of a bucket given its batches (share w_i / W_b of the B_b slots per batch). The
    sampler's within-bucket slots are systematic (floor/ceil of the expected count per epoch), so
    their spread is at most the multinomial one and the multinomial bound applies."""
    rng = np.random.default_rng(7)
    members = _members(rng, sizes=(23, 31, 17))
    weights = rng.lognormal(0.0, 0.8, size=71)
    weights[members[1][:3]] = 0.0                                   # never drawn
    plan = sampler.SamplerPlan(BUCKETS, members, TaskMix(0.2, 0.8, 0.0), seed=3, weights=weights.tolist())
    steps = 6000
    batches, _ = _run(plan, sampler.init(3), steps)
    counts = np.zeros(71)
    for b in batches:
        for p in b.positions:
            counts[p] += 1
    assert counts[members[1][:3]].sum() == 0, "a weight-0 item was drawn"
    per_kind_buckets = {"image": [0], "video": [1, 2]}
    for kind, bs in per_kind_buckets.items():
        n_steps = sum(plan.buckets[b.bucket].frames > 1 for b in batches) if kind == "video" else \
            sum(plan.buckets[b.bucket].frames == 1 for b in batches)
        odds = np.array([weights[members[b]].sum() / BUCKETS[b].batch_size for b in bs])
        odds /= odds.sum()
        got = np.array([sum(x.bucket == b for x in batches) for b in bs])
        if len(bs) > 1:
            assert _chi2(got, n_steps * odds) <= _bound(len(bs) - 1), (kind, got, n_steps * odds)
        for b, n_b in zip(bs, got):
            pos = [p for p in members[b] if weights[p] > 0]
            expected = n_b * BUCKETS[b].batch_size * weights[pos] / weights[pos].sum()
            stat = _chi2(counts[pos], expected)
            assert stat <= _bound(len(pos) - 1), f"bucket {b}: chi2 {stat:.1f} > {_bound(len(pos) - 1):.1f}"
            # the same statistic against uniform draws is far over the bound: the test can fail
            uniform = np.full(len(pos), n_b * BUCKETS[b].batch_size / len(pos))
            assert _chi2(counts[pos], uniform) > 10 * _bound(len(pos) - 1)


def test_weighted_plans_resume_and_slice_like_unweighted_ones():
    rng = np.random.default_rng(12)
    members = _members(rng)
    weights = rng.uniform(0.1, 3.0, size=47).tolist()
    plan = sampler.SamplerPlan(BUCKETS, members, TaskMix(0.3, 0.5, 0.2), seed=5, world=2, weights=weights)
    full, _ = _run(plan, sampler.init(5), 60)
    assert [b.positions for b in full] != [b.positions for b in _run(_golden_plan(world=2), sampler.init(5), 60)[0]]
    for cut in rng.choice(np.arange(1, 60), size=4, replace=False):
        head, state = _run(plan, sampler.init(5), int(cut))
        state = json.loads(json.dumps(state))
        fresh = sampler.SamplerPlan(BUCKETS, members, plan.task_mix, seed=5, world=2, weights=weights)
        tail, _ = _run(fresh, state, 60 - int(cut))
        assert head + tail == full, f"weighted resume at step {cut} diverged"
    single, _ = _run(sampler.SamplerPlan(BUCKETS, members, plan.task_mix, seed=5, weights=weights), sampler.init(5), 60)
    for b, s in zip(full, single):
        assert tuple(p for r in range(2) for p in b.rank_slice(r, 2)) == s.positions
    for b in full:
        assert set(b.positions) <= set(members[b.bucket])
    with pytest.raises(ValueError, match="unweighted plan"):
        sampler.step(plan, {"seed": 5, "step": 3, "image": [0, 1], "video": [0, 2]})
    with pytest.raises(ValueError, match="position 4 has weight nan"):
        sampler.SamplerPlan(BUCKETS, members, plan.task_mix, seed=5, weights=weights[:4] + [float("nan")] + weights[5:])
    zero = [0.0 if p in members[1] or p in members[2] else 1.0 for p in range(47)]
    with pytest.raises(ValueError, match=r"items with weight > 0, batch_size"):
        sampler.SamplerPlan(BUCKETS, members, TaskMix(0.0, 1.0, 0.0), seed=5, weights=zero)


def test_manifest_weights_reach_the_index_and_bad_ones_name_the_line(tmp_path):
    from mugv.torch_backend.data import dataset
    from mugv.torch_backend.data.manifest import ManifestError, read_manifest
    manifest = generate_dataset(tmp_path / "data", 4, seed=4, size=32, frames=9)
    rows = [json.loads(line) for line in open(manifest)]
    buckets = (BucketSpec(32, 32, 9, 2, 16.0),)
    assert dataset.build_index(manifest, buckets).weights() is None      # unweighted: as before
    weighted = tmp_path / "data" / "weighted.jsonl"
    weighted.write_text("".join(json.dumps({**r, "weight": w}) + "\n" for r, w in zip(rows, (0.5, 2, 1.5))) +
                        "".join(json.dumps(r) + "\n" for r in rows[3:]))
    assert dataset.build_index(weighted, buckets).weights() == [0.5, 2.0, 1.5, 1.0]   # no field = 1
    for bad, why in (("-1", "-1"), ("NaN", "nan"), ('"heavy"', "'heavy'"), ("true", "True"), ("[1]", r"\[1\]")):
        weighted.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-1] + f', "weight": {bad}}}\n')
        with pytest.raises(ManifestError, match=rf"weighted\.jsonl:2: field 'weight' = {why}: expected a finite number >= 0"):
            read_manifest(weighted)
    weighted.write_text("".join(json.dumps({**r, "weight": 0}) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"weighted\.jsonl: field 'weight' is 0 on every row"):
        read_manifest(weighted)
    csv_manifest = tmp_path / "data" / "w.csv"
    csv_manifest.write_text(f"path,caption,weight\n{rows[0]['path']},a cube,2.5\n{rows[1]['path']},a cone,x\n")
    with pytest.raises(ManifestError, match=r"w\.csv:3: field 'weight' = 'x'"):
        read_manifest(csv_manifest)
