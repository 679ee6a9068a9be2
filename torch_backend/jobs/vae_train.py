"""Train the video VAE on a folder (or manifest) of real videos.

Objective (formulas in core/vae.py): L1 reconstruction read as an NLL with the model's learned
scalar `logvar`, plus `kl_weight` x KL, plus, from step `disc_start` on, a per-frame patch
discriminator (hinge loss) whose generator term is weighted adaptively against the NLL at the
decoder's last layer (latent diffusion's autoencoder recipe, without the perceptual term).

Optional stages before it (the usual way to train a video VAE built on a 2D image VAE, and the
only one measured to keep colour on a small budget, docs/vae.md "Why the demo VAE collapses"):
(A) `spatial_steps` of the 2D VAE alone on single frames (weighted L1), then (B)
`temporal_steps` of the temporal stage alone on the frozen 2D features (MSE per feature channel
divided by that channel's variance), then the `steps` end-to-end steps above (C).

Data: every clip is decoded once at (height, width, fps) through the data pipeline's PyAV decode;
batches are random windows of `num_frames` frames. Checkpoints go through the mugv format
(checkpoints/torch_io.py): group "model" (the VAE schema) and, when on, "discriminator", plus
what an exact resume needs (`training/vae_run.py`: Adam moments, position, generators).

Device: `models/vae_runtime.py::place_vae` (the GPU of this rank when there is one, else the CPU;
fp32 by default on both, bf16 autocast with `precision="bf16"`). Under torchrun the run is data parallel: each rank
takes its rows of every global batch (`batch_size`, `spatial_batch`, `temporal_batch` are global)
and the gradients are averaged before each step (`training/vae_run.py`); the result is the
one-process run's up to summation order. A run whose `--out` holds a checkpoint resumes from it
bit-exactly (step budgets; a `minutes` budget stops where the clock says).

    python -m mugv.torch_backend.jobs.vae_train --data ../shared/data/clips --size tiny \
        --height 32 --width 32 --frames 9 --minutes 4 --out runs/vae
    torchrun --nproc-per-node 2 -m mugv.torch_backend.jobs.vae_train ... (the same options)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import torch
from torch import nn

from mugv.core import vae as spec
from mugv.torch_backend.data import media
from mugv.torch_backend.jobs import vae_eval
from mugv.torch_backend.models.vae import VideoVAE, init_vae
from mugv.torch_backend.training.checkpointing import truncate_metrics
from mugv.torch_backend.training.run_lock import RunLock
from mugv.torch_backend.training.vae_run import DataParallel, VAERun


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """One VAE training run (`mugv train-vae`).

    steps: end-to-end steps (stage C, the full VAE on clip windows); `minutes` usually stops first
    spatial_steps: stage A, before C: steps of the 2D VAE alone on random single frames (0 = skip)
    spatial_batch: stage A: frames per step
    temporal_steps: stage B, after A: steps of the temporal stage alone on the frozen 2D features of
        `num_frames`-frame windows, MSE per channel over its variance (0 = skip)
    temporal_batch: stage B: windows per step
    temporal_lr: stage B: Adam learning rate (stages A and C use `lr`)
    """

    data: str
    size: str = "tiny"
    height: int = 32
    width: int = 32
    num_frames: int = 9
    fps: float = 8.0
    batch_size: int = 2
    steps: int = 100_000          # upper bound; `minutes` usually stops first
    spatial_steps: int = 0
    spatial_batch: int = 16
    temporal_steps: int = 0
    temporal_batch: int = 8
    temporal_lr: float = 1e-3
    minutes: float | None = None
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)   # LDM's autoencoder optimiser
    logvar_init: float = 0.0      # LDM's default; the official MUGVAE stores 4.0
    # False: decode the posterior mean (a plain autoencoder). With kl_weight 1e-6 the posterior
    # std stays near its init (1) for thousands of steps while the means spread by ~0.1, so a
    # short run that samples learns to ignore z (every clip decodes to the same blob; docs/vae.md).
    sample_posterior: bool = True
    # > 0: pixels away from their frame's background (the border's median colour) weigh
    # 1 + foreground_weight in the reconstruction term. A small product on a plain background
    # is a few % of the pixels; unweighted, the best early answer is the background alone.
    foreground_weight: float = 0.0
    # > 0: adds colour_weight x the error of the product's mean colour per frame
    # (core/vae.py::foreground_colour_error) to stages A and C; the foreground is
    # `foreground_mask`'s. Pixel L1 alone reconstructed red products orange (docs/vae.md "Red").
    colour_weight: float = 0.0
    loss: spec.VAELossConfig = spec.VAELossConfig()
    disc_channels: int = 32
    seed: int = 0
    log_every: int = 10
    eval_frames: int = 17
    # score PSNR/SSIM on the training clips before and after (off: the demo scores held-out clips)
    evaluate: bool = True
    out: str | None = None
    # exact resume: a checkpoint every this many steps (all stages counted; 0 = only the final one)
    checkpoint_every: int = 0
    keep_last: int = 2
    precision: str = "auto"       # models/vae_runtime.py: auto (= GPU_DEFAULT, fp32 today), fp32, bf16 (autocast)

    def __post_init__(self) -> None:
        from mugv.core import validate as v
        v.positive_int(self, "height", "width", "num_frames", "batch_size", "log_every", "eval_frames",
                       "disc_channels", "spatial_batch", "temporal_batch")
        v.non_negative_int(self, "steps", "spatial_steps", "temporal_steps", "checkpoint_every")
        v.positive_int(self, "keep_last")
        v.one_of(self, "precision", ("auto", "fp32", "bf16"))
        if self.steps + self.spatial_steps + self.temporal_steps == 0:
            v.fail(self, "steps", "> 0 when spatial_steps and temporal_steps are 0 (nothing would train)")
        v.in_range(self, "lr", 0, None, lo_open=True)
        v.in_range(self, "temporal_lr", 0, None, lo_open=True)
        v.in_range(self, "foreground_weight", 0, None)
        v.in_range(self, "colour_weight", 0, None)
        v.in_range(self, "fps", 0, None, lo_open=True)
        for f in ("height", "width"):
            if getattr(self, f) % spec.SPATIAL_FACTOR:
                v.fail(self, f, f"a multiple of {spec.SPATIAL_FACTOR}")
        if self.size not in spec.VAE_SIZES:
            v.fail(self, "size", f"one of {sorted(spec.VAE_SIZES)}")


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN on single frames: one logit per overlapping patch (70x70 at full depth).
    GroupNorm instead of BatchNorm so batches of 2 clips train stably."""

    def __init__(self, channels: int = 32, image_channels: int = 3):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(image_channels, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 1, 1, bias=False), nn.GroupNorm(8, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 4, 1, 1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video.transpose(1, 2).flatten(0, 1))     # (B T, 1, h, w)


