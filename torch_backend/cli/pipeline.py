"""The steps the `mugv` subcommands and the demo share: cache a stage's latents and text, train a
curriculum stage by stage, load a DiT for sampling (mugv or official-layout weights), sample
text-to-video / image-to-video clips through the VAE, and score them with the analyzer.

Configs are frozen dataclasses validated in `__post_init__` (a bad value raises `ConfigError`
naming the field); the command line (`cli/__init__.py`) fills them from a recipe file plus
dotted overrides.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable, Optional

import numpy as np
import torch

from mugv.core import validate as v
from mugv.core.dit import DiTConfig, patch_grid
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.train import OptimizerConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One curriculum stage of pre-training.

    name: folder name of the stage's run. frames: 1 = an image stage (t2i), else video clips of
    this many frames. steps / lr / warmup_steps: optimizer schedule (constant after warm-up).
    batch_size: clips per global batch. i2v: share of video batches trained as image-to-video
    (the rest text-to-video). caption_dropout: probability a caption is dropped (for CFG).
    """

    name: str = "images"
    frames: int = 1
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    batch_size: int = 16
    i2v: float = 0.0
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            v.fail(self, "name", "a non-empty folder name")
        v.positive_int(self, "frames", "steps", "batch_size")
        v.non_negative_int(self, "warmup_steps")
        v.in_range(self, "lr", 0, 1, lo_open=True)
        v.in_range(self, "i2v", 0, 1)
        v.in_range(self, "caption_dropout", 0, 1)


