"""The one tolerance table of mugv's parity tests, keyed by (op, dtype), and the comparison helper.

A comparison passes when max|a - b| <= atol + rtol * max|b| (b the reference). Errors are scaled by
the reference's largest magnitude, not elementwise, so tiny reference entries do not dominate.
bf16 kernels are judged against an fp32 reference relative to plain torch in bf16
(`assert_bf16_within_factor`), as FlashAttention's tests do.

Add a row when a new op needs one; never loosen a row to make a test pass without saying why here.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float = 0.0


# (op, dtype) -> tolerance. "op" names a family of computations; "*" is the fallback.
TOLERANCES: dict[tuple[str, str], Tol] = {
    ("exact", "float32"): Tol(0.0),
    ("exact", "bfloat16"): Tol(0.0),
    ("*", "float32"): Tol(1e-5, 1e-7),
    ("*", "float64"): Tol(1e-12, 1e-14),
    ("*", "float16"): Tol(2e-3, 1e-5),
    ("*", "bfloat16"): Tol(2e-2, 1e-4),
    # Whole-model comparisons accumulate through depth; the scale is the goldens' own fp32 error
    # against their float64 runs (`*_fp64` tensors, goldens/README.md; the margins report prints
    # the DiT's as row "golden/float32 one process vs float64").
    ("dit", "float32"): Tol(1e-5),
    ("dit_grad", "float32"): Tol(5e-5),
    ("vae", "float32"): Tol(5e-5),
    ("vae_grad", "float32"): Tol(2e-4),
    ("objective", "float32"): Tol(1e-6, 1e-7),
    ("kernel", "float32"): Tol(1e-5, 1e-6),
    ("kernel", "float16"): Tol(2e-3, 1e-4),
    # fp32 sharded-vs-one-process parity of the tiny DiT is judged against float64 (VS_FLOAT64
    # below, parity_tests/test_parallel_layouts.py). These rtol rows remain for comparisons
    # without a float64 run: losses of multi-step trainer runs (test_trainer.py,
    # test_preference_stage.py), gradient norms (test_grad_norm.py) and benchmarks/multi_gpu.py.
    # test_megatron_tp.py, test_lora.py's TP=2 tests and test_dit.py's JAX-vs-torch test are judged
    # against float64 (VS_FLOAT64).
    ("sharded", "float32"): Tol(1e-5, 1e-7),
    ("sharded", "bfloat16"): Tol(2e-2, 1e-3),
    # Global gradients of a sharded layout vs the whole model, per tensor (benchmarks/multi_gpu.py).
    # bf16: each layout rounds different intermediates to bf16 (TP partial sums before the
    # all-reduce, per-micro-batch outputs, per-rank attention chunks); 1 ulp = 2^-8 = 3.9e-3 at each
    # rounding point, compounded through the layers' backward. 5e-2 is ~2x the worst tensor that
    # `torchrun --nproc_per_node 2 benchmarks/multi_gpu.py --cpu` (CPU bf16) and the H100 runs in
    # benchmarks/results/multi_gpu_h100_world2_run*.json report, and well below the one-process
    # bf16 run's own distance from fp32 (its `bf16_vs_fp32` field); a sharding bug (a missing TP
    # or DP sum, a wrong slice) is an O(1) error.
    ("sharded_grad", "float32"): Tol(1e-5, 1e-7),
    ("sharded_grad", "bfloat16"): Tol(5e-2, 1e-6),
    # Multi-step trainer runs, sharded vs one process (test_trainer.py; the trainer's Megatron
    # optimizer takes fp32 or bf16 parameters, so no float64 run exists): Adam divides by
    # sqrt(v), so summation-order differences in the gradients grow over the steps. The bound is
    # a safety factor of 3.5 over the worst spread the margins report measured on both dispatch
    # paths (docs/tolerances.md), still three orders below a real bug.
    ("sharded_train", "float32"): Tol(1e-4, 0.0),
    # The Adam MOMENTS of the cross-attention logit path (q, k, their norm) on SyntheticLatents,
    # whose text tokens are one vector plus 1% noise: near-equal keys make dL/dq and dL/dk tiny
    # sums of cancelling terms, so a changed summation order (CP=2 splits the tokens) is a large
    # RELATIVE change of a tiny gradient. A missing or doubled gradient sum is an O(1) error in the
    # moments (linear in the gradient). The weights of these tensors are Adam's normalisation of
    # that noise (steps of ~lr whatever its size): test_trainer judges them by
    # `adam_divergence_bound`, the most any two Adam runs can differ, and no tighter claim holds
    # on every machine. Margins: docs/tolerances.md (python -P -m mugv.parity_tests.margins).
    ("sharded_train_flat_logits", "float32"): Tol(5e-2, 0.0),
}


# ---------------------------------------------------------------------------------------------
# fp32 parity judged against float64 (sharded vs one process)
#
# Two fp32 runs of one computation that differ only in summation order (a TP partial sum, a PP
# micro-batch split, a CP all-to-all) are each some rounding away from the exact result, and
# neither is "the" answer: comparing them to each other with a fixed rtol measures one machine's
# kernels (its vector width picks the order), and failed by 1-5 % on another AVX-512 machine.
# Instead both are compared with a float64 run of the same computation (the same fp32 parameters
# and inputs, the model in float64):
#
#     max|sharded32 - ref64| <= factor * max(max|single32 - ref64|, floor_ulps * u * max|ref64|)
#
# per tensor, u = 2^-24 the fp32 unit roundoff. `factor`: a sharded layout does the same
# arithmetic in another order, so its error is a draw from the same distribution as the one
# process's; the worst-case bound of a sum of n terms (n u sum|x_i|, Higham 4.2) is the same for
# every order, while typical errors (~sqrt(n) u) of two orders differ by small factors. The floor
# covers tensors the one process happens to get almost exactly (a short sum, a lucky order): a
# few dozen fp32 roundings of a value of size max|ref64|. A sharding bug (a missing TP or DP sum,
# a wrong slice, a dropped micro-batch) is an O(max|ref64|) error: 2^24 / (factor * floor_ulps),
# ~2.6e5 times above the floor with the row below. `single_ulps` bounds the one-process fp32 run
# itself against float64 (in units of u * max|ref64|, per tensor): rounding accumulated through
# the tiny DiT's depth; a formula difference (a wrong eps, a missing term) is >= 1e-3 relative.
# `python -P -m mugv.parity_tests.margins` prints each row's measured worst and margin.


@dataclasses.dataclass(frozen=True)
class VsFloat64:
    factor: float
    floor_ulps: float
    single_ulps: float


UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}

VS_FLOAT64: dict[tuple[str, str], VsFloat64] = {
    # Losses, outputs and global gradients of every TP/SP/PP/VPP/DP/CP layout of the tiny DiT.
    ("sharded", "float32"): VsFloat64(factor=4.0, floor_ulps=16.0, single_ulps=256.0),
    # The JAX oracle with the official code's sinusoid table vs the official code (goldens): the
    # same computation in another framework's kernels, judged by the same argument.
    ("golden", "float32"): VsFloat64(factor=4.0, floor_ulps=16.0, single_ulps=256.0),
    # The JAX oracle with torch's sinusoid table vs torch production, both against the torch model
    # in float64 (test_dit.test_torch_equals_jax_oracle): the same argument again.
    ("jax", "float32"): VsFloat64(factor=4.0, floor_ulps=16.0, single_ulps=256.0),
    # The whole VAE computed another way vs the same VAE in one fp32 process, both against the
    # VAE in float64: with the fused GroupNorm + SiLU kernel at every GroupNorm + SiLU site
    # (parity_tests/kernels/test_groupnorm_silu.py; the kernel's split spans merged by Chan's
    # formula are another summation order) and data parallel over ranks (test_vae_parallel.py:
    # gradients averaged over ranks are another summation order; each rank's convolutions also
    # run at a smaller batch, so MKL-DNN may block them differently). So the argument above holds
    # for `factor`. The rounding the two ulp counts stand for scales with depth: a VAE gradient
    # reaching the first encoder conv passes ~70 layers (2D encoder ~17, temporal encoder ~16,
    # temporal decoder ~16, 2D decoder ~20) against ~15 in the tiny DiT the row above was set for,
    # so `floor_ulps` and `single_ulps` are 4x its values. A data-parallel bug (a missing or doubled
    # rank sum, wrong rows, noise drawn per rank) or a kernel bug is O(max|ref64|) = 2^24 ulps,
    # 6.5e4 x above the bound; a formula difference (a wrong eps, a missing term, >= 1e-3 relative
    # = ~1.7e4 ulps) stays 16x above `single_ulps`.
    ("vae_model", "float32"): VsFloat64(factor=4.0, floor_ulps=64.0, single_ulps=1024.0),
    # The tiny DiT with the Triton kernels in every slot (AdaLN, gated residual + AdaLN, QK-RMSNorm
    # + RoPE on self-attention, QK-RMSNorm on cross-attention) vs the same DiT on the references,
    # both against the DiT in float64 (parity_tests/kernels/test_dit_kernels.py): the argument of
    # the "sharded" row (the same computation in other summation orders and fusions, ~15 layers
    # deep), so its numbers. A kernel with a wrong term, index or gradient is O(max|ref64|) off.
    ("kernel_model", "float32"): VsFloat64(factor=4.0, floor_ulps=16.0, single_ulps=256.0),
}

# Every comparison made through this module, for the margins report (parity_tests/margins.py):
# dicts with row, name, measured, bound (the test passes when measured <= bound).
RECORDS: list[dict] = []


def _record(row: str, name: str, measured: float, bound: float, **extra) -> None:
    RECORDS.append(dict(row=row, name=name, measured=float(measured), bound=float(bound), **extra))


def assert_sharded_vs_float64(sharded, single, ref64, op: str = "sharded", dtype: str = "float32",
                              name: str = "", redraws=()) -> float:
    """Judge a sharded fp32 result against the one-process fp32 result, both against float64.

    First the one process itself (assert_single_vs_float64). Then: passes when
    max|sharded - ref64| <= factor * max(max|single - ref64|, floor_ulps * u * max|ref64|) (the
    VS_FLOAT64 row (op, dtype); see the comment above it). `redraws`: more fp32 runs of the
    one-process computation with its rounding drawn again (`harness.rerounded`); the one
    process's error is then the worst of all its runs, since one run's error is a single draw
    that can be many times below the next (docs/tolerances.md, "One draw is not a bound").
    Returns the error in units of the bound (<= 1 passes). The failure message names the tensor,
    the worst element, the three values there, and both sides' errors."""
    row = VS_FLOAT64[(op, dtype)]
    u = UNIT_ROUNDOFF[dtype]
    ref = to_numpy(ref64)
    assert_single_vs_float64(single, ref, op, dtype, name=name)
    err_sharded, idx, v_sharded, v_ref = worst(sharded, ref)
    err_single = max([worst(single, ref)[0]] + [worst(r, ref)[0] for r in redraws])
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    floor = row.floor_ulps * u * scale
    bound = row.factor * max(err_single, floor)
    _record(f"{op}/{dtype} vs float64", name, err_sharded, bound,
            single=err_single, floor=floor, scale=scale)
    if not err_sharded <= bound:
        v_single = to_numpy(single)[idx] if ref.size else 0.0
        raise AssertionError(
            f"{name or 'tensor'} ({op}, {dtype} vs float64): max|sharded - ref64| = {err_sharded:.3e} "
            f"at index {idx} (sharded {v_sharded:.8e}, one process {v_single:.8e}, float64 "
            f"{v_ref:.8e}) = {err_sharded / (u * scale) if scale else float('inf'):.1f} ulps of "
            f"max|ref64| ({scale:.3e}); allowed {bound:.3e} = {row.factor:g} x max(one process's "
            f"{err_single:.3e}{f' (worst of {1 + len(redraws)} runs)' if redraws else ''}, "
            f"floor {row.floor_ulps:g} u max|ref64| = {floor:.3e})")
    return err_sharded / bound if bound else 0.0


