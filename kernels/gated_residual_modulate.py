"""Gated residual add fused into the next AdaLN site of a MUG-DiT block (forward-notes 1.10,
steps 2 -> 4 and 5 -> next block's 1):

    x'  = x + gate[b, index[b, l]] * y
    out = LN(x') * (1 + scale[b, index[b, l]]) + shift[b, index[b, l]]

returning both x' (the residual stream) and out (the next sublayer's input). LN has no affine
parameters (eps 1e-6). One read of x and y and one write of x' and out replace the three passes of
the unfused add, norm and modulate.

Reference: `gated_residual_modulate_reference` (plain torch). The Triton path computes in fp32
inside the kernel; x' is stored in x's dtype and LN is taken of the fp32 sum (the reference in
bf16 normalises the rounded x', a difference of one bf16 rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mugv.kernels import _launch
from mugv.kernels.adaln_modulate import (_index_or_zeros, backward_grid, gather_rows, kernel_index, sum_partials,
                                         validate_modulation)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def gated_residual_reference(x, y, gate, index=None):
    """Plain torch: x + gate * y, the gate row picked per token (the DiT's last residual add)."""
    return x + gather_rows(gate, _index_or_zeros(x, gate, index)) * y


def gated_residual_modulate_reference(x, y, gate, shift, scale, index=None, eps: float = 1e-6):
    """Plain torch, in the inputs' dtype: (x + gate*y, LN(x + gate*y) * (1 + scale) + shift)."""
    index = _index_or_zeros(x, shift, index)
    x_res = gated_residual_reference(x, y, gate, index)
    out = F.layer_norm(x_res, (x.shape[-1],), eps=eps) * (1 + gather_rows(scale, index)) + gather_rows(shift, index)
    return x_res, out


@_launch.tuned(["H"])
@triton.jit
def _gated_fwd_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, index_ptr, xres_ptr, out_ptr,
                      mean_ptr, rstd_ptr, L, H, K, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    k = tl.load(index_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    mod = (b * K + k) * H + cols
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    xr = x + gate * y
    tl.store(xres_ptr + row * H + cols, xr.to(xres_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(xr, axis=0) / H
    xc = tl.where(mask, xr - mean, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(xc * xc, axis=0) / H + eps))  # not sqrt.approx / div.full
    shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * H + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@_launch.tuned(["H", "TWO", "HAS_DXRES"], "row_loop")
@triton.jit
def _gated_bwd_kernel(x_ptr, y_ptr, gate_ptr, scale_ptr, index_ptr, mean_ptr, rstd_ptr,
                      dout_ptr, dxres_ptr, dx_ptr, dy_ptr,
                      dgate_part_ptr, dshift_part_ptr, dscale_part_ptr,
                      L, H, rows_per_program, TWO: tl.constexpr, HAS_DXRES: tl.constexpr,
                      BLOCK_H: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr):
    # Loop over the rows of one sample, ROWS at a time, pipelined, with per-branch elementwise
    # accumulators (see adaln_modulate's backward). x' is recomputed from x and y in fp32 rather
    # than re-read, so the forward's rounding of x' does not enter the gradient.
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_prog = tl.num_programs(1)
    K: tl.constexpr = 2 if TWO else 1
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    acc_gate0 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_shift0 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_scale0 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_gate1 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_shift1 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_scale1 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    start = c * rows_per_program
    end = tl.minimum(start + rows_per_program, L)
    for l0 in tl.range(start, end, ROWS, num_stages=STAGES):
        ls = l0 + tl.arange(0, ROWS)
        rmask = ls < end
        rows = b * L + ls
        m2 = rmask[:, None] & mask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        k = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int64)
        mod = (b * K + k)[:, None] * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + mod, mask=m2, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + mod, mask=m2, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(m2, (x + gate * y - mean) * rstd, 0.0)
        g = dout * (1.0 + scale)
        dxr = (g - tl.sum(g, axis=1)[:, None] / H - xhat * (tl.sum(g * xhat, axis=1)[:, None] / H)) * rstd
        if HAS_DXRES:
            dxr += tl.load(dxres_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dxr.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(dy_ptr + offs, (dxr * gate).to(dy_ptr.dtype.element_ty), mask=m2)
        dgate = dxr * y  # masked rows have zero gradients and add nothing
        dscale = dout * xhat
        if TWO:  # branch 1's share, and v - share (exactly v or exactly 0) for branch 0
            sel = (k == 1)[:, None]
            gate1 = tl.where(sel, dgate, 0.0)
            shift1 = tl.where(sel, dout, 0.0)
            scale1 = tl.where(sel, dscale, 0.0)
            acc_gate1 += gate1
            acc_shift1 += shift1
            acc_scale1 += scale1
            acc_gate0 += dgate - gate1
            acc_shift0 += dout - shift1
            acc_scale0 += dscale - scale1
        else:
            acc_gate0 += dgate
            acc_shift0 += dout
            acc_scale0 += dscale
    part = (b * n_prog + c) * K * H + cols
    tl.store(dgate_part_ptr + part, tl.sum(acc_gate0, axis=0), mask=mask)
    tl.store(dshift_part_ptr + part, tl.sum(acc_shift0, axis=0), mask=mask)
    tl.store(dscale_part_ptr + part, tl.sum(acc_scale0, axis=0), mask=mask)
    if TWO:
        tl.store(dgate_part_ptr + part + H, tl.sum(acc_gate1, axis=0), mask=mask)
        tl.store(dshift_part_ptr + part + H, tl.sum(acc_shift1, axis=0), mask=mask)
        tl.store(dscale_part_ptr + part + H, tl.sum(acc_scale1, axis=0), mask=mask)


class _GatedResidualModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, index, eps):
        _launch.check_runnable()
        b, length, h, k = validate_modulation(
            x, {"gate": gate, "shift": shift, "scale": scale}, index, "gated_residual_modulate")
        _launch.check(tuple(y.shape) == tuple(x.shape), "gated_residual_modulate: y",
                      tuple(y.shape), f"x's shape {tuple(x.shape)}")
        x, y = x.contiguous(), y.contiguous()
        gate, shift, scale = gate.contiguous(), shift.contiguous(), scale.contiguous()
        index = kernel_index(x, shift, index)
        x_res = torch.empty_like(x)
        out = torch.empty_like(x)
        stats = torch.empty((2, b * length), dtype=torch.float32, device=x.device)
        mean, rstd = stats[0], stats[1]
        _launch.launch(_gated_fwd_kernel, (b * length,),
                       (x, y, gate, shift, scale, index, x_res, out, mean, rstd, length, h, k, eps),
                       dict(BLOCK_H=_launch.row_block(h), **_launch.launch_config()))
        ctx.save_for_backward(x, y, gate, scale, index, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return x_res, out

    @staticmethod
    def backward(ctx, dx_res, dout):
        x, y, gate, scale, index, mean, rstd = ctx.saved_tensors
        b, length, h = x.shape
        k = scale.shape[1]
        dout = torch.zeros_like(x) if dout is None else dout.contiguous()
        has_dxres = dx_res is not None
        dx_res = dx_res.contiguous() if has_dxres else dout  # placeholder pointer, never read
        dx, dy = torch.empty_like(x), torch.empty_like(y)
        n_prog, rows = backward_grid(b, length, x.device)
        parts = torch.empty((3, b, n_prog, k, h), dtype=torch.float32, device=x.device)
        _launch.launch(_gated_bwd_kernel, (b, n_prog),
                       (x, y, gate, scale, index, mean, rstd, dout, dx_res, dx, dy, parts[0], parts[1], parts[2],
                        length, h, rows),
                       dict(TWO=k == 2, HAS_DXRES=has_dxres, BLOCK_H=_launch.row_block(h),
                            **_launch.launch_config("row_loop")))
        dgate, dshift, dscale = sum_partials(parts, (gate.dtype, ctx.shift_dtype, scale.dtype))
        return dx, dy, dgate, dshift, dscale, None, None


def gated_residual_modulate(x, y, gate, shift, scale, index=None, eps: float = 1e-6):
    """Fused (x', out) = (x + gate*y, LN(x') * (1 + scale) + shift), every table picked per token
    by `index` (Triton; equals `gated_residual_modulate_reference`). Gradients flow to x, y, gate,
    shift and scale.

    Arguments:
        x: (B, L, h) residual stream; y: (B, L, h) sublayer output (attention or MLP).
        gate, shift, scale: (B, K, h) modulation tables; index: (B, L) in [0, K) or None for K = 1.
    Returns:
        x_res (B, L, h) and out (B, L, h), both in x's dtype.
    """
    return _GatedResidualModulate.apply(x, y, gate, shift, scale, index, eps)
