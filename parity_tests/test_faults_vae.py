"""VAE training and the data-parallel cache killed by SIGKILL and restarted (issue 25). Training:
the resumed run's final checkpoint (weights, discriminator, every Adam moment) and its log are
bit-equal to an uninterrupted run's.
Data parallel over 2 gloo processes, both killed at once at a random step (drawn from a fixed
seed) after the first checkpoint, with stages A, B and C (discriminator and adaptive weight on,
posterior samples) all run; the restart resumes wherever the newest checkpoint stands."""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from mugv.checkpoints.format import Checkpoint, latest_checkpoint
from mugv.parity_tests.helpers import child_env, free_port

WORKER = pathlib.Path(__file__).with_name("vae_train_worker.py")
TOTAL_STEPS = 8   # vae_train_worker: 2 spatial + 2 temporal + 4 end to end


def _start(out: pathlib.Path, progress: pathlib.Path, world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, "-P", str(WORKER), str(out), str(progress)],
                             env=child_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for r in range(world)]


def _finish(procs: list[subprocess.Popen]) -> None:
    for r, p in enumerate(procs):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-3000:]}"


def _arrays(path: pathlib.Path) -> dict:
    ckpt = Checkpoint(path)
    return {(g, n): ckpt.read(g, n) for g in ckpt.groups() for n in ckpt.names(g)}


def _log(out: pathlib.Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_killed_data_parallel_vae_training_resumes_bit_exactly(tmp_path):
    whole = tmp_path / "whole"
    _finish(_start(whole, tmp_path / "p_whole"))
    kill_at = int(np.random.default_rng(25).integers(4, TOTAL_STEPS))   # after the step-3 checkpoint
    killed, progress = tmp_path / "killed", tmp_path / "p_killed"
    procs = _start(killed, progress)
    deadline = time.time() + 300
    while time.time() < deadline:
        if progress.exists() and len(progress.read_text().splitlines()) >= 2 * kill_at:   # both ranks
            break
        assert all(p.poll() is None for p in procs), "a rank ended before the kill"
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    stopped_at = latest_checkpoint(killed / "ckpt")
    assert stopped_at is not None, "killed before the first checkpoint"
    step = Checkpoint(stopped_at).step
    assert step < TOTAL_STEPS, stopped_at
    _finish(_start(killed, tmp_path / "p_resumed"))
    resumed_steps = len((tmp_path / "p_resumed").read_text().splitlines()) // 2
    assert resumed_steps == TOTAL_STEPS - step, (resumed_steps, stopped_at)
    a, b = _arrays(latest_checkpoint(whole / "ckpt")), _arrays(latest_checkpoint(killed / "ckpt"))
    assert sorted(a) == sorted(b)
    groups = {g for g, _ in a}
    assert {"model", "discriminator", "optimizer.end_to_end.exp_avg", "optimizer.discriminator.exp_avg_sq"} <= groups
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), \
            f"{key}: {int((a[key] != b[key]).sum())} of {a[key].size} elements differ after the resume"
    assert _log(killed) == _log(whole)


def test_resume_with_other_math_is_refused_naming_the_field(tmp_path):
    """A VAE run folder with a checkpoint, rerun with another learning rate: refused, naming it;
    a longer budget (steps) is a resume, not a refusal."""
    import pytest

    from mugv.checkpoints.format import CheckpointError
    from mugv.torch_backend.jobs import vae_train
    rng = np.random.default_rng(1)
    clips = [(f"c{i}", rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)) for i in range(2)]
    cfg = vae_train.VAETrainConfig(data="unused", height=16, width=16, num_frames=9, batch_size=1, steps=1,
                                   evaluate=False, out=str(tmp_path / "run"))
    vae_train.train(cfg, log=lambda s: None, clips=clips)
    with pytest.raises(CheckpointError, match=r"other settings: lr: checkpoint 0.0002, now 0.001"):
        vae_train.train(vae_train.VAETrainConfig(**{**cfg.__dict__, "lr": 1e-3}), log=lambda s: None, clips=clips)
    logs = []
    result = vae_train.train(vae_train.VAETrainConfig(**{**cfg.__dict__, "steps": 2}), log=logs.append, clips=clips)
    assert result["resumed"] and result["steps"] == 2 and any("resumed from" in x for x in logs), logs


