"""Shared launch plumbing of the Triton kernels: interpreter detection, launch configs and the
direct launch path (`launch`).

Importing this module before any `@triton.jit` definition matters: Triton decides at decoration
time whether a kernel is compiled or interpreted. On a machine without CUDA the interpreter is the
only way a kernel can run, so TRITON_INTERPRET=1 is set here when no GPU is visible
(../shared/notes/platform.md, "Triton on CPU").
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the environment decision above)
import triton.language as tl  # noqa: E402
from triton import knobs as _knobs  # noqa: E402

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


def tuned(key: list[str], family: str = "row", reset: list[str] | None = None):
    """Decorator over @triton.jit: on the GPU, autotune over the family's configs per `key` (the
    size arguments); otherwise the kernel as it is, launched with `launch_config(family)`.
    `reset`: output arguments the autotuner zeroes before each config it tries and before the
    chosen one runs after tuning (partial-sum buffers whose used rows depend on the config)."""
    def wrap(kernel):
        if not autotuning():
            return kernel
        configs = [triton.Config(dict(meta), num_warps=w) for meta, w in FAMILIES[family][0]]
        return triton.autotune(configs, key=key, reset_to_zero=reset)(kernel)
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
        return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)
    return 2


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device) -> int:
    """How many programs a loop-over-rows backward kernel should launch: 2 per SM. Each writes
    fp32 partials of the parameter gradients (K x h each), which torch then sums: at 2 per SM that
    stays under 3% of the AdaLN backward's bytes at 720p."""
    return 2 * sm_count(device)


def cast_rows(grads: torch.Tensor, dtypes) -> tuple[torch.Tensor, ...]:
    """The fp32 parameter gradients stacked along dim 0 (summed from the kernels' partials), each
    row in its dtype: one cast where all share one (the usual case), else one per row."""
    if len(set(dtypes)) == 1:
        return grads.to(dtypes[0]).unbind(0)
    return tuple(g.to(d) for g, d in zip(grads.unbind(0), dtypes))


def check(cond: bool, name: str, value, expected: str) -> None:
    """Raise ValueError naming the argument, the value and what was expected."""
    if not cond:
        raise ValueError(f"{name}: got {value}, expected {expected}")


# ---------------------------------------------------------------------------------------------
# Direct launches. Triton's own launch path (`kernel[grid](...)`: the autotuner's key, then
# `JITFunction.run` binding and specialising every argument and looking up its compile cache)
# costs ~0.1 ms of host time per launch, more than the GPU time of a 256p kernel. `launch` goes
# through that path once per launch signature and keeps the compiled kernel Triton returned (the
# autotuner's choice included); later launches of the signature call it with the same argument
# list Triton would have built. The signature is stricter than Triton's specialisation: each
# tensor's dtype and whether its address is 16-byte aligned (what Triton specialises a pointer
# on), the exact value and type of every other argument, the launch keywords and the device.

# MUGV_KERNEL_LAUNCH=triton: every launch through Triton's path (to bisect; benchmarks set False)
DIRECT = not interpreting() and os.environ.get("MUGV_KERNEL_LAUNCH", "direct") != "triton"
_DIRECT_CACHE: dict = {}


def _signature(kernel, device: int, args: tuple, meta: dict) -> tuple:
    # Triton's compile key also holds these two knobs, read at every launch
    key = [id(kernel), device, _knobs.runtime.debug, _knobs.compilation.instrumentation_mode]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((type(a), a))
    key.extend((k, type(v), v) for k, v in sorted(meta.items()))   # TWO=True is not TWO=1
    return tuple(key)


def _jit_function(kernel):
    """The JITFunction under a kernel (an Autotuner's `.fn` chain; a JITFunction's own `.fn` is
    the Python function, so stop at the JITFunction)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _launch_hooks() -> bool:
    """Whether Triton's launch hooks are set (profilers such as proton): then every launch goes
    through Triton's path, which calls them."""
    rt = _knobs.runtime
    return bool(getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
                or getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


def _hooked(kernel) -> bool:
    """Whether Triton runs something for this kernel that a direct launch would skip: pre-run hooks
    of the kernel or a config's own pre-hook."""
    if _jit_function(kernel).pre_run_hooks:
        return True
    return any(c.pre_hook is not None for c in getattr(kernel, "configs", []))


def _bound_tail(kernel, n_args: int, meta: dict) -> tuple[list, list[str]]:
    """The values Triton binds after the `n_args` positional arguments (the launch keywords, the
    autotuner's chosen meta-parameters, defaults), and every parameter's name."""
    jit = _jit_function(kernel)
    chosen = dict(kernel.best_config.kwargs) if hasattr(kernel, "best_config") else {}
    given = {**meta, **chosen}
    tail = []
    for p in jit.params[n_args:]:
        if p.name in given:
            tail.append(given[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            raise TypeError(f"launch: {jit.__name__} parameter {p.name!r} has no value")
    return tail, list(jit.arg_names)


def launch(kernel, grid, args: tuple, meta: dict | None = None) -> None:
    """Launch a `tuned` Triton kernel: `kernel[grid](*args, **meta)`, directly after the first
    launch of its signature (see above). `args` are the kernel's leading parameters, positional;
    `meta` its constexpr keywords (and, untuned, `launch_config`'s). `grid` is a tuple or, as in
    Triton, a function of the bound arguments by name."""
    meta = meta or {}
    if not DIRECT or interpreting() or _launch_hooks():
        kernel[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    sig = _signature(kernel, device, args, meta)
    entry = _DIRECT_CACHE.get(sig)
    if entry is None or _hooked(kernel):
        compiled = kernel[grid](*args, **meta)
        if entry is None and compiled is not None and not _hooked(kernel):
            tail, names = _bound_tail(kernel, len(args), meta)
            compiled._init_handles()
            _DIRECT_CACHE[sig] = (compiled, tail, names)
        return
    compiled, tail, names = entry
    if callable(grid):
        grid = grid(dict(zip(names, (*args, *tail))))
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)


def clear_direct_cache() -> None:
    """Forget the kept compiled kernels (tests)."""
    _DIRECT_CACHE.clear()
