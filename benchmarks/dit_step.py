"""MFU of a MUG-DiT training step at the 10B width on one GPU, against plain PyTorch in the same run
(issue 13).

    python benchmarks/dit_step.py --out DIR [--res 256p 720p] [--layers 4] [--steps 5]

What runs, per resolution (256p: latent (14, 32, 56) = 6,272 video tokens; 720p: (14, 90, 160) =
50,400), text 300 tokens, one sample, bf16, TP = 1:
1. SDPA at head dim 72 and zero-padded to 80/96/128 (exact, see torch_backend/models/attention.py), cuDNN
   and flash, forward+backward, useful TFLOP/s (FLOPs at head dim 72).
2. Baseline: one plain-PyTorch MUG-DiT block written below (`RefBlock`: nn.Linear, F.layer_norm,
   SDPA with torch's default backend choice, per-sample modulation), forward+backward, eager and
   torch.compile. MFU = 3 x the block's forward FLOPs (core/flops.py) / time / the GPU's bf16 peak (BF16_PEAKS).
3. The production model (torch_backend/models/dit.py: `build_dit` with a layer spec, Megatron DDP
   with fp32 gradient buffers and Megatron's mixed-precision Adam with fp32 main weights, exactly
   as the trainer builds them) at full width with `--layers` blocks, one full training step:
   zero grads, forward, float32 MSE loss on the velocity channels, backward, optimizer step.
   Variants (`VARIANTS`): elementwise ops as plain torch / Triton kernels (kernels/registry.py) /
   torch.compile'd; whole layers compiled; Adam foreach (Megatron's default without Apex/TE) or
   fused; attention head dim padded; recompute none / selective / full.
   MFU = model FLOPs of the step (core/flops.py::step_flops: every matmul, attention as
   4 * Lq * Lk * hidden per attention, backward = 2 x forward, the embedders included, recompute
   NOT counted) / step time / the GPU's bf16 peak. HFU adds the recomputed forward FLOPs.
4. A torch.profiler trace of one step of chosen variants: GPU time by kernel class and the top
   kernels (DIR/profile_<res>_<variant>.txt).
Prints a table last and writes DIR/dit_step.json. `--attention cross|none` limits the SDPA
micro-benchmarks, `--skip-ref` the baseline block; extra resolutions `720p-18f`, `720p-23f`,
`720p-40f` (longer 720p clips) measure the memory limit. Results and what they mean:
docs/benchmarks.md, "Training step MFU at the 10B width". `--dry-run` runs tiny shapes on the CPU
(fp32) to check the script.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from mugv.core.flops import benchmark_peak  # noqa: E402
from mugv.torch_backend.parallel.profiling import call_ms, profile_step  # noqa: E402

# MFU's denominator: this GPU's dense bf16 peak (core/flops.py BF16_PEAKS; MUGV_PEAK_TFLOPS overrides)
PEAK, PEAK_SOURCE = benchmark_peak(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                   os.environ.get("MUGV_PEAK_TFLOPS"))
RES = {"256p": (14, 32, 56), "720p": (14, 90, 160),
       # longer 720p clips for the memory limit (item 3 of issue 13): 3,600 tokens per latent frame
       "720p-18f": (18, 90, 160), "720p-23f": (23, 90, 160), "720p-40f": (40, 90, 160)}
TEXT = 300
BATCH = 1   # samples per step (--batch): token-balanced buckets put several small clips in one step
DEV, DT = "cuda", torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    ops: str = "reference"          # reference | kernels | compiled | qk-op (compiled layers' QK kernel op)
    fused_adam: bool = False
    compile_layers: bool = False
    pad_head_dim: int | None = None
    recompute: str = "none"         # none | selective | full
    attention: str = "cudnn"        # torch_backend/models/attention.py BACKENDS; fa4 = FlashAttention-4
    host_grad_norm: bool = False    # Megatron's Apex-less grad norm (one host sync per tensor) and
                                    # per-tensor scale/copy loops, as before sessions 8 and 9
    compile_mode: str | None = None  # torch.compile mode of the compiled layers ("reduce-overhead": CUDA graphs)
    key_packing: str = "sorted"     # FA4 cross-attention keys: "sorted" (attention.pack_keys, no host
                                    # sync) | "boolean" (k[key_mask], two syncs a layer, before session 11)


VARIANTS = {v.name: v for v in [
    Variant("eager"),                                              # the trainer's path today
    Variant("kernels", ops="kernels"),
    Variant("kernels+fadam", ops="kernels", fused_adam=True),
    Variant("kernels+fadam+host-norm", ops="kernels", fused_adam=True, host_grad_norm=True),
    Variant("kernels+fadam+pad80", ops="kernels", fused_adam=True, pad_head_dim=80),
    Variant("kernels+fadam+pad128", ops="kernels", fused_adam=True, pad_head_dim=128),
    Variant("kernels+fadam+selective", ops="kernels", fused_adam=True, recompute="selective"),
    Variant("kernels+fadam+full", ops="kernels", fused_adam=True, recompute="full"),
    Variant("compiled-ops+fadam", ops="compiled", fused_adam=True),
    Variant("compiled-layers+fadam", compile_layers=True, fused_adam=True),
    Variant("compiled-layers+fadam+pad80", compile_layers=True, fused_adam=True, pad_head_dim=80),
    # FlashAttention-4 at the head dim `mugv verify-kernels` verified (96 with 4.0.0b36 at 72)
    Variant("kernels+fadam+fa4", ops="kernels", fused_adam=True, attention="fa4"),
    Variant("compiled-ops+fadam+fa4", ops="compiled", fused_adam=True, attention="fa4"),
    Variant("compiled-layers+fadam+fa4", compile_layers=True, fused_adam=True, attention="fa4"),
    # "auto" = the trainer's default: FA4 where verified (cross-attention only from
    # FA4_CROSS_MIN_QUERIES video tokens, cuDNN masked below), else SDPA's cuDNN order
    Variant("kernels+fadam+auto", ops="kernels", fused_adam=True, attention="auto"),
    Variant("compiled-layers+fadam+auto", compile_layers=True, fused_adam=True, attention="auto"),
    # the same with Megatron's host-synchronising grad norm: what the device norm saves, same run
    Variant("kernels+fadam+auto+host-norm", ops="kernels", fused_adam=True, attention="auto", host_grad_norm=True),
    # compiled layers replayed as CUDA graphs (cudagraph trees; FA4's calls split each layer's graph)
    Variant("compiled-layers-cg+fadam+auto", compile_layers=True, fused_adam=True, attention="auto",
            compile_mode="reduce-overhead"),
    # compiled layers calling the QK-RMSNorm + RoPE kernel as a custom op (dit_layers.compiled_ops;
    # forced here: run `mugv verify-kernels --only qk_rmsnorm_rope,compiled_layers` first)
    Variant("compiled-layers-qk+fadam+auto", ops="qk-op", compile_layers=True, fused_adam=True, attention="auto"),
    # the same with FA4's cross-attention keys packed by boolean indexing (host syncs), as in session 10
    Variant("compiled-layers-qk+fadam+auto+bool-pack", ops="qk-op", compile_layers=True, fused_adam=True,
            attention="auto", key_packing="boolean"),
]}


def _boolean_pack_keys(key_mask, *tensors):
    """Session 10's packing of FA4's cross-attention keys (timing comparison only): boolean
    indexing, the same first cu[-1] rows as attention.pack_keys (whose offsets it takes), one
    host sync per index."""
    cu, _ = _SORTED_PACKING[0](key_mask)
    return cu, [t[key_mask] for t in tensors]


_SORTED_PACKING: list = []   # attention's own (pack_keys, fa4_fingerprint), kept by _key_packing


def _key_packing(kind: str) -> None:
    """Install the variant's key packing in the attention module. "boolean" keeps the FA4
    fingerprint of the verified (sorted) calling code, so that the record switches FA4 on: a
    benchmark-only override of the same kernels with session 10's (verified then) packing."""
    from mugv.torch_backend.models import attention
    if not _SORTED_PACKING:
        _SORTED_PACKING.extend((attention.pack_keys, attention.fa4_fingerprint))
    sorted_pack, fingerprint = _SORTED_PACKING
    attention.pack_keys, attention.fa4_fingerprint = sorted_pack, fingerprint
    if kind == "boolean":
        verified = fingerprint(attention.fa4_version())
        attention.pack_keys, attention.fa4_fingerprint = _boolean_pack_keys, lambda version: verified
    elif kind != "sorted":
        raise ValueError(f"key_packing {kind!r}: expected 'sorted' or 'boolean'")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int) -> list[float]:
    """Milliseconds of each call after `warmup` calls (CUDA events, synchronised per call)."""
    return call_ms(fn, iters, warmup, device=DEV)


