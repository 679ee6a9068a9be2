"""Shared check of a fused kernel against its plain-torch reference, forward and every gradient.

fp32 / fp16: the kernel in that dtype against the reference run in fp32 on the same (rounded)
inputs (float64 where a test asks), within the ("kernel", dtype) row of the tolerance table; the kernels compute in fp32 and
round once at the store, which is what this measures. bf16 (GPU only; the interpreter's bf16
arithmetic is broken, platform notes): error against that fp32 reference at most 2x the error of
the reference computed in plain torch bf16 (FlashAttention's rule).
"""
from __future__ import annotations

import torch

from mugv.parity_tests.tolerances import assert_bf16_within_factor, assert_close

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _leaves(inputs, dtype, device, constants=()):
    """Floating inputs cast to dtype (requires_grad); `constants` (positions: fp32 tables such as
    RoPE angles, not differentiated) and integer inputs only moved to the device."""
    return [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
            if t.is_floating_point() and i not in constants else t.to(device)
            for i, t in enumerate(inputs)]


def run_with_grads(fn, leaves, upstream, **kwargs):
    """Outputs and gradients of every floating leaf for the given upstream gradients."""
    outs = _as_tuple(fn(*leaves, **kwargs))
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, diff, [g.to(device=o.device, dtype=o.dtype) for o, g in zip(outs, upstream)])
    return [o.detach() for o in outs], [g.detach() for g in grads]


class _Reround(torch.autograd.Function):
    """The identity, but its value (forward=True) or the gradient through it (forward=False) is
    multiplied by 1 + e, e uniform in [-unit, unit] per element (drawn from a CPU generator)."""

    @staticmethod
    def forward(ctx, t, unit, generator, forward):
        ctx.unit, ctx.generator, ctx.forward = unit, generator, forward
        return _jitter(t, unit, generator) if forward else t.clone()

    @staticmethod
    def backward(ctx, g):
        return (g if ctx.forward else _jitter(g, ctx.unit, ctx.generator)), None, None, None


def _jitter(t, unit, generator):
    e = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1
    return t * (1 + unit * e.to(device=t.device, dtype=t.dtype))


def rerounded(op, generator: torch.Generator, unit: float = 2.0 ** -24):
    """`op` with its rounding drawn again: its output and the gradient it returns for every
    tensor input that requires one are each rounded once more (times 1 + e, |e| <= unit, fresh
    per element and call). A model test runs its reference model with this at the sites a kernel
    replaces to sample how far from float64 an fp32 implementation of the same accuracy lands
    (tolerances.assert_sharded_vs_float64's `redraws`)."""
    def run(*args, **kwargs):
        args = [_Reround.apply(a, unit, generator, False) if torch.is_tensor(a) and a.requires_grad else a
                for a in args]
        return _Reround.apply(op(*args, **kwargs), unit, generator, True)
    run.__name__ = f"rerounded({getattr(op, '__name__', op)})"
    return run


def check_kernel(kernel, reference, inputs, dtype: str, device, names, factor: float = 2.0,
                 constants=(), reference_dtype=torch.float32, **kwargs):
    """Compare kernel(*inputs) with reference(*inputs): outputs and gradients of all float inputs.

    inputs: fp32 (and integer) CPU tensors, random; names: labels of outputs then gradients.
    Returns {name: relative error} for fp32/fp16 (empty for bf16).
    """
    tdtype = DTYPES[dtype]
    leaves = _leaves(inputs, tdtype, device, constants)
    with torch.no_grad():
        probe = _as_tuple(reference(*[t.float() if t.is_floating_point() else t for t in leaves], **kwargs))
    upstream = [torch.randn(o.shape, dtype=torch.float32).to(device=device, dtype=tdtype).float()
                for o in probe]
    ref_leaves = [t.detach().to(reference_dtype).requires_grad_() if t.requires_grad
                  else (t.to(reference_dtype) if t.is_floating_point() else t) for t in leaves]
    ref_out, ref_grads = run_with_grads(reference, ref_leaves, upstream, **kwargs)
    out, grads = run_with_grads(kernel, leaves, upstream, **kwargs)
    actual, expected = out + grads, ref_out + ref_grads
    assert len(names) == len(actual), f"names {names} vs {len(actual)} tensors"
    for a, name in zip(actual, names):
        assert a.dtype == tdtype, f"{name}: dtype {a.dtype}, expected {tdtype}"
    if dtype == "bfloat16":
        plain = _leaves([t.detach() for t in leaves], tdtype, device, constants)
        plain_out, plain_grads = run_with_grads(reference, plain, upstream, **kwargs)
        for a, p, e, name in zip(actual, plain_out + plain_grads, expected, names):
            assert_bf16_within_factor(a, p, e, factor=factor, name=name)
        return {}
    return {name: assert_close(a, e, "kernel", dtype, name=name) for a, e, name in zip(actual, expected, names)}


def check_against_jax(kernel, jax_fn, inputs, names, device, constants=(), **kwargs):
    """fp32 kernel against the jax.numpy oracle of `jax_reference/ops.py`: outputs and the VJP
    with the same random upstream gradients, within the ("kernel", "float32") row."""
    import jax
    import numpy as np

    leaves = _leaves(inputs, torch.float32, device, constants)
    outs = _as_tuple(kernel(*leaves, **kwargs))
    upstream = [torch.randn(o.shape, dtype=torch.float32) for o in outs]
    out, grads = run_with_grads(kernel, leaves, upstream, **kwargs)

    floats = [i for i, t in enumerate(inputs) if t.is_floating_point() and i not in constants]
    arrays = [np.asarray(t.detach().numpy()) for t in inputs]

    def f(*diff):
        args = list(arrays)
        for i, a in zip(floats, diff):
            args[i] = a
        return jax_fn(*args, **kwargs)

    jout, vjp = jax.vjp(f, *[arrays[i] for i in floats])
    jout = jout if isinstance(jout, tuple) else (jout,)
    cot = tuple(np.asarray(g.numpy()) for g in upstream)
    jgrads = vjp(cot if len(cot) > 1 else cot[0])
    for a, e, name in zip(out + grads, list(jout) + list(jgrads), names):
        assert_close(a, np.asarray(e), "kernel", "float32", name=f"{name} vs JAX")


def check_every_config(kernel, reference, cases, families, device, names, **kwargs):
    """The fp32 check above once per autotune config of each launch family the kernel uses
    (kernels/_launch.py FAMILIES), the others at their fixed config: production autotunes over these
    on the GPU, so each must be correct, masked tails and loop remainders included (`cases`: input
    lists whose sizes are no multiple of any block). GPU only: the interpreter runs one config."""
    import pytest

    from triton.runtime.errors import OutOfResources

    from mugv.kernels import _launch
    if device.type != "cuda":
        pytest.skip("the interpreter runs one launch config; every autotune config is checked on the GPU")
    for family in families:
        for i in range(len(_launch.FAMILIES[family][0])):
            with _launch.forced_config(family, i) as config:
                for inputs in cases:
                    try:
                        check_kernel(kernel, reference, inputs, "float32", device, names, **kwargs)
                    except OutOfResources:   # the autotuner prunes such a config too
                        break
                    except AssertionError as err:
                        raise AssertionError(f"launch family {family} config {i} {config}: {err}") from None
