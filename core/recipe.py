"""Pre-training recipes: a curriculum of stages over one DiT, flow, training, parallel and kernel
config; `KernelConfig` is how a run chooses its attention backend, head-dim padding and fused
kernels (the trainer applies it; its checkpoints record it).

`PretrainConfig` is what `mugv cache` / `mugv train` run (torch_backend/jobs/pretrain.py) and what
the demo composes; a recipe file (YAML/JSON) sets any of its fields and dotted options override
them. Frozen dataclasses validated in `__post_init__` (a bad value raises `ConfigError` naming
the field). Everything here is data: no torch, no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

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


# Names only (core imports no torch): torch_backend/models/attention.py maps them onto SDPA
# backends, kernels/registry.py onto the Triton kernels and their references.
ATTENTION_BACKENDS = ("auto", "math", "cudnn", "flash", "efficient", "fa4")
KERNEL_NAMES = ("adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope", "groupnorm_silu")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which code runs the DiT's attention and fused ops (numerics equal within the kernels'
    parity tolerances; speed differs).

    attention_backend: auto (GPU: FlashAttention-4 where installed and verified on this device by
        `mugv verify-kernels`, else SDPA's cuDNN > flash > efficient > math; CPU: math), one of the
        SDPA backends math, cudnn, flash, efficient, or fa4 (an error where not verified).
    pad_head_dim: zero-pad q/k/v of the self-attention to this head dim (a multiple of 8, >= the
        model's head dim; exact: docs/benchmarks.md, head dim 72 -> 80); None: no padding.
    kernels: fused Triton kernels: auto (those verified on this GPU: kernels/verified.json and the
        user's `mugv verify-kernels` record; the MUGV_KERNELS environment variable, if set, decides), reference (plain torch everywhere),
        all, or comma-separated names from KERNEL_NAMES. The CPU always runs the references.
    compile_layers: torch.compile each transformer layer (Inductor fuses its elementwise ops; the
        kernel slots take their references inside, the attention backend stays): auto (on a GPU
        where `mugv verify-kernels` recorded the compiled DiT's parity, parity_tests/kernels/
        test_dit_compiled.py, with this torch and this layer code; not with activation recompute or
        context parallelism, which were not measured), on (always, the CPU too), off.
        Measured on an H100 (docs/benchmarks.md, issue 22): 720p 43.2 % MFU compiled vs 42.5 %
        with the Triton kernels (FA4 at both), 256p 30.0 % vs 29.3 %.
    """

    attention_backend: str = "auto"
    pad_head_dim: Optional[int] = None
    kernels: str = "auto"
    compile_layers: str = "auto"

    def __post_init__(self) -> None:
        v.one_of(self, "attention_backend", ATTENTION_BACKENDS)
        v.one_of(self, "compile_layers", ("auto", "on", "off"))
        if self.pad_head_dim is not None and (not isinstance(self.pad_head_dim, int) or self.pad_head_dim <= 0
                                              or self.pad_head_dim % 8):
            v.fail(self, "pad_head_dim", "null or a positive multiple of 8")
        names = [k.strip() for k in self.kernels.split(",")]
        if self.kernels not in ("auto", "reference", "all") and (not all(names) or set(names) - set(KERNEL_NAMES)):
            v.fail(self, "kernels", f"auto, reference, all or comma-separated names from {list(KERNEL_NAMES)}")

    @property
    def kernel_choice(self) -> Optional[str]:
        """The registry's choice string (kernels/registry.py); None = auto (verified.json, or
        MUGV_KERNELS when set)."""
        return None if self.kernels == "auto" else self.kernels


def demo_dit(**overrides) -> DiTConfig:
    """The demo's DiT: 'tiny' width, 3 layers, 8 latent channels (the tiny VAE's), 64 text tokens:
    the embedded byte-level encoder's limit, above the longest caption the product generator's
    vocabulary makes (52 bytes + EOS; test_demo.py checks it), so no demo caption is cut."""
    return DiTConfig(**{**dict(hidden_size=144, num_heads=2, depth=3, in_channels=8, out_channels=16,
                               text_dim=64, text_max_len=64), **overrides})


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
    # checkpoint_every: a checkpoint inside each stage too, so a kill mid-stage loses at most 250 steps
    train: TrainConfig = TrainConfig(precision="fp32", ema_decay=0.99, micro_batch=64, checkpoint_every=250,
                                     log_every=50, keep_last=1, seed=0,
                                     optimizer=OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=10))
    parallel: ParallelConfig = ParallelConfig()
    kernels: KernelConfig = KernelConfig()
    stages: tuple[StageConfig, ...] = (
        StageConfig("images", frames=1, steps=200, lr=1e-3),
        StageConfig("short_video", frames=17, steps=700, lr=1e-3, i2v=0.3),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages:
            v.fail(self, "stages", "a non-empty list of stages")
        if len({s.name for s in self.stages}) != len(self.stages):
            v.fail(self, "stages", "distinct stage names")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0 or self.size % 16:
            v.fail(self, "size", "a positive multiple of 16 (VAE 8 x DiT patch 2)")
        v.in_range(self, "fps", 0, 240, lo_open=True)
        v.non_negative_int(self, "sample_every")
        v.positive_int(self, "sample_prompts")
        # Each stage sets these (pretrain replaces them per stage): a value given here would be
        # overwritten in silence (issue 26), so it is refused, naming the stage field to use.
        base = type(self).__dataclass_fields__["train"].default
        for path, now, then, field in (("train.steps", self.train.steps, base.steps, "steps"),
                                       ("train.optimizer.lr", self.train.optimizer.lr, base.optimizer.lr, "lr"),
                                       ("train.optimizer.warmup_steps", self.train.optimizer.warmup_steps,
                                        base.optimizer.warmup_steps, "warmup_steps")):
            if now != then:
                raise v.ConfigError(f"PretrainConfig.{path} = {now!r}: each stage sets its own `{field}` "
                                    f"(stages[i].{field}, e.g. --stages '[{{\"name\": ..., \"{field}\": ...}}]' "
                                    f"or the recipe file), which replaces this one; leave it at {then!r}")
