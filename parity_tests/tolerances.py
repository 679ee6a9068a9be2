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
    # Whole-model comparisons accumulate through depth: the goldens' own fp32-vs-fp64 spread is
    # 6e-7 (DiT) and 7e-6 (VAE, GroupNorm over small groups), see goldens/README.md.
    ("dit", "float32"): Tol(1e-5),
    ("dit_grad", "float32"): Tol(5e-5),
    ("vae", "float32"): Tol(5e-5),
    ("vae_grad", "float32"): Tol(2e-4),
    ("objective", "float32"): Tol(1e-6, 1e-7),
    ("kernel", "float32"): Tol(1e-5, 1e-6),
    ("kernel", "float16"): Tol(2e-3, 1e-4),
    ("sharded", "float32"): Tol(1e-5, 1e-7),
    ("sharded", "bfloat16"): Tol(2e-2, 1e-3),
    # Global gradients of a sharded layout vs the whole model, per tensor (benchmarks/multi_gpu.py).
    # fp32: summation order only (measured worst 1.8e-6, CPU, tiny DiT, TP/PP/DP/CP).
    # bf16: each layout rounds different intermediates to bf16 (TP partial sums before the
    # all-reduce, per-micro-batch outputs, per-rank attention chunks); 1 ulp = 2^-8 = 3.9e-3 at each
    # rounding point, compounded through the layers' backward. Measured (CPU bf16, tiny DiT, 2
    # layers): worst tensor 2.2-2.5e-2 (layers.0.cross_attn_norm.bias), L2 over all gradients
    # 2-6e-3, while the one-process bf16 run itself is 0.92 (worst tensor) / 0.16 (L2) away from
    # fp32. 5e-2 is 2x the measured worst and still 18x below that bf16-vs-fp32 spread; a sharding
    # bug (a missing TP or DP sum, a wrong slice) is an O(1) error.
    ("sharded_grad", "float32"): Tol(1e-5, 1e-7),
    ("sharded_grad", "bfloat16"): Tol(5e-2, 1e-6),
    # A dozen optimizer steps after sharding: Adam divides by sqrt(v), so summation-order
    # differences in the gradients (~1e-7) grow; still three orders below any real bug.
    ("sharded_train", "float32"): Tol(1e-4, 1e-6),
    # The same, for the cross-attention logit path (q, k, their norm) on SyntheticLatents, whose
    # text tokens are one vector plus 1% noise: near-equal keys make dL/dq and dL/dk tiny sums of
    # cancelling terms (the k bias's is exactly zero in exact arithmetic), so a changed summation
    # order (CP=2 splits the tokens) is a large RELATIVE change of a tiny gradient, which Adam's
    # division by sqrt(v) turns into a visible weight change. Measured after 4 steps (CPU, tiny
    # DiT, CP=2 vs one process): worst 2.2e-2 (model/ema, cross_attn.kv.bias), 2.9e-3 (Adam
    # moments); v rows and every other tensor within 3.1e-5. A missing or doubled gradient sum is
    # an O(1) error in the Adam moments (linear in the gradient).
    ("sharded_train_flat_logits", "float32"): Tol(5e-2, 1e-6),
}


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