def assert_single_vs_float64(single, ref64, op: str = "sharded", dtype: str = "float32",
                             name: str = "") -> float:
    """The one-process fp32 result within single_ulps * u * max|ref64| of float64 (per tensor).
    Returns the error in ulps of max|ref64|."""
    row = VS_FLOAT64[(op, dtype)]
    u = UNIT_ROUNDOFF[dtype]
    err, idx, v, v_ref = worst(single, ref64)
    scale = float(np.max(np.abs(to_numpy(ref64)))) if np.size(ref64) else 0.0
    bound = row.single_ulps * u * scale
    _record(f"{op}/{dtype} one process vs float64", name, err, bound, scale=scale)
    if not err <= bound:
        raise AssertionError(
            f"{name or 'tensor'} ({op}, {dtype} one process vs float64): max|single - ref64| = "
            f"{err:.3e} at index {idx} (single {v:.8e}, float64 {v_ref:.8e}) = "
            f"{err / (u * scale) if scale else float('inf'):.1f} ulps of max|ref64| ({scale:.3e}); "
            f"allowed {row.single_ulps:g} ulps = {bound:.3e}")
    return err / (u * scale) if scale else 0.0


def adam_divergence_bound(lrs, betas: tuple[float, float]) -> float:
    """The most two Adam runs from the same weights can differ by, per element, after steps with
    learning rates `lrs`, whatever their gradients (no weight decay).

    One step moves an element by lr_t |m_hat / (sqrt(v_hat) + eps)| <= lr_t rho_t with, by
    Cauchy-Schwarz on m_t = (1 - b1) sum b1^(t-i) g_i against v_t = (1 - b2) sum b2^(t-i) g_i^2,
        rho_t = (1 - b1) / (1 - b1^t) * sqrt(1 - b2^t) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j)
    (rho_1 = 1: the first step is lr * sign(g)). Two runs: twice the sum. An EMA of the weights
    (a convex combination of them) obeys the same bound. Gradient clipping changes nothing (the
    bound holds for any gradients)."""
    import math
    b1, b2 = betas
    total = 0.0
    for t, lr in enumerate(lrs, start=1):
        geometric = sum((b1 * b1 / b2) ** j for j in range(t))
        rho = (1 - b1) / (1 - b1 ** t) * math.sqrt(1 - b2 ** t) / math.sqrt(1 - b2) * math.sqrt(geometric)
        total += lr * rho
    return 2.0 * total