def load_clips(cfg: VAETrainConfig, log=print) -> list[tuple[str, np.ndarray]]:
    """Every clip decoded once, whole, at the training resolution and rate; unreadable clips and
    those shorter than `num_frames` are skipped, named and counted (media.decode_each)."""
    from mugv.torch_backend.data.decode import MediaError

    def load(src):
        clip = media.load_clip(src, None, cfg.height, cfg.width, cfg.fps)
        if len(clip) < cfg.num_frames:
            raise MediaError(src.path, "too short", f"{len(clip)} frames at {cfg.fps} fps, "
                                                    f"num_frames {cfg.num_frames}")
        return clip
    decoded, _ = media.decode_each(media.list_clips(cfg.data), load, log, what=f"train-vae --data {cfg.data}")
    clips = [(src.name, clip) for src, clip in decoded]
    if not clips:
        raise ValueError(f"--data {cfg.data}: no clip has {cfg.num_frames} frames at {cfg.fps} fps")
    return clips


def sample_batch(clips: list[tuple[str, np.ndarray]], cfg: VAETrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, T, H, W) random windows in [-1, 1], random horizontal flips."""
    out = []
    for _ in range(cfg.batch_size):
        clip = clips[rng.integers(len(clips))][1]
        start = rng.integers(len(clip) - cfg.num_frames + 1)
        window = clip[start:start + cfg.num_frames]
        if rng.random() < 0.5:
            window = window[:, :, ::-1]
        out.append(media.to_video_tensor(np.ascontiguousarray(window)))
    return torch.stack(out)


FOREGROUND_THRESHOLD = 0.15   # summed |RGB difference| in [-1, 1] units: JPEG/H.264 noise is < 0.05


def foreground_mask(video: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, H, W) 1.0 where a pixel differs from its frame's background colour, taken as
    the per-channel median of the frame's border pixels (the product is never on the border)."""
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return ((video - background).abs().sum(1, keepdim=True) > FOREGROUND_THRESHOLD).to(video.dtype)


