"""`mugv sample`: text-to-video / image-to-video clips from a DiT checkpoint through the VAE.

`sample_latents` is the one sampling loop every job and experiment uses (Euler + classifier-free
guidance, `torch_backend/sampler.py::sample`); `sample` is the subcommand (mp4 per clip, a PNG frame grid and
the prompts).
"""
from __future__ import annotations

import json
import pathlib

import torch

from mugv.core.dit import DiTConfig, patch_grid
from mugv.core.sampler import FlowSamplerConfig
from mugv.torch_backend.data.media import frame_grid, to_uint8, write_mp4, write_png, written_atomically


@torch.no_grad()
def sample_latents(model, dit: DiTConfig, text: torch.Tensor, text_mask: torch.Tensor,
                   latent_thw: tuple[int, int, int], fps: float, sampler_cfg: FlowSamplerConfig,
                   seed: int, cond_latent: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """Euler + CFG sampling (sampler.sample) of B clips; the negative prompt is the empty
    caption (all text masked, as caption dropout trains it). cond_latent (B, C, 1, h, w) makes it
    image-to-video: latent frame 0 is held at the reference image's latent. on_step(i) is told
    after each model evaluation (progress)."""
    from mugv.torch_backend import sampler
    b = text.shape[0]
    t, h, w = latent_thw
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, dit.in_channels, t, h, w, generator=g)
    frame_mask = None
    cond = None
    if cond_latent is not None:
        frame_mask = torch.ones(b, t, dtype=torch.bool)
        frame_mask[:, 0] = False
        cond = torch.zeros_like(noise)
        cond[:, :, :1] = cond_latent
    text2 = torch.cat([text, text])
    mask2 = torch.cat([text_mask, torch.zeros_like(text_mask)])
    fps2 = torch.full((2 * b,), float(fps))
    tp = patch_grid(dit, latent_thw)[0]
    frame_indice = torch.arange(tp + 2).repeat(2 * b, 1)
    device = next(model.parameters()).device

    calls = [0]

    def call(x, timestep, x_mask):
        x_mask = torch.ones(x.shape[0], t, dtype=torch.bool) if x_mask is None else x_mask
        out = model(x.to(device), timestep.to(device), text2.to(device), mask2.to(device),
                    x_mask.to(device), fps2.to(device), frame_indice.to(device)).float().cpu()
        calls[0] += 1
        if on_step is not None:
            on_step(calls[0])
        return out

    return sampler.sample(call, sampler_cfg, noise, 1.0, cond, frame_mask)


@torch.no_grad()
def decode_videos(vae, latent: torch.Tensor, num_frames: int, runtime=None) -> list:
    """uint8 (T, H, W, 3) clips of a (B, C, t, h, w) latent, decoded on the VAE's device under
    `runtime`'s precision (models/vae_runtime.py; None: fp32 where the VAE is)."""
    import contextlib
    device = next(vae.parameters()).device
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        video = vae.decode(latent.to(device), num_frames)
    return [to_uint8(x) for x in video.float().cpu()]


def sample(ns) -> int:
    """`mugv sample` (cli/commands.py builds `ns`): decode, write sample_<i>.mp4, grid.png and
    prompts.json under `ns.out`."""
    from mugv.core.vae import latent_shape
    from mugv.torch_backend.data.decode import decode_clip, to_model_range
    from mugv.torch_backend.jobs import loaders, report
    from mugv.torch_backend.parallel import megatron_compat
    report.one_thread_on_cpu()
    from mugv.torch_backend.models.vae_runtime import place_vae
    vae = loaders.load_vae(ns.vae_size, ns.vae_checkpoint, ns.vae_official)
    runtime = place_vae(vae)
    print(f"[mugv] VAE on {runtime.record()}")
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=ns.seed)
    try:
        dit, model = loaders.load_dit(ns.dit, ns.checkpoint, ns.official, ns.group)
        text, mask = loaders.text_encoder(ns.text_encoder, dit)(list(ns.prompt))
        if text.shape[-1] != dit.text_dim:
            raise ValueError(f"text encoder gives {text.shape[-1]}-d states; the DiT expects text_dim {dit.text_dim}")
        cond = None
        if ns.image:
            ref = to_model_range(decode_clip(ns.image, 1, ns.size, ns.size, ns.fps))
            with torch.no_grad(), runtime.autocast():
                cond = vae.encode(torch.from_numpy(ref)[None].to(runtime.device), sample=False).float().cpu()
            cond = cond.repeat(len(ns.prompt), 1, 1, 1, 1)
        z = sample_latents(model, dit, text, mask, latent_shape(ns.frames, ns.size, ns.size), ns.fps,
                           ns.sampler, ns.seed, cond,
                           on_step=lambda i: print(f"[mugv] sampling: step {i}/{ns.sampler.num_steps}", flush=True))
    finally:
        megatron_compat.destroy_parallel()
    videos = decode_videos(vae, z, ns.frames, runtime)
    # Each file appears whole or not at all (a kill mid-write left a truncated mp4 under its
    # final name); sampling is deterministic, so a rerun after a kill writes the same files.
    out = pathlib.Path(ns.out)
    for i, video in enumerate(videos):
        with written_atomically(out / f"sample_{i}.mp4") as tmp:
            write_mp4(tmp, video, ns.fps)
    with written_atomically(out / "grid.png") as tmp:
        write_png(tmp, frame_grid(videos))
    with written_atomically(out / "prompts.json") as tmp:
        tmp.write_text(json.dumps(list(ns.prompt), indent=1))
    print(f"{len(videos)} clips ({'i2v' if ns.image else 't2v'}) -> {out}")
    return 0
