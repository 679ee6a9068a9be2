"""Softmax attention for MUG-DiT through one slot: torch scaled_dot_product_attention with a chosen
backend.

Backends (`BACKENDS`): "math" (torch reference, the CPU path), "cudnn", "flash", "efficient", and
"auto": on a GPU the order measured fastest at head dim 72 (cuDNN, then flash, then
memory-efficient; see docs/megatron-on-cpu.md for the numbers), on a CPU plain SDPA. torch falls
through the priority list when a backend cannot take the inputs (e.g. flash with a mask).
The scale is head_dim^-1/2 (the official one), also when `pad_head_dim` pads q, k and v with zero
features to a head dim the fused kernels run faster at (q.k and the softmax are unchanged by zero
features, the padded output columns are zeros and are dropped: exact, forward and backward).

"fa4" is FlashAttention-4 (`flash_attn.cute`, the optional `mugv[hopper]` extra): self-attention
through `flash_attn_func`, cross-attention through `flash_attn_varlen_func` over the real text
tokens only (no mask tensor). It runs only at a head dim whose forward AND dQ/dK/dV parity passed
on this device (`mugv verify-kernels`; kernels/registry.py `attention_head_dim`), with the
calling code and dQ fix it was verified with. FA4 4.0.0b36 as released returns a wrong dQ at head
dims 72 and 80 on Hopper; `kernels/fa4_sm90.py` fixes it before the first use (verified like the
rest). Among the head dims that pass, the record's measured fastest runs (80 for the model's 72 on
an H100). "auto" takes fa4 where it is installed and verified, else SDPA's cuDNN order. `resolve` says
which backend and head dim a device gets, and why.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mugv.core.recipe import ATTENTION_BACKENDS
from mugv.kernels import fa4_sm90

_BY_NAME = {
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}
# Measured (`benchmark()`, H100 80GB, torch 2.11 cu130, bf16, head dim 72, 12 heads, fwd+bwd):
#   self-attention  4k / 16k / 50k tokens: cuDNN 278 / 347 / 332 TFLOP/s, flash 179 / 205 / 215,
#                   efficient 79 / 86 / 82;
#   cross-attention to 300 masked text tokens: cuDNN 27-43, efficient 17-18; flash takes no mask.
GPU_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BACKENDS = ATTENTION_BACKENDS   # the names a run's KernelConfig may give (core/recipe.py)
assert set(BACKENDS) == {"auto", *_BY_NAME, "fa4"}, (BACKENDS, list(_BY_NAME))
# "auto" runs cross-attention through FA4's varlen path only from this many video tokens on:
# measured on an H200 (docs/benchmarks.md, issue 22), 48 heads, 300 text keys (283 real), fwd+bwd:
# 50,400 queries FA4 varlen 5.8 ms vs cuDNN masked 9.4 ms; 6,272 queries 2.5 ms vs 1.5 ms.
FA4_CROSS_MIN_QUERIES = 16384


@functools.lru_cache(maxsize=1)
def fa4_version() -> str | None:
    """The installed flash-attn-4 version, or None (importing it needs a GPU build of torch).
    The dQ fix of `fa4_sm90` is applied to it here, before anything can run it."""
    try:
        import importlib.metadata
        version = importlib.metadata.version("flash-attn-4")
        import flash_attn.cute  # noqa: F401
    except Exception:  # not installed, or installed without its CUDA libraries
        return None
    fa4_sm90.apply(version)
    return version


def resolve(backend: str, device: torch.device, head_dim: int, pad_head_dim: int | None = None
            ) -> tuple[str, int | None, str]:
    """(backend to run, padded head dim or None, why) for `backend` on `device` at `head_dim`.
    "fa4" (forced or by "auto") only at a head dim verified on this device; forced and not
    verified is an error naming the command that verifies it."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    if backend not in ("auto", "fa4"):
        return backend, pad_head_dim, f"{backend}: chosen"
    if device.type != "cuda":
        if backend == "fa4":
            raise ValueError(f"attention backend 'fa4' needs a CUDA device, got {device}")
        return "auto", pad_head_dim, "SDPA default: not a CUDA device"
    from mugv.kernels.registry import attention_head_dim
    version = fa4_version()
    run_at, why = attention_head_dim("fa4", version, head_dim, device, fa4_fingerprint(version)) if version else \
        (None, "flash-attn-4 is not installed (pip install 'mugv[hopper]')")
    if run_at is not None:
        return "fa4", (None if run_at == head_dim else run_at), why
    if backend == "fa4":
        raise ValueError(f"attention backend 'fa4' at head dim {head_dim}: {why}")
    return "auto", pad_head_dim, f"SDPA cuDNN order: fa4 not used ({why})"


