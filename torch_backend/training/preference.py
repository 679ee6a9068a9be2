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
pair is never split. Metrics add `pair_accuracy` (DPO: share of pairs whose margin m < 0, i.e.
the policy moved towards the preferred sample more than towards the rejected one) or `z0` (KTO).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist

from mugv.checkpoints.format import Checkpoint, latest_checkpoint
from mugv.core import preference as core_pref
from mugv.core.dit import dit_schema
from mugv.core.preference import PreferenceStageConfig
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
    from the reference checkpoint (weights only) unless the run resumes from its own."""

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
        # Built under a forked RNG: constructing modules must not move the RNG streams a resumed
        # run restored from its checkpoint.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.reference = self._build_reference()

    def _build_reference(self) -> torch.nn.Module:
        from mugv.checkpoints.torch_io import load_torch
        from mugv.torch_backend.models.dit import build_dit, transformer_config

        bf16 = self.pref.reference_precision == "bf16" or self.train.precision == "bf16"
        tcfg = transformer_config(self.dit, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                  sequence_parallel=self.parallel.sequence_parallel)
        model = build_dit(self.dit, tcfg, seed=None, device=self.device)
        ckpt = Checkpoint(self.reference_path)
        ckpt.check_config(to_dict(self.dit), section="dit")
        weights = load_torch(ckpt, dit_schema(self.dit), "model", tp_rank=self.tp_rank,
                             tp_size=self.parallel.tensor_parallel)
        with torch.no_grad():
            for name, q in model.named_parameters():
                q.copy_(weights[name].to(q))
        model.requires_grad_(False)
        self.log(f"[mugv] preference: frozen reference from {self.reference_path} "
                 f"({'bf16' if bf16 else 'fp32'}, {self.pref.objective}, beta {self.pref.loss.beta:g})")
        return model.eval()

    def config_dict(self) -> dict:
        return {**super().config_dict(), "preference": to_dict(self.pref)}

    # ------------------------------------------------------------------------------------------
    # Inputs

    @property
    def rows_per_item(self) -> int:
        return 2 if self.pref.objective == "dpo" else 1

    def _forward_model(self, model, inputs: dict, sl: slice) -> torch.Tensor:
        return model(inputs["x_t"][sl], inputs["timestep"][sl], inputs["text"][sl], inputs["text_mask"][sl],
                     inputs["frame_mask"][sl], inputs["fps"][sl], inputs["frame_indice"][sl])

    def _prepare(self, batch, rows: slice) -> dict:
        """Pre-training inputs for the preferred (or KTO) latents; for DPO the rejected latents
        prepared with the same rows, hence the same draws, interleaved; then the reference's
        outputs (and KTO's global z0) for every row."""
        if self.pref.objective == "dpo" and getattr(batch, "rejected", None) is None:
            raise ValueError("objective 'dpo' needs pairs: the source gave batches without rejected latents")
        if self.pref.objective == "kto" and getattr(batch, "desirable", None) is None:
            raise ValueError("objective 'kto' needs labels: the source gave batches without 'desirable'")
        inputs = super()._prepare(batch, rows)
        if self.pref.objective == "dpo":
            rejected = super()._prepare(dataclasses.replace(batch, latents=batch.rejected), rows)
            inputs = {k: interleave(v, rejected[k]) for k, v in inputs.items()}
        else:
            inputs["desirable"] = batch.desirable[rows].to(self.device)
        inputs["ref_out"] = self._reference_outputs(inputs)
        if self.pref.objective == "kto" and self.pref.kto_reference_point == "global":
            inputs["z0"] = self._global_reference_point(inputs)
        return inputs

    def _chunks(self, n_rows: int) -> list[slice]:
        step = self.train.micro_batch * self.rows_per_item
        return [slice(k, min(k + step, n_rows)) for k in range(0, n_rows, step)]

    @torch.no_grad()
    def _reference_outputs(self, inputs: dict) -> torch.Tensor:
        n = inputs["x_t"].shape[0]
        return torch.cat([self._forward_model(self.reference, inputs, sl).float() for sl in self._chunks(n)])

    @torch.no_grad()
    def _global_reference_point(self, inputs: dict) -> torch.Tensor:
        """KTO's z0 = max(0, mean reward) over the global batch: a no-grad policy pass, the
        reward sum and count all-reduced over the data-parallel group."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for sl in self._chunks(inputs["x_t"].shape[0]):
            out = self._forward_model(self.model, inputs, sl)
            _, _, _, reward = self._kto_terms(out, inputs, sl)
            total += torch.stack([reward.double().sum(), torch.tensor(float(reward.numel()), dtype=torch.float64,
                                                                          device=self.device)])
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return core_pref.kto_reference_point(torch, (total[0] / total[1]).float().reshape(1))[()]

    # ------------------------------------------------------------------------------------------
    # Loss

    def _kto_terms(self, out, inputs, sl):
        x0, noise, fm = inputs["x0"][sl], inputs["noise"][sl], inputs["frame_mask"][sl]
        diff = objectives._diff(out, inputs["ref_out"][sl], x0, noise, fm)
        return x0, noise, fm, core_pref.kto_reward(diff)

    def loss_fn(self, out: torch.Tensor, inputs: dict, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the micro-batch's items, per-item losses): pairs for DPO, samples for KTO."""
        cfg = self.pref.loss
        ref = inputs["ref_out"][sl]
        if self.pref.objective == "dpo":
            x0, noise, fm = inputs["x0"][sl], inputs["noise"][sl], inputs["frame_mask"][sl]
            return objectives.dpo_loss(cfg, out[0::2], out[1::2], ref[0::2], ref[1::2], x0[0::2], x0[1::2],
                                       noise[0::2], fm[0::2])
        z0 = inputs.get("z0")
        loss, per, _ = objectives.kto_loss(cfg, out, ref, inputs["x0"][sl], inputs["noise"][sl],
                                           inputs["desirable"][sl], inputs["frame_mask"][sl], reference_point=z0)
        return loss, per

    def _forward_backward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (mean over this rank's items) and per-item losses; gradients accumulated. Like the
        pre-training loop, with micro-batches cut in whole pairs."""
        from mugv.torch_backend.parallelize import finalize_grads

        n_rows = inputs["x_t"].shape[0]
        n_items = n_rows // self.rows_per_item
        chunks = self._chunks(n_rows)
        losses, per_item = [], []
        for k, sl in enumerate(chunks):
            sync = contextlib.nullcontext() if k == len(chunks) - 1 else self.ddp.no_sync()
            with sync:
                out = self._forward_model(self.ddp, inputs, sl)
                loss, items = self.loss_fn(out, inputs, sl)
                (loss * (items.shape[0] / n_items)).backward()   # items weigh equally whatever the split
            losses.append(loss.detach() * items.shape[0] / n_items)
            per_item.append(items.detach())
        finalize_grads([self.ddp])
        return torch.stack(losses).sum(), torch.cat(per_item)

    def _reduce_losses(self, loss, per_item, inputs) -> dict:
        """Loss averaged over data-parallel ranks, plus DPO's pair accuracy (loss < log 2 <=> m < 0)
        or KTO's z0."""
        from megatron.core import parallel_state as ps

        extra = (per_item < LOG2).float().sum() if self.pref.objective == "dpo" else \
            inputs.get("z0", torch.zeros((), device=self.device)).float()
        vec = torch.stack([loss.float(), extra.float(), torch.tensor(float(per_item.numel()), device=self.device)])
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
        out = {"loss": (vec[0] / self.dp_size).item()}
        if self.pref.objective == "dpo":
            out["pair_accuracy"] = (vec[1] / vec[2]).item()
        else:
            out["z0"] = (vec[1] / self.dp_size).item()
        return out