def assert_within(actual, expected, bound: float, row: str, name: str = "") -> float:
    """max|actual - expected| <= bound, a bound computed by the caller (e.g. adam_divergence_bound);
    recorded under `row` for the margins report. Returns the error."""
    err, idx, va, vb = worst(actual, expected)
    _record(row, name, err, bound, scale=float(np.max(np.abs(to_numpy(expected)))) if np.size(expected) else 0.0)
    if not err <= bound:
        raise AssertionError(f"{name or 'tensor'} ({row}): max |a-b| = {err:.3e} at index {idx} "
                             f"(actual {va:.6e}, expected {vb:.6e}); allowed {bound:.3e}")
    return err


def tolerance(op: str, dtype: str) -> Tol:
    return TOLERANCES.get((op, dtype)) or TOLERANCES[("*", dtype)]


def to_numpy(x) -> np.ndarray:
    """numpy float64 view of a torch tensor, jax array or numpy array (bf16 upcast exactly)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def worst(actual, expected) -> tuple[float, tuple[int, ...], float, float]:
    """(max abs error, its index, actual value there, expected value there)."""
    a, b = to_numpy(actual), to_numpy(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape} vs expected {b.shape}")
    if a.size == 0:
        return 0.0, (), 0.0, 0.0
    err = np.abs(a - b)
    if not np.all(np.isfinite(a)):
        idx = np.unravel_index(np.argmax(~np.isfinite(a)), a.shape)
        return float("inf"), tuple(int(i) for i in idx), float(a[idx]), float(b[idx])
    idx = np.unravel_index(np.argmax(err), err.shape)
    return float(err[idx]), tuple(int(i) for i in idx), float(a[idx]), float(b[idx])


def assert_close(actual, expected, op: str = "*", dtype: str = "float32", name: str = "") -> float:
    """Assert `actual` equals the reference `expected` within the table's (op, dtype) row.

    Returns the relative error (max abs error / max|expected|) for reporting.
    """
    tol = tolerance(op, dtype)
    err, idx, va, vb = worst(actual, expected)
    scale = float(np.max(np.abs(to_numpy(expected)))) if np.size(to_numpy(expected)) else 0.0
    bound = tol.atol + tol.rtol * scale
    rel = err / scale if scale else err
    _record(f"{op}/{dtype}", name, err, bound, scale=scale)
    if not err <= bound:
        raise AssertionError(
            f"{name or 'tensor'} ({op}, {dtype}): max |a-b| = {err:.3e} at index {idx} "
            f"(actual {va:.6e}, expected {vb:.6e}); allowed {bound:.3e} = {tol.atol:g} + "
            f"{tol.rtol:g} x max|expected| ({scale:.3e}); relative error {rel:.3e}")
    return rel


def assert_bf16_within_factor(kernel_bf16, torch_bf16, reference_fp32, factor: float = 2.0,
                              name: str = "", floor: float = 0.0) -> None:
    """bf16 result judged as FlashAttention does: its error against the fp32 reference is at most
    `factor` times the error of plain torch computing the same thing in bf16."""
    err_k = worst(kernel_bf16, reference_fp32)[0]
    err_t = worst(torch_bf16, reference_fp32)[0]
    if not err_k <= factor * err_t + floor:
        raise AssertionError(f"{name}: bf16 error {err_k:.3e} > {factor} x torch bf16 error {err_t:.3e}")


def assert_tree_close(actual: dict, expected: dict, op: str = "*", dtype: str = "float32") -> dict:
    """assert_close over two dicts of arrays with equal keys; returns {key: relative error}."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(f"key mismatch: missing {missing}, extra {extra}")
    return {k: assert_close(actual[k], expected[k], op, dtype, name=k) for k in expected}