def demo_dit(**overrides) -> DiTConfig:
    """The demo's DiT: 'tiny' width, 3 layers, 8 latent channels (the tiny VAE's), 48 text tokens."""
    return DiTConfig(**{**dict(hidden_size=144, num_heads=2, depth=3, in_channels=8, out_channels=16,
                               text_dim=64, text_max_len=48), **overrides})


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Curriculum pre-training of MUG-DiT on a manifest through the latent/text cache.

    manifest: JSONL/CSV manifest of the training clips. vae_checkpoint: mugv VAE checkpoint
    (step_* directory) whose encoder makes the latents. out: run folder (caches, stages, report).
    size / fps: square training resolution in pixels and the frame rate clips are sampled at.
    text_encoder: "embedded" (no download) or a local T5 directory.
    sample_posterior: train on posterior samples (official) rather than posterior means.
    sample_every: every this many steps of a stage (and at its last step), sample
    `sample_prompts` captions of the manifest with the current weights and write an mp4 and a
    PNG frame grid to stages/<name>/samples/ (0: off; one process only).
    """

    manifest: str = ""
    vae_checkpoint: str = ""
    out: str = "runs/pretrain"
    vae_size: str = "tiny"
    size: int = 32
    fps: float = 16.0
    text_encoder: str = "embedded"
    sample_posterior: bool = False
    sample_every: int = 0
    sample_prompts: int = 4
    dit: DiTConfig = demo_dit()
    flow: FlowConfig = FlowConfig(shift=False)
    train: TrainConfig = TrainConfig(precision="fp32", ema_decay=0.99, micro_batch=64, checkpoint_every=100_000,
                                     log_every=50, keep_last=1, seed=0,
                                     optimizer=OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=10))
    parallel: ParallelConfig = ParallelConfig()
    stages: tuple[StageConfig, ...] = (
        StageConfig("images", frames=1, steps=200, lr=1e-3),
        StageConfig("short_video", frames=17, steps=700, lr=1e-3, i2v=0.3),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages:
            v.fail(self, "stages", "a non-empty list of stages")
        if len({s.name for s in self.stages}) != len(self.stages):
            v.fail(self, "stages", "distinct stage names")
        if self.size % 16:
            v.fail(self, "size", "a multiple of 16 (VAE 8 x DiT patch 2)")
        v.in_range(self, "fps", 0, 240, lo_open=True)
        v.non_negative_int(self, "sample_every")
        v.positive_int(self, "sample_prompts")


def require_path(field: str, path: str, what: str = "file or directory") -> pathlib.Path:
    """A user-given path that must exist; the error names the option."""
    p = pathlib.Path(path) if path else None
    if p is None or not p.exists():
        raise FileNotFoundError(f"--{field} = {path!r}: no such {what}")
    return p


# ---------------------------------------------------------------------------------------------
# Models


def load_vae(size: str, checkpoint: str | None = None, official: str | None = None):
    """VideoVAE from a mugv checkpoint (with its latent normalisation) or an official file."""
    from mugv.torch_backend import vae_eval
    model = vae_eval.load_model(size, checkpoint=checkpoint, official=official)
    return model.eval().requires_grad_(False)


def text_encoder(spec: str, dit: DiTConfig):
    from mugv.torch_backend.data.text import load_text_encoder
    return load_text_encoder(spec, dim=dit.text_dim, max_len=dit.text_max_len)


def read_official_dit(path: str | pathlib.Path) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """Official `dit.pt` / .safetensors -> (config, canonical arrays); a goldens bundle
    (`param.`-prefixed keys next to inputs and outputs) yields its `param.*` entries."""
    from mugv.checkpoints.official_dit import config_from_official, import_official, load_official_file
    state = load_official_file(str(path))
    if any(k.startswith("param.") for k in state):
        state = {k[len("param."):]: a for k, a in state.items() if k.startswith("param.")}
    cfg = config_from_official(state)
    return cfg, import_official(state, cfg)


def load_dit(cfg: DiTConfig, checkpoint: str | None = None, official: str | None = None,
             group: str = "model"):
    """MUG-DiT for sampling on one process: from a mugv checkpoint (trainer output: group
    "model" or "ema"; a run folder picks its newest step), from an official-layout dit.pt /
    .safetensors file or a local directory holding one, or seeded random weights.
    Megatron's parallel state must be initialised (`megatron_compat.initialize_parallel`)."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.checkpoints.torch_io import load_torch
    from mugv.core.dit import dit_schema
    from mugv.torch_backend.models.dit import build_dit

    if official is not None:
        path = pathlib.Path(official)
        if path.is_dir():
            found = sorted(f for f in [*path.glob("*dit*.pt"), *path.glob("*dit*.safetensors")]
                           if ".extra." not in f.name)   # goldens keep fp64 outputs in *.extra.*
            if not found:
                raise FileNotFoundError(f"--official {official}: no *dit*.pt or *dit*.safetensors in it")
            path = found[0]
        cfg, params = read_official_dit(path)
        model = build_dit(cfg, seed=None)
        load_canonical(model, cfg, params)
        return cfg, model.eval()
    model = build_dit(cfg, seed=0 if checkpoint is None else None)
    if checkpoint is not None:
        path = pathlib.Path(checkpoint)
        if not (path / "manifest.json").is_file():
            path = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints") or path
        weights = load_torch(path, dit_schema(cfg), group)
        with torch.no_grad():
            for name, q in model.named_parameters():
                q.copy_(weights[name].to(q))
    return cfg, model.eval()


# ---------------------------------------------------------------------------------------------
# Caching and training


def stage_index(cfg: PretrainConfig, stage: StageConfig):
    from mugv.core.data import BucketSpec
    from mugv.torch_backend.data.dataset import build_index
    bucket = BucketSpec(cfg.size, cfg.size, stage.frames, stage.batch_size, cfg.fps)
    return build_index(cfg.manifest, (bucket,))