def train_step(model: VideoVAE, disc: PatchDiscriminator | None, opt, opt_d, video: torch.Tensor, step: int,
               cfg: VAETrainConfig, generator: torch.Generator, dp: DataParallel | None = None,
               global_batch: int | None = None) -> dict:
    """One generator (VAE) update and, when the discriminator is on, one discriminator update.

    Data parallel (`dp` over several ranks): `video` is this rank's rows of a global batch of
    `global_batch` clips; the posterior noise is drawn for the global batch and sliced, the
    adaptive weight uses the gradients averaged over the ranks (the global batch's), and `opt` /
    `opt_d` average the parameter gradients (`training/vae_run.py::GradientAveraging`). Logged
    values are rank averages."""
    model.train()
    dp = dp or DataParallel()
    rows = dp.rows(global_batch or video.shape[0]) if dp.size > 1 else slice(0, video.shape[0])
    # = VideoVAE.forward, with the noise drawn on the generator's device (the CPU) in fp32 for the
    # global batch: the same draws at any data-parallel size, any device and any dtype.
    mean, logvar = model.posterior(video)
    z = mean
    if cfg.sample_posterior:
        noise = torch.randn(((global_batch or video.shape[0]),) + tuple(mean.shape[1:]), generator=generator)
        z = mean + torch.exp(0.5 * logvar) * noise[rows].to(mean)
    recon = model.decode(z, video.shape[2], normalized=False)
    if cfg.foreground_weight:
        # LDM's nll_loss with its per-pixel `weights` (core/vae.py::reconstruction_nll unweighted)
        weight = 1.0 + cfg.foreground_weight * foreground_mask(video)
        nll = torch.sum(weight * (video - recon).abs() / torch.exp(model.logvar) + model.logvar) / video.shape[0]
    else:
        nll = spec.reconstruction_nll(video, recon, model.logvar, torch)
    kl = spec.gaussian_kl(mean, logvar, torch)
    loss = nll + cfg.loss.kl_weight * kl
    if cfg.colour_weight:
        loss = loss + cfg.colour_weight * spec.foreground_colour_error(video, recon, foreground_mask(video), torch)
    logs = {"step": step, "nll": nll.item(), "kl": kl.item(), "l1": (video - recon).abs().mean().item(),
            "logvar": model.logvar.item()}
    disc_on = disc is not None and step >= cfg.loss.disc_start
    if disc_on:
        g_loss = -disc(recon).mean()
        last = model.spatial.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gen = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        dp.average_([g_nll, g_gen])   # the global batch's gradients, so every rank weighs alike
        weight = spec.adaptive_weight(float(g_nll.norm()), float(g_gen.norm()), cfg.loss.disc_weight)
        loss = loss + weight * cfg.loss.disc_factor * g_loss
        logs.update(g_loss=g_loss.item(), d_weight=weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if disc_on:
        d_loss = cfg.loss.disc_factor * spec.hinge_d_loss(disc(video), disc(recon.detach()), torch)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        logs["d_loss"] = d_loss.item()
    logs["loss"] = loss.item()
    return {k: (dp.mean(x) if isinstance(x, float) and k != "d_weight" else x) for k, x in logs.items()}


# ---------------------------------------------------------------------------------------------
# Stages A and B (docs/vae.md). Trained end to end from the start, the tiny VAE's temporal
# decoder first answers the mean feature for every clip (its initial output has 4-8x the variance
# of its target, and shrinking it to a constant is the fastest way down); the 2D encoder then
# gets no clip-specific gradient through it and its features never become worth reconstructing.
# A 2D VAE trained first gives features the temporal stage learns to reproduce in a few hundred
# steps.


def sample_frames(clips: list[tuple[str, np.ndarray]], batch: int, rng: np.random.Generator) -> torch.Tensor:
    """Stage A's batch: (B, 3, H, W) random single frames in [-1, 1], random horizontal flips."""
    out = []
    for _ in range(batch):
        clip = clips[rng.integers(len(clips))][1]
        frame = clip[rng.integers(len(clip))]
        if rng.random() < 0.5:
            frame = frame[:, ::-1]
        out.append(media.to_video_tensor(np.ascontiguousarray(frame[None]))[:, 0])
    return torch.stack(out)


def spatial_step(model: VideoVAE, opt, frames: torch.Tensor, cfg: VAETrainConfig) -> dict:
    """Stage A: one step of the 2D VAE alone (encode_spatial -> decode_spatial) on (B, 3, H, W)
    frames; mean L1 with the product's pixels weighted 1 + foreground_weight, plus colour_weight x
    the error of the product's mean colour."""
    model.train()
    recon = model.decode_spatial(model.encode_spatial(frames))
    err = (frames - recon).abs()
    l1 = err.mean().item()
    mask = foreground_mask(frames[:, :, None])[:, :, 0] if cfg.foreground_weight or cfg.colour_weight else None
    if cfg.foreground_weight:
        err = err * (1.0 + cfg.foreground_weight * mask)
    loss = err.mean()
    if cfg.colour_weight:
        loss = loss + cfg.colour_weight * spec.foreground_colour_error(frames, recon, mask, torch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "l1": l1}


@torch.no_grad()
def clip_features(model: VideoVAE, clips: list[tuple[str, np.ndarray]], frame_batch: int = 64) -> list[torch.Tensor]:
    """The 2D encoder's features (x spatial_scaling) of every frame of every clip: (C, T, h, w) each."""
    model.eval()
    device = next(model.parameters()).device
    return [model.encode_spatial(media.to_video_tensor(clip).transpose(0, 1).to(device), frame_batch).transpose(0, 1)
            for _, clip in clips]


def temporal_reconstruction(model: VideoVAE, feats: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) 2D features -> the temporal stage's reconstruction of them (posterior mean).

    The same frame rules as `VideoVAE.posterior` + `decode` (core/vae.py padded_sources,
    decode_chunks, output_positions), so decode_spatial of the result is the VAE's reconstruction
    of the clip (parity_tests/test_vae_train.py checks this)."""
    b, _, t = feats.shape[:3]
    zero = feats.new_zeros(feats[:, :, 0].shape)
    seq = torch.stack([zero if s == spec.ZERO_FRAME else feats[:, :, s] for s in spec.padded_sources(t)], dim=2)
    groups = seq.unflatten(2, (-1, spec.TEMPORAL_GROUP)).transpose(1, 2).flatten(0, 1)
    mean, _ = model.encode_temporal(groups)                                     # (B g, lc, 1, h, w)
    z = mean[:, :, 0].unflatten(0, (b, -1)).transpose(1, 2)                     # (B, lc, g, h, w)
    decoded = torch.cat([model.decode_temporal(z[:, :, c.start:c.stop]) for c in spec.decode_chunks(z.shape[2])],
                        dim=2)
    return decoded[:, :, list(spec.output_positions(t))]


def temporal_step(model: VideoVAE, opt, feats: torch.Tensor, inv_var: torch.Tensor) -> dict:
    """Stage B: one step of the temporal stage alone on frozen (B, C, T, h, w) features: MSE per
    channel divided by that channel's variance over the training clips (1.0 = answering the
    mean feature; the 2D features' channels differ in scale by 2x, and unweighted the small ones
    would be learnt last)."""
    model.train()
    loss = (inv_var * (temporal_reconstruction(model, feats) - feats) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item()}


def pretrain_stages(model: VideoVAE, clips: list[tuple[str, np.ndarray]], cfg: VAETrainConfig,
                    rng: np.random.Generator, on_step=None, deadline: float | None = None, *,
                    run: VAERun | None = None) -> dict[str, int]:
    """Stages A (`spatial_steps`) and B (`temporal_steps`), each with its own Adam over its own
    parameters. `on_step(stage, logs)` after every step ("spatial" / "temporal"; logs["step"]
    counts from 1 within the stage); `deadline` (time.monotonic()) stops either stage early.
    `run` (training/vae_run.py): data parallel rows and gradient averaging, checkpoints, and the
    position a resumed run starts at. Returns the steps done per stage."""
    in_time = lambda: deadline is None or time.monotonic() < deadline  # noqa: E731
    run = run or VAERun(model, None, None, {}, spec.vae_schema(model.cfg))
    device = next(model.parameters()).device
    local = lambda batch, what: batch[run.dp.rows(batch.shape[0], what)].to(device)  # noqa: E731
    done = {"spatial": run.position["spatial"], "temporal": run.position["temporal"]}
    if cfg.spatial_steps:
        opt = run.optimizer("spatial", model.spatial.parameters(), lr=cfg.lr, betas=cfg.betas)
        while done["spatial"] < cfg.spatial_steps and in_time():
            frames = local(sample_frames(clips, cfg.spatial_batch, rng), "spatial_batch")
            with run.autocast():
                logs = spatial_step(model, opt, frames, cfg)
            done["spatial"] += 1
            run.done("spatial", ("spatial",))
            if on_step:
                on_step("spatial", {"step": done["spatial"], **{k: run.dp.mean(x) for k, x in logs.items()}})
    if cfg.temporal_steps and done["temporal"] < cfg.temporal_steps:
        feats = clip_features(model, clips)
        var = torch.cat([f.flatten(1) for f in feats], dim=1).var(dim=1)
        inv_var = (1.0 / var.clamp_min(1e-12))[None, :, None, None, None]
        opt = run.optimizer("temporal", model.temporal.parameters(), lr=cfg.temporal_lr, betas=cfg.betas)
        while done["temporal"] < cfg.temporal_steps and in_time():
            windows = []
            for _ in range(cfg.temporal_batch):
                f = feats[rng.integers(len(feats))]
                start = rng.integers(f.shape[1] - cfg.num_frames + 1)
                windows.append(f[:, start:start + cfg.num_frames])
            with run.autocast():
                logs = temporal_step(model, opt, local(torch.stack(windows), "temporal_batch"), inv_var)
            done["temporal"] += 1
            run.done("temporal", ("temporal",))
            if on_step:
                on_step("temporal", {"step": done["temporal"], **{k: run.dp.mean(x) for k, x in logs.items()}})
    return done


@torch.no_grad()
def set_latent_normalisation(model: VideoVAE, clips: list[tuple[str, np.ndarray]], frames: int) -> None:
    """latent_mean / latent_std := per-channel mean and std of the posterior means of the clips'
    first `frames` frames (clips shorter than that are left out unless all are), as the official
    `latents_mean/std`: the DiT then sees unit-scale latents whatever the VAE learned."""
    model.eval()
    use = [c[:frames] for _, c in clips if len(c) >= frames] or [c[:min(len(c) for _, c in clips)] for _, c in clips]
    device = next(model.parameters()).device
    means = torch.cat([model.posterior(media.to_video_tensor(c)[None].to(device))[0].float() for c in use])
    model.latent_mean.copy_(means.mean(dim=(0, 2, 3, 4)))
    model.latent_std.copy_(means.std(dim=(0, 2, 3, 4)).clamp_min(1e-3))


def train(cfg: VAETrainConfig, log=print, on_step=None, clips: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Train the VAE (stages A and B if set, then `steps` end to end within `minutes`), set its
    latent normalisation (`set_latent_normalisation` over the first `eval_frames` frames of the
    training clips) and save it under `out/ckpt`. The one VAE training that `mugv train-vae` and
    the demo both run. Under torch.distributed (torchrun) it is data parallel; with `out` and
    `checkpoint_every` it checkpoints, and a run in a folder with a checkpoint resumes from it.

    on_step(stage, logs): after every step ("spatial", "temporal", "end_to_end"; logs["step"]
    counts from 1 within the stage). clips: already decoded (name, uint8 clip) pairs instead of
    decoding `cfg.data`. With `cfg.evaluate` (vae_eval.evaluate: PSNR/SSIM, posterior mean) the
    first `eval_frames` frames of every clip are scored before and after training (rank 0).
    Returns {"before", "after" (None without evaluate), "steps", "stage_steps", "seconds",
    "checkpoint" (None without `out`), "model" (on the CPU), "runtime", "resumed"}."""
    from mugv.torch_backend.models.vae_runtime import place_vae
    t_start = time.monotonic()
    dp = DataParallel()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = init_vae(spec.vae_config(cfg.size), cfg.seed)
    with torch.no_grad():
        model.logvar.fill_(cfg.logvar_init)
    disc = PatchDiscriminator(cfg.disc_channels) if cfg.loss.disc_start is not None else None
    runtime = place_vae(model, cfg.precision)
    if disc is not None:
        disc.to(runtime.device)
    out = pathlib.Path(cfg.out) if cfg.out else None
    lock = RunLock(out) if out is not None and dp.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        run = VAERun(model, disc, out, run_config(model, cfg), spec.vae_schema(model.cfg),
                     cfg.checkpoint_every, cfg.keep_last, log, dp)
        run.np_rng, run.torch_gen, run.autocast = rng, gen, runtime.autocast
        log(json.dumps({"vae_runtime": runtime.record(), "rank": dp.rank, "world_size": dp.size}))
        return _train(cfg, run, runtime, log, on_step, clips, t_start)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: VAETrainConfig, run: VAERun, runtime, log, on_step, clips, t_start: float) -> dict:
    """`train`'s body once the model, its runtime and the run's state exist (and the lock is held)."""
    model, disc, dp, rng, gen, out = run.model, run.disc, run.dp, run.np_rng, run.torch_gen, run.out
    clips = load_clips(cfg) if clips is None else clips
    eval_clips = [(n, c[:cfg.eval_frames]) for n, c in clips if len(c) >= cfg.eval_frames]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    evaluate = lambda where: vae_eval.evaluate(  # noqa: E731
        model, cfg.data, cfg.height, cfg.width, cfg.eval_frames, cfg.fps,
        out_dir=(out / where) if out is not None else None, clips=eval_clips, runtime=runtime)
    before = None
    if cfg.evaluate and dp.rank == 0:   # of the seeded init, also when resuming
        before = evaluate("eval_before")
        log(json.dumps({"eval": "before", "mean_psnr": before["mean_psnr"], "mean_ssim": before["mean_ssim"]}))
    resumed = run.resume()
    logpath = out / "log.jsonl" if out is not None else None
    if logpath is not None and dp.rank == 0:
        truncate_metrics(logpath, run.global_step, log, key="global_step")
    logfile = open(logpath, "a") if logpath is not None and dp.rank == 0 else None
    t0 = time.monotonic() if cfg.evaluate else t_start   # the time budget counts training only

    def write(line: str) -> None:
        if dp.rank == 0:
            log(line)
            if logfile:
                logfile.write(line + "\n")
                logfile.flush()

    def log_stage(stage: str, logs: dict) -> None:
        if on_step is not None:
            on_step(stage, logs)
        if (logs["step"] - 1) % cfg.log_every == 0:
            write(json.dumps({"stage": stage, **logs, "global_step": run.global_step,
                              "seconds": round(time.monotonic() - t0, 1)}))

    deadline = None if cfg.minutes is None else t0 + 60 * cfg.minutes
    done = pretrain_stages(model, clips, cfg, rng, on_step=log_stage, deadline=deadline, run=run)
    opt = run.optimizer("end_to_end", model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = run.optimizer("discriminator", disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc is not None else None
    live = ("end_to_end", "discriminator")
    step = run.position["end_to_end"]
    while step < cfg.steps and (deadline is None or time.monotonic() < deadline):
        batch = sample_batch(clips, cfg, rng)
        video = batch[dp.rows(batch.shape[0], "batch_size")].to(runtime.device)
        with runtime.autocast():
            logs = train_step(model, disc, opt, opt_d, video, step, cfg, gen, dp, batch.shape[0])
        run.done("end_to_end", live)
        if on_step is not None:
            on_step("end_to_end", {**logs, "step": step + 1})
        if step % cfg.log_every == 0:
            write(json.dumps({**logs, "global_step": run.global_step, "seconds": round(time.monotonic() - t0, 1)}))
        step += 1
    seconds = time.monotonic() - t0
    if logfile:
        logfile.close()
    with runtime.autocast():
        set_latent_normalisation(model, clips, cfg.eval_frames)
    after = None
    if cfg.evaluate and dp.rank == 0:
        after = evaluate("eval_after")
        log(json.dumps({"eval": "after", "mean_psnr": after["mean_psnr"], "mean_ssim": after["mean_ssim"],
                        "steps": step, **{f"{k}_steps": n for k, n in done.items()}, "seconds": round(seconds, 1)}))
    ckpt = run.save(live, final=True) if out is not None else None
    # The model is returned on the CPU, as `loaders.load_vae` gives it: callers (the demo) feed it
    # host tensors; one that wants the GPU calls `place_vae` on it.
    return {"before": before, "after": after, "steps": step, "stage_steps": done, "seconds": seconds,
            "checkpoint": ckpt, "model": model.cpu(), "runtime": runtime.record(), "resumed": resumed}


def run_config(model: VideoVAE, cfg: VAETrainConfig) -> dict:
    """The checkpoint's config: the VAE's and the run's; `resume_check` is what a resumed run must
    share with it (everything that changes the math; not the budgets, intervals or output)."""
    train_cfg = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    fixed = {k: x for k, x in train_cfg.items() if k not in RESUMABLE_CHANGES}
    return {"vae": dataclasses.asdict(model.cfg), "train": train_cfg, "resume_check": fixed}


# VAETrainConfig fields a resumed run may change (budgets, intervals, logging, evaluation, paths).
RESUMABLE_CHANGES = ("steps", "minutes", "checkpoint_every", "keep_last", "log_every", "evaluate", "out",
                     "data", "eval_frames", "precision")


def train_vae(cfg: VAETrainConfig) -> int:
    """`mugv train-vae` (also under torchrun: data parallel): train, then print the PSNR before
    and after and the checkpoint (rank 0)."""
    from mugv.torch_backend.jobs import report
    from mugv.torch_backend.parallel.launch import init_distributed
    report.one_thread_on_cpu()
    init_distributed(timeout_s=600.0)
    result = train(cfg, log=lambda s: print(s, flush=True))
    if DataParallel().rank != 0:
        return 0
    if cfg.evaluate:
        print(f"PSNR {result['before']['mean_psnr']:.2f} -> {result['after']['mean_psnr']:.2f} dB; "
              f"checkpoint {result['checkpoint']}")
    else:
        print(f"checkpoint {result['checkpoint']}")
    return 0


def config_from_args(argv: list[str] | None) -> VAETrainConfig:
    ap = argparse.ArgumentParser(prog="mugv vae-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of videos or a .jsonl/.csv manifest")
    ap.add_argument("--size", default="tiny", help=f"VAE size: {sorted(spec.VAE_SIZES)}")
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--frames", type=int, default=9, help="frames per training window")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100_000, help="end-to-end steps (stage C)")
    ap.add_argument("--spatial-steps", type=int, default=0, help="stage A: steps of the 2D VAE alone on single frames")
    ap.add_argument("--spatial-batch", type=int, default=16, help="stage A: frames per step")
    ap.add_argument("--temporal-steps", type=int, default=0,
                    help="stage B: steps of the temporal stage alone on the frozen 2D features")
    ap.add_argument("--temporal-batch", type=int, default=8, help="stage B: windows per step")
    ap.add_argument("--temporal-lr", type=float, default=1e-3, help="stage B: Adam learning rate")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the training loop")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--logvar-init", type=float, default=0.0)
    ap.add_argument("--posterior-mean", action="store_true",
                    help="decode the posterior mean instead of a sample (short runs; docs/vae.md)")
    ap.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9), help="Adam betas")
    ap.add_argument("--foreground-weight", type=float, default=0.0,
                    help="extra weight of pixels away from the frame's border colour (the product)")
    ap.add_argument("--colour-weight", type=float, default=0.0,
                    help="weight of the product's mean-colour error per frame (stages A and C)")
    ap.add_argument("--disc-start", type=int, default=None, help="step switching the discriminator on (off if unset)")
    ap.add_argument("--disc-weight", type=float, default=0.5)
    ap.add_argument("--eval-frames", type=int, default=17)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="run folder: log.jsonl, eval_before/, eval_after/, ckpt/")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save every N steps (all stages counted) for exact resume; 0: only at the end")
    ap.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto: models/vae_runtime.py GPU_DEFAULT on a GPU (fp32 today), fp32 on the CPU; bf16: autocast")
    ap.add_argument("--no-eval", action="store_true", help="skip PSNR/SSIM before and after")
    a = ap.parse_args(argv)
    return VAETrainConfig(data=a.data, size=a.size, height=a.height, width=a.width, num_frames=a.frames, fps=a.fps,
                          batch_size=a.batch_size, steps=a.steps, minutes=a.minutes, lr=a.lr,
                          spatial_steps=a.spatial_steps, spatial_batch=a.spatial_batch,
                          temporal_steps=a.temporal_steps, temporal_batch=a.temporal_batch,
                          temporal_lr=a.temporal_lr,
                          logvar_init=a.logvar_init, sample_posterior=not a.posterior_mean, betas=tuple(a.betas),
                          foreground_weight=a.foreground_weight, colour_weight=a.colour_weight,
                          loss=spec.VAELossConfig(kl_weight=a.kl_weight, disc_start=a.disc_start,
                                                  disc_weight=a.disc_weight),
                          eval_frames=a.eval_frames, log_every=a.log_every, seed=a.seed, out=a.out,
                          checkpoint_every=a.checkpoint_every, keep_last=a.keep_last, precision=a.precision,
                          evaluate=not a.no_eval)


def main(argv: list[str] | None = None) -> int:
    from mugv.torch_backend.parallel.launch import init_distributed
    cfg = config_from_args(argv)
    init_distributed(timeout_s=600.0)
    result = train(cfg, log=lambda s: print(s, flush=True))
    if DataParallel().rank != 0:
        return 0
    if not cfg.evaluate:
        sys.stdout.write(f"checkpoint {result['checkpoint']}\n")
        return 0
    b, a = result["before"], result["after"]
    sys.stdout.write(f"PSNR {b['mean_psnr']:.2f} -> {a['mean_psnr']:.2f} dB, SSIM {b['mean_ssim']:.4f} -> "
                     f"{a['mean_ssim']:.4f} after {result['steps'] + sum(result['stage_steps'].values())} steps "
                     f"({result['seconds']:.0f} s)\n")
    sys.stdout.write(vae_eval.format_table(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
