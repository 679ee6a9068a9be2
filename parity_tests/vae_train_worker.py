"""A small VAE training (stages A, B and C with the discriminator from step 1, posterior samples)
for the kill tests (test_faults_vae.py): one process, or data parallel when RANK/WORLD_SIZE are
set. Appends "<stage> <step>" to PROGRESS after every step.

    python parity_tests/vae_train_worker.py OUT PROGRESS
"""
from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    import torch

    from mugv.core import vae as spec
    from mugv.torch_backend.jobs import vae_train
    from mugv.torch_backend.parallel.launch import init_distributed
    torch.set_num_threads(1)
    out, progress = sys.argv[1], sys.argv[2]
    init_distributed(timeout_s=120.0)
    rng = np.random.default_rng(1)
    clips = [(f"c{i}", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)) for i in range(3)]
    cfg = vae_train.VAETrainConfig(data="unused", height=16, width=16, num_frames=9, batch_size=2, steps=4,
                                   spatial_steps=2, spatial_batch=4, temporal_steps=2, temporal_batch=2, lr=1e-3,
                                   foreground_weight=2.0, evaluate=False, out=out, checkpoint_every=3,
                                   log_every=1, loss=spec.VAELossConfig(disc_start=1))
    with open(progress, "a") as f:
        def on_step(stage, logs):
            f.write(f"{stage} {logs['step']}\n")
            f.flush()
        vae_train.train(cfg, log=lambda s: None, on_step=on_step, clips=clips)


if __name__ == "__main__":
    main()
