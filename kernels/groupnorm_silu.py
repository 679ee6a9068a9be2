"""GroupNorm followed by SiLU, the pre-convolution pair of every VAE ResBlock (forward-notes 3.x:
GN(32) -> SiLU -> conv3^3):

    y = SiLU((x - mean_g) * rstd_g * weight[c] + bias[c]),  mean/var over (C/G channels x T H W)

A group of a video feature map holds millions of elements, so the statistics are a split
reduction: each program reduces a span of one channel to (count, shift, sum(x-shift),
sum((x-shift)^2)) with `shift` the span's first element (the "shifted data" variance, which keeps
fp32 accurate when |mean| >> std), and a one-program-per-group kernel merges the spans of a group
with Chan's formula (in torch that merge was a dozen small launches).
Forward: 2 reads of x and 1 write. Backward: 2 reads of x and dy, 1 write of dx.

Reference: `groupnorm_silu_reference` (plain torch F.group_norm then F.silu).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mugv.kernels import _launch
from mugv.kernels._launch import check

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402


def groupnorm_silu_reference(x, weight, bias, groups: int, eps: float = 1e-6):
    """Plain torch: F.silu(F.group_norm(x, groups, weight, bias, eps)), x (B, C, *spatial)."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


@triton.jit
def _span(S, span):
    """Program (row, j) of the grid (B*C, spans): span j of channel row = b*C + c; its start, length
    and index among the partials (row-major (B*C, spans)). Rows go on the grid's first axis (up to
    2^31 - 1 programs): the second and third take at most 65,535, and a cache batch of video frames
    has more channel rows than that (`mugv cache` encodes 16 clips x 49 frames at once, 512 channels
    deep in the official VAE)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    start = j.to(tl.int64) * span
    count = tl.minimum(start + span, S) - start
    return row, start, count, row * tl.num_programs(1) + j


# Every span loop runs its whole blocks unmasked, at offsets j * BLOCK, and then the span's tail
# (only a channel's last span has one) masked. A mask `offset < count` with a runtime count keeps
# Triton from proving it constant over a vector, so the v2 loop, masked throughout, issued 2-byte
# loads; unmasked blocks at known multiples of BLOCK get 16-byte ones. The loops are software-
# pipelined (STAGES, autotuned).
@triton.jit
def _ld(ptr, i, offs, count, MASKED: tl.constexpr):
    """fp32 values of ptr[i + offs] (zero past `count` when MASKED)."""
    if MASKED:
        v = tl.load(ptr + i + offs, mask=i + offs < count, other=0.0).to(tl.float32)
    else:
        v = tl.load(ptr + i + offs).to(tl.float32)
    return v


@triton.jit
def _st(ptr, i, offs, count, v, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + i + offs, v.to(ptr.dtype.element_ty), mask=i + offs < count)
    else:
        tl.store(ptr + i + offs, v.to(ptr.dtype.element_ty))


@triton.jit
def _stats_step(base, i, offs, count, shift, s1, s2, MASKED: tl.constexpr):
    v = _ld(base, i, offs, count, MASKED) - shift
    if MASKED:
        v = tl.where(i + offs < count, v, 0.0)
    return s1 + v, s2 + v * v


@_launch.tuned(["S"], "span_loop")
@triton.jit
def _gn_stats_kernel(x_ptr, shift_ptr, s1_ptr, s2_ptr, S, span, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    row, start, count, out = _span(S, span)
    base = x_ptr + row * S + start
    shift = tl.load(base).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    s1 = tl.zeros((BLOCK,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.range(0, count // BLOCK, num_stages=STAGES):
        s1, s2 = _stats_step(base, j * BLOCK, offs, count, shift, s1, s2, False)
    if count % BLOCK != 0:
        s1, s2 = _stats_step(base, count - count % BLOCK, offs, count, shift, s1, s2, True)
    tl.store(shift_ptr + out, shift)
    tl.store(s1_ptr + out, tl.sum(s1, axis=0))
    tl.store(s2_ptr + out, tl.sum(s2, axis=0))


@triton.jit
def _gn_merge_kernel(shift_ptr, s1_ptr, s2_ptr, mean_ptr, rstd_ptr, S, span, n_spans, n_part, eps,
                     BLOCK: tl.constexpr):
    # Program g: Chan's merge of the n_part = (channels per group x spans) partials of group g.
    grp = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < n_part
    src = grp * n_part + offs
    shift = tl.load(shift_ptr + src, mask=m, other=0.0)
    s1 = tl.load(s1_ptr + src, mask=m, other=0.0)
    s2 = tl.load(s2_ptr + src, mask=m, other=0.0)
    j = offs % n_spans
    cnt = tl.where(m, tl.minimum(span, S - j * span), 0).to(tl.float32)
    safe = tl.where(m, cnt, 1.0)
    mean_i = shift + s1 / safe
    m2_i = s2 - s1 * s1 / safe
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mean_i, axis=0) / total
    dev = mean_i - mean
    m2 = tl.sum(tl.where(m, m2_i + cnt * dev * dev, 0.0), axis=0)
    tl.store(mean_ptr + grp, mean)
    tl.store(rstd_ptr + grp, tl.div_rn(1.0, tl.sqrt_rn(m2 / total + eps)))


@triton.jit
def _gn_bwd_merge_kernel(sdz_ptr, sdzx_ptr, w_ptr, c_mean_ptr, c_proj_ptr, C, CG, n_spans, n_part,
                         inv_n, BLOCK: tl.constexpr):
    # Program g: the two group means of the GroupNorm backward, sum_g(dz * w) / n and
    # sum_g(dz * xhat * w) / n, from the (channels per group x spans) partials.
    grp = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < n_part
    src = grp * n_part + offs
    c = (grp % (C // CG)) * CG + offs // n_spans
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    sdz = tl.load(sdz_ptr + src, mask=m, other=0.0)
    sdzx = tl.load(sdzx_ptr + src, mask=m, other=0.0)
    tl.store(c_mean_ptr + grp, tl.sum(sdz * w, axis=0) * inv_n)
    tl.store(c_proj_ptr + grp, tl.sum(sdzx * w, axis=0) * inv_n)


@triton.jit
def _sigmoid(z, PRECISE: tl.constexpr):
    """1 / (1 + exp(-z)) with correctly rounded division and libdevice's expf (what torch's silu
    uses). On the GPU `tl.exp` is ex2.approx of z * log2(e), whose rounded argument costs up to
    ~|z| ulps, and `/` is div.full (2 ulps); with them the whole VAE's gradients through its
    GroupNorm + SiLU sites came out up to 7.7x further from float64 than torch's (H200,
    2026-12-05; test_groupnorm_silu.py's whole-VAE test). The interpreter has no libdevice; its
    tl.exp is numpy's."""
    if PRECISE:
        e = libdevice.exp(-z)
    else:
        e = tl.exp(-z)
    return tl.div_rn(1.0, 1.0 + e)


