"""Shared launch plumbing of the Triton kernels: interpreter detection and launch configs.

Importing this module before any `@triton.jit` definition matters: Triton decides at decoration
time whether a kernel is compiled or interpreted. On a machine without CUDA the interpreter is the
only way a kernel can run, so TRITON_INTERPRET=1 is set here when no GPU is visible
(../shared/notes/platform.md, "Triton on CPU").
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the environment decision above)
import triton.language as tl  # noqa: E402

# True when triton.language was imported (e.g. by torch.use_deterministic_algorithms or megatron)
# before TRITON_INTERPRET=1 was set: its own jit helpers (tl.sum) then refuse to run interpreted.
# Importing the kernel modules (for their references) still works; launching raises (below).
_STALE_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1" and type(tl.sum).__name__ == "JITFunction"


def check_runnable() -> None:
    """Raise a clear error instead of the interpreter's obscure one (called before each launch)."""
    if _STALE_INTERPRETER:
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so kernels cannot "
                           "run in the CPU interpreter; set it before importing torch's deterministic "
                           "mode, megatron or triton (see parity_tests/conftest.py)")


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_block(n: int) -> int:
    """Power-of-two block covering a row of n features (72 -> 128, 3456 -> 4096)."""
    return triton.next_power_of_2(max(int(n), 1))


def autotuning() -> bool:
    """Autotune on the GPU unless MUGV_KERNEL_AUTOTUNE=0 (the GPU parity run uses one fixed
    config per kernel to save compile time; the configs differ only in warps and rows per step)."""
    return not interpreting() and os.environ.get("MUGV_KERNEL_AUTOTUNE", "1") != "0"


def tuned(key: list[str]):
    """Decorator over @triton.jit: on the GPU, autotune the warp count per `key` (the row-size
    arguments); in the interpreter, which refuses several configs, the kernel as it is."""
    def wrap(kernel):
        if not autotuning():
            return kernel
        return triton.autotune([triton.Config({}, num_warps=w) for w in (4, 8, 16)], key=key)(kernel)
    return wrap


def tuned_rows(key: list[str]):
    """Like `tuned`, for the loop-over-rows backward kernels: also tunes ROWS (rows loaded per loop
    iteration) and STAGES (software-pipelining depth of the row loop, `tl.range(num_stages=)`:
    the next rows' loads are issued before this row's reductions). The first H100 runs without
    pipelining reached 61-76% of the copy bandwidth: one program per SM waited on each row's loads."""
    def wrap(kernel):
        if not autotuning():
            return kernel
        configs = [triton.Config({"ROWS": r, "STAGES": s}, num_warps=w)
                   for r, w, s in [(1, 8, 1), (1, 16, 1), (2, 16, 1), (1, 8, 2), (1, 16, 2), (1, 8, 3),
                                   (2, 8, 2), (2, 16, 2), (2, 16, 3), (4, 16, 2)]]
        return triton.autotune(configs, key=key)(kernel)
    return wrap


def tuned_stages(key: list[str]):
    """Like `tuned`, for kernels with a loop over blocks (GroupNorm's spans): tunes the warps and
    STAGES, the software-pipelining depth of the loop."""
    def wrap(kernel):
        if not autotuning():
            return kernel
        configs = [triton.Config({"STAGES": s}, num_warps=w) for w in (4, 8) for s in (1, 2, 3)]
        return triton.autotune(configs, key=key)(kernel)
    return wrap


def stages_warps() -> dict:
    """Launch keywords for a `tuned_stages` kernel (one warp, no pipelining in the interpreter)."""
    if interpreting():
        return {"num_warps": 1, "STAGES": 1}
    return {} if autotuning() else {"num_warps": 8, "STAGES": 2}


def rows_warps() -> dict:
    """Launch keywords for a `tuned_rows` kernel: in the interpreter 2 rows per iteration (so the
    tests cover the masked tail of the row tile) and one warp; the autotuner's choice on the GPU."""
    if interpreting():
        return {"num_warps": 1, "ROWS": 2, "STAGES": 1}
    return {} if autotuning() else {"num_warps": 16, "ROWS": 1, "STAGES": 2}


def warps() -> dict:
    """Launch keywords for a `tuned` kernel: one warp in the interpreter, the autotuner's choice
    on the GPU."""
    if interpreting():
        return {"num_warps": 1}
    return {} if autotuning() else {"num_warps": 8}


def reduction_programs(device: torch.device) -> int:
    """How many programs a loop-over-rows backward kernel should launch: a few per SM on the GPU
    (each writes one fp32 partial of the parameter gradients), very few in the interpreter."""
    if device.type == "cuda":  # each program's fp32 partials (K x h per parameter gradient) are
        # written and summed again: 2 per SM keeps that under 3% of the backward's bytes at 720p
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check(cond: bool, name: str, value, expected: str) -> None:
    """Raise ValueError naming the argument, the value and what was expected."""
    if not cond:
        raise ValueError(f"{name}: got {value}, expected {expected}")
