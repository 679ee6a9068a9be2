"""The preference stage: Diffusion-DPO and Diffusion-KTO against a frozen reference model.

`PreferenceTrainer` is the pre-training `Trainer` with three things changed:
  * inputs: a batch of B pairs becomes 2B model rows, preferred and rejected interleaved
    [w0, l0, w1, l1, ...]; both members of a pair get the SAME draws (timestep, noise, task and
    caption dropout), because the trainer's draws are a function of (seed, step) and the batch
    row alone: preparing the preferred and the rejected latents with the same rows gives
    identical sigma and noise (DPO's margin compares errors at one x_t, Wallace et al. eq. 14);
  * the frozen reference: the stage's starting checkpoint, built in the same parallel layout
    (TP-sharded like the policy), optionally in bf16, never wrapped by DDP nor given to the
    optimizer, `requires_grad=False`. Its outputs for every row are computed once per step under
    `torch.no_grad()` from the very inputs the policy sees (same t, noise, text, masks);
  * the loss: `objectives.dpo_loss` / `objectives.kto_loss` (formulas in core/preference.py).
    For KTO the reference point z0 = max(0, mean reward) is by default taken over the GLOBAL
    batch (a no-grad policy pass, summed over data-parallel ranks), so it is one number at any
    layout and micro-batch split; the official code averages it over GPUs likewise.

Micro-batches are cut in units of pairs (`TrainConfig.micro_batch` pairs = 2x rows for DPO) so a
pair is never split. DPO's metrics add `pair_accuracy`: the share of pairs whose margin m < 0,
i.e. the policy moved towards the preferred sample more than towards the rejected one.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist

from mugv.checkpoints.format import Checkpoint, latest_checkpoint
from mugv.core import preference as core_pref
from mugv.core.dit import DiTConfig
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig
from mugv.core.preference import PreferenceStageConfig
from mugv.core.train import OptimizerConfig, TrainConfig
from mugv.core.validate import to_dict
from mugv.torch_backend import objectives
from mugv.torch_backend.training.trainer import StageSettings, Trainer

LOG2 = math.log(2.0)


def resolve_reference(path: str) -> Path:
    """The reference checkpoint's step directory: `path` itself (a step_* directory with a
    manifest) or the newest checkpoint under `path` or `path/checkpoints`. A missing one is a
    FileNotFoundError naming the path, raised before any model is built."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    found = (latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"preference stage: reference checkpoint {str(p)!r} not found (expected a "
                                "step_* checkpoint directory or a run folder holding checkpoints/)")
    return found


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a0, b0, a1, b1, ...] along dim 0."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


