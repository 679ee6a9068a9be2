"""AdaLN modulate kernel (`kernels/adaln_modulate.py`) vs its torch reference and the JAX oracle,
forward and the gradients of x, shift and scale, in fp32 and fp16 (bf16 on a GPU)."""
import pytest
import torch

from mugv.jax_reference import ops as jops
from mugv.kernels.adaln_modulate import adaln_modulate, adaln_modulate_reference
from mugv.parity_tests.kernels.harness import check_against_jax, check_every_config, check_kernel

NAMES = ["y", "dx", "dshift", "dscale"]
# (B, L, h, K): rows not a multiple of any block, hidden 72 / 288 (DiT debug sizes), a non-power-
# of-two 130, and one row set at the 10B hidden size 3456.
SHAPES = [(2, 23, 72, 2), (1, 19, 288, 1), (3, 5, 130, 2), (1, 3, 3456, 2)]


def _inputs(b, length, h, k):
    x = torch.randn(b, length, h) * 1.5 + 0.3
    shift = torch.randn(b, k, h)
    scale = torch.randn(b, k, h) * 0.5
    index = torch.randint(0, k, (b, length))
    return [x, shift, scale, index]


def _dtypes(device):
    return ["float32", "float16"] + (["bfloat16"] if device.type == "cuda" else [])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_adaln_modulate_matches_reference(shape, dtype, device):
    if dtype not in _dtypes(device):
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; checked on the GPU")
    check_kernel(adaln_modulate, adaln_modulate_reference, _inputs(*shape), dtype, device, NAMES)


def test_adaln_modulate_matches_jax(device):
    check_against_jax(adaln_modulate, jops.adaln_modulate, _inputs(2, 11, 72, 2), NAMES, device)


def test_adaln_modulate_bool_mask_and_default_index(device):
    """x_mask (bool) as the branch index, and index=None for K = 1."""
    x, shift, scale, _ = _inputs(2, 9, 40, 2)
    mask = torch.rand(2, 9) > 0.5
    check_kernel(adaln_modulate, adaln_modulate_reference, [x, shift, scale, mask], "float32",
                 device, NAMES)
    x, shift, scale, _ = _inputs(2, 9, 40, 1)
    y = adaln_modulate(x.to(device), shift.to(device), scale.to(device))
    torch.testing.assert_close(y.cpu(), adaln_modulate_reference(x, shift, scale), rtol=1e-5, atol=1e-5)


def test_adaln_modulate_rejects_bad_input(device):
    x, shift, scale, index = _inputs(1, 4, 8, 2)
    with pytest.raises(ValueError, match="index values"):
        adaln_modulate(x, shift, scale, index + 2)
    with pytest.raises(ValueError, match="scale"):
        adaln_modulate(x, shift, scale[:, :1], index)
    with pytest.raises(ValueError, match="index"):
        adaln_modulate(x, shift, scale, None)
    with pytest.raises(ValueError, match="K = 1 or 2"):  # one accumulator per branch in the backward
        adaln_modulate(x, torch.cat([shift, shift[:, :1]], 1), torch.cat([scale, scale[:, :1]], 1), index)


def test_adaln_modulate_every_launch_config(device):
    check_every_config(adaln_modulate, adaln_modulate_reference, [_inputs(*SHAPES[0]), _inputs(*SHAPES[3])],
                       ["row", "row_loop"], device, NAMES)
