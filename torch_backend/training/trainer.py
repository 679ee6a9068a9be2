"""The MUG-DiT training engine on Megatron-Core: step, loop, checkpoint/resume, failure handling.

One `Trainer` runs one stage on any layout `torch_backend/training/parallelize.py::parallelize` builds
(TP(+SP), PP(+virtual stages), DP with the distributed optimizer). Per step it takes a global
batch from a resumable source, keeps its data-parallel rank's rows, assigns tasks (text-to-image
for 1-frame batches, else text-to-video or image-to-video by the stage's mix), drops captions for
classifier-free guidance, draws timesteps and noise from a generator seeded by (seed, step) (a
resumed run draws exactly what the uninterrupted run drew), runs the micro-batches (= gradient
accumulation) through Megatron's schedule for the layout (`parallelize.forward_backward`: no
pipelining, 1F1B or interleaved 1F1B; DDP's reduce deferred to the last micro-batch;
`finalize_grads`), checks the loss and every gradient for non-finite values, and steps Megatron's
optimizer (clipping inside) and the EMA.

Override points (for other objectives on the same engine, e.g. the DPO/KTO preference stage):
    prepare_inputs(batch, rows) -> dict
        This rank's rows of the global batch as tensors (leading dim = samples) plus anything else
        the loss needs. Default: flow-matching inputs (x_t, timestep, text, text_mask, frame_mask,
        fps, frame_indice, x0, noise, is_image, is_i2v). Every pipeline stage calls it and must
        get the same micro-batch sizes and conditioning.
    micro_batches(inputs) -> list[dict]
        Default: every tensor whose leading dim is `num_samples(inputs)` cut into chunks of
        `TrainConfig.micro_batch` rows; other values are passed to every micro-batch as they are.
        Override to keep groups of rows together (e.g. a preference pair).
    num_samples(inputs) -> int
        Default: rows of inputs["x_t"]. Micro-batches weigh by it in the step's loss.
    model_inputs(mb) -> dict
        The model's keyword arguments (x, timestep, text, text_mask, x_mask, fps, frame_indice).
    loss_fn(out, mb) -> (loss_mean, per_sample)
        On the last pipeline stage: the scalar loss of the micro-batch (mean over its samples)
        and per-sample values (metrics only). Default: flow matching (`torch_backend/flow.py`).
    task_masks(mb) -> dict[name, bool tensor]
        Masks over `per_sample` for the per-task metrics ("loss_<name>"). Default: t2i/i2v/t2v
        from is_image/is_i2v when present, else none; masks not matching `per_sample` are ignored.
    forward_only(model, inputs, reduce=None)
        Runs ANOTHER model of this layout (`frozen_copy()`, the preference stage's reference)
        without gradients through the same schedule and micro-batches. Returns, on the last
        pipeline stage, torch.cat of `reduce(out, mb)` over the micro-batches (or the list of
        outputs when reduce is None); None on other stages. Collective over the pipeline: call it
        from `prepare_inputs` (store the result as a per-sample tensor in the inputs, which
        `micro_batches` then cuts), not from `loss_fn` (a schedule cannot nest in a schedule).
    frozen_copy(checkpoint=None, group="model")
        This rank's stages rebuilt with the same layout, weights copied from the model now, or
        read from a checkpoint (any layout), requires_grad False.

Exact resume: model (fp32 main values), EMA, Adam moments and step, every RNG, the source's
position, the step and the failure counters all go into one atomic checkpoint
(`checkpoints/format.py`); a restarted run picks the newest complete one, at any layout (each
pipeline stage writes its own parameters, each data-parallel shard of the distributed optimizer
its range via an all-reduce; reading reshards). The EMA is kept per shard like the Adam moments.
Saves can be asynchronous (`training/saving.py`): the step copies the state to host memory and
a background thread writes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mugv.checkpoints.format import Checkpoint
from mugv.checkpoints.torch_io import load_torch
from mugv.core import flow as core_flow
from mugv.core import provenance
from mugv.core.dit import DiTConfig, dit_schema, patch_grid, video_tokens
from mugv.core.flops import bf16_peak, step_flops
from mugv.core.flow import FlowConfig
from mugv.core.parallel import ParallelConfig, check_layout
from mugv.core.recipe import KernelConfig
from mugv.core.schema import Schema
from mugv.core.train import TrainConfig, ema_update, learning_rate
from mugv.core.validate import to_dict
from mugv.torch_backend.parallel import megatron_compat
from mugv.torch_backend import flow as torch_flow
from mugv.torch_backend.training import optim_state
from mugv.torch_backend.data.batch import BatchSource, TrainBatch
from mugv.torch_backend.training.checkpointing import CheckpointMixin
from mugv.torch_backend.training.run_lock import RunLock
from mugv.torch_backend.training.saving import CheckpointSaver

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


class _Stages:
    """named_parameters() over all of this rank's model chunks (canonical names are global)."""

    def __init__(self, stages):
        self.stages = stages

    def named_parameters(self):
        for s in self.stages:
            yield from s.named_parameters()

    def parameters(self):
        for _, q in self.named_parameters():
            yield q