@triton.jit
def _apply_step(x_base, y_base, i, offs, count, a, shift, MASKED: tl.constexpr, PRECISE: tl.constexpr):
    z = _ld(x_base, i, offs, count, MASKED) * a + shift
    _st(y_base, i, offs, count, z * _sigmoid(z, PRECISE), MASKED)


@_launch.tuned(["S"], "span_loop")
@triton.jit
def _gn_apply_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, y_ptr, C, CG, S, span,
                     BLOCK: tl.constexpr, STAGES: tl.constexpr, PRECISE: tl.constexpr):
    row, start, count, _ = _span(S, span)
    c = row % C
    group = (row // C) * (C // CG) + c // CG
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    a = rstd * tl.load(w_ptr + c).to(tl.float32)
    shift = tl.load(b_ptr + c).to(tl.float32) - mean * a  # z = x * a + shift
    offs = tl.arange(0, BLOCK)
    base = row * S + start
    for j in tl.range(0, count // BLOCK, num_stages=STAGES):
        _apply_step(x_ptr + base, y_ptr + base, j * BLOCK, offs, count, a, shift, False, PRECISE)
    if count % BLOCK != 0:
        _apply_step(x_ptr + base, y_ptr + base, count - count % BLOCK, offs, count, a, shift, True, PRECISE)


@triton.jit
def _dz(x, dy, mean, rstd, w, bias, PRECISE: tl.constexpr):
    """xhat and dL/dz of y = SiLU(z), z = xhat * w + bias, in fp32."""
    xhat = (x - mean) * rstd
    z = xhat * w + bias
    sig = _sigmoid(z, PRECISE)
    return xhat, dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _reduce_step(x_base, dy_base, i, offs, count, mean, rstd, w, bias, acc, accx, MASKED: tl.constexpr,
                 PRECISE: tl.constexpr):
    xhat, dz = _dz(_ld(x_base, i, offs, count, MASKED), _ld(dy_base, i, offs, count, MASKED),
                   mean, rstd, w, bias, PRECISE)
    if MASKED:  # dy = 0 there gives dz = 0 already; xhat is not 0, so mask the product too
        dz = tl.where(i + offs < count, dz, 0.0)
    return acc + dz, accx + dz * xhat


@_launch.tuned(["S"], "span_loop")
@triton.jit
def _gn_bwd_reduce_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sdz_ptr, sdzx_ptr,
                          C, CG, S, span, BLOCK: tl.constexpr, STAGES: tl.constexpr, PRECISE: tl.constexpr):
    # Per (channel row, span): sum(dz) and sum(dz * xhat), from which torch forms the bias and
    # weight gradients and the two group means of the GroupNorm backward.
    row, start, count, out = _span(S, span)
    c = row % C
    group = (row // C) * (C // CG) + c // CG
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    w = tl.load(w_ptr + c).to(tl.float32)
    bias = tl.load(b_ptr + c).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    base = row * S + start
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    accx = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.range(0, count // BLOCK, num_stages=STAGES):
        acc, accx = _reduce_step(x_ptr + base, dy_ptr + base, j * BLOCK, offs, count, mean, rstd, w, bias,
                                 acc, accx, False, PRECISE)
    if count % BLOCK != 0:
        acc, accx = _reduce_step(x_ptr + base, dy_ptr + base, count - count % BLOCK, offs, count, mean, rstd,
                                 w, bias, acc, accx, True, PRECISE)
    tl.store(sdz_ptr + out, tl.sum(acc, axis=0))
    tl.store(sdzx_ptr + out, tl.sum(accx, axis=0))


@triton.jit
def _bwd_apply_step(x_base, dy_base, dx_base, i, offs, count, mean, rstd, w, bias, c_mean, c_proj,
                    MASKED: tl.constexpr, PRECISE: tl.constexpr):
    xhat, dz = _dz(_ld(x_base, i, offs, count, MASKED), _ld(dy_base, i, offs, count, MASKED),
                   mean, rstd, w, bias, PRECISE)
    _st(dx_base, i, offs, count, (dz * w - c_mean - xhat * c_proj) * rstd, MASKED)


@_launch.tuned(["S"], "span_loop")
@triton.jit
def _gn_bwd_apply_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c_mean_ptr, c_proj_ptr,
                         dx_ptr, C, CG, S, span, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                         PRECISE: tl.constexpr):
    # dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dz * w.
    row, start, count, _ = _span(S, span)
    c = row % C
    group = (row // C) * (C // CG) + c // CG
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    c_mean = tl.load(c_mean_ptr + group)
    c_proj = tl.load(c_proj_ptr + group)
    w = tl.load(w_ptr + c).to(tl.float32)
    bias = tl.load(b_ptr + c).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    base = row * S + start
    for j in tl.range(0, count // BLOCK, num_stages=STAGES):
        _bwd_apply_step(x_ptr + base, dy_ptr + base, dx_ptr + base, j * BLOCK, offs, count, mean, rstd, w,
                        bias, c_mean, c_proj, False, PRECISE)
    if count % BLOCK != 0:
        _bwd_apply_step(x_ptr + base, dy_ptr + base, dx_ptr + base, count - count % BLOCK, offs, count, mean,
                        rstd, w, bias, c_mean, c_proj, True, PRECISE)


def _launch_shape(rows: int, spatial: int, device) -> tuple[int, int, int]:
    """(block, span, spans per channel): spans are whole blocks, and enough of them that the GPU
    has ~8 programs per SM; the interpreter gets few, large programs."""
    if _launch.interpreting() or device.type != "cuda":
        # Small blocks and up to 4 spans, so CPU tests exercise the multi-span merge too.
        block = min(256, triton.next_power_of_2(spatial))
        spans = min(4, triton.cdiv(spatial, block))
    else:
        block = min(2048, triton.next_power_of_2(spatial))
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        spans = max(1, min(triton.cdiv(spatial, block), triton.cdiv(target, rows)))
    span = triton.cdiv(triton.cdiv(spatial, spans), block) * block
    return block, span, triton.cdiv(spatial, span)


GRID_AXIS_MAX = 65_535   # CUDA's limit on a grid's second and third axes


def _grid(rows: int, spans: int) -> tuple[int, int]:
    """The span kernels' grid: (rows, spans), spans on the axis limited to 65,535 programs."""
    check(spans <= GRID_AXIS_MAX, "groupnorm_silu: spans per channel", spans, f"<= {GRID_AXIS_MAX}")
    return rows, spans


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        _launch.check_runnable()
        b, c = x.shape[:2]
        x = x.contiguous()
        spatial = x[0, 0].numel()
        block, span, spans = _launch_shape(b * c, spatial, x.device)
        grid = _grid(b * c, spans)
        span_meta = dict(BLOCK=block, **_launch.launch_config("span_loop"))
        parts = torch.empty((3, b * c, spans), dtype=torch.float32, device=x.device)
        _launch.launch(_gn_stats_kernel, grid, (x, parts[0], parts[1], parts[2], spatial, span), span_meta)
        stats = torch.empty((2, b * groups), dtype=torch.float32, device=x.device)
        mean, rstd = stats[0], stats[1]
        n_part = (c // groups) * spans
        _launch.launch(_gn_merge_kernel, (b * groups,),
                       (parts[0], parts[1], parts[2], mean, rstd, spatial, span, spans, n_part, eps),
                       dict(BLOCK=triton.next_power_of_2(n_part)))
        y = torch.empty_like(x)
        _launch.launch(_gn_apply_kernel, grid, (x, weight, bias, mean, rstd, y, c, c // groups, spatial, span),
                       dict(PRECISE=not _launch.interpreting(), **span_meta))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups = groups
        ctx.shape = (block, span, spans)  # the backward's launch shape is the forward's
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        b, c = x.shape[:2]
        groups = ctx.groups
        dy = dy.contiguous()
        spatial = x[0, 0].numel()
        block, span, spans = ctx.shape
        grid = _grid(b * c, spans)
        span_meta = dict(BLOCK=block, PRECISE=not _launch.interpreting(), **_launch.launch_config("span_loop"))
        sums = torch.empty((2, b * c, spans), dtype=torch.float32, device=x.device)
        sdz, sdzx = sums[0], sums[1]
        _launch.launch(_gn_bwd_reduce_kernel, grid,
                       (x, dy, weight, bias, mean, rstd, sdz, sdzx, c, c // groups, spatial, span), span_meta)
        centred = torch.empty((2, b * groups), dtype=torch.float32, device=x.device)
        c_mean, c_proj = centred[0], centred[1]
        n_part = (c // groups) * spans
        _launch.launch(_gn_bwd_merge_kernel, (b * groups,),
                       (sdz, sdzx, weight, c_mean, c_proj, c, c // groups, spans, n_part,
                        1.0 / ((c // groups) * spatial)),
                       dict(BLOCK=triton.next_power_of_2(n_part)))
        dx = torch.empty_like(x)
        _launch.launch(_gn_bwd_apply_kernel, grid,
                       (x, dy, weight, bias, mean, rstd, c_mean, c_proj, dx, c, c // groups, spatial, span),
                       span_meta)
        dbias, dweight = _launch.cast_rows(sums.view(2, b, c, spans).sum((1, 3)), (bias.dtype, weight.dtype))
        return dx, dweight, dbias, None, None


def groupnorm_silu(x, weight, bias, groups: int, eps: float = 1e-6):
    """Fused SiLU(GroupNorm(x)) (Triton; equals `groupnorm_silu_reference`).

    Arguments:
        x: (B, C, T, H, W) or (B, C, H, W) feature map.
        weight, bias: (C,) GroupNorm affine parameters.
        groups: number of groups (32 in the VAE); must divide C.
        eps: GroupNorm epsilon (1e-6 in the SDXL-style VAE, 1e-5 where torch's default is used).
    Returns:
        y of x's shape and dtype. Gradients flow to x, weight and bias.
    """
    check(x.dim() >= 3, "groupnorm_silu: x", tuple(x.shape), "(B, C, *spatial)")
    c = x.shape[1]
    check(isinstance(groups, int) and groups > 0 and c % groups == 0, "groupnorm_silu: groups",
          groups, f"a positive divisor of C = {c}")
    check(tuple(weight.shape) == (c,) and tuple(bias.shape) == (c,), "groupnorm_silu: weight/bias",
          (tuple(weight.shape), tuple(bias.shape)), f"({c},) each")
    check(x[0, 0].numel() > 0, "groupnorm_silu: spatial size", tuple(x.shape[2:]), "non-empty")
    return _GroupNormSiLU.apply(x, weight.contiguous(), bias.contiguous(), groups, eps)
