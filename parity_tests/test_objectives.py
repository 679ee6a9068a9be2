"""Objectives and sampler: torch entry points vs the JAX oracle (values and gradients, fp32), known
answers of every formula, and clear errors for bad input.

Shapes are odd and small (B=3, 48 output / 24 latent channels, T=5, H=3, W=7); inputs random.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mugv.core import flow, preference, sampler
from mugv.core.flow import FlowConfig
from mugv.core.preference import PreferenceConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.validate import ConfigError
from mugv.jax_reference import objectives as J
from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend import objectives as T

B, C, F, H, W = 3, 24, 5, 3, 7
OP = "objective"

# Masks: None; mixed (I2V frame 0 out, one sample with two conditioning frames, one all True).
MASKS = {
    "none": None,
    "mixed": np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 1]], dtype=bool),
}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _batch(seed=0):
    rng = _rng(seed)
    return dict(out=_normal(rng, B, 2 * C, F, H, W), x0=_normal(rng, B, C, F, H, W),
                noise=_normal(rng, B, C, F, H, W))


def _t(a):
    return None if a is None else torch.tensor(a)


def _j(a):
    return None if a is None else jnp.asarray(a)


def _torch_grad(fn, *arrays):
    """fn(*tensors) -> scalar; returns (value, grads) with grads w.r.t. every array."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    value = fn(*ts)
    grads = torch.autograd.grad(value, ts)
    return value.detach(), grads


def _jax_grad(fn, *arrays):
    js = [jnp.asarray(a) for a in arrays]
    value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(js))))(*js)
    return value, grads


