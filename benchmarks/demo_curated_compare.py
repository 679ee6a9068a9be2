"""`mugv demo --curated` against the uncurated demo of the same data seed: the table in
docs/cli.md and docs/curation.md ("The demo trains from curated data").

    python -P benchmarks/demo_curated_compare.py /tmp/demo_curated/results.json \
        [--baseline benchmarks/results/demo_seeds3_cpu.json] [--seed 0]

A curated run over several seeds (`--seeds N`) is compared with the baseline's statistics over
the same seeds instead: mean +- sample sd and the per-seed values of each number.

Prints, per attribute, t2v on new compositions, its gain over the text-blind baseline, seen
recall, red prompts made red, and the training clips of each run; "as good" = every number of
the curated run >= the uncurated one's.
"""
from __future__ import annotations

import argparse
import json
import pathlib

ATTRIBUTES = ("colour", "shape", "motion")


def numbers(r: dict) -> dict[str, float]:
    out = {}
    for a in ATTRIBUTES:
        out[f"t2v new {a}"] = 100 * r["new"]["t2v"][a]
        out[f"gain {a}"] = 100 * (r["new"]["t2v"][a] - r["new"]["baseline"][a])
        out[f"seen t2v {a}"] = 100 * r["seen"]["t2v"][a]
    hits, n = r["colours"]["t2v"].get("red", [0, 0])
    out["red made red"] = 100 * hits / n if n else float("nan")
    return out


STATS = [("t2v new", "new.t2v"), ("gain", "gain"), ("seen t2v", "seen.t2v")]


def compare_seeds(base: dict, cur: dict) -> None:
    """Both runs' mean +- sd over seeds (the baseline's must be the same seeds)."""
    if base.get("seeds") not in (None, cur["seeds"]) or "statistics" not in base:
        raise SystemExit(f"the baseline needs statistics over the curated run's {cur['seeds']} seeds")
    print(f"| over {cur['seeds']} seeds, mean +- sd (per seed) | uncurated | curated |")
    print("|---|---|---|")

    def cell(x):
        return f"{100 * x['mean']:.1f} +- {100 * x['std']:.1f} ({', '.join(f'{100 * v:.0f}' for v in x['values'])})"
    for label, key in STATS:
        for a in ATTRIBUTES:
            print(f"| {label} {a} (%) | {cell(base['statistics'][key][a])} | {cell(cur['statistics'][key][a])} |")
    print(f"| red made red (%) | {cell(base['statistics']['red']['t2v'])} | {cell(cur['statistics']['red']['t2v'])} |")
    kept = [r["curation"]["counts"]["kept"] for r in cur["per_seed"]]
    clips = [r["curation"]["counts"]["clips"] for r in cur["per_seed"]]
    spans = [r["curation"].get("kept_rows", {}) for r in cur["per_seed"]]
    print(f"| training clips | 192 generated | kept {kept} of {clips} curated |")
    print(f"| kept clips holding / touching a true transition | | "
          f"{[s.get('transition_centre') for s in spans]} / {[s.get('transition_edge') for s in spans]} |")
    lower = [f"{label} {a}" for label, key in STATS for a in ATTRIBUTES
             if cur["statistics"][key][a]["mean"] < base["statistics"][key][a]["mean"] - 1e-9]
    print("curated mean as good on every number:", "yes" if not lower else f"no (lower: {', '.join(lower)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curated")
    ap.add_argument("--baseline", default="benchmarks/results/demo_seeds3_cpu.json")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cur = json.loads(pathlib.Path(a.curated).read_text())
    base = json.loads(pathlib.Path(a.baseline).read_text())
    if "statistics" in cur:
        return compare_seeds(base, cur)
    base = base["per_seed"][a.seed] if "per_seed" in base else base
    if "curation" not in cur:
        raise SystemExit(f"{a.curated}: no 'curation' field; run `mugv demo --curated`")
    b, c = numbers(base), numbers(cur)
    print(f"| | uncurated (seed {a.seed}) | curated | curated - uncurated |")
    print("|---|---|---|---|")
    for k in b:
        print(f"| {k} (%) | {b[k]:.1f} | {c[k]:.1f} | {c[k] - b[k]:+.1f} |")
    cc = cur["curation"]["counts"]
    dropped = cc.get("dropped_with_transitions")   # the --curated_drop_transitions diagnostic
    trained = f"; {cc['kept'] - dropped} trained ({dropped} holding a true transition left out)" if dropped else ""
    print(f"| training clips | 192 generated | {cc['kept']} kept of {cc['clips']} curated clips{trained} | |")
    worse = [k for k in b if c[k] < b[k] - 1e-9]
    print("as good on every number:", "yes" if not worse else f"no (lower: {', '.join(worse)})")


if __name__ == "__main__":
    main()
