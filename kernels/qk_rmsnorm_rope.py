"""Per-head QK-RMSNorm fused with the interleaved 3D RoPE rotation of MUG-DiT self-attention
(forward-notes 1.11 and 1.13):

    n   = q * rsqrt(mean_d(q^2) + eps) * weight          (per head, weight shared by all heads)
    out[2p], out[2p+1] = n[2p] cos a_p - n[2p+1] sin a_p,  n[2p] sin a_p + n[2p+1] cos a_p

with angles a (B, L, d/2) from `mugv.core.rope.rope_angles` (pairs 0..11 h axis, 12..23 w, 24..35
t at head dim 72). Applied to q and to k, each with its own weight.

Reference: `qk_rmsnorm_rope_reference` (plain torch, as the official code: normalise in fp32, cast
to the input dtype, multiply by the weight, rotate in fp32, cast back). The Triton path keeps fp32
from load to store, skipping the intermediate cast.
"""
from __future__ import annotations

import torch

from mugv.kernels import _launch
from mugv.kernels._launch import check

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def rope_rotate_reference(x, angles):
    """Rotate interleaved pairs of x (B, L, n_heads, d) by angles (B, L, d/2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    cos = torch.cos(angles.float()).unsqueeze(2)
    sin = torch.sin(angles.float()).unsqueeze(2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def qk_rmsnorm_rope_reference(q, weight, angles, eps: float = 1e-6):
    """Plain torch: RMSNorm over the head dim (fp32, cast back, times weight), then RoPE."""
    qf = q.float()
    normed = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)).to(q.dtype) * weight
    return rope_rotate_reference(normed, angles)


@_launch.tuned(["NH", "P"])
@triton.jit
def _qk_fwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
                   L, NH, P, stride_qb, stride_ql, stride_ab, stride_al, eps,
                   BLOCK_NH: tl.constexpr, BLOCK_P: tl.constexpr):
    # One program per token: a (heads x pairs) tile; even and odd features are loaded as two
    # stride-2 views so the rotation needs no shuffles. cos/sin of the token's angles are read
    # once per token (computing them here cost 48x redundant libdevice sin/cos: 7% of the copy
    # bandwidth at 720p in the first H100 run).
    tok = tl.program_id(0).to(tl.int64)
    b = tok // L
    l = tok % L
    heads = tl.arange(0, BLOCK_NH)
    pairs = tl.arange(0, BLOCK_P)
    d = 2 * P
    mask = (heads[:, None] < NH) & (pairs[None, :] < P)
    src = q_ptr + b * stride_qb + l * stride_ql + heads[:, None] * d + 2 * pairs[None, :]
    qa = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    qb = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(qa * qa + qb * qb, axis=1) / d + eps)
    pmask = pairs < P
    wa = tl.load(w_ptr + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
    rot = b * stride_ab + l * stride_al + pairs
    cos = tl.load(cos_ptr + rot, mask=pmask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + rot, mask=pmask, other=0.0)[None, :]
    ua = qa * rstd[:, None] * wa[None, :]
    ub = qb * rstd[:, None] * wb[None, :]
    dst = out_ptr + tok * NH * d + heads[:, None] * d + 2 * pairs[None, :]
    tl.store(dst, (ua * cos - ub * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + 1, (ua * sin + ub * cos).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + tok * NH + heads, rstd, mask=heads < NH)


@_launch.tuned(["NH", "P"])
@triton.jit
def _qk_bwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dout_ptr, dq_ptr, dw_part_ptr,
                   L, NH, P, stride_qb, stride_ql, stride_ab, stride_al, tokens_per_program,
                   n_tokens, BLOCK_NH: tl.constexpr, BLOCK_P: tl.constexpr):
    # Program c walks tokens [c * tokens_per_program, ...): rotate the incoming gradient back
    # (R^T), then the RMSNorm backward per head; fp32 sums of du * n per weight entry go to one
    # partial per program, summed in torch.
    c = tl.program_id(0)
    heads = tl.arange(0, BLOCK_NH)
    pairs = tl.arange(0, BLOCK_P)
    d = 2 * P
    mask = (heads[:, None] < NH) & (pairs[None, :] < P)
    pmask = pairs < P
    wa = tl.load(w_ptr + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
    acc_a = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_P,), dtype=tl.float32)
    start = c.to(tl.int64) * tokens_per_program
    count = tl.minimum(start + tokens_per_program, n_tokens) - start
    for i in range(0, count):
        tok = start + i  # int64 (the loop index is a plain int in the interpreter)
        b = tok // L
        l = tok % L
        src = q_ptr + b * stride_qb + l * stride_ql + heads[:, None] * d + 2 * pairs[None, :]
        na = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        nb = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tok * NH + heads, mask=heads < NH, other=0.0)[:, None]
        na = na * rstd
        nb = nb * rstd
        g = dout_ptr + tok * NH * d + heads[:, None] * d + 2 * pairs[None, :]
        ga = tl.load(g, mask=mask, other=0.0).to(tl.float32)
        gb = tl.load(g + 1, mask=mask, other=0.0).to(tl.float32)
        rot = b * stride_ab + l * stride_al + pairs
        cos = tl.load(cos_ptr + rot, mask=pmask, other=0.0)[None, :]
        sin = tl.load(sin_ptr + rot, mask=pmask, other=0.0)[None, :]
        dua = ga * cos + gb * sin
        dub = gb * cos - ga * sin
        acc_a += tl.sum(dua * na, axis=0)
        acc_b += tl.sum(dub * nb, axis=0)
        dna = dua * wa[None, :]
        dnb = dub * wb[None, :]
        proj = tl.sum(dna * na + dnb * nb, axis=1)[:, None] / d
        dst = dq_ptr + tok * NH * d + heads[:, None] * d + 2 * pairs[None, :]
        tl.store(dst, ((dna - na * proj) * rstd).to(dq_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, ((dnb - nb * proj) * rstd).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + c * d + 2 * pairs, acc_a, mask=pmask)
    tl.store(dw_part_ptr + c * d + 2 * pairs + 1, acc_b, mask=pmask)


def _validate(q, weight, angles):
    check(q.dim() == 4, "qk_rmsnorm_rope: q", tuple(q.shape), "(B, L, n_heads, head_dim)")
    b, length, nh, d = q.shape
    check(d % 2 == 0, "qk_rmsnorm_rope: head_dim", d, "an even number (interleaved pairs)")
    check(q.stride(3) == 1 and q.stride(2) == d, "qk_rmsnorm_rope: q strides", q.stride(),
          "heads and head_dim contiguous (any batch/token strides)")
    check(tuple(weight.shape) == (d,), "qk_rmsnorm_rope: weight", tuple(weight.shape), f"({d},)")
    check(angles.dim() == 3 and angles.shape[1:] == (length, d // 2) and angles.shape[0] in (1, b),
          "qk_rmsnorm_rope: angles", tuple(angles.shape), f"({b} or 1, {length}, {d // 2})")
    check(angles.stride(2) == 1, "qk_rmsnorm_rope: angles strides", angles.stride(), "last dim contiguous")


def _angle_strides(table):
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


class _QKRMSNormRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, weight, angles, eps):
        _launch.check_runnable()
        _validate(q, weight, angles)
        b, length, nh, d = q.shape
        # fp32 cos/sin once per call (B or 1, L, d/2): 4% of q's bytes at head dim 72.
        angles = angles.float()
        cos, sin = torch.cos(angles).contiguous(), torch.sin(angles).contiguous()
        weight = weight.contiguous()
        out = torch.empty((b, length, nh, d), dtype=q.dtype, device=q.device)
        rstd = torch.empty((b * length * nh,), dtype=torch.float32, device=q.device)
        block_nh, block_p = triton.next_power_of_2(nh), triton.next_power_of_2(d // 2)
        _qk_fwd_kernel[(b * length,)](q, weight, cos, sin, out, rstd, length, nh, d // 2,
                                      q.stride(0), q.stride(1), *_angle_strides(cos), eps,
                                      BLOCK_NH=block_nh, BLOCK_P=block_p,
                                      **_launch.warps())
        ctx.save_for_backward(q, weight, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, weight, cos, sin, rstd = ctx.saved_tensors
        b, length, nh, d = q.shape
        dout = dout.contiguous()
        dq = torch.empty((b, length, nh, d), dtype=q.dtype, device=q.device)
        n_tokens = b * length
        n_prog = max(1, min(n_tokens, _launch.reduction_programs(q.device)))
        per = triton.cdiv(n_tokens, n_prog)
        n_prog = triton.cdiv(n_tokens, per)
        dw = torch.empty((n_prog, d), dtype=torch.float32, device=q.device)
        block_nh, block_p = triton.next_power_of_2(nh), triton.next_power_of_2(d // 2)
        _qk_bwd_kernel[(n_prog,)](q, weight, cos, sin, rstd, dout, dq, dw, length, nh, d // 2,
                                  q.stride(0), q.stride(1), *_angle_strides(cos), per, n_tokens,
                                  BLOCK_NH=block_nh, BLOCK_P=block_p,
                                  **_launch.warps())
        return dq, dw.sum(0).to(weight.dtype), None, None


def qk_rmsnorm_rope(q, weight, angles, eps: float = 1e-6):
    """Fused per-head RMSNorm and interleaved RoPE (Triton; equals `qk_rmsnorm_rope_reference`).

    Arguments:
        q: (B, L, n_heads, d) queries or keys; heads and head_dim contiguous (a view of the fused
            qkv projection output is fine).
        weight: (d,) RMSNorm weight shared by all heads.
        angles: (B or 1, L, d/2) rotation angles (`core/rope.py::rope_angles`); not differentiated.
        eps: RMSNorm epsilon (1e-6 in MUG-DiT).
    Returns:
        (B, L, n_heads, d) contiguous, in q's dtype. Gradients flow to q and weight.
    """
    return _QKRMSNormRoPE.apply(q, weight, angles, eps)
