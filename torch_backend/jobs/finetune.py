"""Fine-tuning MUG-DiT on a user's own videos: LoRA or full, from the official weights or ours.

The path (docs/finetune.md):
1. the base: an official `dit.pt` / `.safetensors` (imported in memory through
   `checkpoints/official_dit.py`; for the 10B model convert it once with
   `python -m mugv.checkpoints.torch_dit dit.pt OUT` and pass OUT, which each rank reads slice by
   slice) or any mugv checkpoint (a step directory or a run root);
2. the data: a manifest of the user's clips and captions (`torch_backend/data/manifest.py`),
   indexed into buckets, encoded once into the resumable latent/text cache (`data/cache.py`) with
   the caller's video encoder (the official VAE: `vae_encoder(load_official_vae(path))`) and text
   encoder (a local T5 directory, `data/text.py`), then read by `CachedLatents`, a resumable
   `BatchSource` for the Trainer;
3. the Trainer (`training/trainer.py`) with a `model_hook` that loads the base weights and, for
   LoRA, attaches the adapters and freezes the rest (`torch_backend/models/lora.py`); its checkpoints
   resume exactly; at the end the adapters are also written alone (small) under `out/adapters`.

`mugv finetune` runs `finetune_command` (FinetuneRunConfig: base, manifest, encoders, the
configs). From Python: `finetune(...)`, `prepare_data(...)`, `finetuned_model(...)` (the model
before or after, for sampling); the loaders `load_base(...)`, `load_official_vae(...)` are in jobs/loaders.py.
The held-out-attribute experiment built on it: experiments/held_out.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from mugv.core import validate as v
from mugv.core.data import BucketSpec, TaskMix
from mugv.core.dit import DiTConfig
from mugv.core.flow import FlowConfig
from mugv.core.lora import LoRAConfig
from mugv.core.parallel import ParallelConfig
from mugv.core.recipe import KernelConfig
from mugv.core.train import TrainConfig
from mugv.torch_backend.data.batch import TrainBatch
from mugv.torch_backend.jobs.loaders import load_base

@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run adds to the training configs.

    mode: "lora" (adapters only; base frozen) or "full" (every parameter trains).
    lora: the adapters (rank, alpha, targets, base dtype), used when mode == "lora".
    buckets: the batch shapes the user's clips are resized/cropped/resampled to (core/data.py).
    i2v: share of video batches trained as image-to-video (latent frame 0 clean), the rest t2v.
    caption_dropout: captions dropped for classifier-free guidance (the anchor: 0.1).
    data_seed: the sampler's seed (which clips form which batch, in which order).
    """

    mode: str = "lora"
    lora: LoRAConfig = LoRAConfig()
    buckets: tuple[BucketSpec, ...] = (BucketSpec(256, 448, 33, batch_size=1, fps=24.0),)
    i2v: float = 0.0
    caption_dropout: float = 0.1
    data_seed: int = 0

    def __post_init__(self) -> None:
        v.one_of(self, "mode", ("lora", "full"))
        if not self.buckets or not all(isinstance(b, BucketSpec) for b in self.buckets):
            v.fail(self, "buckets", "a non-empty tuple of BucketSpec")
        v.in_range(self, "i2v", 0, 1)
        v.in_range(self, "caption_dropout", 0, 1)
        v.non_negative_int(self, "data_seed")


# ---------------------------------------------------------------------------------------------
# Base weights


# Base weights and the official VAE: jobs/loaders.py (`load_base`, `load_official_vae`).


# ---------------------------------------------------------------------------------------------
# Data: manifest -> index -> cache -> batches


class CachedLatents:
    """A resumable `BatchSource` over a dataset index and its latent/text cache (or online
    encoders): the data sampler picks each global batch (one bucket), latents are drawn from the
    cached posterior, z = mean + std * eps, with eps from a generator seeded by (seed, step), so a
    resumed run sees exactly the batches of the uninterrupted one. The state is the sampler's."""

    def __init__(self, index, source, task_mix: TaskMix = TaskMix(t2v=1.0), seed: int = 0,
                 sample_posterior: bool = True):
        from mugv.torch_backend.data import sampler
        self.index, self.source, self.seed = index, source, seed
        self.sample_posterior = sample_posterior   # False: train on the posterior means (demo VAE)
        self.plan = sampler.SamplerPlan(index.buckets, index.members(), task_mix, seed, weights=index.weights())
        self.state = sampler.init(seed)

    def next_batch(self) -> TrainBatch:
        from mugv.torch_backend.data import sampler
        from mugv.torch_backend.data.cache import sample_latents
        batch, self.state = sampler.step(self.plan, self.state)
        mean, std, emb, mask = self.source.get(list(batch.positions))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + batch.step)
        spec = self.index.buckets[batch.bucket]
        latents = sample_latents(mean.float(), std.float(), gen) if self.sample_posterior else mean.float()
        return TrainBatch(latents, emb.float(), mask.bool(), torch.full((latents.shape[0],), float(spec.fps)),
                          (spec.height, spec.width), list(batch.positions))

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data state seed {state.get('seed')} != this source's seed {self.seed}")
        self.state = dict(state)


