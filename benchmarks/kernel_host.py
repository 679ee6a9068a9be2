"""Where a Triton kernel's wall time goes when the GPU work is small (256p): host time per call of
each kernel's forward+backward against torch.compile of its reference, and a cProfile of the
kernel's host path (issue 22: "faster than torch.compile by wall time at 256p").

    python -P benchmarks/kernel_host.py --out DIR [--res 256p 720p] [--calls 200]

For each kernel of benchmarks/kernels.py's cases at the chosen shapes, each variant runs `calls`
forward+backward calls back to back (the same step as kernels.py: the op, then
torch.autograd.grad of its outputs). Variants: "tritonpath", every launch through Triton's own
launch path; "triton", as the package runs it (launched directly after the first launch of each
signature, `kernels/_launch.py::launch`); "compile", torch.compile of the reference.
- host ms: host time per call until the last call returns (no synchronisation inside the loop);
- loop ms: time per call until the GPU has finished them all (a training loop's cost: the larger
  of host and GPU work when they overlap);
- gpu ms: the kernels' summed device time per call (profiler), as in kernels.py.
Then cProfile over `calls` triton steps: the functions with the most own time, per call.
Prints the tables last and writes DIR/kernel_host.json. Needs a CUDA GPU; `--dry-run` checks the
script on the CPU (kernels.py's tiny shapes, Triton's interpreter, no torch.compile).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: the same cases and step)


def sync() -> None:
    if kb.DEV == "cuda":
        torch.cuda.synchronize()


def per_call(step, calls: int) -> tuple[float, float]:
    """(host ms, loop ms) per call over `calls` back-to-back calls."""
    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3 / calls, (t2 - t0) * 1e3 / calls


def profile_host(step, calls: int, top: int) -> list[dict]:
    """The `top` functions by own time in `calls` steps, ms per step."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    sync()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{pathlib.Path(path).name}:{line}({name})", "calls_per_step": ncalls / calls,
                     "own_ms": tottime * 1e3 / calls, "cum_ms": cumtime * 1e3 / calls})
    rows.sort(key=lambda r: -r["own_ms"])
    return rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--res", nargs="*", default=["256p"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU shapes; checks the script")
    args = ap.parse_args()
    if args.dry_run:
        kb._dry_run_sizes()
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_host.py needs a CUDA GPU (or --dry-run)")
    else:
        kb.TOKENS = {k: v for k, v in kb.TOKENS.items() if k in args.res}
    from mugv.kernels import _launch
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if kb.DEV == "cuda" else "cpu (dry run)",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -P benchmarks/kernel_host.py " + " ".join(sys.argv[1:])}
    rows, profiles = [], {}
    for name, label, kernel, reference, make_inputs, _, _ in kb.cases():
        if name == "groupnorm_silu" and not (label.startswith("mid") or args.dry_run):
            continue   # the VAE's mid map: the small GroupNorm call
        inputs = make_inputs()
        with torch.no_grad():
            probe = kernel(*[t.detach() if t.requires_grad else t for t in inputs])
        probe = probe if isinstance(probe, tuple) else (probe,)
        upstream = [torch.randn_like(o) for o in probe]
        row = {"kernel": name, "shape": label}
        compiled = torch.compile(reference, dynamic=False) if kb.DEV == "cuda" else reference
        direct = _launch.DIRECT
        for variant, fn in (("tritonpath", kernel), ("triton", kernel), ("compile", compiled)):
            _launch.DIRECT = direct and variant == "triton"
            step = kb._fwd_bwd(fn, inputs, upstream)
            host, loop = per_call(step, args.calls)
            row[f"{variant}_host_ms"], row[f"{variant}_loop_ms"] = round(host, 4), round(loop, 4)
            row[f"{variant}_gpu_ms"] = round(kb.gpu_time_ms(step), 4)
            if variant == "triton":
                profiles[f"{name} {label}"] = profile_host(step, args.calls, args.top)
        _launch.DIRECT = direct
        row["loop_speedup"] = round(row["compile_loop_ms"] / row["triton_loop_ms"], 3)
        row["tritonpath_loop_speedup"] = round(row["compile_loop_ms"] / row["tritonpath_loop_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "kernel_host.json").write_text(json.dumps({"meta": meta, "rows": rows, "profiles": profiles},
                                                          indent=1) + "\n")
    for key, prof in profiles.items():
        print(f"\n{key}: triton forward+backward host path, per call (cProfile)")
        print("| function | calls | own ms | cumulative ms |\n|---|---|---|---|")
        for r in prof:
            print(f"| {r['function']} | {r['calls_per_step']:.0f} | {r['own_ms']:.4f} | {r['cum_ms']:.4f} |")
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}; forward+backward per call, "
          f"{args.calls} calls back to back")
    print("| kernel | shape | triton's path host / loop ms | direct host ms | direct loop ms | triton gpu ms | "
          "compile host ms | compile loop ms | compile gpu ms | compile / triton's path (loop) | "
          "compile / direct (loop) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['shape']} | {r['tritonpath_host_ms']} / {r['tritonpath_loop_ms']} | "
              f"{r['triton_host_ms']} | {r['triton_loop_ms']} | {r['triton_gpu_ms']} | {r['compile_host_ms']} | "
              f"{r['compile_loop_ms']} | {r['compile_gpu_ms']} | {r['tritonpath_loop_speedup']} | "
              f"{r['loop_speedup']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