def free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# 1. attention at head dim 72 and padded


def attention_bench(seq: int, heads: int, d: int, pads=(72, 80, 96, 128), iters: int = 5) -> dict:
    """fwd+bwd ms and useful TFLOP/s (4 * S^2 * heads * d * 3.5: fwd 2 matmuls, bwd 2.5x) of SDPA
    self-attention, the inputs zero-padded from d to each of `pads`; the scale stays d^-1/2."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = {}
    flops = 4 * seq * seq * heads * d * 3.5
    base = [torch.randn(1, heads, seq, d, device=DEV, dtype=DT) for _ in range(3)]
    for backend, enum in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        for p in pads:
            q, k, v = (F.pad(t, (0, p - d)).requires_grad_() for t in base)
            try:
                with sdpa_kernel([enum]):
                    def run():
                        out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
                        out.backward(torch.ones_like(out))
                    ms = statistics.median(timed(run, iters, 2))
                rows[f"{backend} d={p}"] = {"ms": round(ms, 3), "useful_tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as e:
                rows[f"{backend} d={p}"] = {"error": str(e).splitlines()[0][:160]}
            del q, k, v
    _fa4_rows(rows, base, d, pads, flops, iters, None)
    return rows


def _fa4_rows(rows, base, d, pads, flops, iters, mask, name="fa4"):
    """FlashAttention-4 (torch_backend/models/attention.py::fa4_attention) over the same inputs, each
    padding; rows say whether that padding passed parity on this device (kernels/registry.py)."""
    from mugv.torch_backend.models.attention import fa4_attention, fa4_fingerprint, fa4_version
    version = fa4_version()
    if version is None:
        rows[name] = {"error": "flash-attn-4 not installed"}
        return
    from mugv.kernels.registry import attention_head_dim
    verified, why = attention_head_dim("fa4", version, d, torch.device(DEV, 0), fa4_fingerprint(version))
    for p in pads:
        q, k, v = (F.pad(t.transpose(1, 2), (0, p - d)).contiguous().requires_grad_() for t in base)
        try:
            def run():
                out = fa4_attention(q, k, v, mask, scale=d ** -0.5)
                out.backward(torch.ones_like(out))
            ms = statistics.median(timed(run, iters, 2))
            rows[f"{name} d={p}"] = {"ms": round(ms, 3), "useful_tflops": round(flops / ms / 1e9, 1),
                                     "verified_for_training": p == verified}
        except Exception as e:  # noqa: BLE001 - record and go on
            rows[f"{name} d={p}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        del q, k, v
    rows[f"{name} choice"] = {"runs_at": verified, "why": why}


def cross_attention_bench(seq: int, heads: int, d: int, text: int, real: int, iters: int = 5) -> dict:
    """fwd+bwd ms of the cross-attention core (video queries, `text` keys of which `real` are real)
    with the key-padding mask as the model passes it, and without a mask on the real keys only
    (what a batch of one, or a batch trimmed to its longest caption, could pass instead)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = {}
    flops = 4 * seq * real * heads * d * 3.5
    q0 = torch.randn(1, heads, seq, d, device=DEV, dtype=DT)
    k0, v0 = (torch.randn(1, heads, text, d, device=DEV, dtype=DT) for _ in range(2))
    mask = (torch.arange(text, device=DEV) < real)[None, None, None, :]
    cases = {"cudnn masked": ("cudnn", text, True), "efficient masked": ("efficient", text, True),
             "math masked": ("math", text, True), "cudnn unmasked (real keys)": ("cudnn", real, False),
             "flash unmasked (real keys)": ("flash", real, False),
             "efficient unmasked (real keys)": ("efficient", real, False)}
    enums = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for name, (backend, sk, masked) in cases.items():
        q = q0.clone().requires_grad_()
        k, v = (t[:, :, :sk].clone().requires_grad_() for t in (k0, v0))
        try:
            with sdpa_kernel([enums[backend]]):
                def run():
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)
                    out.backward(torch.ones_like(out))
                ms = statistics.median(timed(run, iters, 2))
            rows[name] = {"ms": round(ms, 3), "useful_tflops": round(flops / ms / 1e9, 1)}
        except RuntimeError as e:
            rows[name] = {"error": str(e).splitlines()[0][:160]}
        del q, k, v
    # FA4 varlen over the real keys only (what the fa4 backend runs for cross-attention)
    _fa4_rows(rows, (q0, k0, v0), d, (d, 96), flops, iters, mask[:, 0, 0, :].expand(1, text).contiguous(),
              name="fa4 varlen")
    return rows