def prepare_data(manifest: str | os.PathLike, buckets: tuple[BucketSpec, ...],
                 encode_video: Callable, encode_text: Callable, video_name: str, text_name: str,
                 cache_dir: Optional[str | os.PathLike] = None, seed: int = 0,
                 log: Callable[[str], None] = print, sample_posterior: bool = True) -> CachedLatents:
    """Index the manifest's clips into `buckets` (unusable files skipped and counted), encode them
    into the cache under `cache_dir` (resumable; already-done rows are kept), and return the batch
    source. Without `cache_dir` the clips are encoded at every step (online)."""
    from mugv.torch_backend.data.cache import CachedSource, OnlineSource, build_cache
    from mugv.torch_backend.data.dataset import build_index

    index = build_index(manifest, tuple(buckets))
    log(f"[mugv] finetune data: {index.report()}")
    if not index.items:
        raise ValueError(f"manifest {manifest}: no usable clip for buckets {[b.name for b in buckets]} "
                         f"(skipped: {index.skip_counts})")
    if cache_dir is not None:
        counts = build_cache(index, cache_dir, encode_video, encode_text, video_name, text_name)
        log(f"[mugv] finetune cache {cache_dir}: {counts['encoded']} encoded, {counts['skipped_done']} already done")
        source = CachedSource(index, cache_dir, video_name, text_name)
    else:
        source = OnlineSource(index, encode_video, encode_text)
    images = any(b.frames == 1 for b in buckets)
    videos = any(b.frames > 1 for b in buckets)
    mix = TaskMix(t2i=1.0, t2v=0.0) if images and not videos else TaskMix(t2v=1.0)
    return CachedLatents(index, source, mix, seed, sample_posterior)


# ---------------------------------------------------------------------------------------------
# The run


def model_hook(cfg: DiTConfig, base, ft: FinetuneConfig, seed: int = 0):
    """The Trainer's model_hook: load the base weights; for LoRA attach adapters and freeze the rest."""
    from mugv.torch_backend.models.lora import apply_lora, load_base_weights

    def hook(model):
        load_base_weights(model, cfg, base)
        return apply_lora(model, cfg, ft.lora, seed=seed) if ft.mode == "lora" else None
    return hook


def finetune(base: str | os.PathLike, source, out_dir: str | os.PathLike, ft: FinetuneConfig,
             train: TrainConfig, flow: FlowConfig = FlowConfig(),
             parallel: ParallelConfig = ParallelConfig(), log: Callable[[str], None] = print,
             on_metrics: Optional[Callable[[dict], None]] = None, kernels: KernelConfig = KernelConfig()) -> dict:
    """Fine-tune from `base` (official file or mugv checkpoint) on `source` (a BatchSource, e.g.
    `prepare_data(...)`), writing checkpoints, metrics.jsonl and TensorBoard events under
    `out_dir` (a rerun resumes from its newest checkpoint). LoRA runs also write the adapters
    alone under `out_dir/adapters` (from the fp32 values and from the EMA, `adapters_ema`).
    Every rank calls it (under torchrun for several). Returns a small report dict."""
    from mugv.torch_backend.models.lora import extract_adapters
    from mugv.torch_backend.training.trainer import StageSettings, Trainer

    import torch.distributed as dist

    cfg, base_weights = load_base(base)
    out_dir = Path(out_dir)
    stage = StageSettings(task_mix=(("t2v", 1.0 - ft.i2v), ("i2v", ft.i2v)), caption_dropout=ft.caption_dropout)
    # LoRA checkpoints keep the adapters and their state; the frozen base is reloaded from the
    # official file or the very checkpoint step the run started from (a run root's newest step
    # may move on)
    frozen_from = str(Path(base_weights if isinstance(base_weights, str) else base).resolve())
    trainer = Trainer(cfg, train, flow, source, out_dir, parallel=parallel, stage=stage,
                      model_hook=model_hook(cfg, frozen_from if isinstance(base_weights, str) else base_weights,
                                            ft, seed=train.seed),
                      log=log, on_metrics=on_metrics, frozen_from=frozen_from if ft.mode == "lora" else None,
                      kernels=kernels)
    rank = dist.get_rank()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if rank == 0:
        (out_dir / "finetune.json").write_text(json.dumps(
            {"base": str(base), "finetune": v.to_dict(ft), "dit": v.to_dict(cfg)}, indent=1))
        log(f"[mugv] finetune ({ft.mode}) from {base}: {trainable:,} of {total:,} parameters train "
            f"on this rank ({100 * trainable / max(total, 1):.2f}%)")
    try:
        last = trainer.run()
        ckpt = trainer.ckpt_dir
    finally:
        trainer.close()
    report = {"out_dir": str(out_dir), "mode": ft.mode, "trainable_params": trainable,
              "total_params": total, "last": {k: val for k, val in last.items() if k != "samples"}}
    if ft.mode == "lora" and rank == 0:
        report["adapters"] = str(extract_adapters(ckpt, cfg, ft.lora, out_dir / "adapters", group="model"))
        report["adapters_ema"] = str(extract_adapters(ckpt, cfg, ft.lora, out_dir / "adapters_ema", group="ema"))
        log(f"[mugv] adapters written to {report['adapters']} (EMA: {report['adapters_ema']})")
    return report