class PreferenceTrainer(Trainer):
    """Trains the policy with Diffusion-DPO (pairs) or Diffusion-KTO (labelled samples) against
    a frozen reference; `source` yields `data/preference.py::PreferenceBatch`es. The policy starts
    from the reference checkpoint (weights only) unless the run resumes from its own.

    Built on the trainer's override points (training/trainer.py): prepare_inputs (pairs, the
    reference's outputs, KTO's z0), micro_batches (whole pairs), loss_fn, task_masks; the
    reference is `frozen_copy(checkpoint)` run by `forward_only`, i.e. the same layout and
    schedule as the policy."""

    def __init__(self, dit, train, flow, source, out_dir, preference: PreferenceStageConfig,
                 stage: StageSettings = StageSettings(), **kwargs):
        self.pref = preference
        self.reference_path = resolve_reference(preference.reference)
        if preference.reference_precision == "bf16" and not torch.cuda.is_available():
            raise ValueError("PreferenceStageConfig.reference_precision = 'bf16' needs a GPU; use 'fp32' on a CPU")
        stage = dataclasses.replace(stage, init_from=str(self.reference_path), init_weights_only=True)
        super().__init__(dit, train, flow, source, out_dir, stage=stage, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Set-up: the frozen reference

    def _setup(self) -> None:
        super()._setup()
        Checkpoint(self.reference_path).check_config(to_dict(self.dit), section="dit")
        # Built under a forked RNG: constructing modules must not move the RNG streams that a
        # resumed run restored from its checkpoint.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.reference = self.frozen_copy(self.reference_path, group="model")
        if self.pref.reference_precision == "bf16":
            if self.parallel.pipeline_parallel > 1 and self.train.precision != "bf16":
                raise ValueError("reference_precision 'bf16' with fp32 training and pipeline parallel: the "
                                 "stages would exchange tensors of two dtypes; train in bf16 or keep the "
                                 "reference in fp32")
            for m in self.reference:
                m.to(torch.bfloat16)   # the DiT casts its inputs to its weights' dtype
        self.log(f"[mugv] preference: frozen reference from {self.reference_path} "
                 f"({self.pref.reference_precision}, {self.pref.objective}, beta {self.pref.loss.beta:g})")

    def config_dict(self) -> dict:
        return {**super().config_dict(), "preference": to_dict(self.pref)}

    # ------------------------------------------------------------------------------------------
    # Inputs

    @property
    def rows_per_item(self) -> int:
        return 2 if self.pref.objective == "dpo" else 1

    def prepare_inputs(self, batch, rows: slice) -> dict:
        """Pre-training inputs for the preferred (or KTO) latents; for DPO the rejected latents
        prepared with the same rows, hence the same draws, interleaved; then the reference's
        outputs (and KTO's global z0) for every row."""
        if self.pref.objective == "dpo" and getattr(batch, "rejected", None) is None:
            raise ValueError("objective 'dpo' needs pairs: the source gave batches without rejected latents")
        if self.pref.objective == "kto" and getattr(batch, "desirable", None) is None:
            raise ValueError("objective 'kto' needs labels: the source gave batches without 'desirable'")
        inputs = super().prepare_inputs(batch, rows)
        if self.pref.objective == "dpo":
            rejected = super().prepare_inputs(dataclasses.replace(batch, latents=batch.rejected), rows)
            inputs = {k: interleave(v, rejected[k]) for k, v in inputs.items()}
        else:
            inputs["desirable"] = batch.desirable[rows].to(self.device)
        inputs["ref_out"] = self.forward_only(self.reference, inputs, reduce=lambda out, mb: out.float())
        if self.pref.objective == "kto" and self.pref.kto_reference_point == "global":
            inputs["z0"] = self._global_reference_point(inputs)
        return inputs

    def micro_batches(self, inputs: dict) -> list[dict]:
        """`TrainConfig.micro_batch` items per micro-batch: whole pairs for DPO."""
        n, step = self.num_samples(inputs), self.train.micro_batch * self.rows_per_item
        cut = lambda v, k: v[k * step:(k + 1) * step] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v  # noqa: E731
        return [{key: cut(v, k) for key, v in inputs.items()} for k in range(max(1, -(-n // step)))]

    @torch.no_grad()
    def _global_reference_point(self, inputs: dict) -> torch.Tensor:
        """KTO's z0 = max(0, mean reward) over the global batch: a no-grad policy pass, the reward
        sum and count all-reduced over the data-parallel group (every rank of a data-parallel
        group is on the same pipeline stage; stages without the output add zeros)."""
        from megatron.core import parallel_state as ps

        rewards = self.forward_only(self.stages, inputs, reduce=lambda out, mb: self._kto_reward(out, mb))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if rewards is not None:
            total[0], total[1] = rewards.double().sum(), float(rewards.numel())
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return core_pref.kto_reference_point(torch, (total[0] / total[1]).float())

    # ------------------------------------------------------------------------------------------
    # Loss

    @staticmethod
    def _kto_reward(out, mb) -> torch.Tensor:
        return core_pref.kto_reward(objectives._diff(out, mb["ref_out"], mb["x0"], mb["noise"], mb["frame_mask"]))

    def loss_fn(self, out: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the micro-batch's items, per-item losses): pairs for DPO, samples for KTO."""
        cfg, ref = self.pref.loss, mb["ref_out"]
        if self.pref.objective == "dpo":
            x0, noise, fm = mb["x0"], mb["noise"], mb["frame_mask"]
            return objectives.dpo_loss(cfg, out[0::2], out[1::2], ref[0::2], ref[1::2], x0[0::2], x0[1::2],
                                       noise[0::2], fm[0::2])
        loss, per, _ = objectives.kto_loss(cfg, out, ref, mb["x0"], mb["noise"], mb["desirable"], mb["frame_mask"],
                                           reference_point=mb.get("z0"))
        return loss, per

    def task_masks(self, mb: dict) -> dict[str, torch.Tensor]:
        masks = super().task_masks(mb)
        return {k: m[0::2] for k, m in masks.items()} if self.pref.objective == "dpo" else masks

    def _reduce_losses(self, loss, per_item, masks) -> dict:
        """The trainer's metrics plus DPO's pair accuracy (share of pairs with loss < log 2, i.e.
        margin m < 0) or KTO's z0, over the ranks holding the output."""
        out = super()._reduce_losses(loss, per_item, masks)
        vec = torch.zeros(2, dtype=torch.float64, device=self.device)
        if per_item is not None:
            vec[0] = (per_item < LOG2).double().sum() if self.pref.objective == "dpo" else 0.0
            vec[1] = float(per_item.numel())
        dist.all_reduce(vec)
        if self.pref.objective == "dpo" and vec[1] > 0:
            out["pair_accuracy"] = (vec[0] / vec[1]).item()
        return out


# ---------------------------------------------------------------------------------------------
# The stage as a command (`mugv train-preference`)


def _demo_dit() -> DiTConfig:
    from mugv.torch_backend.cli.pipeline import demo_dit
    return demo_dit()


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
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    caption_dropout: float = 0.0
    i2v: float = 0.0
    vae_checkpoint: str = ""
    vae_size: str = "tiny"
    size: int = 32
    frames: int = 17
    fps: float = 16.0
    text_encoder: str = "embedded"
    dit: DiTConfig = _demo_dit()
    flow: FlowConfig = FlowConfig(shift=False)
    train: TrainConfig = TrainConfig(precision="fp32", ema_decay=0.0, micro_batch=64, checkpoint_every=100_000,
                                     log_every=25, keep_last=1, seed=0,
                                     optimizer=OptimizerConfig(lr=1e-4, min_lr=0.0, warmup_steps=0))
    parallel: ParallelConfig = ParallelConfig()

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
    from mugv.torch_backend.cli import pipeline
    from mugv.torch_backend.data import preference as data

    pipeline.require_path("manifest", cfg.manifest, "preference manifest")
    reference = resolve_reference(cfg.reference)
    rows = (data.read_dpo_manifest if cfg.objective == "dpo" else data.read_kto_manifest)(cfg.manifest)
    load = {}
    if not rows[0].is_latent:
        pipeline.require_path("vae_checkpoint", cfg.vae_checkpoint, "VAE checkpoint (the manifest holds videos)")
        from mugv.torch_backend.data.cache import vae_encoder
        load = dict(encode_video=vae_encoder(pipeline.load_vae(cfg.vae_size, cfg.vae_checkpoint)),
                    size=(cfg.size, cfg.size), frames=cfg.frames, fps=cfg.fps)
    source = data.preference_source(rows, pipeline.text_encoder(cfg.text_encoder, cfg.dit), cfg.batch_size,
                                    seed=cfg.train.seed, fps=cfg.fps, pixel_hw=(cfg.size, cfg.size), **load)
    train = dataclasses.replace(cfg.train, steps=cfg.steps, optimizer=dataclasses.replace(
        cfg.train.optimizer, lr=cfg.lr, min_lr=min(cfg.train.optimizer.min_lr, cfg.lr)))
    settings = StageSettings(task_mix=(("t2v", 1 - cfg.i2v), ("i2v", cfg.i2v)), caption_dropout=cfg.caption_dropout)
    log(f"[mugv] preference stage ({cfg.objective}): {len(rows)} {'pairs' if cfg.objective == 'dpo' else 'samples'}, "
        f"{cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, beta {cfg.beta:g} -> {cfg.out}")
    trainer = PreferenceTrainer(cfg.dit, train, cfg.flow, source, cfg.out, cfg.stage_config(str(reference)),
                                stage=settings, parallel=cfg.parallel, log=log, on_metrics=on_metrics)
    try:
        trainer.run()
    finally:
        trainer.close()
    return Path(cfg.out)