def cache_stage(cfg: PretrainConfig, stage: StageConfig, vae, text, log=print) -> pathlib.Path:
    """Encode the stage's bucket (latent moments + text states) into out/cache/<bucket>; resumable."""
    from mugv.torch_backend.data.cache import build_cache, cache_complete, vae_encoder
    index = stage_index(cfg, stage)
    folder = pathlib.Path(cfg.out) / "cache" / index.buckets[0].name
    if not cache_complete(folder):
        counts = build_cache(index, folder, vae_encoder(vae), text, f"vae:{cfg.vae_checkpoint}",
                             f"text:{cfg.text_encoder}", batch=16)
        log(f"[mugv] cache {folder}: {counts['encoded']} clips encoded ({len(index.items)} items, "
            f"{len(index.skipped)} skipped {index.skip_counts})")
    return folder


def train_stages(cfg: PretrainConfig, on_metrics_for: Callable[[StageConfig], Optional[Callable]] = lambda s: None,
                 log=print, only: Optional[str] = None) -> pathlib.Path:
    """Cache and train every stage (or only the one named), each starting from the previous
    stage's final weights. Returns the last trained stage's run folder."""
    from mugv.core.data import TaskMix
    from mugv.torch_backend.data.cache import CachedSource, cache_complete
    from mugv.torch_backend.training.data_source import CachedBatches
    from mugv.torch_backend.training.trainer import StageSettings, Trainer

    require_path("manifest", cfg.manifest, "manifest file")
    require_path("vae_checkpoint", cfg.vae_checkpoint, "VAE checkpoint")
    vae = load_vae(cfg.vae_size, cfg.vae_checkpoint)
    text = text_encoder(cfg.text_encoder, cfg.dit)
    names = [s.name for s in cfg.stages]
    if only is not None and only not in names:
        raise v.ConfigError(f"--stage {only!r}: expected one of the recipe's stages {names}")
    previous = None
    run_dir = None
    for stage in cfg.stages:
        run_dir = pathlib.Path(cfg.out) / "stages" / stage.name
        if only is None or stage.name == only:
            cache = pathlib.Path(cfg.out) / "cache" / stage_index(cfg, stage).buckets[0].name
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cache_complete(cache):
                # every rank would encode the same rows at once: cache in one process first
                raise RuntimeError(f"cache {cache} is incomplete; under torchrun run `mugv cache` with the "
                                   f"same recipe first (one process), then `mugv train`")
            cache = cache_stage(cfg, stage, vae, text, log)
            index = stage_index(cfg, stage)
            mix = TaskMix(1.0, 0.0, 0.0) if stage.frames == 1 else TaskMix(0.0, 1 - stage.i2v, stage.i2v)
            source = CachedBatches(index, CachedSource(index, cache), mix, seed=cfg.train.seed,
                                   sample_posterior=cfg.sample_posterior)
            train = dataclasses.replace(cfg.train, steps=stage.steps, optimizer=dataclasses.replace(
                cfg.train.optimizer, lr=stage.lr, min_lr=min(cfg.train.optimizer.min_lr, stage.lr),
                warmup_steps=stage.warmup_steps))
            settings = StageSettings(task_mix=(("t2v", 1 - stage.i2v), ("i2v", stage.i2v)),
                                     caption_dropout=stage.caption_dropout,
                                     init_from=str(previous / "checkpoints") if previous else None)
            log(f"[mugv] stage {stage.name}: {stage.steps} steps, {stage.frames} frame(s), batch "
                f"{stage.batch_size}, lr {stage.lr:g}, i2v {stage.i2v:g} -> {run_dir}")
            holder = {}
            on_metrics = on_metrics_for(stage)
            if cfg.sample_every and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                on_metrics = _with_previews(on_metrics, Previewer(cfg, stage, vae, text, run_dir / "samples"),
                                            holder, cfg.sample_every, stage.steps)
            trainer = Trainer(cfg.dit, train, cfg.flow, source, run_dir, parallel=cfg.parallel,
                              stage=settings, log=log, on_metrics=on_metrics)
            holder["model"] = trainer.model
            try:
                trainer.run()
            finally:
                trainer.close()
        previous = run_dir
    return run_dir