class _MicroBatch(dict):
    """The model's keyword inputs (what Megatron's schedule passes to the model), carrying the
    whole micro-batch (targets, masks) for the loss."""

    full: dict


class Trainer(CheckpointMixin):
    """Trains MUG-DiT for one stage. Construct on every rank (under torchrun for several).

    Attributes a subclass may read: `stages` (this rank's bare model chunks), `chunks` (the same
    in Megatron DDP), `model` (the first chunk: the whole model at PP = 1), `params` (canonical
    `named_parameters()` over all chunks), `optimizer`, `ema` ({name: fp32 shard}), `pm` (the
    `ParallelDiT`), `last_stage`, `dp_rank`, `dp_size`, `tp_rank`, `pp_rank`, `device`, `step`.
    """

    def __init__(self, dit: DiTConfig, train: TrainConfig, flow: FlowConfig, source: BatchSource,
                 out_dir: str | Path, parallel: ParallelConfig = ParallelConfig(),
                 stage: StageSettings = StageSettings(), grad_hook: Optional[Callable] = None,
                 log: Callable[[str], None] = print, model_hook: Optional[Callable] = None,
                 on_metrics: Optional[Callable[[dict], None]] = None,
                 async_save: Optional[bool] = None, frozen_from: Optional[str] = None,
                 kernels: KernelConfig = KernelConfig()):
        """Arguments beyond the configs:
            source: resumable global-batch source (`training/batch.py::BatchSource`).
            grad_hook(step, model): called after backward, before the finiteness check (tests
                plant non-finite gradients with it).
            model_hook(model) -> Schema | None: called on every model chunk after it is built and
                before DDP wraps it; may freeze parameters or add modules (LoRA) and returns the
                schema of the parameters it added, which join the checkpoint.
            on_metrics(metrics): called on rank 0 after every step (progress display).
            async_save: write checkpoints in a background thread (default: on a GPU).
            frozen_from: where the parameters a model_hook froze come from (LoRA's base weights
                file or checkpoint, which the hook loads on every start). When set, checkpoints
                hold only the trainable parameters and record this path, and resuming checks it:
                a 10B LoRA checkpoint is then its adapters and their state, not 40 GB of an fp32
                copy of the base. None: checkpoints hold every parameter (self-contained).
            kernels: attention backend, head-dim padding and fused-kernel set of the model (and of
                its frozen copies); checkpoints record it and which kernels ran (`config_dict`).
        """
        self.dit, self.train, self.flow, self.parallel, self.stage = dit, train, flow, parallel, stage
        self.source = source
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.run_lock = RunLock(self.out_dir)
        self.grad_hook = grad_hook
        self.model_hook = model_hook
        self.on_metrics = on_metrics
        self.log = log
        self.async_save = torch.cuda.is_available() if async_save is None else async_save
        self.frozen_from = frozen_from
        self.kernels = kernels
        self.step = 0                  # iterations done (skipped ones included)
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.tokens_seen = 0
        self._setup()

    # ------------------------------------------------------------------------------------------
    # Set-up

    def _setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.enums import ModelType

        from mugv.torch_backend.training.parallelize import (megatron_optimizer, parallelize, recompute_overrides,
                                                             wrap_in_ddp)

        p = self.parallel
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        self.dp_size = check_layout(p, self.dit, world)
        bf16 = self.train.precision == "bf16"
        if bf16 and not torch.cuda.is_available():
            raise ValueError("TrainConfig.precision = 'bf16' needs a GPU; use 'fp32' on a CPU")
        recompute = recompute_overrides(self.train.recompute, self.train.recompute_layers)
        pm = parallelize(self.dit, p, seed=self.train.seed, wrap_ddp=False, kernels=self.kernels,
                         hooked=self.model_hook is not None,
                         params_dtype=torch.bfloat16 if bf16 else torch.float32, **recompute)
        self.pm, self.params_dtype = pm, pm.config.params_dtype
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.stages = pm.stages
        self.model = self.stages[0]   # the (first) model chunk: the whole model at PP = 1
        self.params = _Stages(self.stages)
        added = []
        for m in self.stages:
            m.model_type = ModelType.encoder_or_decoder
            extra = self.model_hook(m) if self.model_hook is not None else None
            added += list(extra.params) if extra is not None else []
        # Checkpoint groups are declared globally by every rank: gather what the other pipeline
        # stages hold (parameters a hook added, which of them train).
        mine = (added, [n for n, q in self.params.named_parameters() if q.requires_grad])
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        extra_specs = {q.name: q for a, _ in everyone for q in a}
        self.schema = Schema(dit_schema(self.dit).params + tuple(extra_specs.values()))
        trainable = set().union(*(set(t) for _, t in everyone))
        # EMA and optimizer state exist for trainable parameters only (all of them, unless a
        # model_hook froze some, as LoRA does).
        self.trainable = Schema(tuple(q for q in self.schema if q.name in trainable))
        local = {n for n, _ in self.params.named_parameters()}
        self.local_schema = Schema(tuple(q for q in self.schema if q.name in local))
        self.local_trainable = Schema(tuple(q for q in self.trainable if q.name in local))
        # Fail before training, once what a checkpoint holds is known (rank 0 checks; the others
        # meet it at the next collective).
        if self.rank == 0:
            self._check_output_dir()   # names an unwritable or full directory first
            self.run_lock.acquire()    # then one run per directory, before anything is written
        # DDP after the model_hook (LoRA adds and freezes parameters), as parallelize would wrap
        pm.chunks = wrap_in_ddp(self.stages, pm.config, p, self.dp_size)
        self.chunks = pm.chunks
        self.ddp = self.chunks[0]
        self.optimizer = megatron_optimizer(pm, self.train.optimizer)
        # EMA of this rank's shard of the fp32 main values (the distributed optimizer's range).
        self.ema = {n: t.detach().float().clone()
                    for n, t in optim_state.main_shards(self.optimizer, self.params).items()}
        self.saver = CheckpointSaver(self.async_save, log=self.log)
        self._metrics_path = self.out_dir / "metrics.jsonl"
        self._tb = None
        if not self._resume() and self.stage.init_from:
            self._init_from(self.stage.init_from, self.stage.init_weights_only)

    def checkpoint_numel(self) -> int:
        """fp32 values one checkpoint holds: model (all parameters, or only the trainable ones
        with `frozen_from`), EMA and the two Adam moments of the trainable ones."""
        model = self.trainable.numel if self.frozen_from else self.schema.numel
        return model + 3 * self.trainable.numel

    def config_dict(self) -> dict:
        from mugv.torch_backend.models.dit_layers import kernels_selected
        return {"dit": to_dict(self.dit), "train": to_dict(self.train), "flow": to_dict(self.flow),
                "parallel": to_dict(self.parallel), "stage": to_dict(self.stage),
                # what produced the weights: the run's choice and what it resolved to on this device
                "kernels": {**to_dict(self.kernels),
                            "selected": kernels_selected(self.kernels, self.device, self.pm.compiled[0]),
                            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}}

    # ------------------------------------------------------------------------------------------
    # Override points (see the module docstring)

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

    def prepare_inputs(self, batch: TrainBatch, rows: slice) -> dict:
        """Model inputs and loss targets for this rank's rows of the global batch (flow matching)."""
        local = batch.rows(rows.start, rows.stop)
        d = self._draws(batch, rows)
        b, _, t, h, w = local.latents.shape
        is_image = torch.full((b,), t == 1)
        frame_mask = torch.ones(b, t, dtype=torch.bool)
        if t > 1:  # image-to-video: latent frame 0 is the clean reference, out of the loss
            frame_mask[:, 0] = ~(d["task"] < self.stage.i2v_probability)
        text_mask = local.text_mask.bool() & (d["caption"] >= self.stage.caption_dropout)[:, None]
        r = core_flow.shift_ratio(self.flow, local.pixel_hw[0], local.pixel_hw[1], t) if self.flow.shift else 1.0
        sigma = torch_flow.sample_sigma(self.flow, d["sigma"], float(r))
        x0 = local.latents.float()
        x_t = torch_flow.noisy_latents(x0, d["noise"], sigma, frame_mask)
        timestep = core_flow.timestep_from_sigma(self.flow, sigma)
        tp = patch_grid(self.dit, (t, h, w))[0]
        dev = self.device
        return {"x_t": x_t.to(dev), "timestep": timestep.to(dev), "text": local.text.to(dev),
                "text_mask": text_mask.to(dev), "frame_mask": frame_mask.to(dev), "fps": local.fps.float().to(dev),
                "frame_indice": torch.arange(tp + 2).repeat(b, 1).to(dev), "x0": x0.to(dev),
                "noise": d["noise"].to(dev), "is_image": is_image.to(dev),
                "is_i2v": (~frame_mask[:, 0]).to(dev) if t > 1 else torch.zeros(b, dtype=torch.bool, device=dev)}

    def num_samples(self, inputs: dict) -> int:
        return inputs["x_t"].shape[0]

    def micro_batches(self, inputs: dict) -> list[dict]:
        n, mb = self.num_samples(inputs), self.train.micro_batch
        cut = lambda v, k: v[k * mb:(k + 1) * mb] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v  # noqa: E731
        return [{key: cut(v, k) for key, v in inputs.items()} for k in range(max(1, -(-n // mb)))]

    def model_inputs(self, mb: dict) -> dict:
        return {"x": mb["x_t"], "timestep": mb["timestep"], "text": mb["text"], "text_mask": mb["text_mask"],
                "x_mask": mb["frame_mask"], "fps": mb["fps"], "frame_indice": mb["frame_indice"]}

    def loss_fn(self, out: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_flow.flow_matching_loss(self.flow, out, mb["x0"], mb["noise"], mb["frame_mask"], mb["is_image"])

    def task_masks(self, mb: dict) -> dict[str, torch.Tensor]:
        if "is_image" not in mb or "is_i2v" not in mb:
            return {}
        return {"t2i": mb["is_image"], "i2v": mb["is_i2v"], "t2v": ~(mb["is_image"] | mb["is_i2v"])}

    # ------------------------------------------------------------------------------------------
    # One step

    def _schedule(self, chunks, config, mbs: list[dict], loss: Callable, forward_only: bool) -> None:
        """Megatron's schedule for this layout over the micro-batches `mbs`; `loss(out, mb)` on
        the last stage returns what Megatron's loss function returns."""
        from mugv.torch_backend.training.parallelize import ParallelDiT, forward_backward

        if self.parallel.pipeline_parallel > 1 and len({self.num_samples(m) for m in mbs}) > 1:
            raise ValueError(f"pipeline parallel needs equal micro-batches: {self.num_samples(mbs[0])} "
                             f"samples per rank do not divide into TrainConfig.micro_batch = "
                             f"{self.train.micro_batch}")
        items = []
        for mb in mbs:
            item = _MicroBatch(self.model_inputs(mb))
            item.full = mb
            items.append(item)
        pm = ParallelDiT(list(chunks), config, self.parallel, self.dp_size, self.dit)
        forward_backward(pm, iter(items), lambda out, item: loss(out, item.full), len(items),
                         forward_only=forward_only)

    def _forward_backward(self, inputs: dict):
        """Loss (mean over this rank's samples), per-sample values and task masks (on the last
        stage; None elsewhere); gradients accumulated over the micro-batches and finalized."""
        mbs = self.micro_batches(inputs)
        n = self.num_samples(inputs)
        records = []

        def loss(out, mb):
            value, per_sample = self.loss_fn(out, mb)
            k = self.num_samples(mb)
            records.append((value.detach().float() * (k / n), per_sample.detach(), self.task_masks(mb)))
            # Megatron divides by the number of micro-batches: samples weigh equally whatever
            # the split.
            return value * (k * len(mbs) / n), {}

        self._schedule(self.chunks, self.pm.config, mbs, loss, forward_only=False)
        if not records:
            return None, None, None
        masks = {}
        for name in records[0][2]:
            if all(name in r[2] for r in records):
                masks[name] = torch.cat([r[2][name] for r in records])
        return torch.stack([r[0] for r in records]).sum(), torch.cat([r[1] for r in records]), masks

    @torch.no_grad()
    def forward_only(self, model, inputs: dict, reduce: Optional[Callable] = None):
        """`model` (a list of this rank's stages of the same layout, e.g. `frozen_copy()`) on
        `inputs` without gradients, micro-batched like training; see the module docstring."""
        chunks = model if isinstance(model, (list, tuple)) else [model]
        got = []

        def collect(out, mb):
            got.append(out.detach() if reduce is None else reduce(out, mb))
            return torch.zeros((), device=out.device), {}

        self._schedule(chunks, getattr(chunks[0], "config", self.pm.config), self.micro_batches(inputs),
                       collect, forward_only=True)
        if not self.last_stage:
            return None
        return got if reduce is None else torch.cat(got)

    def frozen_copy(self, checkpoint: Optional[str | Path] = None, group: str = "model") -> list:
        """This rank's stages of the same layout without gradients: a copy of the current weights,
        or `group` of a checkpoint (any layout; e.g. "ema")."""
        from mugv.torch_backend.models.dit import build_dit

        copies = []
        for m in self.stages:
            c = build_dit(self.dit, self.pm.config, self.pm.layer_spec, seed=None, device=self.device,
                          pre_process=m.pre_process,
                          post_process=m.post_process, layers=m.layer_range)
            c.share_embeddings_and_output_weights = False
            copies.append(c)
        names = {n for c in copies for n, _ in c.named_parameters()}
        if checkpoint is not None:
            ckpt = Checkpoint(checkpoint)
            part = Schema(tuple(q for q in dit_schema(self.dit) if q.name in names))
            src = load_torch(ckpt, part, group, tp_rank=self.tp_rank, tp_size=self.parallel.tensor_parallel,
                             subset=True)
        else:
            src = dict(self.params.named_parameters())
        with torch.no_grad():
            for c in copies:
                for n, q in c.named_parameters():
                    q.copy_(src[n].to(q))
                    q.requires_grad_(False)
                c.eval()
        return copies

    def _all_finite(self, loss: Optional[torch.Tensor]) -> bool:
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        if loss is not None and not torch.isfinite(loss):
            bad += 1
        for q in self.params.parameters():
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
        inputs = self.prepare_inputs(batch, slice(self.dp_rank * per, (self.dp_rank + 1) * per))
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, per_sample, masks = self._forward_backward(inputs)
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
            metrics.update(self._reduce_losses(loss, per_sample, masks))
        self.step += 1
        dt = time.perf_counter() - t0
        b, _, t, h, w = batch.latents.shape
        tokens = batch.size * video_tokens(self.dit, (t, h, w))
        self.tokens_seen += tokens
        metrics.update(step_time=dt, tokens_per_s=tokens / dt, samples=batch.ids[:4])
        peak = self._peak_flops()
        if peak is not None:
            fl = step_flops(self.dit, (t, h, w), batch.text.shape[1], batch=batch.size)
            metrics["mfu"] = fl.model / dt / dist.get_world_size() / peak
        return metrics

    def _peak_flops(self) -> float | None:
        """The running GPU's dense bf16 peak (core/flops.py BF16_PEAKS or MUGV_PEAK_TFLOPS), said
        once in the log; None on a CPU or an unknown GPU (no MFU then)."""
        if not hasattr(self, "_peak"):
            self._peak = None
            if torch.cuda.is_available():
                name = torch.cuda.get_device_name()
                self._peak, source = bf16_peak(name, os.environ.get("MUGV_PEAK_TFLOPS"))
                self.log(f"[mugv] MFU over {self._peak / 1e12:.0f} TFLOP/s ({source})" if self._peak else f"[mugv] {source}")
        return self._peak

    def _reduce_losses(self, loss, per_sample, masks) -> dict:
        """Loss and per-task losses averaged over the ranks that hold them (last pipeline stage).
        Task names travel with rank 0's view; a rank with masks of another length contributes none."""
        names = ("t2i", "i2v", "t2v")
        vec = [torch.zeros((), device=self.device) for _ in range(2 + 2 * len(names))]
        if loss is not None:
            vec[0], vec[1] = loss.float().reshape(()), torch.ones((), device=self.device)
            for i, name in enumerate(names):
                mask = (masks or {}).get(name)
                if mask is not None and mask.shape == per_sample.shape[:1]:
                    vec[2 + 2 * i] = (per_sample.float().reshape(mask.shape[0], -1).mean(1) * mask).sum()
                    vec[3 + 2 * i] = mask.sum().float()
        vec = torch.stack(vec).to(self.device)
        dist.all_reduce(vec)
        out = {"loss": (vec[0] / vec[1]).item()}
        for i, name in enumerate(names):
            count = vec[3 + 2 * i].item()
            if count:
                out[f"loss_{name}"] = vec[2 + 2 * i].item() / count
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.train.ema_decay
        for name, main in optim_state.main_shards(self.optimizer, self.params).items():
            self.ema[name].copy_(ema_update(self.ema[name], main.detach().float(), decay))

    # ------------------------------------------------------------------------------------------
    # Loop

    def run(self) -> dict:
        """Train to `train.steps`, checkpointing every `checkpoint_every` steps and at the end
        (an asynchronous save is complete when this returns)."""
        last = {}
        self._record_environment()
        while self.step < self.train.steps:
            batch = self.source.next_batch()
            last = self.train_step(batch)
            self._record(last)
            if self.nonfinite_in_a_row >= self.train.max_nonfinite_in_a_row:
                path = self.save(wait=True)
                raise TrainingStopped(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (limit "
                    f"max_nonfinite_in_a_row = {self.train.max_nonfinite_in_a_row}) at step {self.step}; "
                    f"the last good state is saved in {path}")
            if self.step % self.train.checkpoint_every == 0 or self.step == self.train.steps:
                self.save()
        self.saver.wait()
        return last

    def _record_environment(self) -> None:
        """One line per start (first or resumed) in `environment.jsonl`: the package versions and
        dispatch settings that produced the steps after `start_step` (a resume may run elsewhere)."""
        if self.rank != 0:
            return
        from mugv.kernels.registry import kernel_report
        from mugv.torch_backend.models.attention import resolve
        env = provenance.environment()
        # what the DiT's op slots and attention took under this run's KernelConfig here, and why
        kernels = kernel_report(self.device, self.kernels.kernel_choice)
        backend, pad, why = resolve(self.kernels.attention_backend, self.device, self.dit.head_dim,
                                    self.kernels.pad_head_dim)
        attention = {"backend": backend, "head_dim": self.dit.head_dim, "runs_at": pad or self.dit.head_dim,
                     "why": why}
        compiled, compile_why = self.pm.compiled
        if compiled:   # the DiT's slots run their references inside the compiled layers
            from mugv.torch_backend.models.dit_layers import DIT_KERNELS
            kernels = {k: {"used": False, "why": "reference inside compiled layers (Inductor fuses it)"}
                       if k in DIT_KERNELS else v for k, v in kernels.items()}
        with open(self.out_dir / "environment.jsonl", "a") as f:
            f.write(json.dumps({"start_step": self.step, **env, "device": str(self.device),
                                "kernels": kernels, "attention": attention,
                                "compiled_layers": {"used": compiled, "why": compile_why}}) + "\n")
        self.log(f"[mugv] versions: {provenance.versions_line(env)}")
        self.log("[mugv] kernels: " + "; ".join(f"{k} {v['why']}" for k, v in kernels.items()))
        self.log(f"[mugv] attention: {why}")
        self.log(f"[mugv] layers: {compile_why}")

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

    def close(self) -> None:
        """Wait for an asynchronous save in flight, then leave Megatron's parallel state."""
        self.saver.wait()
        if self._tb:
            self._tb.close()
        self.run_lock.release()
        megatron_compat.destroy_parallel()
