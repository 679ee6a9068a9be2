"""The MUG-DiT training engine on Megatron-Core: step, loop, checkpoint/resume, failure handling.

One `Trainer` runs one stage. Per step it takes a global batch from a resumable source, keeps its
data-parallel rank's rows, assigns tasks (text-to-image for 1-frame batches, else text-to-video
or image-to-video by the stage's mix), drops captions for classifier-free guidance, draws
timesteps and noise from a generator seeded by (seed, step, rank) (so a resumed run draws exactly
what the uninterrupted run drew), runs forward/backward over the micro-batches with Megatron's
DDP (gradient reduce deferred to the last micro-batch), checks the loss and every gradient for
non-finite values, and steps Megatron's optimizer (clipping inside) and the EMA.

Exact resume: model (fp32 main values), EMA, Adam moments and step, every RNG, the source's
position, the step and the failure counters all go into one atomic checkpoint
(`checkpoints/format.py`); a restarted run picks the newest complete one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mugv.checkpoints.format import Checkpoint, CheckpointError, check_writable, latest_checkpoint
from mugv.checkpoints.torch_io import load_torch, save_torch
from mugv.core import flow as core_flow
from mugv.core.dit import DiTConfig, dit_schema, patch_grid, video_tokens
from mugv.core.flops import H100_BF16_PEAK, step_flops
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig, check_layout
from mugv.core.schema import Schema
from mugv.core.train import TrainConfig, ema_update, learning_rate
from mugv.core.validate import to_dict
from mugv.torch_backend import megatron_compat, objectives
from mugv.torch_backend.training import optim_state, rng
from mugv.torch_backend.training.batch import BatchSource, TrainBatch

# Fields of TrainConfig that may change when a run is resumed (they do not change the math).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "log_every")


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row; the last good state was checkpointed."""


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What a curriculum stage adds to the loop: the task mix and caption dropout.

    task_mix: relative weights of "t2v" and "i2v" for video batches (1-frame batches are t2i).
    caption_dropout: probability that a sample's caption is dropped (empty text: the model's
        cross-attention then contributes nothing, the unconditional branch of CFG).
    init_from: checkpoint another stage wrote, loaded when this stage has none of its own;
        init_weights_only: take only its weights (fresh optimizer and EMA = weights).
    """

    task_mix: tuple[tuple[str, float], ...] = (("t2v", 1.0),)
    caption_dropout: float = 0.0
    init_from: Optional[str] = None
    init_weights_only: bool = True

    def __post_init__(self) -> None:
        for task, w in self.task_mix:
            if task not in ("t2v", "i2v") or not (w >= 0):
                raise ValueError(f"StageSettings.task_mix entry ({task!r}, {w!r}): expected "
                                 f"('t2v' | 'i2v', weight >= 0)")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"StageSettings.caption_dropout = {self.caption_dropout}: expected [0, 1]")

    @property
    def i2v_probability(self) -> float:
        weights = dict(self.task_mix)
        total = weights.get("t2v", 0.0) + weights.get("i2v", 0.0)
        return weights.get("i2v", 0.0) / total if total > 0 else 0.0


class Trainer:
    """Trains MUG-DiT for one stage. Construct on every rank (under torchrun for several)."""

    def __init__(self, dit: DiTConfig, train: TrainConfig, flow: FlowConfig, source: BatchSource,
                 out_dir: str | Path, parallel: ParallelConfig = ParallelConfig(),
                 stage: StageSettings = StageSettings(), grad_hook: Optional[Callable] = None,
                 log: Callable[[str], None] = print, model_hook: Optional[Callable] = None,
                 on_metrics: Optional[Callable[[dict], None]] = None):
        """Arguments beyond the configs:
            source: resumable global-batch source (`training/batch.py::BatchSource`).
            grad_hook(step, model): called after backward, before the finiteness check (tests
                plant non-finite gradients with it).
            model_hook(model) -> Schema | None: called after the model is built and before DDP
                wraps it; may freeze parameters or add modules (LoRA) and returns the schema of
                the parameters it added, which join the checkpoint.
            on_metrics(metrics): called on rank 0 after every step (progress display).
        """
        self.dit, self.train, self.flow, self.parallel, self.stage = dit, train, flow, parallel, stage
        self.source = source
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.grad_hook = grad_hook
        self.model_hook = model_hook
        self.on_metrics = on_metrics
        self.log = log
        self.step = 0                  # iterations done (skipped ones included)
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.tokens_seen = 0
        self._setup()

    # ------------------------------------------------------------------------------------------
    # Set-up

    def _setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.enums import ModelType
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        from mugv.torch_backend.models.dit import build_dit, transformer_config

        p = self.parallel
        megatron_compat.initialize_parallel(tp=p.tensor_parallel, pp=p.pipeline_parallel,
                                            cp=p.context_parallel, seed=self.train.seed)
        world = dist.get_world_size()
        self.dp_size = check_layout(p, self.dit, world)
        if p.pipeline_parallel > 1 or p.context_parallel > 1:
            raise NotImplementedError("the trainer runs TP and DP layouts; pipeline and context "
                                      "parallel training arrive with the parallel-layouts work")
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.rank == 0:
            self._check_output_dir()
        dist.barrier()

        bf16 = self.train.precision == "bf16"
        if bf16 and not torch.cuda.is_available():
            raise ValueError("TrainConfig.precision = 'bf16' needs a GPU; use 'fp32' on a CPU")
        recompute = {"none": {}, "selective": dict(recompute_granularity="selective"),
                     "full": dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=self.train.recompute_layers or 1)}[self.train.recompute]
        tcfg = transformer_config(self.dit, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                  sequence_parallel=p.sequence_parallel, **recompute)
        model = build_dit(self.dit, tcfg, seed=self.train.seed, device=self.device)
        model.model_type = ModelType.encoder_or_decoder
        self.model = model
        extra = self.model_hook(model) if self.model_hook is not None else None
        self.schema = dit_schema(self.dit) if extra is None else Schema(dit_schema(self.dit).params + extra.params)
        requires_grad = {n for n, q in model.named_parameters() if q.requires_grad}
        # EMA and optimizer state exist for trainable parameters only (all of them, unless a
        # model_hook froze some, as LoRA does).
        self.trainable = Schema(tuple(q for q in self.schema if q.name in requires_grad))
        self.ddp = DistributedDataParallel(
            config=tcfg, module=model,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce and self.dp_size > 1,
                use_distributed_optimizer=p.distributed_optimizer))
        o = self.train.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                    adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps,
                                    clip_grad=o.clip_grad, bf16=bf16, params_dtype=tcfg.params_dtype,
                                    use_distributed_optimizer=p.distributed_optimizer),
            [self.ddp])
        self.ema = {n: q.detach().float().clone() for n, q in model.named_parameters() if q.requires_grad}
        self._metrics_path = self.out_dir / "metrics.jsonl"
        self._tb = None
        if not self._resume() and self.stage.init_from:
            self._init_from(self.stage.init_from, self.stage.init_weights_only)

    def _check_output_dir(self) -> None:
        check_writable(self.out_dir)
        # Fail at start, not at the first save: model + EMA + two Adam moments in fp32.
        need = 4 * 4 * self.schema_numel()
        free = shutil.disk_usage(self.out_dir).free
        if free < need:
            raise CheckpointError(f"output directory {self.out_dir} has {free / 1e9:.2f} GB free; a "
                                  f"checkpoint needs about {need / 1e9:.2f} GB")

    def schema_numel(self) -> int:
        return dit_schema(self.dit).numel

    def config_dict(self) -> dict:
        return {"dit": to_dict(self.dit), "train": to_dict(self.train), "flow": to_dict(self.flow),
                "parallel": to_dict(self.parallel), "stage": to_dict(self.stage)}

    # ------------------------------------------------------------------------------------------
    # One step

    def _draws(self, batch: TrainBatch, rows: slice) -> dict:
        """Every random draw of this step, from a generator of (seed, step) over the GLOBAL batch,
        then this rank's rows: any data-parallel size draws the same numbers for a sample, and a
        resumed run draws what the uninterrupted run drew."""
        g = torch.Generator().manual_seed(self.train.seed * 1_000_003 + self.step)
        b, c, t, h, w = batch.latents.shape
        draws = {
            "task": torch.rand(b, generator=g),
            "caption": torch.rand(b, generator=g),
            "sigma": (torch.randn(b, generator=g) if self.flow.sample_method == "logit_normal"
                      else torch.rand(b, generator=g)),
            "noise": torch.randn(b, c, t, h, w, generator=g),
        }
        return {k: v[rows] for k, v in draws.items()}

    def _prepare(self, batch: TrainBatch, rows: slice) -> dict:
        """Model inputs and loss targets for this rank's rows of the global batch."""
        local = batch.rows(rows.start, rows.stop)
        d = self._draws(batch, rows)
        b, _, t, h, w = local.latents.shape
        is_image = torch.full((b,), t == 1)
        frame_mask = torch.ones(b, t, dtype=torch.bool)
        if t > 1:  # image-to-video: latent frame 0 is the clean reference, out of the loss
            frame_mask[:, 0] = ~(d["task"] < self.stage.i2v_probability)
        text_mask = local.text_mask.bool() & (d["caption"] >= self.stage.caption_dropout)[:, None]
        r = core_flow.shift_ratio(self.flow, local.pixel_hw[0], local.pixel_hw[1], t) if self.flow.shift else 1.0
        sigma = objectives.sample_sigma(self.flow, d["sigma"], float(r))
        x0 = local.latents.float()
        x_t = objectives.noisy_latents(x0, d["noise"], sigma, frame_mask)
        timestep = core_flow.timestep_from_sigma(self.flow, sigma)
        tp = patch_grid(self.dit, (t, h, w))[0]
        dev = self.device
        return {"x_t": x_t.to(dev), "timestep": timestep.to(dev), "text": local.text.to(dev),
                "text_mask": text_mask.to(dev), "frame_mask": frame_mask.to(dev), "fps": local.fps.float().to(dev),
                "frame_indice": torch.arange(tp + 2).repeat(b, 1).to(dev), "x0": x0.to(dev),
                "noise": d["noise"].to(dev), "is_image": is_image.to(dev),
                "is_i2v": (~frame_mask[:, 0]).to(dev) if t > 1 else torch.zeros(b, dtype=torch.bool, device=dev)}

    def _forward_backward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (mean over this rank's samples) and per-sample losses; gradients accumulated."""
        from mugv.torch_backend.parallelize import finalize_grads

        n = inputs["x0"].shape[0]
        mb = self.train.micro_batch
        chunks = max(1, math.ceil(n / mb))
        losses, per_sample = [], []
        for k in range(chunks):
            sl = slice(k * mb, (k + 1) * mb)
            sync = contextlib.nullcontext() if k == chunks - 1 else self.ddp.no_sync()
            with sync:
                out = self.ddp(inputs["x_t"][sl], inputs["timestep"][sl], inputs["text"][sl],
                               inputs["text_mask"][sl], inputs["frame_mask"][sl], inputs["fps"][sl],
                               inputs["frame_indice"][sl])
                loss, samples = objectives.flow_matching_loss(self.flow, out, inputs["x0"][sl], inputs["noise"][sl],
                                                              inputs["frame_mask"][sl], inputs["is_image"][sl])
                # Samples weigh equally whatever the micro-batch split.
                (loss * (samples.shape[0] / n)).backward()
            losses.append(loss.detach() * samples.shape[0] / n)
            per_sample.append(samples.detach())
        # Megatron's reduction plus the TP sum of the per-head q/k norm weights' partial gradients.
        finalize_grads([self.ddp])
        return torch.stack(losses).sum(), torch.cat(per_sample)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        if not torch.isfinite(loss):
            bad += 1
        for q in self.model.parameters():
            grad = getattr(q, "main_grad", None)
            if grad is not None and not torch.isfinite(grad).all():
                bad += 1
                break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def train_step(self, batch: TrainBatch) -> dict:
        """One iteration on a global batch. Returns its metrics (rank-averaged)."""
        t0 = time.perf_counter()
        if batch.size % self.dp_size:
            raise ValueError(f"global batch of {batch.size} samples does not divide over "
                             f"{self.dp_size} data-parallel ranks")
        per = batch.size // self.dp_size
        inputs = self._prepare(batch, slice(self.dp_rank * per, (self.dp_rank + 1) * per))
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, per_sample = self._forward_backward(inputs)
        if self.grad_hook is not None:
            self.grad_hook(self.step, self.model)
        lr = learning_rate(self.train.optimizer, optim_state.optimizer_step_count(self.optimizer),
                           self.train.steps)
        metrics = {"step": self.step + 1, "lr": lr}
        if not self._all_finite(loss):
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            metrics.update(skipped=True, loss=float("nan"), nonfinite_total=self.nonfinite_total)
        else:
            self.nonfinite_in_a_row = 0
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            ok, grad_norm, _ = self.optimizer.step()
            self._update_ema()
            metrics.update(skipped=not ok, grad_norm=float(grad_norm) if grad_norm is not None else None)
            metrics.update(self._reduce_losses(loss, per_sample, inputs))
        self.step += 1
        dt = time.perf_counter() - t0
        b, _, t, h, w = batch.latents.shape
        tokens = batch.size * video_tokens(self.dit, (t, h, w))
        self.tokens_seen += tokens
        metrics.update(step_time=dt, tokens_per_s=tokens / dt, samples=batch.ids[:4])
        if torch.cuda.is_available():
            fl = step_flops(self.dit, (t, h, w), batch.text.shape[1], batch=batch.size)
            metrics["mfu"] = fl.model / dt / dist.get_world_size() / H100_BF16_PEAK
        return metrics

    def _reduce_losses(self, loss, per_sample, inputs) -> dict:
        """Loss and per-task losses averaged over data-parallel ranks."""
        tasks = {"t2i": inputs["is_image"], "i2v": inputs["is_i2v"],
                 "t2v": ~(inputs["is_image"] | inputs["is_i2v"])}
        vec = [loss.float()]
        for mask in tasks.values():
            vec += [(per_sample * mask).sum(), mask.sum().float()]
        vec = torch.stack(vec).to(self.device)
        dist.all_reduce(vec)
        out = {"loss": (vec[0] / dist.get_world_size()).item()}
        for i, name in enumerate(tasks):
            count = vec[2 + 2 * i].item()
            if count:
                out[f"loss_{name}"] = vec[1 + 2 * i].item() / count
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.train.ema_decay
        for name, q in self.model.named_parameters():
            if name in self.ema:
                self.ema[name].copy_(ema_update(self.ema[name], q.detach().float(), decay))

    # ------------------------------------------------------------------------------------------
    # Loop

    def run(self) -> dict:
        """Train to `train.steps`, checkpointing every `checkpoint_every` steps and at the end."""
        last = {}
        while self.step < self.train.steps:
            batch = self.source.next_batch()
            last = self.train_step(batch)
            self._record(last)
            if self.nonfinite_in_a_row >= self.train.max_nonfinite_in_a_row:
                path = self.save()
                raise TrainingStopped(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (limit "
                    f"max_nonfinite_in_a_row = {self.train.max_nonfinite_in_a_row}) at step {self.step}; "
                    f"the last good state is saved in {path}")
            if self.step % self.train.checkpoint_every == 0 or self.step == self.train.steps:
                self.save()
        return last

    def _record(self, m: dict) -> None:
        if self.rank != 0:
            return
        if self.on_metrics is not None:
            self.on_metrics(m)
        with open(self._metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, m["step"])
        if m["step"] % self.train.log_every == 0 or m.get("skipped"):
            shown = " ".join(f"{k} {m[k]:.4g}" for k in ("loss", "grad_norm", "lr", "step_time")
                             if isinstance(m.get(k), float))
            self.log(f"[mugv] step {m['step']}/{self.train.steps} {shown}"
                     + (" SKIPPED (non-finite)" if m.get("skipped") else ""))

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save(self) -> Path:
        """Collective: every rank calls it. Atomic; keeps the last `keep_last`."""
        from megatron.core import parallel_state as ps

        self.log(f"[mugv] checkpoint: saving step {self.step}")
        states = optim_state.gather_states(self.optimizer, self.model)
        # Frozen parameters (LoRA's base) may be held in bf16; the checkpoint's model group is fp32.
        weights = {n: q.detach().float() for n, q in self.model.named_parameters() if not q.requires_grad}
        weights.update({n: s["param"] for n, s in states.items()})   # fp32 main values
        groups = {
            "model": (self.schema, weights),
            "ema": (self.trainable, {n: t.cpu() for n, t in self.ema.items()}),
            "optimizer.exp_avg": (self.trainable, {n: s["exp_avg"] for n, s in states.items()}),
            "optimizer.exp_avg_sq": (self.trainable, {n: s["exp_avg_sq"] for n, s in states.items()}),
        }
        meta = {"step": self.step, "optimizer_step": optim_state.optimizer_step_count(self.optimizer),
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "tokens_seen": self.tokens_seen, "world_size": dist.get_world_size()}
        data_state = json.dumps(self.source.state_dict()).encode()
        path = save_torch(self.ckpt_dir, self.step, groups, tp_rank=self.tp_rank,
                          tp_size=self.parallel.tensor_parallel,
                          write_replica=ps.get_data_parallel_rank() == 0,
                          config=self.config_dict(), schema_hash=self.schema.hash(), meta=meta,
                          states={"rng": rng.capture(), "data": data_state},
                          keep_last=self.train.keep_last, overwrite=True)
        self.log(f"[mugv] checkpoint: step {self.step} committed at {path}")
        return path

    def _load_groups(self, ckpt: Checkpoint, optimizer: bool) -> None:
        tp = self.parallel.tensor_parallel
        load = lambda g, s: load_torch(ckpt, s, g, tp_rank=self.tp_rank, tp_size=tp)  # noqa: E731
        model = load("model", self.schema)
        trainable = set(self.trainable.names)
        with torch.no_grad():
            for name, q in self.model.named_parameters():
                if name not in trainable:
                    q.copy_(model[name].to(q))
        model = {n: model[n] for n in trainable}
        if optimizer:
            m, v = load("optimizer.exp_avg", self.trainable), load("optimizer.exp_avg_sq", self.trainable)
            states = {n: {"param": model[n], "exp_avg": m[n], "exp_avg_sq": v[n]} for n in model}
            optim_state.scatter_states(self.optimizer, self.model, states,
                                       int(ckpt.manifest["meta"]["optimizer_step"]))
            ema = load("ema", self.trainable)
        else:
            optim_state.scatter_states(self.optimizer, self.model, {
                n: {"param": model[n], "exp_avg": torch.zeros_like(model[n]),
                    "exp_avg_sq": torch.zeros_like(model[n])} for n in model}, 0)
            ema = model
        for name in self.ema:
            self.ema[name].copy_(ema[name].to(self.ema[name]))

    def _resume(self) -> bool:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        ckpt = Checkpoint(path)
        saved = ckpt.config
        for section, now in (("dit", to_dict(self.dit)), ("flow", to_dict(self.flow))):
            Checkpoint.check_config(ckpt, now, section=section)
        normal = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples and lists compare equal)
        train_now = {k: v for k, v in normal(to_dict(self.train)).items() if k not in RESUMABLE_CHANGES}
        train_then = {k: v for k, v in saved.get("train", {}).items() if k not in RESUMABLE_CHANGES}
        if train_now != train_then:
            diffs = [f"train.{k}: checkpoint {train_then.get(k)!r}, now {train_now.get(k)!r}"
                     for k in sorted(set(train_now) | set(train_then)) if train_now.get(k) != train_then.get(k)]
            raise CheckpointError(f"{path} was written with a different config: " + "; ".join(diffs))
        self._load_groups(ckpt, optimizer=True)
        meta = ckpt.manifest["meta"]
        self.step = int(meta["step"])
        self.nonfinite_total = int(meta["nonfinite_total"])
        self.nonfinite_in_a_row = int(meta["nonfinite_in_a_row"])
        self.tokens_seen = int(meta["tokens_seen"])
        rank_blob = self.rank if self.rank < int(meta.get("world_size", 1)) else 0
        rng.restore(ckpt.read_state("rng", rank_blob))
        self.source.load_state_dict(json.loads(ckpt.read_state("data", 0)))
        if self.rank == 0:
            self._truncate_metrics(self.step)
        self.log(f"[mugv] resumed from {path} at step {self.step}")
        return True

    def _init_from(self, path: str, weights_only: bool) -> None:
        ckpt = Checkpoint(path) if (Path(path) / "manifest.json").is_file() else Checkpoint(latest_checkpoint(path) or path)
        ckpt.check_config(to_dict(self.dit), section="dit")
        self._load_groups(ckpt, optimizer=not weights_only)
        self.log(f"[mugv] stage starts from {ckpt.path} ({'weights only' if weights_only else 'weights, EMA and optimizer'})")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resumed from (they will be redone)."""
        if not self._metrics_path.is_file():
            return
        keep = [ln for ln in self._metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self._metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        megatron_compat.destroy_parallel()