def test_resume_inside_each_stage_is_exact(tmp_path):
    """One process: a run that checkpoints inside stage A, inside stage B and inside stage C,
    restarted from each of those checkpoints (later ones removed), ends bit-equal to the run itself
    (the kill test above resumes where the clock put it; this covers every stage's optimizer and
    stage B's recomputed features deterministically)."""
    import shutil

    from mugv.core import vae as spec
    from mugv.torch_backend.jobs import vae_train
    rng = np.random.default_rng(2)
    clips = [(f"c{i}", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)) for i in range(3)]
    cfg = vae_train.VAETrainConfig(data="unused", height=16, width=16, num_frames=9, batch_size=1, steps=3,
                                   spatial_steps=3, spatial_batch=2, temporal_steps=3, temporal_batch=1, lr=1e-3,
                                   evaluate=False, out=str(tmp_path / "run"), checkpoint_every=2, keep_last=10,
                                   log_every=1, loss=spec.VAELossConfig(disc_start=1))
    whole = vae_train.train(cfg, log=lambda s: None, clips=clips)["checkpoint"]
    final = _arrays(whole)
    for step, stage in ((2, "spatial"), (4, "temporal"), (8, "end_to_end")):
        run = tmp_path / f"from_{step}"
        shutil.copytree(tmp_path / "run", run)
        for ckpt in (run / "ckpt").glob("step_*"):
            if int(ckpt.name.split("_")[1]) > step:
                shutil.rmtree(ckpt)
        position = Checkpoint(latest_checkpoint(run / "ckpt")).manifest["meta"]["position"]
        assert 0 < position[stage] < {"spatial": 3, "temporal": 3, "end_to_end": 3}[stage], position
        again = vae_train.train(vae_train.VAETrainConfig(**{**cfg.__dict__, "out": str(run)}), log=lambda s: None,
                                clips=clips)
        assert again["resumed"]
        b = _arrays(again["checkpoint"])
        assert sorted(b) == sorted(final)
        for key in final:
            assert np.array_equal(final[key], b[key]), f"resumed at step {step} ({stage}): {key} differs"
        assert _log(run) == _log(tmp_path / "run")


def test_killed_data_parallel_cache_resumes_to_the_one_process_cache(tmp_path):
    """2 processes building one cache, both SIGKILLed after some rows, restarted as 2 processes:
    complete and bit-equal to a one-shot one-process cache (the row protocol holds with several
    writers: rows of both ranks share shard files)."""
    from mugv.parity_tests.test_data_cache import _arrays as cache_arrays
    from mugv.torch_backend.data.cache import cache_complete
    from mugv.torch_backend.data.product_videos import generate_dataset
    worker = pathlib.Path(__file__).with_name("cache_dp_worker.py")
    manifest = generate_dataset(tmp_path / "data", 10, seed=26, size=32, frames=9)

    def start(out, progress, delay, world):
        port = free_port()
        return [subprocess.Popen([sys.executable, "-P", str(worker), str(manifest), str(out), str(progress), str(delay)],
                                 env=child_env(r, world, port) if world > 1 else child_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    _finish(start(tmp_path / "one", tmp_path / "p_one", 0.0, 1))
    procs = start(tmp_path / "two", tmp_path / "p_two", 0.5, 2)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (tmp_path / "p_two").exists() and len((tmp_path / "p_two").read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert not cache_complete(tmp_path / "two")
    _finish(start(tmp_path / "two", tmp_path / "p_restart", 0.0, 2))
    assert cache_complete(tmp_path / "two")
    a, b = cache_arrays(tmp_path / "one"), cache_arrays(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
