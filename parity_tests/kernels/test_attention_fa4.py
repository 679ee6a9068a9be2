"""FlashAttention-4 (`attention backend "fa4"`) against a float64 reference on this GPU: output and
dQ, dK, dV, self-attention and varlen cross-attention over the real text tokens, at each model head
dim and each zero-padded head dim it could run at. `mugv verify-kernels` runs this file and records
per (head dim, padded head dim) whether both kinds passed; the backend runs only at a recorded one.

The bf16 rule is the kernels' (FlashAttention's own tests): error against the float64 reference at
most 2x the error of plain torch attention computed in bf16 (SDPA math), plus a floor of 4 bf16
ulps of the reference's scale for entries where torch happens to be exact. A wrong gradient (FA4
4.0.0b36's dQ at head dims 72 and 80 on Hopper: relative error ~1) fails by two orders.
"""
import pytest
import torch

from mugv.parity_tests.tolerances import assert_bf16_within_factor
from mugv.torch_backend.models.attention import DotProductAttention, fa4_attention, fa4_version

# (model head dim, head dim it runs at): unpadded, and the zero-paddings to multiples of 8/16/32
CASES = [(72, 72), (72, 80), (72, 96), (72, 128), (64, 64), (128, 128)]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fa4_version() is None,
                                reason="needs a CUDA GPU with flash-attn-4 installed (mugv[hopper])")


def _inputs(kind, d, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n = 2, 4
    sq, sk = (1000, 1000) if kind == "self" else (777, 300)
    q, k, v = (torch.randn(s, b, n, d, generator=g, dtype=torch.float64) for s in (sq, sk, sk))
    mask = None
    if kind == "cross":
        lengths = torch.tensor([sk, 123])
        mask = torch.arange(sk)[None, :] < lengths[:, None]
    up = torch.randn(sq, b, n * d, generator=g, dtype=torch.float64)
    return [t.cuda() for t in (q, k, v, up)], (None if mask is None else mask.cuda())


def _fwd_bwd(fn, qkv, up, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv)
    out = fn(q, k, v)
    out.backward(up.to(dtype))
    return [out.detach()] + [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("head_dim, run_at", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_fa4_equals_float64_reference(kind, head_dim, run_at):
    (q, k, v, up), mask = _inputs(kind, head_dim, seed=head_dim * 1000 + run_at)
    scale = head_dim ** -0.5
    pad = run_at - head_dim

    def fa4(q, k, v):
        q, k, v = (torch.nn.functional.pad(t.transpose(0, 1), (0, pad)).contiguous() for t in (q, k, v))
        return fa4_attention(q, k, v, mask, scale=scale)[..., :head_dim].transpose(0, 1).flatten(2)

    math = DotProductAttention("math")
    ref = _fwd_bwd(lambda q, k, v: math(q, k, v, mask), (q, k, v), up, torch.float64)
    base = _fwd_bwd(lambda q, k, v: math(q, k, v, mask), (q, k, v), up, torch.bfloat16)
    got = _fwd_bwd(fa4, (q, k, v), up, torch.bfloat16)
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        floor = 4 * 2 ** -8 * float(r.abs().max())
        assert_bf16_within_factor(g, t, r, factor=2.0, floor=floor,
                                  name=f"fa4 {kind} head dim {head_dim} run at {run_at}: {name}")
