"""The VAE data parallel (issue 25), 2 gloo processes on the CPU against one process:

- training: one step of each stage (2D alone, temporal alone, end to end with the discriminator
  and the adaptive weight) gives the gradients each optimizer applies, averaged over the ranks,
  equal to the one-process step on the same global batch, judged against the step in float64
  (tolerances.py "vae_model" vs-float64 row);
- caching: `mugv cache`'s stage cache built by 2 processes, each encoding its rows, is bit-equal
  to the one-process cache (the rows' arithmetic does not depend on who computes them).
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from mugv.parity_tests.helpers import child_env, free_port
from mugv.parity_tests.tolerances import assert_sharded_vs_float64

HERE = pathlib.Path(__file__).parent


def run_world(script: pathlib.Path | None, args: list[str], world: int = 2, timeout: float = 240) -> list[str]:
    """`python -P script args` (script None: `python -P args`, e.g. `-m module ...`) as `world`
    gloo processes on localhost; fails naming a rank's output."""
    port = free_port()
    cmd = [sys.executable, "-P", *([str(script)] if script is not None else []), *args]
    procs = [subprocess.Popen(cmd, env=child_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-3000:]}"
    return outs


def test_data_parallel_vae_step_equals_one_process(tmp_path):
    from mugv.parity_tests.vae_dp_worker import run_steps
    from mugv.torch_backend.training.vae_run import DataParallel
    run_world(HERE / "vae_dp_worker.py", [str(tmp_path / "dp.npz")])
    sharded = dict(np.load(tmp_path / "dp.npz"))
    single = run_steps(torch.float32, DataParallel())
    ref64 = run_steps(torch.float64, DataParallel())
    assert set(sharded) == set(single) == set(ref64)
    stages = {k.split("/")[0] for k in sharded}
    assert stages == {"spatial", "temporal", "end_to_end", "discriminator"}, stages
    for name in sorted(ref64):
        if name.endswith("attn.k.bias"):   # exactly zero in exact arithmetic (test_vae.py): noise only
            continue
        assert_sharded_vs_float64(sharded[name], single[name], ref64[name], op="vae_model", name=name)


def _vae_checkpoint(root: pathlib.Path) -> pathlib.Path:
    from mugv.checkpoints.torch_io import save_torch
    from mugv.core import vae as spec
    from mugv.torch_backend.models.vae import init_vae
    import dataclasses
    model = init_vae(spec.vae_config("tiny"), seed=4)
    return save_torch(root, 0, {"model": (spec.vae_schema(model.cfg), model.state_dict())},
                      config={"vae": dataclasses.asdict(model.cfg)}, schema_hash=spec.vae_schema(model.cfg).hash())


def test_data_parallel_cache_equals_one_process_cache(tmp_path):
    """`mugv cache` (the real job: tiny VAE, embedded text encoder) over 20 clips = two batches of
    the job's 16: as 2 gloo processes (each encodes one batch; both write rows of the same shard
    files) and as one process. Every array of the two caches is bit-equal, and complete."""
    from mugv.parity_tests.test_data_cache import _arrays
    from mugv.torch_backend.data.cache import cache_complete
    from mugv.torch_backend.data.product_videos import generate_dataset
    manifest = generate_dataset(tmp_path / "data", 20, seed=21, size=32, frames=17)
    ckpt = _vae_checkpoint(tmp_path / "vae")
    args = lambda out: ["-m", "mugv.torch_backend.cli", "cache", "--manifest", str(manifest),  # noqa: E731
                        "--vae_checkpoint", str(ckpt), "--out", str(out), "--size", "32", "--stage", "short_video"]
    outs = run_world(None, args(tmp_path / "dp"))
    for rank, n in ((0, 16), (1, 4)):   # each rank encoded its batch
        assert f"{n} clips encoded by rank {rank} of 2" in outs[rank], outs[rank][-2000:]
    one = subprocess.run([sys.executable, "-P", *args(tmp_path / "one")], env=child_env(), capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    (folder,) = (tmp_path / "one" / "cache").iterdir()
    dp_folder = tmp_path / "dp" / "cache" / folder.name
    assert cache_complete(folder) and cache_complete(dp_folder)
    a, b = _arrays(folder), _arrays(dp_folder)
    assert sorted(a) == sorted(b) and len(a) == 6, sorted(a)
    assert a[f"latents/{folder.name}/mean"].shape[0] == 20
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), \
            f"{key}: {int((a[key] != b[key]).sum())} elements differ between the 2-process and 1-process caches"


def test_train_under_torchrun_caches_first_then_trains(tmp_path):
    """`mugv train` as 2 gloo processes with no cache yet (it used to refuse: "run mugv cache in
    one process first"): every rank caches its share, then the stage trains data parallel."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.torch_backend.data.cache import cache_complete
    from mugv.torch_backend.data.product_videos import generate_dataset
    manifest = generate_dataset(tmp_path / "data", 20, seed=22, size=32, frames=9)
    ckpt = _vae_checkpoint(tmp_path / "vae")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"manifest: {manifest}\nvae_checkpoint: {ckpt}\nout: {tmp_path / 'run'}\nsize: 32\n"
                      "stages:\n  - name: clips\n    frames: 9\n    steps: 2\n    batch_size: 4\n    warmup_steps: 1\n")
    outs = run_world(None, ["-m", "mugv.torch_backend.cli", "train", "--config", str(recipe)])
    assert "trained; last stage" in outs[0], outs[0][-2000:]
    (folder,) = (tmp_path / "run" / "cache").iterdir()
    assert cache_complete(folder)
    assert latest_checkpoint(tmp_path / "run" / "stages" / "clips" / "checkpoints") is not None
