"""Torch mechanics of Diffusion-DPO and Diffusion-KTO (formulas once in `mugv.core.preference`):
errors from raw model outputs in fp32, the frozen reference detached, the KTO reference point
detached. Mirrors: `core/preference.py`, `jax_reference/preference.py`,
`parity_tests/test_preference.py`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mugv.core import flow, preference
from mugv.core.preference import PreferenceConfig
from mugv.torch_backend.flow import velocity

__all__ = ["error_difference", "dpo_loss", "kto_loss"]


def error_difference(output, ref_output, x0, noise, frame_mask):
    """d = e_policy - e_ref per sample (B,), fp32, without cancellation (core.preference)."""
    target = flow.velocity_target(x0.float(), noise.float())
    return preference.error_difference(torch, velocity(output, x0.shape[1]),
                                       velocity(ref_output, x0.shape[1]), target, frame_mask)


def dpo_loss(cfg: PreferenceConfig, out_w: Tensor, out_l: Tensor, ref_out_w: Tensor,
             ref_out_l: Tensor, x0_w: Tensor, x0_l: Tensor, noise: Tensor,
             frame_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO on raw model outputs: (scalar mean over pairs, per-pair losses (B,)).

    out_w/out_l: policy outputs on the preferred/rejected latents x0_w/x0_l noised with the SAME
    noise and sigma; ref_out_*: the frozen reference's outputs (detached here).
    """
    preference.check_pair_shapes(out_w=out_w, out_l=out_l, ref_out_w=ref_out_w, ref_out_l=ref_out_l)
    preference.check_pair_shapes(x0_w=x0_w, x0_l=x0_l, noise=noise)
    diff_w = error_difference(out_w, ref_out_w.detach(), x0_w, noise, frame_mask)
    diff_l = error_difference(out_l, ref_out_l.detach(), x0_l, noise, frame_mask)
    per_pair = preference.dpo_loss(torch, cfg, diff_w, diff_l)
    return per_pair.mean(), per_pair


def kto_loss(cfg: PreferenceConfig, output: Tensor, ref_output: Tensor, x0: Tensor, noise: Tensor,
             desirable: Tensor, frame_mask: Optional[Tensor] = None,
             reference_point: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-KTO on raw model outputs: (scalar mean, per-sample losses (B,), z0).

    desirable: bool (B,). reference_point: z0 to use (e.g. already averaged over data-parallel
    ranks, as the official code does); by default this batch's max(0, mean reward). Detached.
    """
    preference.check_pair_shapes(output=output, ref_output=ref_output)
    reward = preference.kto_reward(error_difference(output, ref_output.detach(), x0, noise, frame_mask))
    if reference_point is None:
        reference_point = preference.kto_reference_point(torch, reward)
    reference_point = reference_point.detach()
    per_sample = preference.kto_loss(torch, cfg, reward, reference_point, desirable)
    return per_sample.mean(), per_sample, reference_point
