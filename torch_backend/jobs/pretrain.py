"""`mugv cache` and `mugv train`: a pre-training curriculum (core/recipe.py `PretrainConfig`) run
stage by stage. Each stage's bucket is encoded once into the latent/text cache (resumable), then
trained by the Trainer starting from the previous stage's final weights; with `sample_every`,
sample grids are written while it trains (`Previewer`).

The VAE runs where `models/vae_runtime.py::place_vae` puts it (this rank's GPU, else the CPU;
fp32 unless MUGV_VAE_PRECISION=bf16). Under torchrun both commands cache data parallel: every rank encodes its block
of each bucket's batches into the same cache (`data/cache.py`), bit-equal to one process.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Optional

import numpy as np
import torch

from mugv.core import validate as v
from mugv.core.recipe import PretrainConfig, StageConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.torch_backend.jobs.loaders import load_vae, require_path, text_encoder, text_identity, weights_identity
from mugv.torch_backend.data.media import frame_grid, to_uint8, write_mp4, write_png
from mugv.torch_backend.jobs.sample import decode_videos, sample_latents


# ---------------------------------------------------------------------------------------------
# Caching and training


def stage_index(cfg: PretrainConfig, stage: StageConfig, **build):
    from mugv.core.data import BucketSpec
    from mugv.torch_backend.data.dataset import build_index
    bucket = BucketSpec(cfg.size, cfg.size, stage.frames, stage.batch_size, cfg.fps)
    return build_index(cfg.manifest, (bucket,), **build)


def stage_indices(cfg: PretrainConfig, only: Optional[str] = None, say=print) -> dict:
    """{stage name: its bucket index} for the stages this run trains (all, or `only`), built once
    per run: each file probed once, each skipped clip named once (at the first stage that skips
    it; `mugv train` named it three times per stage), then one line per stage that skipped any:
    `N decoded, M skipped (reason counts)`. A stage no clip can fill is an InputError naming it,
    raised before any model loads."""
    from mugv.torch_backend.data.manifest import read_manifest
    from mugv.torch_backend.jobs.preflight import InputError
    entries = read_manifest(cfg.manifest)
    probed: dict = {}
    named: set[str] = set()

    def on_skip(entry, reason, detail):
        if entry.sample_id not in named:
            named.add(entry.sample_id)
            why = detail if detail.startswith(reason) else f"{reason} ({detail})" if detail else reason
            say(f"[mugv] skipped {entry.path} (line {entry.line}): {why}")

    indices = {}
    for stage in cfg.stages:
        if only is not None and stage.name != only:
            continue
        index = indices[stage.name] = stage_index(cfg, stage, on_skip=on_skip, probed=probed)
        counts = ", ".join(f"{k} {n}" for k, n in sorted(index.skip_counts.items()))
        if index.skipped:
            say(f"[mugv] stage {stage.name}: {len(entries) - len(index.skipped)} decoded, "
                f"{len(index.skipped)} skipped ({counts})")
        if not index.items:
            raise InputError(f"stage {stage.name!r}: no clip of --manifest {cfg.manifest} is usable at {stage.frames} "
                             f"frame(s) of {cfg.size}x{cfg.size} px ({len(entries)} rows; skipped: {counts or 'none'})")
    return indices


def cache_names(cfg: PretrainConfig, precision: str = "fp32") -> tuple[str, str]:
    """The identities a cache records and is checked against (loaders.weights_identity); a cache
    encoded in bf16 says so (its rows differ from fp32 ones, so the two are never mixed)."""
    video = f"vae:{weights_identity(cfg.vae_checkpoint)}" + ("" if precision == "fp32" else f":{precision}")
    return video, text_identity(cfg.text_encoder, cfg.dit)


def data_parallel_world(timeout_s: float = 600.0):
    """(rank, world size, barrier) of the torch.distributed group, joined under torchrun with the
    layout's collective timeout (a no-op when joined already)."""
    import torch.distributed as dist
    from mugv.torch_backend.parallel.launch import init_distributed
    init_distributed(timeout_s=timeout_s)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, None


