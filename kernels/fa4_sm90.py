"""A fix for FlashAttention-4's wrong dQ on Hopper at head dims that are not multiples of 32.

What goes wrong (read from the flash-attn-4 4.0.0b36 sources; upstream pull request
Dao-AILab/flash-attention #2896 describes the same cause): on SM90 the backward kernel
(`flash_bwd_sm90.FlashAttentionBackwardSm90`) rounds the head dim up to a multiple of 16 when dK/dV
are not swapped (72 -> 80) and accumulates dQ in fp32 as consecutive (tile_m x tile_hdim) blocks of a
flat buffer. The postprocess that turns that buffer into dQ
(`flash_bwd_postprocess.FlashAttentionBackwardPostprocess`) is given the interface's rounding to 32
(72 -> 96) and reads (tile_m x 96) blocks where (tile_m x 80) ones were written: dQ comes back
scrambled while the output, dK and dV are right. `mugv verify-kernels` measured it on an H200: dQ
error 0.60-1.52 relative at head dims 72 and 80, correct at 64, 96 and 128.

Two ways to make writer and reader agree (`MODES`; MUGV_FA4_DQ_FIX picks one, default `DEFAULT_MODE`):
- "postprocess16": the postprocess reads at the kernel's granularity on SM90 (16; 64 with swapped
  dK/dV, which the interface already passes). The buffer stays allocated and zeroed at the
  interface's larger rounding, a superset of what is read. The kernel keeps its 80-wide tiles.
- "kernel32": #2896's change, the kernel rounds to 32 like the postprocess (96-wide tiles at 72/80).
- "off": FA4 as released.

A fix is applied only to the versions in `FIXED_VERSIONS` (whose sources were read) and only takes
effect on SM90 (the postprocess's `arch`; the SM90 kernel class). Nothing here is trusted on its own:
the backend still runs at a head dim only after `mugv verify-kernels` passed forward and dQ/dK/dV
there with this fix (`fingerprint()` is part of the record; another mode or an edit voids it).
The compiled-kernel caches the fix changes are replaced by in-memory ones, so a kernel compiled
before the fix (or a persistent cache entry from an unpatched process) is never reused.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os

MODES = ("postprocess16", "kernel32", "off")
DEFAULT_MODE = "postprocess16"
FIXED_VERSIONS = ("4.0.0b36",)
_applied: dict[str, str] = {}   # version -> mode applied in this process


def mode() -> str:
    """The fix this process uses: MUGV_FA4_DQ_FIX, else DEFAULT_MODE."""
    chosen = os.environ.get("MUGV_FA4_DQ_FIX", "").strip() or DEFAULT_MODE
    if chosen not in MODES:
        raise ValueError(f"MUGV_FA4_DQ_FIX={chosen!r}: expected one of {MODES}")
    return chosen


def fix_for(version: str | None) -> str:
    """The fix applied to flash-attn-4 `version`: a mode, or "none" (a version not known to need it)."""
    return mode() if version in FIXED_VERSIONS else "none"


def fingerprint(version: str | None) -> str:
    """What a verification record binds to: the fix's mode and the source of this module's patching
    code (editing it voids earlier verifications, as editing a Triton kernel does)."""
    fix = fix_for(version)
    if fix in ("none", "off"):
        return fix
    source = "\n".join(inspect.getsource(f) for f in (patch_postprocess, patch_kernel, apply))
    return f"{fix}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def patch_postprocess(cls) -> None:
    """Make `cls` (FlashAttentionBackwardPostprocess) read dQ's accumulator at the SM90 kernel's
    head-dim granularity: 16 where it was handed 32 (64, the swapped layout's, is left alone)."""
    original = cls.__init__
    if getattr(original, "_mugv_fix", None) == "postprocess16":
        return

    @functools.wraps(original)
    def __init__(self, dtype, head_dim, arch, *args, hdim_multiple_of: int = 32, **kwargs):
        if arch // 10 == 9 and hdim_multiple_of == 32:
            hdim_multiple_of = 16
        original(self, dtype, head_dim, arch, *args, hdim_multiple_of=hdim_multiple_of, **kwargs)

    __init__._mugv_fix = "postprocess16"
    cls.__init__ = __init__


def patch_kernel(cls) -> None:
    """Make `cls` (FlashAttentionBackwardSm90) round its head-dim tiles to 32 where it rounds to 16
    (non-swapped dK/dV), the granularity the interface allocates and the postprocess reads."""
    original = cls.__init__
    if getattr(original, "_mugv_fix", None) == "kernel32":
        return

    @functools.wraps(original)
    def __init__(self, dtype, head_dim, head_dim_v=None, *args, **kwargs):
        original(self, dtype, head_dim, head_dim_v, *args, **kwargs)
        if not self.dKV_swapAB:
            head_dim_v = head_dim if head_dim_v is None else head_dim_v
            self.tile_hdim = int(math.ceil(head_dim / 32) * 32)
            self.tile_hdimv = int(math.ceil(head_dim_v / 32) * 32)
            self.check_hdim_oob = head_dim != self.tile_hdim
            self.check_hdim_v_oob = head_dim_v != self.tile_hdimv
            self.shuffle_LSE = self.SdP_swapAB and self.tile_hdim <= 64
            self.shuffle_dPsum = self.SdP_swapAB and self.tile_hdim <= 64

    __init__._mugv_fix = "kernel32"
    cls.__init__ = __init__


def apply(version: str | None) -> str:
    """Apply this process's fix to the imported flash_attn.cute (once; idempotent); returns it."""
    fix = fix_for(version)
    if fix in ("none", "off"):
        return fix
    if version in _applied:
        if _applied[version] != fix:
            raise RuntimeError(f"flash-attn-4 dQ fix {_applied[version]!r} already applied in this "
                               f"process; MUGV_FA4_DQ_FIX now asks for {fix!r}")
        return fix
    from flash_attn.cute import cache_utils, flash_bwd_postprocess, flash_bwd_sm90, interface
    if fix == "postprocess16":
        patch_postprocess(flash_bwd_postprocess.FlashAttentionBackwardPostprocess)
        interface._bwd_postprocess_convert.compile_cache = cache_utils.JITCache()
    else:
        patch_kernel(flash_bwd_sm90.FlashAttentionBackwardSm90)
        interface._flash_attn_bwd.compile_cache = cache_utils.JITCache()
    _applied[version] = fix
    return fix
