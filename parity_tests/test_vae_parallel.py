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


def run_world(script: pathlib.Path, args: list[str], world: int = 2, timeout: float = 240) -> None:
    """`script args` as `world` gloo processes on localhost; fails naming a rank's output."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-P", str(script), *args], env=child_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-3000:]}"


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
