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


def _at_least_fp32(x):
    """bf16/fp16 -> fp32 (the official code's upcast); fp32 and the parity tests' float64
    reference model unchanged (.float() would cut a float64 model to fp32 mid-network)."""
    return x if x.dtype == torch.float64 else x.float()


def rope_rotate_reference(x, angles):
    """Rotate interleaved pairs of x (B, L, n_heads, d) by angles (B, L, d/2), in fp32 (float64
    for a float64 x)."""
    xf = _at_least_fp32(x).unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    cos = torch.cos(angles.float()).unsqueeze(2)
    sin = torch.sin(angles.float()).unsqueeze(2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def qk_rmsnorm_reference(q, weight, eps: float = 1e-6):
    """Per-head RMSNorm over head_dim of q (B, L, n, d), as the official code: normalise in fp32,
    cast back, multiply by the (d,) weight (the DiT's cross-attention q uses it alone)."""
    qf = _at_least_fp32(q)
    return (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)).to(q.dtype) * weight


def qk_rmsnorm_rope_reference(q, weight, angles, eps: float = 1e-6):
    """Plain torch: RMSNorm over the head dim (fp32, cast back, times weight), then RoPE."""
    return rope_rotate_reference(qk_rmsnorm_reference(q, weight, eps), angles)


@triton.jit
def _qk_tile(tile, n_hb, L, n_tok, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
             NH: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr,
             TOK: tl.constexpr, HB: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Tile `tile` = TOK tokens x HB heads (head block tile % n_hb) x the head dim: its element and
    row masks, q offsets (TOK, HB, BLOCK_D), (token, head) row numbers (TOK, HB), per-token
    angle-table offsets (TOK,) and token mask.

    v8: the tile spans tokens x heads, so cos/sin are loaded once per token and broadcast over its
    heads (v3-v7 loaded them for every (token, head) row: 8x the load instructions of the q row
    itself). Index math in int32 with the head count a constant; every stride is passed divided by
    its alignment and multiplied back here, so the compiler knows each row starts on an ALIGN_Q
    (ALIGN_A) element boundary and issues 16-byte loads (a runtime head stride of 72 or 216
    elements is not a multiple of 16, all Triton assumes of an integer argument: v3's narrow
    loads)."""
    tok = (tile // n_hb) * TOK + tl.arange(0, TOK)
    h = (tile % n_hb) * HB + tl.arange(0, HB)
    tmask = tok < n_tok
    b = tok // L
    l = tok - b * L
    cols = tl.arange(0, BLOCK_D)
    rmask = tmask[:, None] & (h < NH)[None, :]
    mask = rmask[:, :, None] & (cols < D)[None, None, :]
    qoff = ((b.to(tl.int64) * stride_qb + l.to(tl.int64) * stride_ql)[:, None, None]
            + h.to(tl.int64)[None, :, None] * stride_qh) * ALIGN_Q + cols[None, None, :]
    row = tok.to(tl.int64)[:, None] * NH + h[None, :]
    aoff = (b.to(tl.int64) * stride_ab + l.to(tl.int64) * stride_al) * ALIGN_A
    return mask, rmask, qoff, row, aoff, tmask


@triton.jit
def _angles(cos_ptr, sin_ptr, aoff, tmask, P: tl.constexpr, BLOCK_P: tl.constexpr):
    """cos and sin of one tile's tokens, (TOK, 1, BLOCK_P) to broadcast over the heads."""
    pairs = tl.arange(0, BLOCK_P)
    amask = tmask[:, None] & (pairs < P)[None, :]
    cos = tl.load(cos_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
    sin = tl.load(sin_ptr + aoff[:, None] + pairs[None, :], mask=amask, other=0.0)
    return cos[:, None, :], sin[:, None, :]


@_launch.tuned(["L"], "token_tile")
@triton.jit
def _qk_fwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
                   L, n_tok, n_hb, stride_qb, stride_ql, stride_qh, stride_ab, stride_al, eps,
                   NH: tl.constexpr, D: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr,
                   HB: tl.constexpr, BLOCK_P: tl.constexpr, TOK: tl.constexpr):
    # One program per tile (TOK autotuned). Each row's D = 2P features are loaded as one
    # contiguous run and split into (even, odd) pairs in registers (v2 read even and odd features
    # as two stride-2 views: 7%). Any head stride: q may be a view of the fused (head, q|k|v, dim)
    # projection, no copy first.
    mask, rmask, qoff, row, aoff, tmask = _qk_tile(
        tl.program_id(0), n_hb, L, n_tok, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
        NH, ALIGN_Q, ALIGN_A, TOK, HB, 2 * BLOCK_P, D)
    cols = tl.arange(0, 2 * BLOCK_P)
    x = tl.load(q_ptr + qoff, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=2) / D + eps))  # not sqrt.approx / div.full
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    u = x * rstd[:, :, None] * w[None, None, :]
    ua, ub = tl.split(tl.reshape(u, (TOK, HB, BLOCK_P, 2)))
    cos, sin = _angles(cos_ptr, sin_ptr, aoff, tmask, D // 2, BLOCK_P)
    y = tl.reshape(tl.join(ua * cos - ub * sin, ua * sin + ub * cos), (TOK, HB, 2 * BLOCK_P))
    tl.store(out_ptr + row[:, :, None] * D + cols[None, None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=rmask)


# The partial rows are zeroed before each config the autotuner tries and before the chosen one
# runs: the configs launch different numbers of programs (PER_SM), and rows left by a config with
# more programs were summed into the weight gradient of the call that tuned a new length (found in
# session 13's review).
@_launch.tuned(["L"], "token_tile_loop", reset=["dw_part_ptr"])
@triton.jit
def _qk_bwd_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dout_ptr, dq_ptr, dw_part_ptr,
                   L, n_tok, n_hb, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
                   NH: tl.constexpr, D: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_A: tl.constexpr,
                   HB: tl.constexpr, BLOCK_P: tl.constexpr, TOK: tl.constexpr, STAGES: tl.constexpr,
                   PER_SM: tl.constexpr):
    # A grid-stride walk over the forward's tiles (PER_SM programs per SM: the grid, set on the
    # host), software-pipelined. Rotate the incoming gradient back (R^T) in pair registers, then
    # the RMSNorm backward per row; du * n is summed elementwise over the program's tiles (no
    # cross-row reduction inside the loop; v5: 0.68 -> 0.53 ms at 720p) and reduced to one fp32
    # partial per program at the end, summed in torch.
    cols = tl.arange(0, 2 * BLOCK_P)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    acc = tl.zeros((TOK, HB, 2 * BLOCK_P), dtype=tl.float32)
    for tile in tl.range(tl.program_id(0), tl.cdiv(n_tok, TOK) * n_hb, tl.num_programs(0), num_stages=STAGES):
        mask, rmask, qoff, row, aoff, tmask = _qk_tile(
            tile, n_hb, L, n_tok, stride_qb, stride_ql, stride_qh, stride_ab, stride_al,
            NH, ALIGN_Q, ALIGN_A, TOK, HB, 2 * BLOCK_P, D)
        x = tl.load(q_ptr + qoff, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)[:, :, None]
        n = x * rstd
        g = tl.load(dout_ptr + row[:, :, None] * D + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        ga, gb = tl.split(tl.reshape(g, (TOK, HB, BLOCK_P, 2)))
        cos, sin = _angles(cos_ptr, sin_ptr, aoff, tmask, D // 2, BLOCK_P)
        du = tl.reshape(tl.join(ga * cos + gb * sin, gb * cos - ga * sin), (TOK, HB, 2 * BLOCK_P))
        acc += du * n  # masked rows and columns are 0
        dn = du * w[None, None, :]
        proj = tl.sum(dn * n, axis=2)[:, :, None] / D
        tl.store(dq_ptr + row[:, :, None] * D + cols[None, None, :],
                 ((dn - n * proj) * rstd).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(tl.sum(acc, axis=0), axis=0),
             mask=cols < D)


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
          "fewer than 2^31 (token, head) rows (the kernels index tokens and heads in int32)")


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


MAX_PER_SM = 16  # the largest PER_SM of the "token_tile_loop" launch family


def _tiling(b: int, length: int, nh: int, device) -> dict:
    """Tile geometry shared by both kernels: HB heads per tile (a power of two up to 16; 48 heads
    = 3 blocks of 16), and the backward's grid: PER_SM programs per SM (the launch family's
    meta-parameter), never more than there are tiles, with MAX_PER_SM x SMs partial rows."""
    hb = min(16, triton.next_power_of_2(nh))
    n_tok, n_hb, sms = b * length, triton.cdiv(nh, hb), _launch.sm_count(device)
    return dict(hb=hb, n_tok=n_tok, n_hb=n_hb, partials=MAX_PER_SM * sms,
                fwd_grid=lambda meta: (triton.cdiv(n_tok, meta["TOK"]) * n_hb,),
                bwd_grid=lambda meta: (min(meta["PER_SM"] * sms, triton.cdiv(n_tok, meta["TOK"]) * n_hb),))


class _QKRMSNormRoPE(torch.autograd.Function):
    """The kernel pair as an autograd Function. `launch_forward` / `launch_backward` are the
    launches alone, shared with the custom ops that let compiled layers call the kernels
    (`torch_backend/models/dit_layers.py`, "Kernels inside compiled layers")."""

    @staticmethod
    def launch_forward(q, weight, angles, eps):
        """-> (out (B, L, n, d) in q's dtype, rstd (B L n,) fp32, cos, sin (B or 1, L, d/2) fp32)."""
        _launch.check_runnable()
        _validate(q, weight, angles)
        b, length, nh, d = q.shape
        # fp32 cos/sin once per call (B or 1, L, d/2): 4% of q's bytes at head dim 72.
        angles = angles.float()
        cos, sin = torch.cos(angles).contiguous(), torch.sin(angles).contiguous()
        weight = weight.contiguous()
        out = torch.empty((b, length, nh, d), dtype=q.dtype, device=q.device)
        rstd = torch.empty((b * length * nh,), dtype=torch.float32, device=q.device)
        t, args = _tiling(b, length, nh, q.device), _launch_args(q, cos)
        _launch.launch(_qk_fwd_kernel, t["fwd_grid"],
                       (q, weight, cos, sin, out, rstd, length, t["n_tok"], t["n_hb"], *args.pop("strides"), eps),
                       dict(NH=nh, D=d, **args, HB=t["hb"], BLOCK_P=triton.next_power_of_2(d // 2),
                            **_launch.launch_config("token_tile")))
        return out, rstd, cos, sin

    @staticmethod
    def launch_backward(q, weight, cos, sin, rstd, dout):
        """-> (dq (B, L, n, d) in q's dtype, dweight in weight's dtype)."""
        b, length, nh, d = q.shape
        weight = weight.contiguous()
        dout = dout.contiguous()
        dq = torch.empty((b, length, nh, d), dtype=q.dtype, device=q.device)
        t, args = _tiling(b, length, nh, q.device), _launch_args(q, cos)
        # zeros: the tuned grid may launch fewer programs than there are partial rows
        dw = torch.zeros((t["partials"], d), dtype=torch.float32, device=q.device)
        _launch.launch(_qk_bwd_kernel, t["bwd_grid"],
                       (q, weight, cos, sin, rstd, dout, dq, dw, length, t["n_tok"], t["n_hb"], *args.pop("strides")),
                       dict(NH=nh, D=d, **args, HB=t["hb"], BLOCK_P=triton.next_power_of_2(d // 2),
                            **_launch.launch_config("token_tile_loop")))
        return dq, dw.sum(0).to(weight.dtype)

    @staticmethod
    def forward(ctx, q, weight, angles, eps):
        out, rstd, cos, sin = _QKRMSNormRoPE.launch_forward(q, weight, angles, eps)
        ctx.save_for_backward(q, weight, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, weight, cos, sin, rstd = ctx.saved_tensors
        dq, dw = _QKRMSNormRoPE.launch_backward(q, weight, cos, sin, rstd, dout)
        return dq, dw, None, None


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
