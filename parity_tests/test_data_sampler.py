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
