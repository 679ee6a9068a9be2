"""GPU parity run and timings of the fused Triton kernels against torch eager and torch.compile of
their plain-torch references, at the 10B model's shapes (issue 8).

    python benchmarks/kernels.py --out DIR [--skip-tests] [--budget-s 420]

1. Runs parity_tests/kernels with pytest on the GPU (fp32, fp16 and bf16; the bf16 rule is "error
   against the fp32 reference at most 2x plain torch bf16") through kernels/verify.py (what
   `mugv verify-kernels` runs) and writes DIR/verified.json, the record `kernels/registry.py`
   reads, listing the kernels whose test files passed on this device.
2. Measures the device copy bandwidth (a large device-to-device copy, bytes read + written).
3. Times each kernel forward and forward+backward (median of triton.testing.do_bench) in bf16,
   with achieved GB/s over the fewest bytes the op must move (each input read once, each output
   written once), that over the copy bandwidth, and the speedups over eager and torch.compile.
Prints a table last and writes DIR/kernels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
HIDDEN, HEADS, HEAD_DIM = 3456, 48, 72
TOKENS = {"256p": 6272, "720p": 50400}
# VAE feature maps: the decoder's widest level at 720p-ish frame sizes, and a mid-level map.
GN_SHAPES = {"mid 512x9x90x160": (1, 512, 9, 90, 160), "top 128x17x360x640": (1, 128, 17, 360, 640)}
DT = torch.bfloat16
DEV = "cuda"


def _dry_run_sizes():
    """--dry-run: tiny shapes on the CPU (Triton interpreter, fp32) to check this script itself."""
    global HIDDEN, HEADS, TOKENS, GN_SHAPES, DT, DEV
    HIDDEN, HEADS, TOKENS, DT, DEV = 72, 2, {"tiny": 5}, torch.float32, "cpu"
    GN_SHAPES = {"tiny": (1, 64, 2, 3, 5)}


def do_bench(fn, warmup=25, rep=100, return_mode="median"):
    """triton.testing.do_bench on the GPU; a host timer in --dry-run."""
    if DEV == "cuda":
        from triton.testing import do_bench as bench
        return bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (2 GiB read + written)."""
    if DEV != "cuda":
        return 1e9
    src = torch.randn(2**30 // 2, device="cuda", dtype=DT).view(-1)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * 2**30 / (ms * 1e-3)


def _fwd_bwd(fn, inputs, upstream):
    diff = [t for t in inputs if t.requires_grad]

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, diff, upstream)
    return step


