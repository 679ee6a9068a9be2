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


# ---------------------------------------------------------------------------------------------
# Child processes that are killed mid-work (test_faults*.py)


def start_child(args: list[str], env: dict | None = None, log=None):
    """A child process with stdout and stderr merged into one text pipe (read it line by line), or
    into the file `log` (a child left to run beside the test: `finish_child`)."""
    import subprocess
    out = subprocess.PIPE if log is None else open(log, "w")
    try:
        return subprocess.Popen(args, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        if log is not None:
            out.close()


def finish_child(proc, log, timeout: float = 600.0) -> str:
    """Wait for a child started with `start_child(..., log=log)`; asserts exit status 0, returns its output."""
    import pathlib
    proc.wait(timeout=timeout)
    said = pathlib.Path(log).read_text()
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{said[-3000:]}"
    return said


def kill_at(proc, marker: str, timeout: float = 300.0, delay: float = 0.0) -> list[str]:
    """Read the child's output until a line holds `marker` (its progress says it is mid-work),
    wait `delay` seconds, SIGKILL it and reap it. Returns the lines read. Fails if the child ends
    or `timeout` passes before the marker: a kill after the work would prove nothing."""
    import signal
    import threading
    import time
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                break
        else:
            raise AssertionError(f"the child ended (or timed out) before {marker!r}:\n{''.join(lines)[-3000:]}")
    finally:
        timer.cancel()
    if delay:
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the child had already exited ({proc.returncode})"
    return lines


def run_child(args: list[str], env: dict | None = None, timeout: float = 600.0) -> str:
    """Run a child to the end; asserts exit status 0 and returns its output."""
    import subprocess
    done = subprocess.run(args, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Tiny inputs for jobs run as commands


def tiny_vae_checkpoint(root, seed: int = 0):
    """A committed mugv checkpoint of a seeded tiny VideoVAE (what `train-vae` writes, untrained).
    Returns its step folder."""
    import dataclasses

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.vae import vae_config, vae_schema
    from mugv.torch_backend.models.vae import init_vae
    cfg = vae_config("tiny")
    model = init_vae(cfg, seed)
    return save_torch(root, 1, {"model": (vae_schema(cfg), model.state_dict())},
                      config={"vae": dataclasses.asdict(cfg)}, schema_hash=vae_schema(cfg).hash())


def tiny_dit_checkpoint(root, cfg, seed: int = 1):
    """A committed checkpoint of `cfg`'s DiT with random nonzero weights (random_params), group
    "model", config {"dit": ...}: a sampling checkpoint or a preference stage's reference."""
    import torch

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core import validate
    from mugv.core.dit import dit_schema
    params = {k: torch.from_numpy(a) for k, a in random_params(cfg, seed).items()}
    return save_torch(root, 1, {"model": (dit_schema(cfg), params)}, config={"dit": validate.to_dict(cfg)})


def random_clips(folder, specs: dict[str, int], size: int = 32, fps: float = 16.0, seed: int = 0) -> None:
    """name -> frame count: smooth random mp4 clips (H.264), so a VAE sees structure, not only noise."""
    import pathlib

    from mugv.torch_backend.data.media import write_mp4
    rng = np.random.default_rng(seed)
    folder = pathlib.Path(folder)
    for name, frames in specs.items():
        base = rng.integers(0, 255, (1, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2)
        drift = np.arange(frames)[:, None, None, None] * rng.integers(1, 6)
        write_mp4(folder / name, ((base + drift) % 256).astype(np.uint8), fps, crf=18)
