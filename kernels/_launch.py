"""Shared launch plumbing of the Triton kernels: interpreter detection and launch configs.

Importing this module before any `@triton.jit` definition matters: Triton decides at decoration
time whether a kernel is compiled or interpreted. On a machine without CUDA the interpreter is the
only way a kernel can run, so TRITON_INTERPRET=1 is set here when no GPU is visible
(../shared/notes/platform.md, "Triton on CPU").
"""
from __future__ import annotations

import contextlib
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


# Launch families: (autotuned configs as (meta-parameters, warps), the one config used when
# MUGV_KERNEL_AUTOTUNE=0 (the GPU parity run), the interpreter's config). The interpreter refuses
# several configs, runs one warp, and gets small tiles so that the CPU tests cover masked tails.
FAMILIES = {
    # one program per row: warps only
    "row": ([({}, w) for w in (4, 8, 16)], ({}, 8), ({}, 1)),
    # loop over rows (the AdaLN backwards): ROWS per iteration and STAGES, the software-pipelining
    # depth (`tl.range(num_stages=)`: the next rows' loads are issued before this row's reductions).
    # The first H100 runs, unpipelined, reached 61-76% of the copy bandwidth.
    "row_loop": ([({"ROWS": r, "STAGES": st}, w) for r, w, st in
                  [(1, 8, 1), (1, 16, 1), (1, 8, 2), (1, 16, 2), (1, 8, 3), (1, 16, 4), (1, 32, 2),
                   (2, 8, 2), (2, 16, 2), (2, 16, 3), (2, 16, 4), (2, 32, 2), (4, 16, 2)]],
                 ({"ROWS": 1, "STAGES": 2}, 16), ({"ROWS": 2, "STAGES": 1}, 1)),
    # one program per tile of TOK tokens x 16 heads x the head dim (QK-RMSNorm + RoPE forward)
    "token_tile": ([({"TOK": t}, w) for t in (1, 2, 4, 8) for w in (2, 4, 8)],
                   ({"TOK": 2}, 4), ({"TOK": 2}, 1)),
    # grid-stride loop over such tiles by PER_SM programs per SM (its backward; the v7 row tiles
    # ran best at 4 rows, 1 warp, 5 stages, 8 programs per SM)
    "token_tile_loop": ([({"TOK": t, "STAGES": st, "PER_SM": n}, w)
                         for t in (1, 2) for w in (1, 2, 4) for st in (3, 5) for n in (8, 16)],
                        ({"TOK": 1, "STAGES": 3, "PER_SM": 8}, 2), ({"TOK": 2, "STAGES": 1, "PER_SM": 1}, 1)),
    # loop over blocks of one long span (GroupNorm)
    "span_loop": ([({"STAGES": st}, w) for w in (4, 8) for st in (1, 2, 3)],
                  ({"STAGES": 2}, 8), ({"STAGES": 1}, 1)),
}


def tuned(key: list[str], family: str = "row"):
    """Decorator over @triton.jit: on the GPU, autotune over the family's configs per `key` (the
    size arguments); otherwise the kernel as it is, launched with `launch_config(family)`."""
    def wrap(kernel):
        if not autotuning():
            return kernel
        configs = [triton.Config(dict(meta), num_warps=w) for meta, w in FAMILIES[family][0]]
        return triton.autotune(configs, key=key)(kernel)
    return wrap


# family -> index into its autotune configs, set by `forced_config` (the parity run over every config)
_FORCED: dict[str, int] = {}


@contextlib.contextmanager
def forced_config(family: str, index: int):
    """Launch the kernels of `family` with its autotune config `index` (GPU, MUGV_KERNEL_AUTOTUNE=0):
    `mugv verify-kernels` checks every config the autotuner may pick, not only the fixed one."""
    if interpreting() or autotuning():
        raise RuntimeError("forced_config needs a GPU and MUGV_KERNEL_AUTOTUNE=0 (kernels not autotuned)")
    if not 0 <= index < len(FAMILIES[family][0]):
        raise ValueError(f"forced_config: {family} has {len(FAMILIES[family][0])} configs, got index {index}")
    _FORCED[family] = index
    try:
        yield FAMILIES[family][0][index]
    finally:
        _FORCED.pop(family, None)


def launch_config(family: str = "row") -> dict:
    """Launch keywords of a `tuned` kernel: none when autotuning (the autotuner's choice), else the
    family's fixed config (GPU; or the one `forced_config` sets) or its interpreter config (CPU)."""
    if interpreting():
        meta, w = FAMILIES[family][2]
    elif autotuning():
        return {}
    elif family in _FORCED:
        meta, w = FAMILIES[family][0][_FORCED[family]]
    else:
        meta, w = FAMILIES[family][1]
    return {**meta, "num_warps": w}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU; 2 "SMs" in the interpreter (few, long-lived programs,
    so that the CPU tests cover loops of several steps)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def reduction_programs(device: torch.device) -> int:
    """How many programs a loop-over-rows backward kernel should launch: 2 per SM. Each writes
    fp32 partials of the parameter gradients (K x h each), which torch then sums: at 2 per SM that
    stays under 3% of the AdaLN backward's bytes at 720p."""
    return 2 * sm_count(device)


def check(cond: bool, name: str, value, expected: str) -> None:
    """Raise ValueError naming the argument, the value and what was expected."""
    if not cond:
        raise ValueError(f"{name}: got {value}, expected {expected}")