# ---------------------------------------------------------------------------------------------
# 2. the plain-PyTorch baseline block


class RefBlock(torch.nn.Module):
    """One MUG-DiT block in plain PyTorch, batch-first (B, L, h): AdaLN-modulated self-attention
    with per-head RMSNorm and interleaved 3D RoPE, ungated cross-attention to masked text, AdaLN
    MLP (GELU tanh). Modulation per sample (the text-to-video case; the model picks per token)."""

    def __init__(self, h: int, heads: int, mlp: int):
        super().__init__()
        lin = torch.nn.Linear
        self.heads, self.d = heads, h // heads
        self.table = torch.nn.Parameter(torch.randn(6, h) * 0.02)
        self.qkv, self.proj = lin(h, 3 * h), lin(h, h)
        self.cross_norm = torch.nn.LayerNorm(h, eps=1e-6)
        self.cq, self.ckv, self.cproj = lin(h, h), lin(h, 2 * h), lin(h, h)
        self.fc1, self.fc2 = lin(h, mlp), lin(mlp, h)
        self.norms = torch.nn.Parameter(torch.ones(4, self.d))

    def _rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    def _rope(self, x, cos, sin):
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)

    def forward(self, x, mod, text, text_mask, cos, sin):
        b, n, h = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = (self.table[None] + mod).unbind(1)
        u = F.layer_norm(x, (h,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = self.qkv(u).view(b, n, self.heads, 3, self.d).unbind(3)
        q = self._rope(self._rms(q, self.norms[0]), cos, sin)
        k = self._rope(self._rms(k, self.norms[1]), cos, sin)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        x = x + g1[:, None] * self.proj(a.transpose(1, 2).flatten(2))
        q = self._rms(self.cq(self.cross_norm(x)).view(b, n, self.heads, self.d), self.norms[2])
        k, v = self.ckv(text).view(b, -1, self.heads, 2, self.d).unbind(3)
        k = self._rms(k, self.norms[3])
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=text_mask[:, None, None, :])
        x = x + self.cproj(a.transpose(1, 2).flatten(2))
        u = F.layer_norm(x, (h,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.fc2(F.gelu(self.fc1(u), approximate="tanh"))


def bench_reference(cfg, thw, compiled: bool, iters: int) -> dict:
    from mugv.core.dit import sequence_length
    from mugv.core.flops import layer_forward_flops
    seq = sequence_length(cfg, thw)
    h, d = cfg.hidden_size, cfg.head_dim
    block = RefBlock(h, cfg.num_heads, cfg.mlp_hidden).to(DEV, DT)
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(1, seq, h, device=DEV, dtype=DT, generator=g).requires_grad_()
    mod = (torch.randn(1, 6, h, device=DEV, dtype=DT, generator=g) * 0.1).requires_grad_()
    text = torch.randn(1, TEXT, h, device=DEV, dtype=DT, generator=g).requires_grad_()
    mask = torch.arange(TEXT, device=DEV)[None] < TEXT - 17
    ang = torch.rand(seq, d // 2, device=DEV, generator=g) * 50
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    fn = torch.compile(block) if compiled else block
    t0 = time.time()

    def step():
        fn(x, mod, text, mask, cos, sin).sum().backward()
    ms = timed(step, iters, 3)
    flops = 3 * layer_forward_flops(cfg, seq, TEXT)[0]
    med = statistics.median(ms)
    return {"ms": round(med, 2), "ms_all": [round(t, 2) for t in ms], "mfu": flops / (med * 1e-3) / PEAK,
            "wall_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# 3. the production model, one training step


def _ops(kind: str, device):
    from mugv.torch_backend.models import dit_layers as dl
    if kind == "reference":
        return dl.REFERENCE_OPS
    if kind == "kernels":
        return dl.kernel_ops(device)
    if kind == "qk-op":
        return dl.compiled_ops(device, force=True)
    if kind == "compiled":
        c = lambda f: torch.compile(f, dynamic=False)  # noqa: E731
        return dl.DiTOps(adaln_modulate=c(dl.reference_adaln_modulate),
                         gated_residual=c(dl.reference_gated_residual),
                         gated_residual_modulate=c(dl.reference_gated_residual_modulate),
                         qk_rmsnorm_rope=c(dl.reference_qk_rmsnorm_rope),
                         qk_rmsnorm=c(dl.reference_qk_rmsnorm))
    raise ValueError(f"ops {kind!r}")


class _FusedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, fused=True, **kwargs)


def build(cfg, v: Variant):
    """(model, ddp, optimizer) as the trainer builds them, with the variant's layer spec."""
    from mugv.core.parallel import ParallelConfig
    from mugv.core.train import OptimizerConfig
    from mugv.torch_backend.models.dit import build_dit, transformer_config
    from mugv.torch_backend.models.dit_layers import mugdit_layer_spec
    from mugv.torch_backend.training.parallelize import (ParallelDiT, megatron_optimizer, recompute_overrides,
                                                         wrap_in_ddp)

    device = torch.device(DEV, 0) if DEV == "cuda" else torch.device("cpu")
    _key_packing(v.key_packing)
    tcfg = transformer_config(cfg, params_dtype=DT, **recompute_overrides(v.recompute))
    attention = v.attention if DEV == "cuda" else "auto"   # --dry-run: the CPU's SDPA
    spec = mugdit_layer_spec(ops=_ops(v.ops, device), attention_backend=attention,
                             pad_head_dim=v.pad_head_dim or None)  # padding: self-attention only
    model = build_dit(cfg, tcfg, layer_spec=spec, seed=0, device=device)
    if v.compile_layers:
        for layer in model.layers.values():
            layer.compile(dynamic=False, mode=v.compile_mode)
    ddp, = wrap_in_ddp([model], tcfg, ParallelConfig(), data_parallel=1)   # as the trainer wraps it
    pm = ParallelDiT([ddp], tcfg, ParallelConfig(), 1, cfg, spec)
    adamw = torch.optim.AdamW
    if v.fused_adam:
        torch.optim.AdamW = _FusedAdamW  # Megatron picks torch's AdamW when Apex/TE are absent
    try:
        opt = megatron_optimizer(pm, OptimizerConfig(lr=1e-5, eps=1e-8))
    finally:
        torch.optim.AdamW = adamw
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as megatron_opt
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale
    from mugv.torch_backend.training.parallelize import use_device_optimizer_fallbacks
    if v.host_grad_norm:   # read at each step: this variant's steps use Megatron's fallbacks
        clip_grads.l2_norm_impl = local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = megatron_opt.multi_tensor_scale_impl = local_multi_tensor_scale
    else:
        use_device_optimizer_fallbacks()
    return model, ddp, opt


def make_batch(cfg, thw, device, seed: int = 0):
    """BATCH samples of one latent size; sample i has TEXT - 17 - 3 i real text tokens."""
    from mugv.core.dit import patch_grid
    g = torch.Generator(device=device).manual_seed(seed)
    t, b = thw[0], BATCH
    tp = patch_grid(cfg, thw)[0]
    real = TEXT - 17 - 3 * torch.arange(b, device=device)[:, None]
    return dict(
        x=torch.randn(b, cfg.in_channels, *thw, device=device, generator=g),
        timestep=torch.full((b,), 640.0, device=device),
        text=torch.randn(b, TEXT, cfg.text_dim, device=device, generator=g),
        text_mask=torch.arange(TEXT, device=device)[None] < real,
        x_mask=torch.ones(b, t, dtype=torch.bool, device=device),
        fps=torch.full((b,), 24.0, device=device),
        frame_indice=torch.arange(tp + 2, device=device)[None].expand(b, -1).contiguous(),
    ), torch.randn(b, cfg.in_channels, *thw, device=device, generator=g)


def bench_model(cfg, thw, v: Variant, steps: int, profile_dir: pathlib.Path | None) -> dict:
    from mugv.core.dit import video_tokens
    from mugv.core.flops import step_flops
    free()
    device = torch.device(DEV, 0) if DEV == "cuda" else torch.device("cpu")
    t0 = time.time()
    model, ddp, opt = build(cfg, v)
    batch, target = make_batch(cfg, thw, device)
    losses = []

    def fwd_bwd():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = ddp(**batch)
        loss = (out[:, :cfg.in_channels] - target).pow(2).mean()
        loss.backward()
        ddp.finish_grad_sync()
        losses.append(loss.detach())

    def step():
        fwd_bwd()
        opt.step()

    fwd_bwd()  # first: compile, autotune, lazy state; the loss before any update
    loss0 = float(losses[0])
    from mugv.torch_backend.models.attention import resolve
    backend, run_at, why = resolve(v.attention if DEV == "cuda" else "auto", device, cfg.head_dim, v.pad_head_dim)
    opt.step()
    sync()
    states = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # each step timed whole and in two parts (forward+backward, optimizer), one sync per step
    fb, st = [], []
    for _ in range(steps):
        t = timed(fwd_bwd, 1, 0)[0]
        o = timed(opt.step, 1, 0)[0]
        fb.append(t)
        st.append(t + o)
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    layers = len(model.layers)
    rec = layers if v.recompute == "full" else 0
    fl = step_flops(cfg, thw, TEXT, batch=BATCH, layers=layers, recompute_layers=rec)
    med = statistics.median(st)
    row = {"variant": dataclasses.asdict(v), "step_ms": round(med, 2), "step_ms_all": [round(t, 2) for t in st],
           "fwd_bwd_ms": round(statistics.median(fb), 2),
           "optimizer_ms": round(statistics.median(s - f for s, f in zip(st, fb)), 2),
           "mfu": fl.model / (med * 1e-3) / PEAK, "hfu": fl.hardware / (med * 1e-3) / PEAK,
           "mfu_fwd_bwd": fl.model / (statistics.median(fb) * 1e-3) / PEAK,
           "model_tflop": fl.model / 1e12, "attention_fraction": fl.attention_fraction,
           "loss0": loss0, "attention_ran": {"self": backend, "head_dim": run_at or cfg.head_dim, "why": why},
           "peak_gib": peak / 2**30, "states_gib": states / 2**30,
           "activations_gib": (peak - states) / 2**30, "layers": layers, "tokens": BATCH * video_tokens(cfg, thw), "batch": BATCH,
           "ops_used": {f: getattr(getattr(model.layers["0"].ops, f), "__name__", "?")
                        for f in ("adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope")},
           "wall_s": round(time.time() - t0, 1)}
    if profile_dir is not None and DEV == "cuda":
        row["profile"] = profile_step(step, profile_dir / f"profile_{video_tokens(cfg, thw)}x{BATCH}_{v.name.replace('+', '_')}.txt", med)
    del model, ddp, opt, batch, target
    return row


# ---------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| res | what | ms | MFU (HFU) | x eager ref | peak GiB (act.) | loss0 |", "|---|---|---|---|---|---|---|"]
    for res, r in results["runs"].items():
        base = r.get("ref_eager", {}).get("mfu")
        for name in ("ref_eager", "ref_compile"):
            x = r.get(name, {})
            if "mfu" in x:
                lines.append(f"| {res} | {name} (1 block fwd+bwd) | {x['ms']} | {100 * x['mfu']:.1f}% | "
                             f"{x['mfu'] / base:.2f} | | |")
        for name, x in r.get("model", {}).items():
            if "mfu" not in x:
                lines.append(f"| {res} | {name} | failed: {x.get('error', '?')[:60]} | | | | |")
                continue
            ratio = f"{x['mfu'] / base:.2f}" if base else "-"
            ran = x.get("attention_ran", {})
            ran = f", {ran['self']} d={ran['head_dim']}" if ran else ""
            per = f", {x['batch']} samples" if x.get("batch", 1) > 1 else ""
            lines.append(f"| {res} | {name} (step{per}{ran}, fwd+bwd {x['fwd_bwd_ms']} ms) | {x['step_ms']} | "
                         f"{100 * x['mfu']:.1f}% ({100 * x['hfu']:.1f}%) | {ratio} | "
                         f"{x['peak_gib']:.1f} ({x['activations_gib']:.1f}) | {x['loss0']:.5f} |")
    att = ["", "| res | attention fwd+bwd | ms | useful TFLOP/s |", "|---|---|---|---|"]
    for res, r in results["runs"].items():
        for kind in ("attention", "cross_attention"):
            for name, x in r.get(kind, {}).items():
                if "ms" in x:
                    mark = " (verified: the backend runs here)" if x.get("verified_for_training") else ""
                    att.append(f"| {res} | {kind.replace('_', '-')} {name}{mark} | {x['ms']} | {x['useful_tflops']} |")
                elif "why" in x:
                    att.append(f"| {res} | {kind.replace('_', '-')} {name}: {x['why']} | | |")
    return "\n".join(lines + (att if len(att) > 3 else []))


def main() -> None:
    global DEV, DT, RES, TEXT, BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--res", nargs="+", default=list(RES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="samples per step (the model variants; the "
                    "reference block and attention micro-benchmarks stay at one)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--profile", nargs="*", default=["eager", "kernels+fadam"])
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--attention", choices=["all", "cross", "none"], default="all",
                    help="SDPA micro-benchmarks: self- and cross-attention, cross only, none")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    BATCH = a.batch
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from mugv.core.dit import dit_config, sequence_length
    if a.dry_run:
        DEV, DT, RES, TEXT = "cpu", torch.float32, {"tiny": (2, 4, 6)}, 7
        torch.set_num_threads(1)
        cfg = dit_config("debug", depth=a.layers)
        a.res = ["tiny"]
    else:
        cfg = dit_config("10B", depth=a.layers)
        torch.backends.cuda.matmul.allow_tf32 = True  # the model is bf16: no fp32 matmul of size
    from mugv.torch_backend.parallel import megatron_compat
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=0)
    results = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
               "torch": torch.__version__, "peak_tflops": PEAK / 1e12, "peak_source": PEAK_SOURCE, "text_tokens": TEXT,
               "hidden": cfg.hidden_size, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
               "layers": a.layers, "batch": BATCH, "command": " ".join(sys.argv), "runs": {}}
    t_start = time.time()

    def save():
        (out / "dit_step.json").write_text(json.dumps(results, indent=1))

    for res in a.res:
        thw = RES[res]
        r = results["runs"].setdefault(res, {"latent": thw, "seq": sequence_length(cfg, thw)})
        if a.attention == "all" and DEV == "cuda":
            r["attention"] = attention_bench(r["seq"], cfg.num_heads, cfg.head_dim)
            print(res, "attention", json.dumps(r["attention"]), flush=True)
        if a.attention != "none" and DEV == "cuda":
            r["cross_attention"] = cross_attention_bench(r["seq"], cfg.num_heads, cfg.head_dim, TEXT, TEXT - 17)
            print(res, "cross-attention", json.dumps(r["cross_attention"]), flush=True)
        if not a.skip_ref:
            for name, comp in (("ref_eager", False), ("ref_compile", True)):
                if comp and DEV != "cuda":
                    continue
                try:
                    r[name] = bench_reference(cfg, thw, comp, iters=max(3, a.steps))
                except Exception as e:  # noqa: BLE001 - record and go on
                    r[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
                print(res, name, r[name], flush=True)
                free()
        r["model"] = {}
        for name in a.variants:
            v = VARIANTS[name]
            if DEV != "cuda" and (v.ops == "compiled" or v.compile_layers or v.fused_adam):
                continue
            try:
                r["model"][name] = bench_model(cfg, thw, v, a.steps,
                                               out if name in (a.profile or []) else None)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r["model"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            x = r["model"][name]
            print(res, name, {k: x.get(k) for k in ("step_ms", "fwd_bwd_ms", "mfu", "hfu", "peak_gib", "loss0", "error")},
                  f"t={time.time() - t_start:.0f}s", flush=True)
            free()
            save()
        save()
    print(table(results))
    save()


if __name__ == "__main__":
    main()
