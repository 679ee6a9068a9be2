"""Staged VAE training (torch_backend/jobs/vae_train.py stages A and B; docs/vae.md).

- Stage B's feature-level forward (`temporal_reconstruction`) is the VAE's own clip forward
  between the 2D encoder and decoder: decode_spatial of it equals `VideoVAE.forward(video,
  sample=False)` for both frame rules and for more latents than one decode chunk.
- Stage A trains only the 2D VAE, stage B only the temporal stage, each lowers its loss.
- Bad stage settings fail naming the field.
Sizes: the odd TINY config of test_vae.py, 16x24 frames; the file runs in a few seconds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mugv.core import validate as v
from mugv.parity_tests.tolerances import assert_close
from mugv.parity_tests.test_vae import TINY, random_params, write_gradient_clips
from mugv.torch_backend.jobs import vae_train
from mugv.torch_backend.models.vae import VideoVAE


def _model(seed: int = 0) -> VideoVAE:
    model = VideoVAE(TINY)
    model.load_state_dict({k: torch.from_numpy(x) for k, x in random_params(TINY, seed).items()}, strict=True)
    return model


@pytest.mark.parametrize("frames", [9, 12, 57])   # rule (a); rule (c); 8 latents > one decode chunk of 6
def test_temporal_reconstruction_is_the_vae_forward_between_the_2d_stages(frames):
    model = _model().eval()
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(2, 3, frames, 16, 24, generator=g) * 2 - 1
    with torch.no_grad():
        want, _, _ = model(video, sample=False)
        feats = model.encode_spatial(video.transpose(1, 2).flatten(0, 1)).unflatten(0, (2, frames)).transpose(1, 2)
        got = vae_train.temporal_reconstruction(model, feats)
        assert got.shape == feats.shape
        pix = model.decode_spatial(got.transpose(1, 2).flatten(0, 1)).unflatten(0, (2, frames)).transpose(1, 2)
    assert_close(pix, want, "vae", "float32")


def _clips(n: int = 3, frames: int = 12) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(f"c{i}", rng.integers(0, 256, (frames, 16, 24, 3), dtype=np.uint8)) for i in range(n)]


def _cfg(**kw) -> vae_train.VAETrainConfig:
    return vae_train.VAETrainConfig(data="unused", height=16, width=24, num_frames=9, steps=0, lr=1e-3,
                                    foreground_weight=2.0, **kw)


def _changed(before: dict, model: VideoVAE, prefix: str) -> tuple[bool, bool]:
    """(some parameter under `prefix` changed, some parameter outside it changed)."""
    inside = outside = False
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        inside |= moved and name.startswith(prefix)
        outside |= moved and not name.startswith(prefix)
    return inside, outside


@pytest.mark.parametrize("stage", ["spatial", "temporal"])
def test_each_stage_trains_only_its_part(stage):
    model = _model(3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    steps = {"spatial_steps": 3, "temporal_steps": 0} if stage == "spatial" else {"spatial_steps": 0, "temporal_steps": 3}
    logs = []
    done = vae_train.pretrain_stages(model, _clips(), _cfg(spatial_batch=3, temporal_batch=2, **steps),
                                     np.random.default_rng(0), on_step=lambda s, m: logs.append((s, m["step"])))
    assert done == {"spatial": steps["spatial_steps"], "temporal": steps["temporal_steps"]}
    assert logs == [(stage, 1), (stage, 2), (stage, 3)]
    assert _changed(before, model, stage + ".") == (True, False)


def test_stage_losses_go_down():
    """Repeated steps on one batch: stage A's weighted L1 and stage B's relative feature MSE fall."""
    model = _model(5)
    cfg = _cfg(spatial_steps=1)
    frames = vae_train.sample_frames(_clips(), 4, np.random.default_rng(2))
    assert frames.shape == (4, 3, 16, 24) and -1 <= frames.min() < frames.max() <= 1
    opt = torch.optim.Adam(model.spatial.parameters(), lr=1e-3)
    a = [vae_train.spatial_step(model, opt, frames, cfg)["loss"] for _ in range(12)]
    assert a[-1] < 0.9 * a[0], a
    feats = torch.stack(vae_train.clip_features(model, _clips(2)))[:, :, :9]
    assert feats.shape == (2, TINY.spatial_channels[-1], 9, 2, 3)
    inv_var = 1.0 / feats.var(dim=(0, 2, 3, 4), keepdim=True)
    opt = torch.optim.Adam(model.temporal.parameters(), lr=1e-3)
    b = [vae_train.temporal_step(model, opt, feats, inv_var)["loss"] for _ in range(12)]
    assert b[-1] < 0.9 * b[0], b


def test_stage_settings_are_validated():
    from mugv.torch_backend.experiments.demo import DemoVAE
    with pytest.raises(v.ConfigError, match=r"VAETrainConfig.steps = 0.*nothing would train"):
        _cfg()
    with pytest.raises(v.ConfigError, match=r"VAETrainConfig.temporal_steps = -1"):
        _cfg(temporal_steps=-1)
    with pytest.raises(v.ConfigError, match=r"VAETrainConfig.temporal_lr = 0"):
        _cfg(spatial_steps=1, temporal_lr=0.0)
    with pytest.raises(v.ConfigError, match=r"DemoVAE.spatial_batch = 0"):
        DemoVAE(spatial_batch=0)
    with pytest.raises(v.ConfigError, match=r"DemoVAE.steps = 0"):
        DemoVAE(spatial_steps=0, temporal_steps=0)
    cfg = vae_train.config_from_args(["--data", "x", "--spatial-steps", "5", "--temporal-steps", "7",
                                      "--temporal-lr", "2e-3", "--steps", "0"])
    assert (cfg.spatial_steps, cfg.temporal_steps, cfg.temporal_lr, cfg.steps) == (5, 7, 2e-3, 0)


def test_train_vae_command_sets_the_latent_normalisation(tmp_path):
    """`mugv train-vae` (the same job the demo trains its VAE with, jobs/vae_train.py::train)
    saves a VAE whose latent_mean / latent_std are the per-channel statistics of the training
    clips' posterior means, not the 0 / 1 it starts with: its normalised latents of those clips
    have channel means 0 and standard deviations 1."""
    from mugv.torch_backend.cli import main
    from mugv.torch_backend.data import media
    from mugv.torch_backend.jobs.loaders import vae_model

    data = write_gradient_clips(tmp_path / "clips", frames=9)
    assert main(["train-vae", "--data", str(data), "--size", "golden", "--height", "24", "--width", "40",
                 "--num_frames", "9", "--fps", "8", "--steps", "1", "--spatial_steps", "1", "--eval_frames", "9",
                 "--evaluate", "false", "--out", str(tmp_path / "run")]) == 0
    ckpt = sorted((tmp_path / "run" / "ckpt").glob("step_*"))[-1]
    model = vae_model("golden", checkpoint=str(ckpt)).eval()
    assert not torch.all(model.latent_mean == 0) and not torch.all(model.latent_std == 1)
    clips = [media.to_video_tensor(media.load_clip(s, 9, 24, 40, 8.0)) for s in media.list_clips(data)]
    with torch.no_grad():
        z = torch.cat([model.encode(c[None], sample=False) for c in clips])
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4)), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
