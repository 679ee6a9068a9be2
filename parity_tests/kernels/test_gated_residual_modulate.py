"""Gated residual + AdaLN modulate kernel (`kernels/gated_residual_modulate.py`) vs its torch
reference and the JAX oracle: both outputs (x', out) and the gradients of x, y, gate, shift and
scale, in fp32 and fp16 (bf16 on a GPU), with and without a gradient flowing into x'."""
import pytest
import torch

from mugv.jax_reference import ops as jops
from mugv.kernels.gated_residual_modulate import (gated_residual_modulate,
                                                  gated_residual_modulate_reference)
from mugv.parity_tests.kernels.harness import check_against_jax, check_every_config, check_kernel

NAMES = ["x_res", "out", "dx", "dy", "dgate", "dshift", "dscale"]
SHAPES = [(2, 23, 72, 2), (1, 19, 288, 1), (3, 5, 130, 2), (1, 3, 3456, 2)]


def _inputs(b, length, h, k):
    x = torch.randn(b, length, h) * 1.5 + 0.3
    y = torch.randn(b, length, h)
    gate, shift = torch.randn(b, k, h), torch.randn(b, k, h)
    scale = torch.randn(b, k, h) * 0.5
    return [x, y, gate, shift, scale, torch.randint(0, k, (b, length))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gated_residual_modulate_matches_reference(shape, dtype, device):
    if dtype == "bfloat16" and device.type != "cuda":
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; checked on the GPU")
    check_kernel(gated_residual_modulate, gated_residual_modulate_reference, _inputs(*shape),
                 dtype, device, NAMES)


def test_gated_residual_modulate_only_out_used(device):
    """x' unused downstream (its gradient is None): the kernel's HAS_DXRES=False path."""
    inputs = [t.to(device) for t in _inputs(2, 7, 72, 2)]
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    g = torch.randn(2, 7, 72, device=device)
    grads = torch.autograd.grad(gated_residual_modulate(*leaves)[1], leaves[:5], g)
    expected = torch.autograd.grad(gated_residual_modulate_reference(*ref)[1], ref[:5], g)
    from mugv.parity_tests.tolerances import assert_close
    for a, e, name in zip(grads, expected, NAMES[2:]):
        assert_close(a, e, "kernel", "float32", name=name)


def test_gated_residual_modulate_matches_jax(device):
    check_against_jax(gated_residual_modulate, jops.gated_residual_modulate, _inputs(2, 11, 72, 2),
                      NAMES, device)


def test_gated_residual_modulate_rejects_bad_input(device):
    x, y, gate, shift, scale, index = _inputs(1, 4, 8, 2)
    with pytest.raises(ValueError, match="y"):
        gated_residual_modulate(x, y[:, :3], gate, shift, scale, index)
    with pytest.raises(ValueError, match="gate"):
        gated_residual_modulate(x, y, gate[..., :4], shift, scale, index)


def test_gated_residual_modulate_every_launch_config(device):
    check_every_config(gated_residual_modulate, gated_residual_modulate_reference,
                       [_inputs(*SHAPES[0]), _inputs(*SHAPES[3])], ["row", "row_loop"], device, NAMES)
