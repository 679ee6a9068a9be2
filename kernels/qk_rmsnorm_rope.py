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


@triton.jit
def _qk_row_offsets(pid, L, n_rows, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
                    NH: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr, ROWS: tl.constexpr):
    """Rows (token, head) of program `pid`: their mask, q offsets and angle-table offsets.

    v4: int32 index math with the head count as a constant (a multiply-shift, where v3 divided in
    int64 per row), and every stride passed divided by its alignment and multiplied back here, so the
    compiler knows each row starts on an ALIGN_Q (ALIGN_A) element boundary and issues 16-byte vector loads
    (a runtime head stride of 72 or 216 elements is not a multiple of 16, which is all Triton
    assumes about integer arguments; v3 fell back to narrow loads)."""
    row = pid * ROWS + tl.arange(0, ROWS)
    rmask = row < n_rows
    tok = row // NH
    h = row - tok * NH
    b = tok // L
    l = tok - b * L
    qoff = (b.to(tl.int64) * stride_qb + l.to(tl.int64) * stride_ql + h.to(tl.int64) * stride_qh) * ALIGN_Q
    aoff = (b.to(tl.int64) * stride_ab + l.to(tl.int64) * stride_al) * ALIGN_A
    return row.to(tl.int64), rmask, qoff, aoff


