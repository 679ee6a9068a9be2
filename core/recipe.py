"""Pre-training recipes: a curriculum of stages over one DiT, flow, training and parallel config.

`PretrainConfig` is what `mugv cache` / `mugv train` run (torch_backend/jobs/pretrain.py) and what
the demo composes; a recipe file (YAML/JSON) sets any of its fields and dotted options override
them. Frozen dataclasses validated in `__post_init__` (a bad value raises `ConfigError` naming
the field). Everything here is data: no torch, no jax.
"""
from __future__ import annotations

import dataclasses

from mugv.core import validate as v
from mugv.core.dit import DiTConfig
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig
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
