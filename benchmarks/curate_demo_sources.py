"""What curation did to `mugv demo --curated`'s training sources, against the generator's truth
(docs/curation.md, "The demo trains from curated data"): boundaries per kind, filters, how many
kept clips hold a missed transition, and near-duplicate distances of planted copies against
distinct shots (can dedup's pHash <= 8 bits AND chroma layout <= 12 separate them here?).

    python -P benchmarks/curate_demo_sources.py /tmp/demo_curated/data/curated_train

Pairs: clips that passed every filter (rejected at most as duplicates) and overlap a true shot;
"copies" descend from one original shot, "same look" are distinct shots of one colour, shape and
background, "other" the rest.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import sys

import numpy as np

from mugv.torch_backend.data.curation import dedup
from mugv.torch_backend.data.curation.evaluate import evaluate_on_truth, label_clips


def main(root: pathlib.Path, max_phash: float = 8.0, max_chroma: float = 12.0) -> None:
    truth = json.loads((root / "sources" / "truth.json").read_text())
    scores = evaluate_on_truth(root / "curated", root / "sources" / "truth.json")
    report = json.loads((root / "curated" / "report.json").read_text())
    print(f"clips {report['clips']}, kept {report['kept']}, rejected by filter {report['rejected_by_filter']}")
    print("boundaries", json.dumps({k: scores["shots"][k] for k in ("all", "cut", "fade", "dissolve")}))
    for name, f in scores["filters"].items():
        print(name, json.dumps(f))
    print("kept rows", json.dumps(scores["manifest"]))
    records = [json.loads(x) for x in open(root / "curated" / "results.jsonl") if x.strip()]
    decisions = {c["key"]: c for c in map(json.loads, open(root / "curated" / "curation.jsonl")) if "key" in c}
    clips = [r for r in records if r.get("kind") == "clip"
             and set(decisions[r["key"]]["reasons"]) <= {"duplicate"}]
    labels = label_clips(truth, [{**c, "reasons": []} for c in clips])
    clips = [c for c in clips if c["key"] in labels]

    def origin(lab):
        return (lab["original"]["source"], lab["original"]["shot"]) if lab.get("original") else (lab["source"], lab["shot"])

    def look(lab):
        s = lab["scene"]
        return s["colour"], s["shape"], s["background"]

    pairs = {"copies": [], "same look": [], "other": []}
    for a, b in itertools.combinations(clips, 2):
        la, lb = labels[a["key"]], labels[b["key"]]
        d = dedup.signature_distance([int(x, 16) for x in a["phash"]], [int(x, 16) for x in b["phash"]])
        ch = dedup.chroma_distance(a["chroma"], b["chroma"])
        kind = "copies" if origin(la) == origin(lb) else "same look" if look(la) == look(lb) else "other"
        pairs[kind].append((d, ch))
    print(f"{len(clips)} clips passed the filters; thresholds pHash <= {max_phash}, chroma <= {max_chroma}")
    for kind, x in pairs.items():
        x = np.asarray(x)
        grouped = int(((x[:, 0] <= max_phash) & (x[:, 1] <= max_chroma)).sum())
        print(f"{kind:>9}: {len(x):6d} pairs, within both thresholds {grouped:5d}; pHash bits min {x[:, 0].min():.1f} "
              f"median {np.median(x[:, 0]):.1f} max {x[:, 0].max():.1f}; chroma min {x[:, 1].min():.1f} "
              f"median {np.median(x[:, 1]):.1f} max {x[:, 1].max():.1f}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