class Previewer:
    """Samples a few of the manifest's captions (text-to-video, fixed seed) with the weights being
    trained and writes `step_<N>.mp4` (the clips side by side) and `step_<N>.png` (rows = prompts,
    columns = frames) to `folder`: what the model makes as training goes, not only at the end."""

    def __init__(self, cfg: PretrainConfig, stage: StageConfig, vae, text, folder: pathlib.Path,
                 sampler: FlowSamplerConfig = FlowSamplerConfig(num_steps=20, guidance_scale=3.0), seed: int = 1234):
        from mugv.core.vae import latent_shape
        from mugv.torch_backend.data.manifest import read_manifest
        self.cfg, self.stage, self.vae, self.folder, self.sampler, self.seed = cfg, stage, vae, folder, sampler, seed
        self.captions = [e.caption for e in read_manifest(cfg.manifest)[:cfg.sample_prompts]]
        self.text, self.mask = text(self.captions)
        self.thw = latent_shape(stage.frames, cfg.size, cfg.size)
        self.written: list[pathlib.Path] = []

    def __call__(self, model, step: int) -> pathlib.Path:
        from mugv.torch_backend import report
        was_training = model.training
        model.eval()
        try:
            z = sample_latents(model, self.cfg.dit, self.text, self.mask, self.thw, self.cfg.fps, self.sampler,
                               self.seed)
            with torch.no_grad():
                videos = [to_uint8(x) for x in self.vae.decode(z, self.stage.frames)]
        finally:
            model.train(was_training)
        png = report.write_png(self.folder / f"step_{step:06d}.png", report.frame_grid(videos))
        report.write_mp4(self.folder / f"step_{step:06d}.mp4", np.concatenate(videos, axis=2), self.cfg.fps)
        (self.folder / "prompts.txt").write_text("".join(f"{i}. {c}\n" for i, c in enumerate(self.captions)))
        self.written.append(png)
        return png


def _with_previews(on_metrics, previewer: Previewer, holder: dict, every: int, last: int):
    def call(m: dict) -> None:
        if on_metrics is not None:
            on_metrics(m)
        if "model" in holder and (m["step"] % every == 0 or m["step"] == last):
            previewer(holder["model"], m["step"])
    return call


# ---------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample_latents(model, dit: DiTConfig, text: torch.Tensor, text_mask: torch.Tensor,
                   latent_thw: tuple[int, int, int], fps: float, sampler_cfg: FlowSamplerConfig,
                   seed: int, cond_latent: torch.Tensor | None = None) -> torch.Tensor:
    """Euler + CFG sampling (objectives.sample) of B clips; the negative prompt is the empty
    caption (all text masked, as caption dropout trains it). cond_latent (B, C, 1, h, w) makes it
    image-to-video: latent frame 0 is held at the reference image's latent."""
    from mugv.torch_backend import objectives
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

    def call(x, timestep, x_mask):
        x_mask = torch.ones(x.shape[0], t, dtype=torch.bool) if x_mask is None else x_mask
        return model(x.to(device), timestep.to(device), text2.to(device), mask2.to(device),
                     x_mask.to(device), fps2.to(device), frame_indice.to(device)).float().cpu()

    return objectives.sample(call, sampler_cfg, noise, 1.0, cond, frame_mask)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def read_attributes(path: str | pathlib.Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def analyzer_accuracy(videos: list[np.ndarray], captions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Per attribute: the share of clips whose analyzed value is the one the caption names."""
    from mugv.torch_backend.data.analyzer import analyze, parse_caption
    hits: dict[str, list[bool]] = {}
    rows = []
    for video, caption in zip(videos, captions):
        wanted = parse_caption(caption)
        result = analyze(video)
        row = {"caption": caption}
        for attribute, value in wanted.items():
            if value is None:
                continue
            got = result.best(attribute)
            hits.setdefault(attribute, []).append(got == value)
            row[attribute] = got
        rows.append(row)
    return {k: float(np.mean(h)) for k, h in hits.items()}, rows