def cases():
    """(kernel name, shape label, kernel fn, reference fn, inputs, fwd bytes, fwd+bwd bytes)."""
    from mugv.kernels.adaln_modulate import adaln_modulate, adaln_modulate_reference
    from mugv.kernels.gated_residual_modulate import gated_residual_modulate, gated_residual_modulate_reference
    from mugv.kernels.groupnorm_silu import groupnorm_silu, groupnorm_silu_reference
    from mugv.kernels.qk_rmsnorm_rope import qk_rmsnorm_rope, qk_rmsnorm_rope_reference
    dev = DEV
    es = torch.finfo(DT).bits // 8

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, dtype=DT) * scale).requires_grad_()

    for label, n in TOKENS.items():
        act = n * HIDDEN * es
        index = torch.rand(1, n, device=dev) > 0.5  # the bool x_mask, as the DiT passes it
        yield ("adaln_modulate", f"{label} L={n}", adaln_modulate, adaln_modulate_reference,
               lambda: [leaf(1, n, HIDDEN), leaf(1, 2, HIDDEN), leaf(1, 2, HIDDEN, scale=0.1), index],
               2 * act, 5 * act)
        yield ("gated_residual_modulate", f"{label} L={n}", gated_residual_modulate,
               gated_residual_modulate_reference,
               lambda: [leaf(1, n, HIDDEN), leaf(1, n, HIDDEN), leaf(1, 2, HIDDEN), leaf(1, 2, HIDDEN),
                        leaf(1, 2, HIDDEN, scale=0.1), index],
               4 * act, 10 * act)
        angles = torch.rand(1, n, HEAD_DIM // 2, device=dev) * 100

        def qk_inputs():
            qkv = torch.randn(1, n, 3, HEADS, HEAD_DIM, device=dev, dtype=DT).requires_grad_()
            # the q slice of the fused projection, as attention produces it
            return [qkv[:, :, 0], leaf(HEAD_DIM), angles]
        ang = angles.numel() * 4
        yield ("qk_rmsnorm_rope", f"{label} L={n} 48x72", qk_rmsnorm_rope, qk_rmsnorm_rope_reference,
               qk_inputs, 2 * act + ang, 5 * act + 2 * ang)
    for label, shape in GN_SHAPES.items():
        numel = 1
        for s in shape:
            numel *= s
        c = shape[1]
        yield ("groupnorm_silu", label,
               lambda x, w, b: groupnorm_silu(x, w, b, 32, 1e-6),
               lambda x, w, b: groupnorm_silu_reference(x, w, b, 32, 1e-6),
               lambda: [leaf(*shape), leaf(c), leaf(c)], 2 * numel * es, 5 * numel * es)



def gpu_time_ms(fn, iters: int = 20) -> float:
    """Device time per call, summed over the kernels the profiler saw (no host gaps): what the op
    costs when the GPU is kept busy, as inside a model step. Not L2-flushed between calls."""
    if DEV != "cuda":
        return float("nan")
    from torch.autograd import DeviceType
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return us / 1e3 / iters


def bench_case(name, label, kernel, reference, make_inputs, fwd_bytes, total_bytes, copy_bw,
               deadline) -> dict:
    inputs = make_inputs()
    with torch.no_grad():
        probe = kernel(*[t.detach() if t.requires_grad else t for t in inputs])
    probe = probe if isinstance(probe, tuple) else (probe,)
    upstream = [torch.randn_like(o) for o in probe]
    del probe
    compiled = torch.compile(reference, dynamic=False) if DEV == "cuda" else reference
    row = {"kernel": name, "shape": label, "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": total_bytes}
    for variant, fn in [("triton", kernel), ("eager", reference), ("compile", compiled)]:
        if variant == "compile" and time.time() > deadline:
            row["compile_skipped"] = "time budget"
            continue
        def fwd():
            with torch.no_grad():
                fn(*inputs)
        step = _fwd_bwd(fn, inputs, upstream)
        row[f"{variant}_fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
        row[f"{variant}_fwd_bwd_ms"] = do_bench(step, warmup=25, rep=100, return_mode="median")
        try:
            row[f"{variant}_fwd_gpu_ms"] = gpu_time_ms(fwd)
            row[f"{variant}_fwd_bwd_gpu_ms"] = gpu_time_ms(step)
        except Exception as e:  # the profiler is a nicety; keep the event timings
            row["profiler_error"] = f"{type(e).__name__}: {e}"

    for key, nbytes in [("fwd", fwd_bytes), ("fwd_bwd", total_bytes)]:
        ms = row["triton_" + key + "_ms"]
        row[f"{key}_GBps"] = nbytes / (ms * 1e-3) / 1e9
        row[f"{key}_frac_copy"] = nbytes / (ms * 1e-3) / copy_bw
        row[f"{key}_speedup_eager"] = row[f"eager_{key}_ms"] / ms
        if f"compile_{key}_ms" in row:
            row[f"{key}_speedup_compile"] = row[f"compile_{key}_ms"] / ms
        gpu = row.get(f"triton_{key}_gpu_ms")
        if gpu:
            row[f"{key}_gpu_frac_copy"] = nbytes / (gpu * 1e-3) / copy_bw
            if row.get(f"compile_{key}_gpu_ms"):
                row[f"{key}_gpu_speedup_compile"] = row[f"compile_{key}_gpu_ms"] / gpu
    torch.cuda.empty_cache()
    return row


def tuned_configs() -> dict:
    """The autotuner's choice per kernel and key (the size arguments), for the record."""
    import importlib

    from mugv.kernels.registry import KERNELS
    chosen = {}
    for entry in KERNELS.values():
        for name, obj in vars(importlib.import_module(f"mugv.kernels.{entry.module}")).items():
            cache = getattr(obj, "cache", None)
            if hasattr(obj, "configs") and isinstance(cache, dict) and cache:
                chosen[name] = {str(key): str(config) for key, config in cache.items()}
    return chosen


def table(rows, copy_bw, device) -> str:
    def f(r, key, fmt="{:.3f}", scale=1.0):
        return fmt.format(r[key] * scale) if isinstance(r.get(key), float) else "-"
    lines = [f"device: {device}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write); bf16. "
             "ms = median CUDA-event time per call (do_bench, host gaps included); gpu = summed "
             "kernel time (profiler). % copy = fewest bytes the op must move / time / copy bandwidth.",
             "| kernel | shape | fwd ms (gpu) | fwd % copy (gpu) | fwd+bwd ms (gpu) | fwd+bwd % copy (gpu) "
             "| fwd+bwd eager ms | fwd+bwd compile ms (gpu) | x eager | x compile (gpu) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | error: {r['error'][:80]} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {f(r, 'triton_fwd_ms')} ({f(r, 'triton_fwd_gpu_ms')}) "
            f"| {f(r, 'fwd_frac_copy', '{:.0f}%', 100)} ({f(r, 'fwd_gpu_frac_copy', '{:.0f}%', 100)}) "
            f"| {f(r, 'triton_fwd_bwd_ms')} ({f(r, 'triton_fwd_bwd_gpu_ms')}) "
            f"| {f(r, 'fwd_bwd_frac_copy', '{:.0f}%', 100)} ({f(r, 'fwd_bwd_gpu_frac_copy', '{:.0f}%', 100)}) "
            f"| {f(r, 'eager_fwd_bwd_ms')} | {f(r, 'compile_fwd_bwd_ms')} ({f(r, 'compile_fwd_bwd_gpu_ms')}) "
            f"| {f(r, 'fwd_bwd_speedup_eager', '{:.2f}')} "
            f"| {f(r, 'fwd_bwd_speedup_compile', '{:.2f}')} ({f(r, 'fwd_bwd_gpu_speedup_compile', '{:.2f}')}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds, skip the remaining torch.compile baselines")
    parser.add_argument("--only", default="", help="comma-separated kernel names")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes; checks the script")
    args = parser.parse_args()
    if args.dry_run:
        _dry_run_sizes()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --dry-run)")
    import mugv.kernels._launch  # noqa: F401  (decides on the interpreter before triton loads)
    import triton
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run, Triton interpreter)"
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/kernels.py --out $OUT"}
    result = dict(meta)
    only = {k for k in args.only.split(",") if k}
    if not args.skip_tests:
        # The same parity run and record as `mugv verify-kernels` (kernels/verify.py); the record is
        # also written to DIR/verified.json, which the project copies into kernels/ for its devices.
        from mugv.kernels import verify
        from mugv.kernels.registry import KERNELS, verified_devices
        t0 = time.time()
        parity = verify.run_parity_tests(verify.test_files(only), out)
        print(parity["tail"], f"\nparity tests: {time.time() - t0:.0f} s, rc {parity['returncode']}", flush=True)
        result["parity"] = {k: parity[k] for k in ("returncode", "files")}
        record = verify.device_record(device, parity, only or None, verified_devices().get(device, {}))
        record["command"] = meta["command"]
        verify.write_record(device, record, out / "verified.json")
        print("verified on this device:", record["kernels"], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw = copy_bandwidth()
    result["copy_bandwidth_Bps"] = copy_bw
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for name, label, kernel, reference, make_inputs, fb, tb in cases():
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            row = bench_case(name, label, kernel, reference, make_inputs, fb, tb, copy_bw,
                             start + args.budget_s)
        except Exception as e:  # keep the other kernels' numbers
            row = {"kernel": name, "shape": label, "error": f"{type(e).__name__}: {e}"}
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        result["rows"] = rows
        (out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    result["tuned"] = tuned_configs()
    (out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    print("autotuned:", json.dumps(result["tuned"], indent=1))
    text = table(rows, copy_bw, device)
    (out / "kernels_table.md").write_text(text + "\n")
    print(text)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
