"""JAX mechanics of Diffusion-DPO and Diffusion-KTO (the oracle side of
`torch_backend/preference.py`; formulas once in `mugv.core.preference`): `stop_gradient` on the
frozen reference and the KTO reference point.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mugv.core import flow, preference
from mugv.core.preference import PreferenceConfig
from mugv.jax_reference.flow import velocity

Array = jax.Array

__all__ = ["error_difference", "dpo_loss", "kto_loss"]


def error_difference(output, ref_output, x0, noise, frame_mask):
    """d = e_policy - e_ref per sample (B,), fp32, without cancellation (core.preference)."""
    target = flow.velocity_target(x0.astype(jnp.float32), noise.astype(jnp.float32))
    return preference.error_difference(jnp, velocity(output, x0.shape[1]),
                                       velocity(ref_output, x0.shape[1]), target, frame_mask)


def dpo_loss(cfg: PreferenceConfig, out_w: Array, out_l: Array, ref_out_w: Array,
             ref_out_l: Array, x0_w: Array, x0_l: Array, noise: Array,
             frame_mask: Optional[Array] = None) -> tuple[Array, Array]:
    """Diffusion-DPO on raw model outputs: (scalar mean over pairs, per-pair losses (B,)).

    out_w/out_l: policy outputs on the preferred/rejected latents x0_w/x0_l noised with the SAME
    noise and sigma; ref_out_*: the frozen reference's outputs (stop_gradient here).
    """
    preference.check_pair_shapes(out_w=out_w, out_l=out_l, ref_out_w=ref_out_w, ref_out_l=ref_out_l)
    preference.check_pair_shapes(x0_w=x0_w, x0_l=x0_l, noise=noise)
    sg = jax.lax.stop_gradient
    diff_w = error_difference(out_w, sg(ref_out_w), x0_w, noise, frame_mask)
    diff_l = error_difference(out_l, sg(ref_out_l), x0_l, noise, frame_mask)
    per_pair = preference.dpo_loss(jnp, cfg, diff_w, diff_l)
    return jnp.mean(per_pair), per_pair


def kto_loss(cfg: PreferenceConfig, output: Array, ref_output: Array, x0: Array, noise: Array,
             desirable: Array, frame_mask: Optional[Array] = None,
             reference_point: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """Diffusion-KTO on raw model outputs: (scalar mean, per-sample losses (B,), z0).

    desirable: bool (B,). reference_point: z0 to use (e.g. averaged over data-parallel ranks);
    by default this batch's max(0, mean reward). Always under stop_gradient.
    """
    preference.check_pair_shapes(output=output, ref_output=ref_output)
    sg = jax.lax.stop_gradient
    reward = preference.kto_reward(error_difference(output, sg(ref_output), x0, noise, frame_mask))
    if reference_point is None:
        reference_point = preference.kto_reference_point(jnp, reward)
    reference_point = sg(reference_point)
    per_sample = preference.kto_loss(jnp, cfg, reward, reference_point, desirable)
    return jnp.mean(per_sample), per_sample, reference_point