def cache_stage(cfg: PretrainConfig, stage: StageConfig, vae, text, log=print, index=None,
                on_row=None, runtime=None) -> pathlib.Path:
    """Encode the stage's bucket (latent moments + text states) into out/cache/<bucket>; resumable.
    `index`: the stage's index when the caller built it (`stage_indices`); `on_row(bucket, row)`
    is told of each committed row (build_cache). Under torch.distributed every rank calls it and
    encodes its share (data/cache.py). `runtime`: `place_vae`'s (the VAE's device and precision);
    None = fp32 where the VAE is."""
    from mugv.torch_backend.data.cache import build_cache, cache_complete, check_cache, vae_encoder
    rank, world, barrier = data_parallel_world(cfg.parallel.timeout_s)
    index = index if index is not None else stage_index(cfg, stage)
    folder = pathlib.Path(cfg.out) / "cache" / index.buckets[0].name
    video_name, text_name = cache_names(cfg, runtime.precision if runtime is not None else "fp32")
    if (folder / "meta.json").exists():   # complete or not: built by these encoders from these captions?
        check_cache(folder, index, video_name, text_name)
    if not cache_complete(folder):
        encode = vae_encoder(vae, runtime.autocast if runtime is not None else None)
        counts = build_cache(index, folder, encode, text, video_name, text_name, batch=16, on_row=on_row,
                             rank=rank, world=world, barrier=barrier)
        log(f"[mugv] cache {folder}: {counts['encoded']} clips encoded by rank {rank} of {world} "
            f"({len(index.items)} items, {len(index.skipped)} skipped {index.skip_counts})")
    return folder


def train_stages(cfg: PretrainConfig, on_metrics_for: Callable[[StageConfig], Optional[Callable]] = lambda s: None,
                 log=print, only: Optional[str] = None, say=print) -> pathlib.Path:
    """Cache and train every stage (or only the one named), each starting from the previous
    stage's final weights. Returns the last trained stage's run folder. `say` gets the data lines
    (skipped clips, one summary per stage) even where `log` is silenced for progress bars."""
    from mugv.core.data import TaskMix
    from mugv.torch_backend.data.cache import CachedSource
    from mugv.torch_backend.training.data_source import CachedBatches
    from mugv.torch_backend.training.trainer import StageSettings, Trainer

    require_path("manifest", cfg.manifest, "manifest file")
    require_path("vae_checkpoint", cfg.vae_checkpoint, "VAE checkpoint")
    names = [s.name for s in cfg.stages]
    if only is not None and only not in names:
        raise v.ConfigError(f"--stage {only!r}: expected one of the recipe's stages {names}")
    indices = stage_indices(cfg, only, say)
    from mugv.torch_backend.models.vae_runtime import place_vae
    vae = load_vae(cfg.vae_size, cfg.vae_checkpoint)
    runtime = place_vae(vae, kernels=cfg.kernels.kernel_choice)
    log(f"[mugv] VAE on {runtime.record()}")
    text = text_encoder(cfg.text_encoder, cfg.dit)
    previous = None
    run_dir = None
    for stage in cfg.stages:
        run_dir = pathlib.Path(cfg.out) / "stages" / stage.name
        if only is None or stage.name == only:
            index = indices[stage.name]
            cache = cache_stage(cfg, stage, vae, text, log, index, runtime=runtime)   # every rank its share
            mix = TaskMix(1.0, 0.0, 0.0) if stage.frames == 1 else TaskMix(0.0, 1 - stage.i2v, stage.i2v)
            source = CachedBatches(index, CachedSource(index, cache, *cache_names(cfg, runtime.precision)), mix,
                                   seed=cfg.train.seed, sample_posterior=cfg.sample_posterior)
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
                on_metrics = _with_previews(on_metrics, Previewer(cfg, stage, vae, text, run_dir / "samples",
                                                                  runtime=runtime),
                                            holder, cfg.sample_every, stage.steps)
            trainer = Trainer(cfg.dit, train, cfg.flow, source, run_dir, parallel=cfg.parallel,
                              stage=settings, log=log, on_metrics=on_metrics, kernels=cfg.kernels)
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
                 sampler: FlowSamplerConfig = FlowSamplerConfig(num_steps=20, guidance_scale=3.0), seed: int = 1234,
                 runtime=None):
        from mugv.core.vae import latent_shape
        from mugv.torch_backend.data.manifest import read_manifest
        self.cfg, self.stage, self.vae, self.folder, self.sampler, self.seed = cfg, stage, vae, folder, sampler, seed
        self.runtime = runtime
        self.captions = [e.caption for e in read_manifest(cfg.manifest)[:cfg.sample_prompts]]
        self.text, self.mask = text(self.captions)
        self.thw = latent_shape(stage.frames, cfg.size, cfg.size)
        self.written: list[pathlib.Path] = []

    def __call__(self, model, step: int) -> pathlib.Path:
        was_training = model.training
        model.eval()
        try:
            z = sample_latents(model, self.cfg.dit, self.text, self.mask, self.thw, self.cfg.fps, self.sampler,
                               self.seed)
            videos = decode_videos(self.vae, z, self.stage.frames, self.runtime)
        finally:
            model.train(was_training)
        png = write_png(self.folder / f"step_{step:06d}.png", frame_grid(videos))
        write_mp4(self.folder / f"step_{step:06d}.mp4", np.concatenate(videos, axis=2), self.cfg.fps)
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


