"""How far a measured training step is from an MFU target, from `benchmarks/dit_step.py`'s JSON:
per model variant the step time, its MFU, the step time the target needs (MFU is model FLOPs /
time / peak, so the time scales as MFU / target), and where the step goes (forward+backward,
optimizer; with a profile, GPU time by kernel class and the idle time inside the step).

    python -P benchmarks/step_budget.py benchmarks/results/dit_step_h100_device_norm_720p.json [--target 0.45]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=pathlib.Path)
    ap.add_argument("--target", type=float, default=0.45)
    a = ap.parse_args()
    print(f"| file | res | variant | samples | step ms | MFU | ms at {a.target:.0%} | short by ms | fwd+bwd ms | optimizer ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    profiles = []
    runs = collections.defaultdict(list)   # (res, variant, samples) -> [(step ms, MFU)]
    for path in a.results:
        d = json.loads(path.read_text())
        for res, run in d["runs"].items():
            for name, x in run.get("model", {}).items():
                if "mfu" not in x:
                    continue
                need = x["step_ms"] * x["mfu"] / a.target
                print(f"| {path.parent.name}/{path.name} | {res} | {name} | {x.get('batch', 1)} | {x['step_ms']:.1f} | {100 * x['mfu']:.1f}% | "
                      f"{need:.1f} | {x['step_ms'] - need:.1f} | {x['fwd_bwd_ms']:.1f} | {x['optimizer_ms']:.1f} |")
                runs[res, name, x.get("batch", 1)].append((x["step_ms"], x["mfu"]))
                if "profile" in x:
                    profiles.append((path.name, res, name, x))
    if any(len(v) > 1 for v in runs.values()):   # repeated runs (e.g. benchmarks/gpu_step_repeats.sh)
        print("\n| res | variant | samples | runs | step ms mean | sd | min-max | MFU mean | sd |")
        print("|---|---|---|---|---|---|---|---|---|")
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0   # noqa: E731
        for (res, name, samples), v in runs.items():
            ms, mfu = [t for t, _ in v], [100 * m for _, m in v]
            print(f"| {res} | {name} | {samples} | {len(v)} | {statistics.mean(ms):.1f} | {sd(ms):.1f} | "
                  f"{min(ms):.1f}-{max(ms):.1f} | {statistics.mean(mfu):.2f}% | {sd(mfu):.2f} |")
    for file, res, name, x in profiles:
        p = x["profile"]
        classes = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["by_class_ms"].items(), key=lambda kv: -kv[1]))
        print(f"\n{file} {res} {name}: GPU kernel time {p['gpu_ms']:.1f} ms of {x['step_ms']:.1f} "
              f"(idle > {p['gaps']['min_gap_us']:.0f} us: {p['gaps']['idle_ms']} ms in {p['gaps']['count']} gaps); "
              f"by class (ms): {classes}")
        for kernel, calls, ms in p["top"][:4]:
            print(f"  {ms:8.2f} ms  {calls:4d} calls  {kernel[:100]}")


if __name__ == "__main__":
    main()
