"""The embedded curation config (`embedded_curate_config`, calibrated on 64 px sources) on
generated multi-shot sources at a given size and shot length: what it keeps, rejects and finds,
scored against the generator's truth. Written to choose how the demo's training split should be
rendered if it is curated (docs/status.md, "Curation").

    python -P benchmarks/curate_sizes.py OUT --size 32 --shot-frames 24 30
    python -P benchmarks/curate_sizes.py OUT --size 64 --shot-frames 28 34
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from mugv.core.curation import embedded_curate_config
from mugv.torch_backend.data.curation import run
from mugv.torch_backend.data.curation.evaluate import evaluate_on_truth
from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--shot-frames", type=int, nargs=2, default=(24, 30))
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--defect-rate", type=float, default=0.45)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = pathlib.Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    generate_sources(root / "in", SourcesSpec(sources=a.sources, shots=a.shots, shot_frames=tuple(a.shot_frames),
                                              size=a.size, defect_rate=a.defect_rate, seed=a.seed))
    report = run(embedded_curate_config(str(root / "in"), str(root / "out")))
    result = evaluate_on_truth(root / "out", root / "in" / "truth.json")
    print("clips", report["clips"], "kept", report["kept"], "rejected (first reason)", report["rejected_by_first_reason"])
    print("shot boundaries", json.dumps(result["shots"]["all"]))
    for name, f in result["filters"].items():
        print(name, json.dumps(f))


if __name__ == "__main__":
    main()