def _assert_pair(name, tv, jv):
    assert_close(tv, jv, OP, "float32", name=name)


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
    tv, (tg,) = _torch_grad(lambda o: T.flow_matching_loss(cfg, o, _t(d["x0"]), _t(d["noise"]),
                                                           _t(m), _t(img))[0], d["out"])
    jv, (jg,) = _jax_grad(lambda o: J.flow_matching_loss(cfg, o, _j(d["x0"]), _j(d["noise"]),
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
    _, per = T.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
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
        return (T.noisy_latents(x0, nz, s, _t(m)) * _t(wts)).sum()

    def jf(x0, nz, s):
        return (J.noisy_latents(x0, nz, s, _j(m)) * _j(wts)).sum()

    tv, tg = _torch_grad(tf, d["x0"], d["noise"], sigma)
    jv, jg = _jax_grad(jf, d["x0"], d["noise"], sigma)
    _assert_pair("weighted x_t", tv, jv)
    for name, a, b in zip(("d/dx0", "d/dnoise", "d/dsigma"), tg, jg):
        _assert_pair(name, a, b)
    xt = T.noisy_latents(_t(d["x0"]), _t(d["noise"]), _t(sigma), _t(m)).numpy()
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
    tv, (tg,) = _torch_grad(lambda x: (T.sample_sigma(cfg, x, r) ** 2).sum(), draw)
    jv, (jg,) = _jax_grad(lambda x: (J.sample_sigma(cfg, x, r) ** 2).sum(), draw)
    _assert_pair("sigma", tv, jv)
    _assert_pair("d sigma / d draw", tg, jg)
    s = T.sample_sigma(cfg, _t(draw), r).numpy()
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
# Preference losses: parity and known answers
# ---------------------------------------------------------------------------------------------

def _mse64(out, x0, noise, mask):
    """Per-sample masked MSE of the velocity half in float64 numpy."""
    err = (out[:, :C].astype(np.float64) - (x0.astype(np.float64) - noise)) ** 2
    keep = np.ones(err.shape[:1] + err.shape[2:3], bool) if mask is None else mask
    return np.array([err[b][:, keep[b]].mean() for b in range(err.shape[0])])


def _pref_batch(seed):
    rng = _rng(seed)
    x0_w, x0_l, noise = (_normal(rng, B, C, F, H, W) for _ in range(3))
    ref_w, ref_l = (_normal(rng, B, 2 * C, F, H, W) for _ in range(2))
    # Policy = reference + a small random change, as after a few fine-tuning steps.
    out_w = ref_w + _normal(rng, *ref_w.shape, scale=0.05)
    out_l = ref_l + _normal(rng, *ref_l.shape, scale=0.05)
    return dict(out_w=out_w, out_l=out_l, ref_w=ref_w, ref_l=ref_l, x0_w=x0_w, x0_l=x0_l,
                noise=noise)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("beta", [0.5, 50.0, 5000.0])
def test_dpo_parity(mask, beta):
    d = _pref_batch(8)
    m = MASKS[mask]
    cfg = PreferenceConfig(beta=beta)
    consts_t = [_t(d[k]) for k in ("ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    consts_j = [_j(d[k]) for k in ("ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    tv, tg = _torch_grad(lambda w, l: T.dpo_loss(cfg, w, l, *consts_t, _t(m))[0],
                         d["out_w"], d["out_l"])
    jv, jg = _jax_grad(lambda w, l: J.dpo_loss(cfg, w, l, *consts_j, _j(m))[0],
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
    loss, _ = T.dpo_loss(cfg, _t(d["out_w"]), _t(d["out_l"]), ref_w, _t(d["ref_l"]),
                         _t(d["x0_w"]), _t(d["x0_l"]), _t(d["noise"]))
    assert not loss.requires_grad
    (g,) = jax.grad(lambda r: J.dpo_loss(cfg, _j(d["out_w"]), _j(d["out_l"]), r, _j(d["ref_l"]),
                                         _j(d["x0_w"]), _j(d["x0_l"]), _j(d["noise"]))[0],
                    argnums=(0,))(_j(d["ref_w"]))
    assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("beta", [1.0, 1e4, 1e9])
def test_dpo_policy_equals_reference_is_log2(beta):
    d = _pref_batch(10)
    cfg = PreferenceConfig(beta=beta)
    args = [d[k] for k in ("ref_w", "ref_l", "ref_w", "ref_l", "x0_w", "x0_l", "noise")]
    lt, pt = T.dpo_loss(cfg, *map(_t, args), _t(MASKS["mixed"]))
    lj, pj = J.dpo_loss(cfg, *map(_j, args), _j(MASKS["mixed"]))
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
    loss, _ = T.dpo_loss(cfg, out, out, _t(d["ref_w"]), _t(d["ref_w"]), _t(d["x0_w"]),
                         _t(d["x0_w"]), _t(d["noise"]))
    (g,) = torch.autograd.grad(loss, out)
    assert abs(float(loss.detach()) - math.log(2.0)) < 1e-7
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
    jl, jg = jax.value_and_grad(lambda o: J.dpo_loss(
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
    v, (gw, gl) = _torch_grad(lambda w, l: T.dpo_loss(cfg, w, l, *consts)[0],
                              d["out_w"], d["out_l"])
    assert torch.isfinite(v) and torch.isfinite(gw).all() and torch.isfinite(gl).all()
    assert float(gw[0].abs().max()) > 0 and float(gw[1:].abs().max()) == 0.0
    _, per = T.dpo_loss(cfg, *(_t(d[k]) for k in ("out_w", "out_l", "ref_w", "ref_l", "x0_w",
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
    tv, (tg,) = _torch_grad(lambda o: T.kto_loss(cfg, o, _t(d["ref_w"]), _t(d["x0_w"]),
                                                 _t(d["noise"]), _t(des), _t(m),
                                                 None if z0 is None else torch.tensor(z0))[0],
                            d["out_w"])
    jv, (jg,) = _jax_grad(lambda o: J.kto_loss(cfg, o, _j(d["ref_w"]), _j(d["x0_w"]),
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
    loss, _, z0 = T.kto_loss(cfg, out, _t(d["ref_w"]), _t(d["x0_w"]), _t(d["noise"]), _t(des))
    (g,) = torch.autograd.grad(loss, out)
    out2 = torch.tensor(d["out_w"], requires_grad=True)
    loss2, _, _ = T.kto_loss(cfg, out2, _t(d["ref_w"]), _t(d["x0_w"]), _t(d["noise"]), _t(des),
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
# Sampler
# ---------------------------------------------------------------------------------------------

def _linear_model(xp, a, b):
    """A deterministic stand-in for the DiT: output (2B, 48, ...) whose velocity half is
    a * x + b * t / 1000 on the cond half and a * x on the uncond half."""
    def model(x, t, x_mask):
        n = x.shape[0] // 2
        tt = xp.reshape(t, (-1, 1, 1, 1, 1)) / 1000.0
        v = a * x + b * tt
        v = xp.concatenate([v[:n], a * x[n:]], axis=0)
        return xp.concatenate([v, 0 * v + 7.0], axis=1)  # second half: unused channels
    return model


@pytest.mark.parametrize("i2v", [False, True])
def test_sampler_parity(i2v):
    rng = _rng(15)
    noise, cond = _normal(rng, 2, C, 3, 2, 3), _normal(rng, 2, C, 3, 2, 3)
    a, b = _normal(rng, 1, C, 1, 1, 1, scale=0.3), _normal(rng, 1, C, 3, 2, 3)
    m = np.array([[False, True, True], [False, True, True]]) if i2v else None
    cfg = FlowSamplerConfig(num_steps=6, guidance_scale=3.5)
    r = 2.3

    def tf(nz):
        return T.sample(_linear_model(torch, _t(a), _t(b)), cfg, nz, r,
                                    _t(cond) if i2v else None, _t(m))

    def jf(nz):
        return J.sample(_linear_model(jnp, _j(a), _j(b)), cfg, nz, r,
                        _j(cond) if i2v else None, _j(m))

    wts = _normal(rng, *noise.shape)
    tv, (tg,) = _torch_grad(lambda nz: (tf(nz) * _t(wts)).sum(), noise)
    jv, (jg,) = _jax_grad(lambda nz: (jf(nz) * _j(wts)).sum(), noise)
    _assert_pair("sampled latents (weighted sum)", tv, jv)
    _assert_pair("d latents / d noise", tg, jg)
    _assert_pair("sampled latents", tf(_t(noise)), jf(_j(noise)))


@pytest.mark.parametrize("xp,conv", [(torch, torch.tensor), (jnp, jnp.asarray)])
def test_euler_integrates_linear_fields_exactly(xp, conv):
    rng = _rng(16)
    noise, x0, c = (_normal(rng, 2, C, 2, 3, 2) for _ in range(3))
    cfg = FlowSamplerConfig(num_steps=25, guidance_scale=4.0)
    r = float(flow.shift_ratio(FlowConfig(), 720, 1280, 14))

    def run(velocity_fn):
        state = sampler.init(xp, cfg, conv(noise), r)
        while state.step < cfg.num_steps:
            state = sampler.step(xp, cfg, state, velocity_fn)
        return np.asarray(state.z)

    # A constant field: z(0) = z(1) + c * (sum of steps = 1).
    const = run(lambda x, t, m: 0 * x + conv(np.concatenate([c, c])))
    assert_close(const, noise.astype(np.float64) + c, OP, "float32", name="constant field")
    # The rectified-flow field of one data point, v = (x0 - z) / sigma, affine in z: Euler on the
    # straight path lands exactly on x0.
    x0x = conv(np.concatenate([x0, x0]))

    def straight(x, t, m):
        return (x0x - x) / xp.reshape(t / 1000.0, (-1, 1, 1, 1, 1))

    assert_close(run(straight), x0, OP, "float32", name="straight path to x0")


def test_cfg_scale_one_is_conditional_and_order():
    rng = _rng(17)
    noise = _normal(rng, 2, C, 2, 3, 2)
    v_c, v_u = _normal(rng, 2, C, 2, 3, 2), _normal(rng, 2, C, 2, 3, 2)

    def model(x, t, m):
        return torch.cat([_t(v_c), _t(v_u)], 0)  # [cond; uncond]

    for scale in (1.0, 4.0):
        cfg = FlowSamplerConfig(num_steps=5, guidance_scale=scale)
        state = sampler.step(torch, cfg, sampler.init(torch, cfg, _t(noise)), model)
        d = float(state.sigmas[0] - state.sigmas[1])
        v = v_c if scale == 1.0 else v_u + scale * (v_c - v_u)
        assert_close(state.z, noise + d * v.astype(np.float64), OP, "float32",
                     name=f"one Euler step, cfg {scale}")
    assert_close(sampler.guided_velocity(_t(v_c), _t(v_u), 1.0), v_c, OP, "float32", name="s=1")


@pytest.mark.parametrize("xp,conv", [(torch, torch.tensor), (jnp, jnp.asarray)])
def test_i2v_frame0_fixed_and_masks_passed(xp, conv):
    rng = _rng(18)
    noise, cond = _normal(rng, 2, C, 4, 2, 3), _normal(rng, 2, C, 4, 2, 3)
    m = np.array([[False, True, True, True]] * 2)
    cfg = FlowSamplerConfig(num_steps=4)
    seen = []

    def model(x, t, x_mask):
        seen.append((np.asarray(t), np.asarray(x_mask), np.asarray(x)))
        return conv(_normal(rng, *x.shape))  # arbitrary velocity, also on frame 0

    state = sampler.init(xp, cfg, conv(noise), 3.0, conv(cond), conv(m))
    assert np.array_equal(np.asarray(state.z)[:, :, 0], cond[:, :, 0])
    assert np.array_equal(np.asarray(state.z)[:, :, 1:], noise[:, :, 1:])
    while state.step < cfg.num_steps:
        state = sampler.step(xp, cfg, state, model)
        assert np.array_equal(np.asarray(state.z)[:, :, 0], cond[:, :, 0])  # every step
    t_grid = sampler.timesteps(cfg, state)
    for i, (t, x_mask, x) in enumerate(seen):
        assert np.array_equal(t, np.full(4, t_grid[i], np.float32))
        assert np.array_equal(x_mask, np.concatenate([m, m]))
        assert np.array_equal(x[:2], x[2:])  # [z; z]


def test_bf16_output_is_upcast():
    """Mixed precision: a bf16 model output gives the fp32 loss of its upcast values."""
    d = _batch(19)
    cfg = FlowConfig()
    out_bf16 = torch.tensor(d["out"]).bfloat16()
    lt, _ = T.flow_matching_loss(cfg, out_bf16, _t(d["x0"]), _t(d["noise"]))
    ref, _ = T.flow_matching_loss(cfg, out_bf16.float(), _t(d["x0"]), _t(d["noise"]))
    assert lt.dtype == torch.float32 and float(lt) == float(ref)
    lj, _ = J.flow_matching_loss(cfg, jnp.asarray(out_bf16.float().numpy()).astype(jnp.bfloat16),
                                 _j(d["x0"]), _j(d["noise"]))
    assert lj.dtype == jnp.float32
    _assert_pair("bf16 output loss", lt, lj)


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


@pytest.mark.parametrize("kwargs,field", [
    (dict(scale=0.0), "scale"), (dict(sample_method="normal"), "sample_method"),
    (dict(num_timesteps=0), "num_timesteps"), (dict(image_weight=-0.1), "image_weight"),
    (dict(shift="yes"), "shift")])
def test_bad_flow_config(kwargs, field):
    with pytest.raises(ConfigError, match=f"FlowConfig.{field}"):
        FlowConfig(**kwargs)


def test_bad_sampler_config():
    with pytest.raises(ConfigError, match="FlowSamplerConfig.num_steps"):
        FlowSamplerConfig(num_steps=0)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_mismatched_pair_shapes(backend):
    conv, mod = (_t, T) if backend == "torch" else (_j, J)
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
    conv, mod = (_t, T) if backend == "torch" else (_j, J)
    d = _pref_batch(21)
    with pytest.raises(ValueError, match="desirable has dtype .*expected a bool"):
        mod.kto_loss(PreferenceConfig(beta=1.0), conv(d["out_w"]), conv(d["ref_w"]),
                     conv(d["x0_w"]), conv(d["noise"]), conv(labels))


def test_labels_wrong_shape():
    with pytest.raises(ValueError, match=r"desirable has shape \(2,\)"):
        preference.kto_loss(np, PreferenceConfig(beta=1.0), np.zeros(3, np.float32), 0.0,
                            np.array([True, False]))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_all_masked_sample(backend):
    conv, mod = (_t, T) if backend == "torch" else (_j, J)
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
        T.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             torch.ones(B, F))
    with pytest.raises(ValueError, match=r"frame_mask has shape \(3, 4\)"):
        T.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="model output has 24 channels.*expected 48"):
        T.flow_matching_loss(FlowConfig(), _t(d["out"][:, :C]), _t(d["x0"]), _t(d["noise"]))
    with pytest.raises(ValueError, match="is_image has dtype"):
        T.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
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
        fl = J.flow_matching_loss(fcfg, out, _j(d["x0"]), _j(d["noise"]), mask)[0]
        dl = J.dpo_loss(pcfg, *(_j(pd[k]) for k in ("out_w", "out_l", "ref_w", "ref_l", "x0_w",
                                                     "x0_l", "noise")), mask)[0]
        kl = J.kto_loss(pcfg, _j(pd["out_w"]), _j(pd["ref_w"]), _j(pd["x0_w"]), _j(pd["noise"]),
                        _j(des), mask)[0]
        return jnp.stack([fl, dl, kl])

    eager = losses(_j(d["out"]), _j(m))
    jitted = jax.jit(losses)(_j(d["out"]), _j(m))
    assert_close(jitted, eager, OP, "float32", name="jit vs eager")


def test_is_image_wrong_shape():
    d = _batch(26)
    with pytest.raises(ValueError, match=r"is_image has shape \(2,\)"):
        T.flow_matching_loss(FlowConfig(), _t(d["out"]), _t(d["x0"]), _t(d["noise"]),
                             is_image=torch.tensor([True, False]))
