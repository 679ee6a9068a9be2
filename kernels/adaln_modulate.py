"""AdaLN modulate fused with the non-affine LayerNorm of a MUG-DiT block (forward-notes 1.10).

    y[b, l] = LN(x[b, l]) * (1 + scale[b, index[b, l]]) + shift[b, index[b, l]]

LN is LayerNorm over the hidden axis without weight or bias (eps 1e-6). K = 1 is the plain
per-sample modulation; K = 2 with `index` built from x_mask picks, per token, the noisy-timestep
row or the t = 0 row (conditioning frames of image-to-video and the start/end tokens, notes 1.8).

Reference: `adaln_modulate_reference` (plain torch, the model's default path). The Triton path
(`adaln_modulate`) computes in fp32 inside the kernel and stores in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mugv.kernels import _launch
from mugv.kernels._launch import check

import triton  # noqa: E402  (after _launch decided on the interpreter)
import triton.language as tl  # noqa: E402


def adaln_modulate_reference(x, shift, scale, index=None, eps: float = 1e-6):
    """Plain torch: F.layer_norm (no affine) then the per-token modulation pick, in x's dtype.

    x: (B, L, h); shift, scale: (B, K, h); index: (B, L) integers in [0, K) or None when K = 1.
    """
    index = _index_or_zeros(x, shift, index)
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + gather_rows(scale, index)) + gather_rows(shift, index)


def gather_rows(table, index):
    """table (B, K, h), index (B, L) -> (B, L, h): the per-token row of a modulation table.

    A chain of `where`s rather than torch.gather: gather's backward is a scatter-add of L*h values
    into K*h slots whose atomic contention dominated the eager baseline on the H100 (adaln fwd+bwd
    239 ms at 720p, see docs/benchmarks.md); the values selected are identical.
    """
    index = index.long()
    rows = table[:, -1:].expand(-1, index.shape[1], -1)
    for k in range(table.shape[1] - 2, -1, -1):
        rows = torch.where((index == k)[..., None], table[:, k:k + 1], rows)
    return rows


@_launch.tuned(["H"])
@triton.jit
def _adaln_fwd_kernel(x_ptr, shift_ptr, scale_ptr, index_ptr, y_ptr, mean_ptr, rstd_ptr,
                      L, H, K, eps, BLOCK_H: tl.constexpr):
    # One program per token row; all math in fp32 (load, convert, compute, convert, store).
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    k = tl.load(index_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(xc * xc, axis=0) / H + eps))  # not sqrt.approx / div.full
    mod = (b * K + k) * H + cols
    shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(y_ptr + row * H + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@_launch.tuned(["H", "TWO"], "row_loop")
@triton.jit
def _adaln_bwd_kernel(x_ptr, scale_ptr, index_ptr, mean_ptr, rstd_ptr, dy_ptr, dx_ptr,
                      dshift_part_ptr, dscale_part_ptr, L, H, rows_per_program, TWO: tl.constexpr,
                      BLOCK_H: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr):
    # Program (b, c) walks rows [c * rows_per_program, ...) of sample b, ROWS at a time, software-
    # pipelined (STAGES), writes dx and keeps fp32 sums of dy and dy * xhat per branch (TWO: K = 2)
    # elementwise over the row tile (no cross-row reduction inside the loop); one partial per
    # program, summed in torch (deterministic, unlike atomics).
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_prog = tl.num_programs(1)
    K: tl.constexpr = 2 if TWO else 1
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    acc_shift0 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_scale0 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_shift1 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_scale1 = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    # the sample's K scale rows, held in registers (v5; v4 gathered one per row from L2)
    scale_row0 = tl.load(scale_ptr + b * K * H + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    scale_row1 = tl.load(scale_ptr + (b * K + K - 1) * H + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    start = c * rows_per_program
    end = tl.minimum(start + rows_per_program, L)
    for l0 in tl.range(start, end, ROWS, num_stages=STAGES):
        ls = l0 + tl.arange(0, ROWS)
        rmask = ls < end
        rows = b * L + ls
        m2 = rmask[:, None] & mask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        k = tl.load(index_ptr + rows, mask=rmask, other=0)
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        sel = (k == 1)[:, None]
        scale = tl.where(sel, scale_row1, scale_row0) if TWO else scale_row0
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(m2, (x - mean) * rstd, 0.0)
        g = dy * (1.0 + scale)  # gradient w.r.t. xhat
        c_mean = tl.sum(g, axis=1)[:, None] / H
        c_proj = tl.sum(g * xhat, axis=1)[:, None] / H
        dx = (g - c_mean - xhat * c_proj) * rstd
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m2)
        dscale = dy * xhat  # masked rows have dy = 0 and add nothing
        if TWO:  # branch 1's share, and v - share (exactly v or exactly 0) for branch 0
            shift1 = tl.where(sel, dy, 0.0)
            scale1 = tl.where(sel, dscale, 0.0)
            acc_shift1 += shift1
            acc_scale1 += scale1
            acc_shift0 += dy - shift1
            acc_scale0 += dscale - scale1
        else:
            acc_shift0 += dy
            acc_scale0 += dscale
    part = (b * n_prog + c) * K * H + cols
    tl.store(dshift_part_ptr + part, tl.sum(acc_shift0, axis=0), mask=mask)
    tl.store(dscale_part_ptr + part, tl.sum(acc_scale0, axis=0), mask=mask)
    if TWO:
        tl.store(dshift_part_ptr + part + H, tl.sum(acc_shift1, axis=0), mask=mask)
        tl.store(dscale_part_ptr + part + H, tl.sum(acc_scale1, axis=0), mask=mask)


def _index_or_zeros(x, shift, index):
    if index is None:
        check(shift.shape[1] == 1, "index", None, f"an index tensor when K = {shift.shape[1]} > 1")
        return torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
    return index


def kernel_index(x, shift, index):
    """The branch index as the kernels read it, without a cast kernel where possible: a bool mask
    as its bytes (0 or 1, a view), int32 as it is, other integers cast to int32."""
    index = _index_or_zeros(x, shift, index)
    if index.dtype == torch.bool:
        index = index.view(torch.uint8)
    elif index.dtype != torch.int32:
        index = index.to(torch.int32)
    return index.contiguous()


def sum_partials(parts, dtypes):
    """The parameter gradients from one fp32 partial-sum buffer (n, B, programs, K, h): one sum over
    the programs and one cast per distinct dtype (instead of a sum and a cast per gradient)."""
    return _launch.cast_rows(parts.sum(2), dtypes)


def validate_modulation(x, tables: dict, index, what: str = "adaln_modulate"):
    """Shared argument checks: x (B, L, h), every table (B, K, h) of one K, index (B, L) ints."""
    check(x.dim() == 3, f"{what}: x", tuple(x.shape), "(B, L, h)")
    b, length, h = x.shape
    k = None
    for name, t in tables.items():
        check(t.dim() == 3 and t.shape[0] == b and t.shape[2] == h, f"{what}: {name}",
              tuple(t.shape), f"(B={b}, K, h={h})")
        k = t.shape[1] if k is None else k
        check(t.shape[1] == k, f"{what}: {name}", tuple(t.shape), f"K = {k} like the other tables")
        # K = 1 (per sample) or 2 (t and t = 0): the backward kernels keep one accumulator per branch
        check(k in (1, 2), f"{what}: {name}", tuple(t.shape), "K = 1 or 2 modulation rows per sample")
    if index is not None:
        check(tuple(index.shape) == (b, length), f"{what}: index", tuple(index.shape), f"({b}, {length})")
        check(not index.is_floating_point(), f"{what}: index dtype", index.dtype, "an integer or bool tensor")
        if index.dtype == torch.bool:
            check(k == 2, f"{what}: index", "a bool mask", "an integer index when K != 2")
        elif index.device.type == "cpu":
            lo, hi = int(index.min()), int(index.max())
            check(lo >= 0 and hi < k, f"{what}: index values", (lo, hi), f"in [0, {k})")
        else:  # no host sync on the GPU: the check runs asynchronously (pass the bool x_mask
            # itself for K = 2 to skip it)
            torch._assert_async(((index >= 0) & (index < k)).all())
    return b, length, h, k


def backward_grid(b: int, length: int, device) -> tuple[int, int]:
    """(programs per sample, rows per program) of the loop-over-rows backward kernels."""
    per_sample = max(1, min(length, _launch.reduction_programs(device) // b))
    rows = triton.cdiv(length, per_sample)
    return triton.cdiv(length, rows), rows


class _AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, index, eps):
        _launch.check_runnable()
        b, length, h, k = validate_modulation(x, {"shift": shift, "scale": scale}, index)
        x = x.contiguous()
        shift, scale = shift.contiguous(), scale.contiguous()
        index = kernel_index(x, shift, index)
        y = torch.empty_like(x)
        stats = torch.empty((2, b * length), dtype=torch.float32, device=x.device)
        mean, rstd = stats[0], stats[1]
        _launch.launch(_adaln_fwd_kernel, (b * length,), (x, shift, scale, index, y, mean, rstd, length, h, k, eps),
                       dict(BLOCK_H=_launch.row_block(h), **_launch.launch_config()))
        ctx.save_for_backward(x, scale, index, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, index, mean, rstd = ctx.saved_tensors
        b, length, h = x.shape
        k = scale.shape[1]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n_prog, rows = backward_grid(b, length, x.device)
        parts = torch.empty((2, b, n_prog, k, h), dtype=torch.float32, device=x.device)
        _launch.launch(_adaln_bwd_kernel, (b, n_prog),
                       (x, scale, index, mean, rstd, dy, dx, parts[0], parts[1], length, h, rows),
                       dict(TWO=k == 2, BLOCK_H=_launch.row_block(h), **_launch.launch_config("row_loop")))
        dshift, dscale = sum_partials(parts, (ctx.shift_dtype, scale.dtype))
        return dx, dshift, dscale, None, None


def adaln_modulate(x, shift, scale, index=None, eps: float = 1e-6):
    """Fused LN(x) * (1 + scale[b, index]) + shift[b, index] (Triton; equals
    `adaln_modulate_reference`). Gradients flow to x, shift and scale.

    Arguments:
        x: (B, L, h) activations.
        shift, scale: (B, K, h) modulation tables (K = 1 per sample, K = 2 for t vs t = 0).
        index: (B, L) integer/bool branch of each token in [0, K); None when K = 1.
        eps: LayerNorm epsilon (1e-6 in MUG-DiT).
    Returns:
        (B, L, h) in x's dtype.
    """
    return _AdaLNModulate.apply(x, shift, scale, index, eps)
