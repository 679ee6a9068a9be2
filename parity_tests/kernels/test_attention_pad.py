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


@pytest.mark.parametrize("lengths", [[11, 4, 1], [11, 11, 11], [1, 1, 1]])
def test_packed_keys_equal_boolean_indexing(lengths):
    """FA4's cross-attention packs the real text keys with `pack_keys` (no host sync): the first
    cu[-1] rows are exactly `k[key_mask]`, the rest zeros; the gradient reaching k is boolean
    indexing's even where the kernel leaves the rows past cu[-1] as garbage (here NaN), and a row's
    masked keys get none. Mask positions are scattered, not a prefix, to test the order."""
    from mugv.torch_backend.models.attention import pack_keys
    gen = torch.Generator(device="cpu").manual_seed(sum(lengths))
    b, sk, n, d = len(lengths), 11, 3, 8
    mask = torch.zeros(b, sk, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, torch.randperm(sk, generator=gen)[:length]] = True
    k = torch.randn(b, sk, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, sk, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    cu, (kp, vp) = pack_keys(mask, k, v)
    total = sum(lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert kp.shape == (b * sk, n, d) and vp.shape == (b * sk, n, d)
    assert torch.equal(kp[:total], k[mask]) and torch.equal(vp[:total], v[mask])
    assert torch.count_nonzero(kp[total:]) == 0 and torch.count_nonzero(vp[total:]) == 0
    up_k = torch.randn(b * sk, n, d, generator=gen, dtype=torch.float64)
    up_v = torch.randn(b * sk, n, d, generator=gen, dtype=torch.float64)
    up_k[total:] = float("nan")   # what an unwritten gradient buffer may hold
    up_v[total:] = float("nan")
    gk, gv = torch.autograd.grad((kp * up_k).nansum() + (vp * up_v).nansum(), (k, v))
    kb, vb = (t.detach().requires_grad_() for t in (k, v))
    rk, rv = torch.autograd.grad((kb[mask] * up_k[:total]).sum() + (vb[mask] * up_v[:total]).sum(), (kb, vb))
    assert torch.equal(gk, rk) and torch.equal(gv, rv)
    assert torch.count_nonzero(gk[~mask]) == 0


def test_packed_keys_name_bad_input():
    from mugv.torch_backend.models.attention import pack_keys
    with pytest.raises(ValueError, match="key_mask: expected a .batch, keys. bool tensor"):
        pack_keys(torch.ones(2, 3), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"tensor of shape \(2, 4, 1\) does not start with the key mask's shape \(2, 3\)"):
        pack_keys(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, 1))
