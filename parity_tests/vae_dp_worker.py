"""One step of each VAE training stage on a fixed global batch, data parallel over the
torch.distributed world (or one process), recording the averaged gradients each optimizer would
apply: what `test_vae_parallel.py` compares between 2 gloo processes, one process and float64.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python parity_tests/vae_dp_worker.py OUT.npz
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from mugv.core import vae as spec
from mugv.parity_tests.test_vae import TINY, random_params
from mugv.torch_backend.jobs import vae_train
from mugv.torch_backend.models.vae import VideoVAE
from mugv.torch_backend.training.vae_run import DataParallel, GradientAveraging


class Recorder(torch.optim.Optimizer):
    """An optimizer that stores the gradients it is asked to apply (and changes nothing)."""

    def __init__(self, params, names: dict, record: dict, prefix: str):
        super().__init__(params, {})
        self.names, self.record, self.prefix = names, record, prefix

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.record[f"{self.prefix}/{self.names[p]}"] = p.grad.detach().double().numpy().copy()


def global_batches(seed: int = 7) -> dict[str, torch.Tensor]:
    """The fixed global batches: 4 frames (stage A), 2 feature windows (stage B), 2 clips (C)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(4, 3, 16, 24, generator=g) * 2 - 1
    frames[:, :, 4:10, 6:14] = 0.8                      # a "product" so the foreground weight acts
    clips = torch.rand(2, 3, 9, 16, 24, generator=g) * 2 - 1
    clips[:, :, :, 4:10, 6:14] = -0.5
    feats = torch.randn(2, TINY.spatial_channels[-1], 9, 2, 3, generator=g) * 0.2
    return {"frames": frames, "clips": clips, "feats": feats}


def run_steps(dtype: torch.dtype, dp: DataParallel) -> dict[str, np.ndarray]:
    """One spatial_step, one temporal_step and one end-to-end train_step (discriminator on, adaptive
    weight, posterior sample, foreground weight) from the same weights, on this rank's rows."""
    cfg = vae_train.VAETrainConfig(data="unused", height=16, width=24, num_frames=9, batch_size=2, lr=1e-3,
                                   foreground_weight=2.0, sample_posterior=True, evaluate=False,
                                   loss=spec.VAELossConfig(disc_start=0))
    batches = {k: v.to(dtype) for k, v in global_batches().items()}
    record: dict[str, np.ndarray] = {}

    def fresh():
        model = VideoVAE(TINY)
        model.load_state_dict({k: torch.from_numpy(a) for k, a in random_params(TINY, 2).items()}, strict=True)
        torch.manual_seed(11)
        disc = vae_train.PatchDiscriminator(8)
        names = {p: n for n, p in model.named_parameters()}
        names.update({p: f"disc.{n}" for n, p in disc.named_parameters()})
        return model.to(dtype), disc.to(dtype), names

    def opt(params, names, prefix):
        return GradientAveraging(Recorder(list(params), names, record, prefix), dp)

    local = lambda x: x[dp.rows(x.shape[0])]  # noqa: E731
    model, _, names = fresh()
    logs = vae_train.spatial_step(model, opt(model.spatial.parameters(), names, "spatial"), local(batches["frames"]), cfg)
    record["spatial/loss"] = np.array(dp.mean(logs["loss"]))
    model, _, names = fresh()
    inv_var = (1.0 / batches["feats"].var(dim=(0, 2, 3, 4)))[None, :, None, None, None]
    logs = vae_train.temporal_step(model, opt(model.temporal.parameters(), names, "temporal"), local(batches["feats"]),
                                   inv_var)
    record["temporal/loss"] = np.array(dp.mean(logs["loss"]))
    model, disc, names = fresh()
    gen = torch.Generator().manual_seed(3)
    logs = vae_train.train_step(model, disc, opt(model.parameters(), names, "end_to_end"),
                                opt(disc.parameters(), names, "discriminator"), local(batches["clips"]), 0, cfg, gen,
                                dp, batches["clips"].shape[0])
    for key in ("loss", "nll", "kl", "g_loss", "d_loss", "d_weight"):
        record[f"end_to_end/{key}"] = np.array(logs[key])
    return record


def main() -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    record = run_steps(torch.float32, DataParallel())
    if dist.get_rank() == 0:
        np.savez(sys.argv[1], **record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