def pack_keys(key_mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each row's real keys (`key_mask` (b, Sk), True = attend) packed to the front of one
    (b * Sk, ...) buffer per tensor of `tensors` (each (b, Sk, ...)), with no host sync and no
    data-dependent shape: a stable sort puts the True entries first, in row order, so row i's keys
    are rows cu[i]:cu[i+1]. Returns (cu (b + 1,) int32, packed tensors).

    The rows past cu[-1] are zeros, and no gradient flows back from them: FA4's varlen backward
    leaves dK/dV of rows outside every sequence unwritten (uninitialised memory), and `where`
    selects, so even a NaN there is dropped. Boolean indexing (`k[key_mask]`) gives the same rows
    but syncs the host twice per call (forward and backward): 16 syncs in a 4-layer step."""
    if key_mask.dtype != torch.bool or key_mask.dim() != 2:
        raise ValueError(f"key_mask: expected a (batch, keys) bool tensor, got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    b, sk = key_mask.shape
    cu = F.pad(torch.cumsum(key_mask.sum(1, dtype=torch.int32), 0, dtype=torch.int32), (1, 0))
    order = torch.argsort(torch.logical_not(key_mask.reshape(-1)).to(torch.uint8), stable=True)
    keep = torch.arange(b * sk, device=key_mask.device) < cu[-1]
    packed = []
    for t in tensors:
        if t.shape[:2] != key_mask.shape:
            raise ValueError(f"pack_keys: tensor of shape {tuple(t.shape)} does not start with the "
                             f"key mask's shape {tuple(key_mask.shape)}")
        rows = t.reshape(b * sk, *t.shape[2:]).index_select(0, order)
        packed.append(torch.where(keep.view(-1, *([1] * (t.dim() - 2))), rows, 0))
    return cu, packed


def fa4_attention(q, k, v, key_mask=None, scale: float | None = None):
    """FlashAttention-4 over (b, S, n, d) tensors (head dim already padded as wanted): the full
    sequence for self-attention, the `key_mask` keys only (varlen over `pack_keys`' buffers, no
    host sync) for cross-attention. Returns (b, Sq, n, d).

    Not used: passing all keys with `seqused_k` after moving each row's real keys to the front.
    FA4 4.0.0b36 then leaves dK/dV of the keys beyond `seqused_k` unwritten (uninitialised memory:
    an infinite error on the H100 in `mugv verify-kernels`, 2026-12-05); `pack_keys` drops them."""
    if fa4_version() is None:
        raise RuntimeError("attention backend 'fa4': flash-attn-4 is not installed (pip install 'mugv[hopper]')")
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    if key_mask is None:
        out = flash_attn_func(q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out
    b, sq, n, d = q.shape
    cu_k, (k, v) = pack_keys(key_mask, k, v)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.reshape(b * sq, n, d), k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=sq, max_seqlen_k=key_mask.shape[1], softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(b, sq, n, d)


def fa4_fingerprint(version: str | None) -> str:
    """What an FA4 verification record binds to besides the version: the dQ fix applied
    (`kernels/fa4_sm90.py`) and the source of `fa4_attention` and `pack_keys` (how the backend
    calls FA4)."""
    source = inspect.getsource(fa4_attention) + inspect.getsource(pack_keys)
    code = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"{fa4_sm90.fingerprint(version)}|call:{code}"


def sdpa_context(backend: str, device: torch.device):
    """The torch context that restricts/prioritises SDPA backends for `backend`."""
    if backend not in BACKENDS or backend == "fa4":
        raise ValueError(f"SDPA backend {backend!r}: expected one of {BACKENDS[:-1]}")
    if backend == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(GPU_PRIORITY, set_priority=True)
    return sdpa_kernel(_BY_NAME[backend])


class DotProductAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v over sequence-first tensors; no parameters.

    forward(q (Sq, b, n, d), k (Sk, b, n, d), v (Sk, b, n, d), key_mask (b, Sk) bool or None)
    -> (Sq, b, n * d). key_mask True = attend; every row must have at least one True.
    """

    def __init__(self, backend: str = "auto", pad_head_dim: int | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
        if pad_head_dim is not None and (not isinstance(pad_head_dim, int) or pad_head_dim % 8):
            raise ValueError(f"pad_head_dim={pad_head_dim!r}: expected None or a multiple of 8")
        self.backend = backend
        self.pad_head_dim = pad_head_dim
        self._resolved: dict = {}

    def chosen(self, device: torch.device, head_dim: int) -> tuple[str, int | None, str]:
        """(backend, padded head dim, why) on `device` (decided once per device and head dim)."""
        key = (str(device), head_dim)
        if key not in self._resolved:
            self._resolved[key] = resolve(self.backend, device, head_dim, self.pad_head_dim)
        return self._resolved[key]

    def forward(self, q, k, v, key_mask=None):
        d = q.shape[-1]
        if self.pad_head_dim is not None and self.pad_head_dim < d:
            raise ValueError(f"pad_head_dim={self.pad_head_dim} is below the head dim {d}")
        backend, pad_to, _ = self.chosen(q.device, d)
        if backend == "fa4" and key_mask is not None and self.backend == "auto" \
                and q.shape[0] < FA4_CROSS_MIN_QUERIES:
            backend, pad_to = "auto", self.pad_head_dim   # short cross-attention: cuDNN masked is faster
        pad = 0 if pad_to is None else pad_to - d
        if backend == "fa4":
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (b, S, n, d)
            if pad:
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
            out = fa4_attention(q.contiguous(), k.contiguous(), v.contiguous(), key_mask, scale=d ** -0.5)
            return out[..., :d].transpose(0, 1).flatten(2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, n, S, d)
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        with sdpa_context(backend, q.device):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)
        if pad:
            out = out[..., :d]
        return out.permute(2, 0, 1, 3).flatten(2)


def benchmark(seq: int = 16384, heads: int = 12, head_dim: int = 72, batch: int = 1,
              text_len: int = 300, dtype=torch.bfloat16, iters: int = 10) -> dict[str, dict]:
    """Forward+backward TFLOP/s of each SDPA backend on this GPU: self-attention (no mask) and
    cross-attention (key padding mask). How the "auto" order was chosen; run
    `python -m mugv.torch_backend.models.attention` on the GPU machine."""
    import statistics

    from mugv.torch_backend.parallel.profiling import call_ms
    dev = torch.device("cuda")
    results: dict[str, dict] = {}
    shapes = {"self": (seq, seq, False), "cross": (seq, text_len, True)}
    for kind, (sq, sk, masked) in shapes.items():
        q = torch.randn(batch, heads, sq, head_dim, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, heads, sk, head_dim, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        mask = None
        if masked:
            mask = torch.arange(sk, device=dev)[None, None, None, :] < sk * 2 // 3
        flops = 4 * batch * heads * sq * sk * head_dim * 3.5  # fwd 2 matmuls, bwd 2.5x fwd
        for name in ("cudnn", "flash", "efficient", "math"):
            if name == "math" and sq * sk > 8192 * 8192:
                continue
            try:
                with sdpa_context(name, dev):
                    ms = statistics.median(call_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward(),
                        iters, warmup=2, device=dev))
                results.setdefault(kind, {})[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as e:  # backend cannot take these inputs
                results.setdefault(kind, {})[name] = {"error": str(e).splitlines()[0][:120]}
    return results


if __name__ == "__main__":
    import json
    print(torch.cuda.get_device_name(), torch.__version__)
    for seq in (4096, 16384, 50402):
        print(seq, json.dumps(benchmark(seq=seq), indent=1))