@_launch.tuned(["L"], "tile")
@triton.jit
def _qk_fwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
                   L, n_rows, stride_qb, stride_ql, stride_qh, stride_ab, stride_al, eps,
                   NH: tl.constexpr, D: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr,
                   BLOCK_P: tl.constexpr, ROWS: tl.constexpr):
    # One program per tile of ROWS (token, head) rows (ROWS autotuned; a grid-stride pipelined
    # walk, v5, ran at 59% of the copy bandwidth against 78% for this). Each row's D = 2P features
    # are loaded as one contiguous run and split into (even, odd) pairs in registers (v2 read even
    # and odd features as two stride-2 views: 7%). Any head stride: q may be a view of the fused
    # (head, q|k|v, dim) projection, no copy first.
    row, rmask, qoff, aoff = _qk_row_offsets(tl.program_id(0), L, n_rows, stride_qb, stride_ql, stride_qh,
                                             stride_ab, stride_al, NH, ALIGN_Q, ALIGN_A, ROWS)
    P: tl.constexpr = D // 2
    cols = tl.arange(0, 2 * BLOCK_P)
    mask = rmask[:, None] & (cols[None, :] < D)
    x = tl.load(q_ptr + qoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    u = x * rstd[:, None] * w[None, :]
    ua, ub = tl.split(tl.reshape(u, (ROWS, BLOCK_P, 2)))
    pairs = tl.arange(0, BLOCK_P)
    amask = rmask[:, None] & (pairs[None, :] < P)
    cos = tl.load(cos_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
    sin = tl.load(sin_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
    y = tl.reshape(tl.join(ua * cos - ub * sin, ua * sin + ub * cos), (ROWS, 2 * BLOCK_P))
    tl.store(out_ptr + row[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=rmask)


@_launch.tuned(["L"], "tile_loop")
@triton.jit
def _qk_bwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dout_ptr, dq_ptr, dw_part_ptr,
                   L, n_rows, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
                   NH: tl.constexpr, D: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr,
                   BLOCK_P: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr, PER_SM: tl.constexpr):
    # A grid-stride walk over tiles of the forward's shape (PER_SM programs per SM: the grid, set
    # on the host). Rotate the incoming gradient back (R^T) in pair registers, then the
    # RMSNorm backward per row; du * n is summed elementwise over the program's tiles (no
    # cross-row reduction inside the loop) and reduced to one fp32 partial per program at the
    # end, summed in torch.
    P: tl.constexpr = D // 2
    cols = tl.arange(0, 2 * BLOCK_P)
    pairs = tl.arange(0, BLOCK_P)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    acc = tl.zeros((ROWS, 2 * BLOCK_P), dtype=tl.float32)
    for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0), num_stages=STAGES):
        row, rmask, qoff, aoff = _qk_row_offsets(tile, L, n_rows, stride_qb, stride_ql, stride_qh,
                                                 stride_ab, stride_al, NH, ALIGN_Q, ALIGN_A, ROWS)
        mask = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(q_ptr + qoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
        n = x * rstd[:, None]
        g = tl.load(dout_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ga, gb = tl.split(tl.reshape(g, (ROWS, BLOCK_P, 2)))
        amask = rmask[:, None] & (pairs[None, :] < P)
        cos = tl.load(cos_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
        sin = tl.load(sin_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
        du = tl.reshape(tl.join(ga * cos + gb * sin, gb * cos - ga * sin), (ROWS, 2 * BLOCK_P))
        acc += du * n  # masked rows and columns are 0
        dn = du * w[None, :]
        proj = tl.sum(dn * n, axis=1)[:, None] / D
        tl.store(dq_ptr + row[:, None] * D + cols[None, :],
                 ((dn - n * proj) * rstd[:, None]).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cols < D)


def _validate(q, weight, angles):
    check(q.dim() == 4, "qk_rmsnorm_rope: q", tuple(q.shape), "(B, L, n_heads, head_dim)")
    b, length, nh, d = q.shape
    check(d % 2 == 0, "qk_rmsnorm_rope: head_dim", d, "an even number (interleaved pairs)")
    check(q.stride(3) == 1, "qk_rmsnorm_rope: q strides", q.stride(),
          "head_dim contiguous (any batch/token/head strides)")
    check(tuple(weight.shape) == (d,), "qk_rmsnorm_rope: weight", tuple(weight.shape), f"({d},)")
    check(angles.dim() == 3 and angles.shape[1:] == (length, d // 2) and angles.shape[0] in (1, b),
          "qk_rmsnorm_rope: angles", tuple(angles.shape), f"({b} or 1, {length}, {d // 2})")
    check(angles.stride(2) == 1, "qk_rmsnorm_rope: angles strides", angles.stride(), "last dim contiguous")
    check(b * length * nh < 2 ** 31, "qk_rmsnorm_rope: q", tuple(q.shape),
          "fewer than 2^31 (token, head) rows (the kernels index rows in int32)")


def _aligned(strides: list[int]) -> tuple[list[int], int]:
    """Strides divided by their largest common power-of-two factor up to 8, and that factor."""
    align = next(a for a in (8, 4, 2, 1) if all(s % a == 0 for s in strides))
    return [s // align for s in strides], align


def _launch_args(q, table) -> dict:
    """Positional strides and alignment constants of the kernels: q's (batch, token, head) strides
    over ALIGN_Q (8 for the model's views: head strides 72 and 216) and the fp32 angle table's
    (batch, token) strides over ALIGN_A (4 at head dim 72: rows of 36)."""
    qs, align_q = _aligned([q.stride(0), q.stride(1), q.stride(2)])
    ts, align_a = _aligned([0 if table.shape[0] == 1 else table.stride(0), table.stride(1)])
    return dict(strides=qs + ts, ALIGN_Q=align_q, ALIGN_A=align_a)


MAX_PER_SM = 16  # the largest PER_SM of the "tile_loop" launch family


def _grid(n_rows: int, device):
    """(weight-gradient partial rows, grid function) of the backward's tile walk: PER_SM programs
    per SM (the launch family's meta-parameter), never more than there are tiles."""
    sms = _launch.sm_count(device)
    return MAX_PER_SM * sms, lambda meta: (min(meta["PER_SM"] * sms, triton.cdiv(n_rows, meta["ROWS"])),)


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
        n_rows = b * length * nh
        args = _launch_args(q, cos)
        _qk_fwd_kernel[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](
            q, weight, cos, sin, out, rstd, length, n_rows, *args.pop("strides"), eps, NH=nh, D=d, **args,
            BLOCK_P=triton.next_power_of_2(d // 2), **_launch.launch_config("tile"))
        ctx.save_for_backward(q, weight, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, weight, cos, sin, rstd = ctx.saved_tensors
        b, length, nh, d = q.shape
        dout = dout.contiguous()
        dq = torch.empty((b, length, nh, d), dtype=q.dtype, device=q.device)
        n_rows = b * length * nh
        programs, grid = _grid(n_rows, q.device)
        # zeros: the tuned grid may launch fewer programs than there are partial rows
        dw = torch.zeros((programs, d), dtype=torch.float32, device=q.device)
        args = _launch_args(q, cos)
        _qk_bwd_kernel[grid](q, weight, cos, sin, rstd, dout, dq, dw, length, n_rows,
                             *args.pop("strides"), NH=nh, D=d, **args, BLOCK_P=triton.next_power_of_2(d // 2),
                             **_launch.launch_config("tile_loop"))
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
