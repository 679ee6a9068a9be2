"""The preference stage: Diffusion-DPO and Diffusion-KTO against a frozen reference model.

`PreferenceTrainer` is the pre-training `Trainer` (training/trainer.py) through its override
points:
  * prepare_inputs: a batch of B pairs becomes 2B model rows [w_0..w_B-1, l_0..l_B-1]; both
    members of a pair get the SAME draws (timestep, noise, task, caption dropout) because the
    trainer's draws are a function of (seed, step) and the batch row alone, and the rejected half
    is prepared with the same rows (DPO compares errors at one x_t, Wallace et al. eq. 14). Then
    the frozen reference's outputs for every row (`forward_only`), and a no-grad policy pass:
    DPO's per-pair gradient weights (`_dpo_weights`: the separable form, exact on identical
    pairs) or KTO's reference point z0 over the GLOBAL batch (all data-parallel ranks and
    micro-batches: one number at any layout; the official code averages it over GPUs likewise);
  * the reference: `frozen_copy(checkpoint)` = the stage's starting checkpoint in the same
    parallel layout (TP-sharded, pipeline stages like the policy), optionally in bf16; never
    wrapped by DDP nor given to the optimizer, `requires_grad=False`;
  * micro_batches: DPO's preferred and rejected halves are cut separately;
  * loss_fn: Diffusion-DPO / Diffusion-KTO (formulas in core/preference.py, entry points in
    torch_backend/preference.py). Metrics add DPO's `pair_accuracy`: the share of pairs with margin m < 0
    (the policy moved towards the preferred sample more than towards the rejected one).

Cost per step: reference forward + policy no-grad forward + policy forward/backward on 2B rows.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mugv.checkpoints.format import Checkpoint, latest_checkpoint
from mugv.core import preference as core_pref
from mugv.core.preference import PreferenceStageConfig
from mugv.core.validate import to_dict
from mugv.torch_backend import preference as torch_preference
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


class PreferenceTrainer(Trainer):
    """Trains the policy with Diffusion-DPO (pairs) or Diffusion-KTO (labelled samples) against
    a frozen reference; `source` yields `data/preference.py::PreferenceBatch`es. The policy starts
    from the reference checkpoint (weights only) unless the run resumes from its own.

    The reference is `frozen_copy(checkpoint)` run by `forward_only`: the same layout and
    schedule as the policy (module docstring)."""

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

    def prepare_inputs(self, batch, rows: slice) -> dict:
        """Pre-training inputs for the preferred (or KTO) latents; for DPO the rejected latents
        prepared with the same rows (hence the same draws) after them: rows [w_0..w_B-1, l_0..l_B-1].
        Then the reference's outputs for every row, and the no-grad policy pass that gives DPO's
        per-pair weights and losses (or KTO's global z0)."""
        if self.pref.objective == "dpo" and getattr(batch, "rejected", None) is None:
            raise ValueError("objective 'dpo' needs pairs: the source gave batches without rejected latents")
        if self.pref.objective == "kto" and getattr(batch, "desirable", None) is None:
            raise ValueError("objective 'kto' needs labels: the source gave batches without 'desirable'")
        inputs = super().prepare_inputs(batch, rows)
        if self.pref.objective == "dpo":
            rejected = super().prepare_inputs(dataclasses.replace(batch, latents=batch.rejected), rows)
            inputs = {k: torch.cat([v, rejected[k]]) for k, v in inputs.items()}
        else:
            inputs["desirable"] = batch.desirable[rows].to(self.device)
        inputs["ref_out"] = self._per_row(self.reference, inputs, lambda out, mb: out.float())
        if self.pref.objective == "dpo":
            inputs.update(self._dpo_weights(inputs))
        elif self.pref.kto_reference_point == "global":
            inputs["z0"] = self._global_reference_point(inputs)
        return inputs

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        """DPO micro-batches as row ranges: the preferred half and the rejected half cut
        separately (no micro-batch mixes them), chunks alternating w_0, l_0, w_1, l_1, ... (chunk
        i of each half: the same pairs): on identical pairs the gradient buffer then goes
        0 -> g -> g + (-g) = 0 exactly after every two micro-batches."""
        half, mb = n // 2, self.train.micro_batch
        return [(a + o, min(a + mb, half) + o) for a in range(0, half, mb) for o in (0, half)]

    def micro_batches(self, inputs: dict) -> list[dict]:
        if self.pref.objective != "dpo":
            return super().micro_batches(inputs)
        n = self.num_samples(inputs)
        cut = lambda v, a, b: v[a:b] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v  # noqa: E731
        return [{key: cut(v, a, b) for key, v in inputs.items()} for a, b in self._bounds(n)]

    def _per_row(self, model, inputs: dict, reduce) -> Optional[torch.Tensor]:
        """`forward_only` of per-row values, put back in row order (DPO's micro-batches are not
        in row order); None off the last pipeline stage."""
        got = self.forward_only(model, inputs, reduce=reduce)
        if got is None or self.pref.objective != "dpo":
            return got
        order = torch.cat([torch.arange(a, b) for a, b in self._bounds(self.num_samples(inputs))]).to(got.device)
        rows = torch.empty_like(got)
        rows[order] = got
        return rows

    def _row_diffs(self, model, inputs: dict) -> Optional[torch.Tensor]:
        """d = e_model - e_ref per row (no gradients), None off the last pipeline stage."""
        return self._per_row(model, inputs, lambda out, mb: torch_preference.error_difference(
            out, mb["ref_out"], mb["x0"], mb["noise"], mb["frame_mask"]))

    @torch.no_grad()
    def _dpo_weights(self, inputs: dict) -> dict:
        """Per-row weights of the separable DPO gradient, from a no-grad policy pass.

        With m_p = d_w - d_l and L = mean_p softplus(beta m_p), dL/dtheta = mean_p c_p (grad d_w -
        grad d_l) with c_p = beta sigmoid(beta m_p) evaluated at the current weights. So the
        backward pass needs each row alone, weighted +c_p (preferred) or -c_p (rejected): the two
        halves run as separate micro-batches and their gradients meet only in the gradient
        buffer. On an identical pair both are bitwise equal with opposite signs and cancel
        exactly, so beta -> infinity leaves the weights untouched instead of amplifying rounding.
        """
        d = self._row_diffs(self.stages, inputs)
        if d is None:
            return {}
        half = d.shape[0] // 2
        d_w, d_l = d[:half], d[half:]
        loss = core_pref.dpo_loss(torch, self.pref.loss, d_w, d_l)                 # softplus(beta m)
        c = self.pref.loss.beta * torch.sigmoid(self.pref.loss.beta * core_pref.dpo_margin(d_w, d_l))
        return {"dpo_weight": torch.cat([c, -c]), "dpo_pair_loss": torch.cat([loss, loss])}

    @torch.no_grad()
    def _global_reference_point(self, inputs: dict) -> torch.Tensor:
        """KTO's z0 = max(0, mean reward) over the global batch: a no-grad policy pass, the reward
        sum and count all-reduced over the data-parallel group (every rank of a data-parallel
        group is on the same pipeline stage; stages without the output add zeros)."""
        from megatron.core import parallel_state as ps

        d = self._row_diffs(self.stages, inputs)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if d is not None:
            reward = core_pref.kto_reward(d)
            total[0], total[1] = reward.double().sum(), float(reward.numel())
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return core_pref.kto_reference_point(torch, (total[0] / total[1]).float())

    # ------------------------------------------------------------------------------------------
    # Loss

    def loss_fn(self, out: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(micro-batch loss, per-row values for the metrics).

        DPO: the value is the mean over the micro-batch's rows of their pair's DPO loss (so the
        step's loss is the mean over pairs), its gradient that of 2 mean(weight * d) (the
        separable form, `_dpo_weights`; the factor 2: a pair has two rows). KTO: torch_preference.kto_loss
        with z0 from the whole global batch (or this micro-batch)."""
        if self.pref.objective == "dpo":
            d = torch_preference.error_difference(out, mb["ref_out"], mb["x0"], mb["noise"], mb["frame_mask"])
            surrogate = 2 * (mb["dpo_weight"] * d).mean()
            pair_loss = mb["dpo_pair_loss"]
            return surrogate - surrogate.detach() + pair_loss.mean(), pair_loss
        loss, per, _ = torch_preference.kto_loss(self.pref.loss, out, mb["ref_out"], mb["x0"], mb["noise"], mb["desirable"],
                                           mb["frame_mask"], reference_point=mb.get("z0"))
        return loss, per

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
