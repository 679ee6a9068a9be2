"""The diffusion sampler (core/sampler.py: Euler + classifier-free guidance): torch loop
(torch_backend/sampler.py) vs the JAX oracle (jax_reference/sampler.py), exact on linear fields,
i2v frame 0 held; bad settings named. (The data's bucket sampler is test_data_sampler.py.)
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mugv.core import flow, sampler
from mugv.core.flow import FlowConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.validate import ConfigError
from mugv.jax_reference import flow as JF
from mugv.jax_reference import sampler as JS
from mugv.parity_tests.objective_cases import (C, OP, _assert_pair, _batch, _j, _jax_grad, _normal,
                                               _rng, _t, _torch_grad)
from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend import flow as TF
from mugv.torch_backend import sampler as TS


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
        return TS.sample(_linear_model(torch, _t(a), _t(b)), cfg, nz, r,
                                    _t(cond) if i2v else None, _t(m))

    def jf(nz):
        return JS.sample(_linear_model(jnp, _j(a), _j(b)), cfg, nz, r,
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
    lt, _ = TF.flow_matching_loss(cfg, out_bf16, _t(d["x0"]), _t(d["noise"]))
    ref, _ = TF.flow_matching_loss(cfg, out_bf16.float(), _t(d["x0"]), _t(d["noise"]))
    assert lt.dtype == torch.float32 and float(lt) == float(ref)
    lj, _ = JF.flow_matching_loss(cfg, jnp.asarray(out_bf16.float().numpy()).astype(jnp.bfloat16),
                                 _j(d["x0"]), _j(d["noise"]))
    assert lj.dtype == jnp.float32
    _assert_pair("bf16 output loss", lt, lj)



# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, never NaNs
# ---------------------------------------------------------------------------------------------

def test_bad_sampler_config():
    with pytest.raises(ConfigError, match="FlowSamplerConfig.num_steps"):
        FlowSamplerConfig(num_steps=0)
