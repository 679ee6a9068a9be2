"""Measuring code on the device, shared by `mugv verify-kernels` and the benchmarks: the time of
each call (CUDA events on a GPU, wall time on the CPU) and, from one torch.profiler trace of a
step, GPU time by kernel class and where the GPU sat idle (with the host calls that made it wait).
"""
from __future__ import annotations

import pathlib
import re
import time
from typing import Callable

import torch


def call_ms(fn: Callable[[], object], iters: int, warmup: int = 1, device: str | torch.device | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn` after `warmup` untimed calls (compilation,
    autotuning, lazy state). On a CUDA device each call sits between two CUDA events and is
    synchronised before the next starts, so a call's time is its GPU span; elsewhere wall time.
    `device` None means CUDA when available."""
    cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


# the first pattern a kernel's name matches names its class
KERNEL_CLASSES = [("attention", r"cudnn|flash|fmha|attention|sdpa"), ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_"),
                  ("optimizer", r"adam|multi_tensor|foreach"), ("triton (fused ops)", r"triton"),
                  ("elementwise/other", r".")]
# host calls that block until the GPU has caught up
HOST_WAITS = r"Synchronize|cudaMemcpy(?!Async)|_local_scalar_dense|aten::nonzero|aten::item|cudaMalloc|cudaFree"


def _intervals(events) -> tuple[list, list]:
    """(GPU activities, host ops) as (start_us, end_us, name); user annotations (names with '#',
    e.g. Optimizer.step#..., ProfilerStep#) repeat their kernels' time and are left out."""
    gpu, host = [], []
    for e in events:
        if "#" in e.name:
            continue
        if e.device_type.name == "CUDA" and e.device_time > 0:
            gpu.append((e.time_range.start, e.time_range.end, e.name))
        elif e.device_type.name == "CPU":
            host.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(gpu), host


def idle_gaps(events, min_gap_us: float = 50.0, largest: int = 15) -> dict:
    """Where the GPU waits in a profiled step (`events`: a profiler's `events()`): the gaps between
    consecutive GPU activities (kernels, copies, fills; overlapping ones merged) longer than
    `min_gap_us`, the largest with the activities around them and the innermost host op running
    when the gap began, and the host calls that block on the GPU, with counts and time."""
    gpu, host = _intervals(events)
    found = []
    end = gpu[0][1] if gpu else 0
    for (_, e0, n0), (s1, _, n1) in zip(gpu, gpu[1:]):
        end = max(end, e0)
        if s1 - end > min_gap_us:
            found.append((s1 - end, end, n0, n1))
    found.sort(reverse=True)

    def host_at(t):
        running = [h for h in host if h[0] <= t <= h[1]]
        return min(running, key=lambda h: h[1] - h[0])[2] if running else "-"

    waits: dict[str, list] = {}
    for s0, e0, name in host:
        if re.search(HOST_WAITS, name):
            w = waits.setdefault(name, [0, 0.0])
            w[0] += 1
            w[1] += (e0 - s0) / 1e3
    return {"min_gap_us": min_gap_us, "count": len(found), "idle_ms": round(sum(g[0] for g in found) / 1e3, 2),
            "span_ms": round((max(g[1] for g in gpu) - gpu[0][0]) / 1e3, 2) if gpu else 0.0,
            "largest": [{"ms": round(g / 1e3, 3), "after": a, "before": b, "host": host_at(t)}
                        for g, t, a, b in found[:largest]],
            "host_waits": sorted(((n, c, round(ms, 2)) for n, (c, ms) in waits.items()), key=lambda w: -w[2])}


def kernel_times(events) -> dict[str, list]:
    """GPU milliseconds and calls of each kernel name in a profiled step."""
    kernels: dict[str, list] = {}
    for e in events:
        if e.device_type.name == "CUDA" and e.device_time > 0 and "#" not in e.name:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time / 1e3
            k[1] += 1
    return kernels


def profile_step(step: Callable[[], object], path: pathlib.Path, step_ms: float) -> dict:
    """Profile one call of `step` (after one more untimed call) on the GPU: GPU time by kernel class
    (KERNEL_CLASSES), the top kernels and the idle gaps, printed as tables and written to `path`
    with the profiler's own table."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = kernel_times(events)
    total = sum(k[0] for k in kernels.values())
    by_class: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        cls = next(c for c, pat in KERNEL_CLASSES if re.search(pat, name, re.I))
        by_class[cls] = by_class.get(cls, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    lines = [f"step {step_ms:.1f} ms (events), GPU kernel time {total:.1f} ms "
             f"(idle/overhead {step_ms - total:.1f} ms)", "", "| class | ms | % of step |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {100 * ms / step_ms:.1f}% |" for c, ms in sorted(by_class.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | calls | ms | % of step |", "|---|---|---|---|"]
    lines += [f"| `{n[:90]}` | {c} | {ms:.2f} | {100 * ms / step_ms:.1f}% |" for n, (ms, c) in top]
    gaps = idle_gaps(events)
    lines += ["", f"GPU idle inside the profiled step: {gaps['idle_ms']} ms in {gaps['count']} gaps > "
              f"{gaps['min_gap_us']} us (first kernel to last: {gaps['span_ms']} ms); host calls that "
              "wait for the GPU: " + (", ".join(f"{n} x{c} ({ms} ms)" for n, c, ms in gaps["host_waits"]) or "none"),
              "", "| gap ms | after kernel | before kernel | host op running at the gap's start |", "|---|---|---|---|"]
    lines += [f"| {g['ms']} | `{g['after'][:50]}` | `{g['before'][:50]}` | `{g['host'][:60]}` |" for g in gaps["largest"]]
    text = "\n".join(lines)
    path.write_text(text + "\n\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    print(text, flush=True)
    return {"gpu_ms": round(total, 2), "by_class_ms": {k: round(x, 2) for k, x in by_class.items()},
            "top": [(n[:120], c, round(ms, 3)) for n, (ms, c) in top], "gaps": gaps}