def cache(cfg) -> int:
    """`mugv cache`: encode every stage's bucket (or only `--stage`'s) into the cache."""
    from mugv.torch_backend.jobs import report
    from mugv.torch_backend.models.vae_runtime import place_vae
    recipe, only = cfg
    report.one_thread_on_cpu()
    indices = stage_indices(recipe, only)
    vae = load_vae(recipe.vae_size, recipe.vae_checkpoint)
    runtime = place_vae(vae, kernels=recipe.kernels.kernel_choice)
    rank = data_parallel_world(recipe.parallel.timeout_s)[0]
    if rank == 0:
        print(f"[mugv] VAE on {runtime.record()}")
    text = text_encoder(recipe.text_encoder, recipe.dit)
    committed: dict[str, int] = {}

    def progress(bucket: str, row: int, every: int = 16) -> None:
        committed[bucket] = committed.get(bucket, 0) + 1
        if committed[bucket] % every == 0:
            print(f"[mugv] cache {bucket}: {committed[bucket]} rows committed", flush=True)

    for stage in recipe.stages:
        if stage.name in indices:
            folder = cache_stage(recipe, stage, vae, text, index=indices[stage.name], on_row=progress,
                                 runtime=runtime)
            if rank == 0:
                print(folder, flush=True)
    return 0


def train(cfg) -> int:
    """`mugv train`: the whole curriculum (or only `--stage`) with progress bars on rank 0, then
    the loss curve of every stage."""
    from mugv.torch_backend.jobs import report
    recipe, only = cfg
    report.one_thread_on_cpu()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    bars = []

    def progress(stage):
        bars.append(report.Progress(stage.steps, stage.name, disable=not rank0))
        return bars[-1]

    last = train_stages(recipe, progress, log=lambda s: None, only=only)
    for bar in bars:
        bar.close()
    if rank0:
        runs = {s.name: report.read_metrics(pathlib.Path(recipe.out) / "stages" / s.name / "metrics.jsonl")
                for s in recipe.stages}
        png = report.loss_curve(runs, pathlib.Path(recipe.out) / "loss_curve.png")
        print(f"trained; last stage {last}; loss curve {png}")
    return 0

