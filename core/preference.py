"""Diffusion-DPO and Diffusion-KTO for rectified flow, written once over an array namespace `xp`.

Both start from per-sample flow-matching errors e = masked_mse(v_hat, x0 - eps) (flow.py) of the
policy and of a frozen reference model, evaluated at the SAME x_t (same t and noise). A lower
error than the reference stands for a higher likelihood: the diffusion ELBO gives
log p_theta(x0 | c) - log p_ref(x0 | c) ~ -k (e_theta - e_ref) with k > 0 folded into beta
(Wallace et al. 2023, the derivation leading to eq. 14; Li et al. 2024, sec. 4). docs/objectives.md
maps our beta to the papers' and their code's beta.

Both losses only need the per-sample differences d = e_theta - e_ref. `error_difference` computes
d as ONE masked mean of (v - v_ref)(v + v_ref - 2 v*) instead of subtracting two means of ~2:
near the reference (where preference tuning lives) the naive subtraction loses ~3 of fp32's 7
digits, and beta (~1e3) multiplies what is left.

Diffusion-DPO (Wallace et al. 2023, eq. 14, epsilon-errors replaced by velocity errors):
    m = (e_w - e_w_ref) - (e_l - e_l_ref) = d_w - d_l
    loss = -log sigmoid(-beta m) = softplus(beta m)           (per pair; the batch takes the mean)
  beta here multiplies MEAN squared errors: beta = beta_paper * T * omega(lambda_t) * D for D
  latent elements, and beta = beta_dpo / 2 of the Diffusion-DPO code (scale_term = -0.5 beta_dpo).

Diffusion-KTO (Li et al. 2024, sec. 4, "eq 8" in its code for r - z0; built on the KTO loss of
Ethayarajh et al. 2024, sec. 4, L_KTO = E[lambda_y - v(x, y)]):
    r = -(e - e_ref) = -d                                     implicit reward (log-ratio proxy)
    z0 = max(0, mean_batch(r)), detached                      reference point (batch KL estimate)
    v = lambda_D sigmoid(beta (r - z0))   if desirable
        lambda_U sigmoid(beta (z0 - r))   if undesirable
    loss = lambda_y - v                                       (per sample; the batch takes the mean)
  beta multiplies the mean-squared-error difference directly, as the Diffusion-KTO code does.

Detaching z0 and reducing it across data-parallel ranks are mechanics: the backends do them.
"""
from __future__ import annotations

import dataclasses

from mugv.core import validate
from mugv.core.flow import _as_float_like, _check_same_shape as _check_latents, _is_bool, \
    _sigmoid, _softplus, masked_mean


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """beta: inverse temperature on MEAN squared velocity errors (> 0; no default: its scale
    depends on the data, see docs/objectives.md); desirable_weight, undesirable_weight: KTO's
    lambda_D and lambda_U (> 0, 1.0 in KTO and Diffusion-KTO)."""
    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        validate.in_range(self, "beta", lo=0.0, lo_open=True)
        validate.in_range(self, "desirable_weight", lo=0.0, lo_open=True)
        validate.in_range(self, "undesirable_weight", lo=0.0, lo_open=True)


