"""Rectified flow (core/flow.py): torch mechanics (torch_backend/flow.py) vs the JAX oracle
(jax_reference/flow.py), values and gradients in fp32; the timestep shift's known answers; clear
errors for bad input. Shapes and inputs: objective_cases.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mugv.core import flow, sampler
from mugv.core.flow import FlowConfig
from mugv.core.preference import PreferenceConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.validate import ConfigError
from mugv.jax_reference import flow as JF
from mugv.jax_reference import preference as JP
from mugv.parity_tests.objective_cases import (B, C, F, H, MASKS, OP, W, _assert_pair, _batch, _j,
                                               _jax_grad, _normal, _pref_batch, _rng, _t, _torch_grad)
from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend import flow as TF


# ---------------------------------------------------------------------------------------------
# Rectified flow: parity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("with_images", [False, True])
def test_flow_loss_parity(mask, with_images):
    d = _batch(1)
    m = MASKS[mask]
    img = np.array([True, False, True]) if with_images else None
    cfg = FlowConfig()
    tv, (tg,) = _torch_grad(lambda o: TF.flow_matching_loss(cfg, o, _t(d["x0"]), _t(d["noise"]),
                                                           _t(m), _t(img))[0], d["out"])
    jv, (jg,) = _jax_grad(lambda o: JF.flow_matching_loss(cfg, o, _j(d["x0"]), _j(d["noise"]),
                                                         _j(m), _j(img))[0], d["out"])
    _assert_pair("flow loss", tv, jv)
    _assert_pair("flow loss grad", tg, jg)
    # The unused half of the output gets no gradient; masked frames neither.
    assert float(np.abs(tg[:, C:].numpy()).max()) == 0.0
    if m is not None:
        assert float(np.abs(tg[:, :C].numpy().transpose(0, 2, 1, 3, 4)[~m]).max()) == 0.0


def test_flow_loss_matches_numpy_definition():
    """The per-sample mean over C, H, W and unmasked frames, x0.3 for images, mean over B."""
    d = _batch(2)
    m = MASKS["mixed"]
    img = np.array([False, True, False])
    _, per = TF.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                                  _t(m), _t(img))
    err = (d["out"][:, :C].astype(np.float64) - (d["x0"] - d["noise"])) ** 2
    want = np.array([err[b][:, m[b]].mean() for b in range(B)]) * np.where(img, 0.3, 1.0)
    assert_close(per, want, OP, "float32", name="per-sample loss")


@pytest.mark.parametrize("mask", list(MASKS))
def test_noisy_latents_parity_several_sigma(mask):
    d = _batch(3)
    m = MASKS[mask]
    sigma = np.array([0.0, 0.37, 1.0], dtype=np.float32)  # clean, mid, pure noise
    wts = _normal(_rng(4), B, C, F, H, W)

    def tf(x0, nz, s):
        return (TF.noisy_latents(x0, nz, s, _t(m)) * _t(wts)).sum()

    def jf(x0, nz, s):
        return (JF.noisy_latents(x0, nz, s, _j(m)) * _j(wts)).sum()

    tv, tg = _torch_grad(tf, d["x0"], d["noise"], sigma)
    jv, jg = _jax_grad(jf, d["x0"], d["noise"], sigma)
    _assert_pair("weighted x_t", tv, jv)
    for name, a, b in zip(("d/dx0", "d/dnoise", "d/dsigma"), tg, jg):
        _assert_pair(name, a, b)
    xt = TF.noisy_latents(_t(d["x0"]), _t(d["noise"]), _t(sigma), _t(m)).numpy()
    assert np.array_equal(xt[0][:, m[0] if m is not None else slice(None)],
                          d["x0"][0][:, m[0] if m is not None else slice(None)])  # sigma 0: data
    keep = m[2] if m is not None else np.ones(F, bool)
    assert np.array_equal(xt[2][:, keep], d["noise"][2][:, keep])  # sigma 1: noise
    if m is not None:
        assert np.array_equal(xt[:, :, 0][~m[:, 0]], d["x0"][:, :, 0][~m[:, 0]])  # frames kept


@pytest.mark.parametrize("method", ["logit_normal", "uniform"])
@pytest.mark.parametrize("shift", [True, False])
def test_timestep_sampling_parity(method, shift):
    cfg = FlowConfig(sample_method=method, shift=shift, loc=0.3, scale=1.2)
    rng = _rng(5)
    draw = _normal(rng, 7) if method == "logit_normal" else rng.random(7).astype(np.float32)
    r = flow.shift_ratio(cfg, 720, 1280, 14)
    tv, (tg,) = _torch_grad(lambda x: (TF.sample_sigma(cfg, x, r) ** 2).sum(), draw)
    jv, (jg,) = _jax_grad(lambda x: (JF.sample_sigma(cfg, x, r) ** 2).sum(), draw)
    _assert_pair("sigma", tv, jv)
    _assert_pair("d sigma / d draw", tg, jg)
    s = TF.sample_sigma(cfg, _t(draw), r).numpy()
    assert s.dtype == np.float32 and np.all((s >= 0) & (s <= 1))
    base = 1 / (1 + np.exp(-(0.3 + 1.2 * draw.astype(np.float64)))) if method == "logit_normal" \
        else draw.astype(np.float64)
    want = float(r) * base / (1 + (float(r) - 1) * base) if shift else base
    assert_close(s, want, OP, "float32", name="sigma vs float64 formula")


# ---------------------------------------------------------------------------------------------
# Timestep shift: known answers
# ---------------------------------------------------------------------------------------------

def test_shift_is_identity_at_r1():
    sigma = _rng(6).random(101).astype(np.float32)
    for xp, conv in ((np, np.asarray), (torch, torch.tensor), (jnp, jnp.asarray)):
        out = np.asarray(flow.timestep_shift(conv(sigma), 1.0))
        assert np.array_equal(out, sigma), xp.__name__
    cfg = FlowConfig()
    assert flow.shift_ratio(cfg, 512, 512, 1) == np.float32(1.0)


def test_shift_ratio_720p_14_frames():
    cfg = FlowConfig()
    r = flow.shift_ratio(cfg, 720, 1280, 14)
    assert isinstance(r, np.float32)
    assert r == np.float32(1.875 * math.sqrt(14))  # sqrt(720*1280/512^2) = 1.875 exactly
    assert abs(float(r) - 7.0156) < 1e-4  # "about 7.016" (the bf16 inference path gets 7.0)
    assert flow.shift_ratio(cfg, 1280, 720, 1) == np.float32(1.875)  # an image: F = 1
    s = np.linspace(0, 1, 11, dtype=np.float32)
    shifted = flow.timestep_shift(s, r)
    assert shifted[0] == 0 and shifted[-1] == 1 and np.all(np.diff(shifted) > 0)
    assert np.all(shifted[1:-1] > s[1:-1])  # r > 1 moves mass towards noise


def test_sigma_grid_reproduces_the_notes():
    """With the inference path's bf16 r = 7.0 the grid is the notes' 1000, 994.1, 987.7, ...,
    488.4, 378.4, 225.8; the last step ends exactly at sigma 0."""
    scfg = FlowSamplerConfig()
    g = sampler.sigma_grid(25, 7.0)
    assert g.dtype == np.float32 and g.shape == (26,) and g[0] == 1 and g[-1] == 0
    t = g * 1000
    np.testing.assert_allclose(t[[1, 2, 22, 23, 24]], [994.1, 987.7, 488.4, 378.4, 225.8],
                               atol=0.05)
    state = sampler.init(np, scfg, _normal(_rng(7), 1, 2, 1, 1, 1), 7.0)
    np.testing.assert_array_equal(sampler.timesteps(scfg, state), t[:25])



# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, never NaNs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(scale=0.0), "scale"), (dict(sample_method="normal"), "sample_method"),
    (dict(num_timesteps=0), "num_timesteps"), (dict(image_weight=-0.1), "image_weight"),
    (dict(shift="yes"), "shift")])
def test_bad_flow_config(kwargs, field):
    with pytest.raises(ConfigError, match=f"FlowConfig.{field}"):
        FlowConfig(**kwargs)



@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_all_masked_sample(backend):
    conv, mod = (_t, TF) if backend == "torch" else (_j, JF)
    d = _batch(22)
    m = MASKS["mixed"].copy()
    m[1] = False
    with pytest.raises(ValueError, match=r"frame_mask is all False for sample\(s\) \[1\]"):
        mod.flow_matching_loss(FlowConfig(), conv(d["out"]), conv(d["x0"]), conv(d["noise"]),
                               conv(m))
    with pytest.raises(ValueError, match="frame_mask is all False"):
        sampler.init(torch if backend == "torch" else jnp, FlowSamplerConfig(), conv(d["x0"]),
                     1.0, conv(d["x0"]), conv(m))



def test_bad_masks_and_outputs():
    d = _batch(23)
    with pytest.raises(ValueError, match="frame_mask has dtype"):
        TF.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             torch.ones(B, F))
    with pytest.raises(ValueError, match=r"frame_mask has shape \(3, 4\)"):
        TF.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="model output has 24 channels.*expected 48"):
        TF.flow_matching_loss(FlowConfig(), _t(d["out"][:, :C]), _t(d["x0"]), _t(d["noise"]))
    with pytest.raises(ValueError, match="is_image has dtype"):
        TF.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             is_image=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shift_ratio: frames = 0"):
        flow.shift_ratio(FlowConfig(), 720, 1280, 0)
    with pytest.raises(ValueError, match="pass cond_latent and frame_mask together"):
        sampler.init(np, FlowSamplerConfig(), d["x0"], 1.0, cond_latent=d["x0"])



def test_jax_entry_points_jit():
    """Under jax.jit the mask is a tracer: value checks are skipped, results unchanged."""
    d, pd = _batch(24), _pref_batch(25)
    m, des = MASKS["mixed"], np.array([False, True, True])
    fcfg, pcfg = FlowConfig(), PreferenceConfig(beta=40.0)

    def losses(out, mask):
        fl = JF.flow_matching_loss(fcfg, out, _j(d["x0"]), _j(d["noise"]), mask)[0]
        dl = JP.dpo_loss(pcfg, *(_j(pd[k]) for k in ("out_w", "out_l", "ref_w", "ref_l", "x0_w",
                                                     "x0_l", "noise")), mask)[0]
        kl = JP.kto_loss(pcfg, _j(pd["out_w"]), _j(pd["ref_w"]), _j(pd["x0_w"]), _j(pd["noise"]),
                        _j(des), mask)[0]
        return jnp.stack([fl, dl, kl])

    eager = losses(_j(d["out"]), _j(m))
    jitted = jax.jit(losses)(_j(d["out"]), _j(m))
    assert_close(jitted, eager, OP, "float32", name="jit vs eager")



def test_is_image_wrong_shape():
    d = _batch(26)
    with pytest.raises(ValueError, match=r"is_image has shape \(2,\)"):
        TF.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             is_image=torch.tensor([True, False]))
