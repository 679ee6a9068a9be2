"""Diffusion-DPO and Diffusion-KTO for rectified flow, written once over an array namespace `xp`.

Both start from per-sample flow-matching errors e = masked_mse(v_hat, x0 - eps) (flow.py) of the
policy and of a frozen reference model, evaluated at the SAME x_t (same t and noise). A lower
error than the reference stands for a higher likelihood: the diffusion ELBO gives
log p_theta(x0 | c) - log p_ref(x0 | c) ~ -k (e_theta - e_ref) with k > 0 folded into beta
(Wallace et al. 2023, the derivation leading to eq. 14; Li et al. 2024, sec. 4). docs/objectives.md
maps our beta to the papers' and their code's beta.

Diffusion-DPO (Wallace et al. 2023, eq. 14, epsilon-errors replaced by velocity errors):
    m = (e_w - e_w_ref) - (e_l - e_l_ref)
    loss = -log sigmoid(-beta m) = softplus(beta m)           (per pair; the batch takes the mean)
  beta here multiplies MEAN squared errors: beta = beta_paper * T * omega(lambda_t) * D for D
  latent elements, and beta = beta_dpo / 2 of the Diffusion-DPO code (scale_term = -0.5 beta_dpo).

Diffusion-KTO (Li et al. 2024, sec. 4, "eq 8" in its code for r - z0; built on the KTO loss of
Ethayarajh et al. 2024, sec. 4, L_KTO = E[lambda_y - v(x, y)]):
    r = -(e - e_ref)                                          implicit reward (log-ratio proxy)
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
from mugv.core.flow import _as_float_like, _is_bool, _sigmoid


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


def _softplus(xp, y):
    """log(1 + e^y) = max(y, 0) + log1p(e^-|y|), finite for any y; (y + |y|) / 2 is max(y, 0)
    exactly and works in every namespace."""
    return 0.5 * (y + xp.abs(y)) + xp.log1p(xp.exp(-xp.abs(y)))


def _check_same_shape(fn: str, **arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: per-sample errors must have equal shapes (B,); got {desc}")
    first = next(iter(shapes.values()))
    if len(first) != 1:
        raise ValueError(f"{fn}: {next(iter(shapes))} has shape {first}: expected (B,)")


def dpo_margin(err_w, err_l, ref_err_w, ref_err_l):
    """m = (e_w - e_w_ref) - (e_l - e_l_ref): negative when the policy improves on the preferred
    sample more than on the rejected one."""
    return (err_w - ref_err_w) - (err_l - ref_err_l)


def dpo_loss(xp, cfg: PreferenceConfig, err_w, err_l, ref_err_w, ref_err_l):
    """Per-pair Diffusion-DPO loss -log sigmoid(-beta m) (B,); log 2 when policy == reference.

    err_*: per-sample mean squared velocity errors (B,) of the policy (w: preferred, l: rejected)
    and of the frozen reference; all four at the same t and noise within a pair.
    """
    _check_same_shape("dpo_loss", err_w=err_w, err_l=err_l, ref_err_w=ref_err_w,
                      ref_err_l=ref_err_l)
    return _softplus(xp, cfg.beta * dpo_margin(err_w, err_l, ref_err_w, ref_err_l))


def kto_reward(err, ref_err):
    """r = -(e - e_ref) = e_ref - e: positive when the policy fits the sample better than the
    reference (the flow-matching stand-in for log pi_theta / pi_ref)."""
    return ref_err - err


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
    """v (B,): lambda_D sigmoid(beta (r - z0)) for desirable samples, lambda_U sigmoid(beta (z0 - r))
    for undesirable ones. Increasing in r for desirable, decreasing for undesirable samples."""
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