def finetuned_model(base: str | os.PathLike, adapters: Optional[str | os.PathLike] = None,
                    merge: bool = True, device: Optional[torch.device] = None, **config_overrides):
    """The DiT for sampling before (`adapters=None`) or after fine-tuning: base weights loaded,
    adapters (an adapter checkpoint, e.g. `out/adapters`) loaded and, with `merge`, folded into
    the weights so sampling costs nothing extra. For a full fine-tune pass its checkpoint as
    `base`. Megatron's parallel state must be initialised (any TP size). Returns (config, model)."""
    from mugv.torch_backend.models.lora import load_adapters, load_base_weights, merge_lora
    from mugv.torch_backend.models.dit import build_dit, transformer_config

    cfg, weights = load_base(base)
    model = build_dit(cfg, transformer_config(cfg, **config_overrides), seed=None, device=device)
    load_base_weights(model, cfg, weights)
    if adapters is not None:
        load_adapters(model, cfg, adapters)
        if merge:
            merge_lora(model)
    model.eval()
    return cfg, model


# ---------------------------------------------------------------------------------------------
# The run as a command (`mugv finetune`)


@dataclasses.dataclass(frozen=True)
class FinetuneRunConfig:
    """Fine-tune MUG-DiT on a manifest of clips (`mugv finetune`, docs/finetune.md).

    base: official dit.pt / .safetensors or a mugv checkpoint (step directory or run root).
    manifest: JSONL/CSV manifest of the clips and captions. out: run folder (checkpoints,
    metrics, adapters/, cache/).
    vae_official / vae_checkpoint: the video encoder of the cache (exactly one): an official
    vae.pt / .safetensors or a mugv VAE checkpoint. vae_size: core/vae.py size of vae_checkpoint;
    "official" reads the widths from vae_official's weights.
    text_encoder: "embedded" (no download) or a local T5 directory.
    cache: encode the clips once into out/cache (resumable); false: encode at every step.
    sample_posterior: train on posterior samples (official) rather than posterior means.
    One process encodes the cache; run the command once on one process before a torchrun launch.
    """

    base: str = ""
    manifest: str = ""
    out: str = "runs/finetune"
    vae_official: str = ""
    vae_checkpoint: str = ""
    vae_size: str = "official"
    text_encoder: str = "embedded"
    cache: bool = True
    sample_posterior: bool = True
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    flow: FlowConfig = FlowConfig()
    parallel: ParallelConfig = ParallelConfig()
    kernels: KernelConfig = KernelConfig()

    def __post_init__(self) -> None:
        if bool(self.vae_official) == bool(self.vae_checkpoint):
            v.fail(self, "vae_official", "exactly one of vae_official (official weights) and vae_checkpoint (mugv)")
        if self.vae_checkpoint and self.vae_size == "official":
            v.fail(self, "vae_size", "a core/vae.py size name for vae_checkpoint (e.g. 'tiny')")


def finetune_command(cfg: FinetuneRunConfig) -> int:
    """`mugv finetune`: index and cache the clips, fine-tune, print the report as JSON."""
    from mugv.torch_backend.data.cache import vae_encoder
    from mugv.torch_backend.jobs.loaders import load_vae, text_encoder, text_identity, weights_identity
    from mugv.torch_backend.jobs.report import one_thread_on_cpu

    one_thread_on_cpu()
    dit, _ = load_base(cfg.base)
    vae = load_vae(cfg.vae_size, cfg.vae_checkpoint or None, cfg.vae_official or None)
    vae_name = f"vae:{weights_identity(cfg.vae_official or cfg.vae_checkpoint)}"
    source = prepare_data(cfg.manifest, cfg.finetune.buckets, vae_encoder(vae), text_encoder(cfg.text_encoder, dit),
                          video_name=vae_name, text_name=text_identity(cfg.text_encoder, dit),
                          cache_dir=Path(cfg.out) / "cache" if cfg.cache else None, seed=cfg.finetune.data_seed,
                          log=lambda s: print(s, flush=True), sample_posterior=cfg.sample_posterior)
    result = finetune(cfg.base, source, cfg.out, cfg.finetune, cfg.train, cfg.flow, cfg.parallel,
                      log=lambda s: print(s, flush=True), kernels=cfg.kernels)
    print(json.dumps(result, indent=1, default=str))
    return 0
