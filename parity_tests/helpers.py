"""Helpers shared by the parity tests, their worker processes and the GPU benchmarks (numpy and the
standard library only, so a worker or a benchmark can import them without pytest)."""
from __future__ import annotations

import os
import socket

import numpy as np


def random_params(cfg, seed: int = 1) -> dict[str, np.ndarray]:
    """Every DiT parameter random and nonzero (the schema's own init has zero biases and unit norms,
    which would hide mistakes): N/sqrt(fan_in) for matrices, 1 + 0.1 N for norm weights, 0.1 N else."""
    from mugv.core.dit import dit_schema
    rng = np.random.default_rng(seed)
    out = {}
    for spec in dit_schema(cfg):
        z = rng.standard_normal(spec.shape)
        if len(spec.shape) >= 2:
            z = z / np.sqrt(np.prod(spec.shape[1:]))
        elif "norm" in spec.name and spec.name.endswith("weight"):
            z = 1 + 0.1 * z
        else:
            z = 0.1 * z
        out[spec.name] = z.astype(np.float32)
    return out


def child_env(rank=None, world=None, port=None) -> dict:
    """Environment of a child process: one intra-op thread (tiny shapes on a loaded 2-core machine)
    and MKL's conditional numerical reproducibility (without it a restarted process can take
    another code path for differently aligned buffers and differ by one ulp: seen here). With a
    rank: the torch.distributed variables of a `world`-process group on localhost:`port`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
