"""Padding the head dim with zero features (DotProductAttention(pad_head_dim=...)) is exact: the
same output and the same q/k/v gradients as unpadded attention, self-attention and masked
cross-attention, at head dim 72 padded to 80 and 128. The performance reason is in
docs/benchmarks.md (issue 13); here only the arithmetic."""
import pytest
import torch

from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend.models.attention import DotProductAttention


def _run(attn, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(q, k, v, mask)
    out.backward(torch.randn_like(out, generator=None))
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("pad", [80, 128])
@pytest.mark.parametrize("cross", [False, True])
def test_padded_head_dim_is_exact(device, pad, cross):
    gen = torch.Generator(device="cpu").manual_seed(pad + cross)
    sq, sk, b, n, d = 37, (11 if cross else 37), 2, 3, 72
    q = torch.randn(sq, b, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sk, b, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sk, b, n, d, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, sk, generator=gen) > 0.3) if cross else None
    if mask is not None:
        mask[:, 0] = True  # every row needs one key
    q, k, v = (t.to(device) for t in (q, k, v))
    mask = None if mask is None else mask.to(device)
    torch.manual_seed(0)
    ref_out, ref_grads = _run(DotProductAttention("math"), q, k, v, mask)
    torch.manual_seed(0)
    out, grads = _run(DotProductAttention("math", pad_head_dim=pad), q, k, v, mask)
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, "*", "float64", name="out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, "*", "float64", name=f"d{name}")


def test_bad_pad_is_named():
    with pytest.raises(ValueError, match="pad_head_dim"):
        DotProductAttention("math", pad_head_dim=75)
    attn = DotProductAttention("math", pad_head_dim=64)
    x = torch.randn(3, 1, 2, 72)
    with pytest.raises(ValueError, match="pad_head_dim=64"):
        attn(x, x, x)
