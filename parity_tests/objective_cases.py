"""Shared cases of the objective tests (test_flow.py, test_preference.py, test_sampler.py): odd,
small shapes (B=3, 48 output / 24 latent channels, T=5, H=3, W=7), random inputs, the masks, and
the torch/JAX value-and-gradient helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mugv.parity_tests.tolerances import assert_close

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

def _pref_batch(seed):
    rng = _rng(seed)
    x0_w, x0_l, noise = (_normal(rng, B, C, F, H, W) for _ in range(3))
    ref_w, ref_l = (_normal(rng, B, 2 * C, F, H, W) for _ in range(2))
    # Policy = reference + a small random change, as after a few fine-tuning steps.
    out_w = ref_w + _normal(rng, *ref_w.shape, scale=0.05)
    out_l = ref_l + _normal(rng, *ref_l.shape, scale=0.05)
    return dict(out_w=out_w, out_l=out_l, ref_w=ref_w, ref_l=ref_l, x0_w=x0_w, x0_l=x0_l,
                noise=noise)