def check_pair_shapes(**arrays) -> None:
    """Preferred/rejected (or policy/reference) tensors must share one shape; the backends call
    this before any arithmetic so a mismatch is an error naming both, not a broadcast."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("preferred and rejected tensors must have equal shapes; got "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def _check_same_shape(fn: str, **arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: per-sample errors must have equal shapes (B,); got {desc}")
    first = next(iter(shapes.values()))
    if len(first) != 1:
        raise ValueError(f"{fn}: {next(iter(shapes))} has shape {first}: expected (B,)")


def error_difference(xp, pred, ref_pred, target, frame_mask=None):
    """d = e_theta - e_ref per sample (B,), with e = masked_mse(., target), computed as the masked
    mean of (pred - ref) (pred + ref - 2 target): the same number without the cancellation.

    pred, ref_pred, target: velocities (B, C, T, H, W) at the same x_t; frame_mask: bool (B, T).
    The caller stops the gradient into ref_pred (frozen reference).
    """
    _check_latents("error_difference", pred=pred, ref_pred=ref_pred, target=target)
    return masked_mean(xp, (pred - ref_pred) * (pred + ref_pred - 2 * target), frame_mask)


def dpo_margin(diff_w, diff_l):
    """m = (e_w - e_w_ref) - (e_l - e_l_ref) = d_w - d_l: negative when the policy improves on
    the preferred sample more than on the rejected one."""
    return diff_w - diff_l


def dpo_loss(xp, cfg: PreferenceConfig, diff_w, diff_l):
    """Per-pair Diffusion-DPO loss -log sigmoid(-beta m) = softplus(beta m) (B,); log 2 when the
    policy equals the reference (d_w = d_l = 0).

    diff_w, diff_l: d = e_theta - e_ref (B,) of the preferred (w) and rejected (l) sample of each
    pair (`error_difference`), both at the same t and noise.
    """
    _check_same_shape("dpo_loss", diff_w=diff_w, diff_l=diff_l)
    return _softplus(xp, cfg.beta * dpo_margin(diff_w, diff_l))


def kto_reward(diff):
    """r = -(e - e_ref) = -d: positive when the policy fits the sample better than the reference
    (the flow-matching stand-in for log pi_theta / pi_ref)."""
    return -diff


def kto_reference_point(xp, reward):
    """z0 = max(0, mean(r)): the batch estimate of KL(pi_theta || pi_ref) that Diffusion-KTO uses
    (the mean implicit reward of the batch, clamped at 0). Callers detach it and may average it
    over data-parallel ranks first, as the official code does."""
    m = xp.mean(reward)
    return 0.5 * (m + xp.abs(m))


def _label_terms(cfg: PreferenceConfig, desirable, like):
    if not _is_bool(desirable):
        raise ValueError(f"desirable has dtype {getattr(desirable, 'dtype', type(desirable))}: "
                         "expected a bool array (B,), True = desirable")
    if tuple(desirable.shape) != tuple(like.shape):
        raise ValueError(f"desirable has shape {tuple(desirable.shape)}: expected "
                         f"{tuple(like.shape)} like the per-sample errors")
    d = _as_float_like(desirable, like)
    sign = 2 * d - 1
    weight = cfg.desirable_weight * d + cfg.undesirable_weight * (1 - d)
    return sign, weight


def kto_value(xp, cfg: PreferenceConfig, reward, reference_point, desirable):
    """KTO's value v (B,): lambda_D sigmoid(beta (r - z0)) for desirable samples and
    lambda_U sigmoid(beta (z0 - r)) for undesirable ones; increasing in r for desirable samples,
    decreasing for undesirable ones."""
    _check_same_shape("kto_value", reward=reward)
    sign, weight = _label_terms(cfg, desirable, reward)
    return weight * _sigmoid(xp, sign * cfg.beta * (reward - reference_point))


def kto_loss(xp, cfg: PreferenceConfig, reward, reference_point, desirable):
    """Per-sample Diffusion-KTO loss lambda_y - v = lambda_y sigmoid(-sign beta (r - z0)) (B,).

    reward: `kto_reward` (B,); reference_point: scalar z0 (`kto_reference_point`, detached);
    desirable: bool (B,).
    """
    _check_same_shape("kto_loss", reward=reward)
    sign, weight = _label_terms(cfg, desirable, reward)
    return weight * _sigmoid(xp, -sign * cfg.beta * (reward - reference_point))


@dataclasses.dataclass(frozen=True)
class PreferenceStageConfig:
    """The preference stage (torch_backend/training/preference.py).

    objective: "dpo" (pairs) or "kto" (labelled samples). reference: checkpoint of the frozen
    reference model = the stage's starting point (a step_* directory or a run/checkpoints folder).
    reference_precision: "fp32", or "bf16" to hold the reference in bf16 (GPU only; it runs
    without gradients, so only its forward's rounding changes). loss: beta and KTO's weights.
    kto_reference_point: "global" averages z0 over the whole global batch (every data-parallel
    rank and micro-batch: the same number at any layout, as the official code's all-gather
    intends), "micro_batch" uses each micro-batch's own mean (the formula's local default).
    """
    reference: str
    loss: PreferenceConfig
    objective: str = "dpo"
    reference_precision: str = "fp32"
    kto_reference_point: str = "global"

    def __post_init__(self):
        validate.one_of(self, "objective", ("dpo", "kto"))
        validate.one_of(self, "reference_precision", ("fp32", "bf16"))
        validate.one_of(self, "kto_reference_point", ("global", "micro_batch"))
        if not isinstance(self.reference, str) or not self.reference:
            validate.fail(self, "reference", "the path of the reference (starting) checkpoint")
