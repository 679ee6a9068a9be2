"""`mugv train-preference`: a Diffusion-DPO or Diffusion-KTO stage (training/preference.py's
`PreferenceTrainer`) on a preference manifest (data/preference.py), from a frozen reference
checkpoint. docs/preference.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mugv.core import preference as core_pref
from mugv.core.dit import DiTConfig
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig
from mugv.core.preference import PreferenceStageConfig
from mugv.core.recipe import KernelConfig, demo_dit
from mugv.core.train import OptimizerConfig, TrainConfig
from mugv.torch_backend.training.preference import PreferenceTrainer, resolve_reference
from mugv.torch_backend.training.trainer import StageSettings


@dataclasses.dataclass(frozen=True)
class PreferenceRunConfig:
    """A preference stage run on a DPO or KTO manifest (data/preference.py).

    manifest: dpo.jsonl (pairs) or kto.jsonl (labels). reference: checkpoint of the frozen
    reference = the policy's start (a run folder or step_* directory). out: run folder.
    objective: dpo | kto. beta: inverse temperature on mean squared velocity errors (docs/
    objectives.md). desirable_weight / undesirable_weight: KTO's lambda_D / lambda_U.
    reference_precision: fp32 | bf16 (GPU). kto_reference_point: global | micro_batch.
    steps / lr / batch_size: schedule (constant lr) and pairs (or KTO samples) per global batch.
    caption_dropout / i2v: as in pre-training (0 by default: preferences are about the prompt).
    vae_checkpoint / vae_size / size / frames / fps: only for manifests of video files (they are
    encoded with this VAE at this size); text_encoder: "embedded" or a local T5 directory.
    """

    manifest: str = ""
    reference: str = ""
    out: str = "runs/preference"
    objective: str = "dpo"
    beta: float = 500.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference_precision: str = "fp32"
    kto_reference_point: str = "global"
    steps: int = 150
    lr: float = 2e-4
    batch_size: int = 8
    caption_dropout: float = 0.0
    i2v: float = 0.0
    vae_checkpoint: str = ""
    vae_size: str = "tiny"
    size: int = 32
    frames: int = 17
    fps: float = 16.0
    text_encoder: str = "embedded"
    dit: DiTConfig = demo_dit()
    flow: FlowConfig = FlowConfig(shift=False)
    train: TrainConfig = TrainConfig(precision="fp32", ema_decay=0.0, micro_batch=64, checkpoint_every=100_000,
                                     log_every=25, keep_last=1, seed=0,
                                     optimizer=OptimizerConfig(lr=1e-4, min_lr=0.0, warmup_steps=0))
    parallel: ParallelConfig = ParallelConfig()
    kernels: KernelConfig = KernelConfig()

    def __post_init__(self) -> None:
        from mugv.core import validate as v
        v.positive_int(self, "steps", "batch_size", "size", "frames")
        v.in_range(self, "lr", 0, 1, lo_open=True)
        v.in_range(self, "caption_dropout", 0, 1)
        v.in_range(self, "i2v", 0, 1)
        self.stage_config()   # validates objective, beta, weights, precision

    def stage_config(self, reference: str | None = None) -> PreferenceStageConfig:
        return PreferenceStageConfig(
            reference=reference or self.reference or "-", objective=self.objective,
            loss=core_pref.PreferenceConfig(self.beta, self.desirable_weight, self.undesirable_weight),
            reference_precision=self.reference_precision, kto_reference_point=self.kto_reference_point)


def train_preference(cfg: PreferenceRunConfig, log=print, on_metrics=None) -> Path:
    """Read the manifest (errors name file:line:field), load latents and text, train the stage.
    Returns the run folder (its checkpoints/ hold the tuned policy)."""
    from mugv.torch_backend.jobs.loaders import load_vae, require_path, text_encoder
    from mugv.torch_backend.data import preference as data

    require_path("manifest", cfg.manifest, "preference manifest")
    reference = resolve_reference(cfg.reference)
    rows = (data.read_dpo_manifest if cfg.objective == "dpo" else data.read_kto_manifest)(cfg.manifest)
    load = {}
    if not rows[0].is_latent:
        require_path("vae_checkpoint", cfg.vae_checkpoint, "VAE checkpoint (the manifest holds videos)")
        from mugv.torch_backend.data.cache import vae_encoder
        load = dict(encode_video=vae_encoder(load_vae(cfg.vae_size, cfg.vae_checkpoint)),
                    size=(cfg.size, cfg.size), frames=cfg.frames, fps=cfg.fps)
    source = data.preference_source(rows, text_encoder(cfg.text_encoder, cfg.dit), cfg.batch_size,
                                    seed=cfg.train.seed, fps=cfg.fps, pixel_hw=(cfg.size, cfg.size), **load)
    train = dataclasses.replace(cfg.train, steps=cfg.steps, optimizer=dataclasses.replace(
        cfg.train.optimizer, lr=cfg.lr, min_lr=min(cfg.train.optimizer.min_lr, cfg.lr)))
    settings = StageSettings(task_mix=(("t2v", 1 - cfg.i2v), ("i2v", cfg.i2v)), caption_dropout=cfg.caption_dropout)
    log(f"[mugv] preference stage ({cfg.objective}): {len(rows)} {'pairs' if cfg.objective == 'dpo' else 'samples'}, "
        f"{cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, beta {cfg.beta:g} -> {cfg.out}")
    trainer = PreferenceTrainer(cfg.dit, train, cfg.flow, source, cfg.out, cfg.stage_config(str(reference)),
                                stage=settings, parallel=cfg.parallel, log=log, on_metrics=on_metrics,
                                kernels=cfg.kernels)
    try:
        trainer.run()
    finally:
        trainer.close()
    return Path(cfg.out)


def reporting_bad_manifests(run):
    """A subcommand runner for which a bad preference manifest is an input error like others:
    one line naming file:line:field, exit status 2."""
    def command(cfg) -> int:
        import sys

        from mugv.torch_backend.data.preference import PreferenceError
        from mugv.torch_backend.jobs.report import one_thread_on_cpu
        one_thread_on_cpu()
        try:
            return run(cfg)
        except PreferenceError as err:
            sys.stderr.write(f"mugv: error: {err}\n")
            return 2
    return command


@reporting_bad_manifests
def train_preference_command(cfg: PreferenceRunConfig) -> int:
    """`mugv train-preference`."""
    out = train_preference(cfg, log=lambda s: print(s, flush=True))
    print(f"preference stage ({cfg.objective}) -> {out / 'checkpoints'}")
    return 0

