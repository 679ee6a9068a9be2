"""Diffusion-DPO / Diffusion-KTO (core/preference.py): torch mechanics (torch_backend/preference.py)
vs the JAX oracle (jax_reference/preference.py), values and gradients in fp32; known answers;
clear errors for bad input. Shapes and inputs: objective_cases.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mugv.core import preference
from mugv.core.preference import PreferenceConfig
from mugv.core.validate import ConfigError
from mugv.jax_reference import preference as JP
from mugv.parity_tests.objective_cases import (B, C, MASKS, OP, _assert_pair, _j, _jax_grad, _normal,
                                               _pref_batch, _rng, _t, _torch_grad)
from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend import preference as TP


# ---------------------------------------------------------------------------------------------
# Preference losses: parity and known answers
# ---------------------------------------------------------------------------------------------

def _mse64(out, x0, noise, mask):
    """Per-sample masked MSE of the velocity half in float64 numpy."""
    err = (out[:, :C].astype(np.float64) - (x0.astype(np.float64) - noise)) ** 2
    keep = np.ones(err.shape[:1] + err.shape[2:3], bool) if mask is None else mask
    return np.array([err[b][:, keep[b]].mean() for b in range(err.shape[0])])




@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("beta", [0.5, 50.0, 5000.0])
def test_dpo_parity(mask, beta):
    d = _pref_batch(8)
    m = MASKS[mask]
    cfg = PreferenceConfig(beta=beta)
    consts_t = [_t(d[k]) for k in ("ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    consts_j = [_j(d[k]) for k in ("ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    tv, tg = _torch_grad(lambda w, l: TP.dpo_loss(cfg, w, l, *consts_t, _t(m))[0],
                         d["out_w"], d["out_l"])
    jv, jg = _jax_grad(lambda w, l: JP.dpo_loss(cfg, w, l, *consts_j, _j(m))[0],
                       d["out_w"], d["out_l"])
    _assert_pair("dpo loss", tv, jv)
    _assert_pair("dpo grad w", tg[0], jg[0])
    _assert_pair("dpo grad l", tg[1], jg[1])
    # Against the formula in float64 numpy (errors subtracted naively: float64 has the digits).
    e = {k: _mse64(d[o], d[x], d["noise"], m) for k, o, x in (
        ("w", "out_w", "x0_w"), ("l", "out_l", "x0_l"),
        ("rw", "ref_w", "x0_w"), ("rl", "ref_l", "x0_l"))}
    z = -beta * ((e["w"] - e["rw"]) - (e["l"] - e["rl"]))
    want = np.mean(np.logaddexp(0.0, -z))  # -log sigmoid(z)
    assert_close(tv, want, OP, "float32", name="dpo vs float64")


def test_dpo_reference_gets_no_gradient():
    d = _pref_batch(9)
    cfg = PreferenceConfig(beta=10.0)
    ref_w = torch.tensor(d["ref_w"], requires_grad=True)
    loss, _ = TP.dpo_loss(cfg, _t(d["out_w"]), _t(d["out_l"]), ref_w, _t(d["ref_l"]),
                         _t(d["x0_w"]), _t(d["x0_l"]), _t(d["noise"]))
    assert not loss.requires_grad
    (g,) = jax.grad(lambda r: JP.dpo_loss(cfg, _j(d["out_w"]), _j(d["out_l"]), r, _j(d["ref_l"]),
                                         _j(d["x0_w"]), _j(d["x0_l"]), _j(d["noise"]))[0],
                    argnums=(0,))(_j(d["ref_w"]))
    assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("beta", [1.0, 1e4, 1e9])
def test_dpo_policy_equals_reference_is_log2(beta):
    d = _pref_batch(10)
    cfg = PreferenceConfig(beta=beta)
    args = [d[k] for k in ("ref_w", "ref_l", "ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    lt, pt = TP.dpo_loss(cfg, *map(_t, args), _t(MASKS["mixed"]))
    lj, pj = JP.dpo_loss(cfg, *map(_j, args), _j(MASKS["mixed"]))
    for per in (pt, pj):
        assert_close(per, np.full(B, math.log(2.0)), OP, "float32", name="dpo at policy == ref")
    assert abs(float(lt) - math.log(2.0)) < 1e-7 and abs(float(lj) - math.log(2.0)) < 1e-7


@pytest.mark.parametrize("beta", [1e3, 1e9])
def test_dpo_identical_pairs_large_beta(beta):
    """Preferred == rejected (same latents, noise, t): the margin is exactly 0 whatever the policy
    does, so the loss stays log 2 and the gradient into the shared prediction is exactly 0."""
    d = _pref_batch(11)
    cfg = PreferenceConfig(beta=beta)
    out = torch.tensor(d["out_w"], requires_grad=True)
    loss, _ = TP.dpo_loss(cfg, out, out, _t(d["ref_w"]), _t(d["ref_w"]), _t(d["x0_w"]),
                         _t(d["x0_w"]), _t(d["noise"]))
    (g,) = torch.autograd.grad(loss, out)
    assert abs(float(loss.detach()) - math.log(2.0)) < 1e-7
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
    jl, jg = jax.value_and_grad(lambda o: JP.dpo_loss(
        cfg, o, o, _j(d["ref_w"]), _j(d["ref_w"]), _j(d["x0_w"]), _j(d["x0_w"]),
        _j(d["noise"]))[0])(_j(d["out_w"]))
    assert abs(float(jl) - math.log(2.0)) < 1e-7 and float(jnp.abs(jg).max()) == 0.0


def test_dpo_large_beta_stays_finite():
    """Saturated pairs (|beta m| ~ 1e7): loss = max(beta m, 0) to fp32 precision, finite
    gradients, no NaN; pair 0 is made wrong-sided (the policy got worse on the preferred sample)."""
    d = _pref_batch(12)
    d["out_l"][0] = d["ref_l"][0]
    d["out_w"][0] = d["ref_w"][0] + _normal(_rng(0), *d["ref_w"].shape[1:], scale=0.5)
    beta = 1e9
    cfg = PreferenceConfig(beta=beta)
    consts = [_t(d[k]) for k in ("ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    v, (gw, gl) = _torch_grad(lambda w, l: TP.dpo_loss(cfg, w, l, *consts)[0],
                              d["out_w"], d["out_l"])
    assert torch.isfinite(v) and torch.isfinite(gw).all() and torch.isfinite(gl).all()
    assert float(gw[0].abs().max()) > 0 and float(gw[1:].abs().max()) == 0.0
    _, per = TP.dpo_loss(cfg, *(_t(d[k]) for k in ("out_w", "out_l", "ref_w", "ref_l", "x0_w",
                                                   "x0_l", "noise")))
    e = {k: _mse64(d[k], d["x0_" + k[-1]], d["noise"], None)
         for k in ("out_w", "ref_w", "out_l", "ref_l")}
    m = (e["out_w"] - e["ref_w"]) - (e["out_l"] - e["ref_l"])
    assert m[0] > 0 and np.all(m[1:] < 0)
    assert_close(per, np.maximum(beta * m, 0.0), OP, "float32", name="saturated dpo")


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("beta", [0.5, 50.0, 5000.0])
@pytest.mark.parametrize("given_z0", [False, True])
def test_kto_parity(mask, beta, given_z0):
    d = _pref_batch(13)
    m = MASKS[mask]
    des = np.array([True, False, True])
    cfg = PreferenceConfig(beta=beta, desirable_weight=1.0, undesirable_weight=1.33)
    z0 = np.float32(0.0123) if given_z0 else None
    tv, (tg,) = _torch_grad(lambda o: TP.kto_loss(cfg, o, _t(d["ref_w"]), _t(d["x0_w"]),
                                                 _t(d["noise"]), _t(des), _t(m),
                                                 None if z0 is None else torch.tensor(z0))[0],
                            d["out_w"])
    jv, (jg,) = _jax_grad(lambda o: JP.kto_loss(cfg, o, _j(d["ref_w"]), _j(d["x0_w"]),
                                               _j(d["noise"]), _j(des), _j(m),
                                               None if z0 is None else jnp.asarray(z0))[0],
                          d["out_w"])
    _assert_pair("kto loss", tv, jv)
    _assert_pair("kto grad", tg, jg)
    # Against the formula in float64 numpy (z0 a constant).
    r = _mse64(d["ref_w"], d["x0_w"], d["noise"], m) - _mse64(d["out_w"], d["x0_w"], d["noise"], m)
    ref_point = float(z0) if z0 is not None else max(0.0, r.mean())
    sgn = np.where(des, 1.0, -1.0)
    lam = np.where(des, 1.0, 1.33)
    want = np.mean(lam - lam / (1 + np.exp(-sgn * beta * (r - ref_point))))
    assert_close(tv, want, OP, "float32", name="kto vs float64")


def test_kto_reference_point_is_detached_and_clamped():
    d = _pref_batch(14)
    des = np.array([True, False, False])
    cfg = PreferenceConfig(beta=30.0)
    out = torch.tensor(d["out_w"], requires_grad=True)
    loss, _, z0 = TP.kto_loss(cfg, out, _t(d["ref_w"]), _t(d["x0_w"]), _t(d["noise"]), _t(des))
    (g,) = torch.autograd.grad(loss, out)
    out2 = torch.tensor(d["out_w"], requires_grad=True)
    loss2, _, _ = TP.kto_loss(cfg, out2, _t(d["ref_w"]), _t(d["x0_w"]), _t(d["noise"]), _t(des),
                             reference_point=z0.clone())
    (g2,) = torch.autograd.grad(loss2, out2)
    assert not z0.requires_grad
    assert_close(g, g2, "exact", "float32", name="z0 detached")
    r = torch.tensor([0.3, -0.1, 0.4])
    assert float(preference.kto_reference_point(torch, r)) == pytest.approx(0.2, abs=1e-7)
    assert float(preference.kto_reference_point(torch, -r)) == 0.0


def test_kto_value_monotone_in_advantage():
    cfg = PreferenceConfig(beta=7.0, desirable_weight=1.0, undesirable_weight=1.5)
    reward = np.linspace(-2.0, 2.0, 41, dtype=np.float32)
    z0 = np.float32(0.25)
    for xp, conv in ((np, np.asarray), (torch, torch.tensor), (jnp, jnp.asarray)):
        up = np.asarray(preference.kto_value(xp, cfg, conv(reward), z0,
                                             conv(np.ones(41, bool))))
        down = np.asarray(preference.kto_value(xp, cfg, conv(reward), z0,
                                               conv(np.zeros(41, bool))))
        assert np.all(np.diff(up) > 0), xp.__name__  # desirable: more advantage, more value
        assert np.all(np.diff(down) < 0), xp.__name__  # undesirable: less value
        assert up.max() <= 1.0 and down.max() <= 1.5
        loss = np.asarray(preference.kto_loss(xp, cfg, conv(reward), z0, conv(np.ones(41, bool))))
        np.testing.assert_allclose(loss, 1.0 - up, atol=1e-7)  # loss = lambda_y - v
    # At the reference point each value is half its weight.
    half = preference.kto_value(np, cfg, np.array([z0, z0]), z0, np.array([True, False]))
    np.testing.assert_allclose(half, [0.5, 0.75], atol=1e-7)



# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, never NaNs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ConfigError, match="PreferenceConfig.beta"):
        PreferenceConfig(beta=beta)



@pytest.mark.parametrize("field,value", [("desirable_weight", 0.0), ("undesirable_weight", -1.0)])
def test_bad_kto_weights(field, value):
    with pytest.raises(ConfigError, match=f"PreferenceConfig.{field}"):
        PreferenceConfig(beta=1.0, **{field: value})



@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_mismatched_pair_shapes(backend):
    conv, mod = (_t, TP) if backend == "torch" else (_j, JP)
    d = _pref_batch(20)
    cfg = PreferenceConfig(beta=1.0)
    short = d["out_l"][:2]
    with pytest.raises(ValueError, match=r"out_l \(2, 48"):
        mod.dpo_loss(cfg, conv(d["out_w"]), conv(short), conv(d["ref_w"]), conv(d["ref_l"]),
                     conv(d["x0_w"]), conv(d["x0_l"]), conv(d["noise"]))
    with pytest.raises(ValueError, match=r"x0_l \(3, 24, 5, 3, 6\)"):
        mod.dpo_loss(cfg, conv(d["out_w"]), conv(d["out_l"]), conv(d["ref_w"]), conv(d["ref_l"]),
                     conv(d["x0_w"]), conv(d["x0_l"][..., :6]), conv(d["noise"]))
    e = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"diff_l \(2,\)"):
        preference.dpo_loss(np, cfg, e, e[:2])



@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("labels", [np.array([1, 0, 1]), np.array([1.0, 0.0, 1.0])])
def test_labels_not_boolean(backend, labels):
    conv, mod = (_t, TP) if backend == "torch" else (_j, JP)
    d = _pref_batch(21)
    with pytest.raises(ValueError, match="desirable has dtype .*expected a bool"):
        mod.kto_loss(PreferenceConfig(beta=1.0), conv(d["out_w"]), conv(d["ref_w"]),
                     conv(d["x0_w"]), conv(d["noise"]), conv(labels))



def test_labels_wrong_shape():
    with pytest.raises(ValueError, match=r"desirable has shape \(2,\)"):
        preference.kto_loss(np, PreferenceConfig(beta=1.0), np.zeros(3, np.float32), 0.0,
                            np.array([True, False]))
