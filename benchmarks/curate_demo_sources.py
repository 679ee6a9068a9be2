"""What curation did to `mugv demo --curated`'s training sources, against the generator's truth
(docs/curation.md, "The demo trains from curated data"): boundaries per kind, filters, how many
kept clips hold a missed transition, and near-duplicate distances of planted copies against
distinct shots (can dedup's pHash <= 8 bits AND chroma layout <= 12 separate them here?).

    python -P benchmarks/curate_demo_sources.py /tmp/demo_curated/data/curated_train

Then the colour-structure check of `shots._colour_changes` on these sources: the hue-distribution
change (total variation, 0-1) at each true dissolve that the whole-frame dissolve test alone
misses, against every frame inside a shot (more than 10 frames from any true transition), with
how many reach `colour_threshold`.

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

from mugv.core.curation import embedded_curate_config
from mugv.torch_backend.data.curation import dedup, media, shots
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


def colour_check(root: pathlib.Path) -> None:
    import dataclasses
    cfg = embedded_curate_config("", "").shots
    pixel_only = dataclasses.replace(cfg, colour_threshold=0.0)
    w = cfg.dissolve_window
    truth = json.loads((root / "sources" / "truth.json").read_text())
    missed, inside = [], []
    for name, src in sorted(truth["sources"].items()):
        scan = media.scan(root / "sources" / name, cfg.analysis_width)
        hist = shots.hue_histograms(scan.frames)
        t = len(hist)

        def change(c):
            v = 0.5 * np.abs(hist[c + w] - hist[c - w]).sum()
            return 0.0 if np.isnan(v) else float(v)
        found = shots.detect(scan.frames, pixel_only)
        near = np.zeros(t, dtype=bool)
        for tr in src["transitions"]:
            c = int(np.argmin(np.abs(scan.times - tr["time"])))
            near[max(0, c - 10):c + 11] = True
            if tr["kind"] == "dissolve" and w + 1 <= c < t - w - 1 and not any(f.start <= c <= f.end for f in found):
                missed.append(max(change(k) for k in (c - 1, c, c + 1)))
        inside += [change(c) for c in range(w, t - w) if not near[c]]
    missed, inside = np.asarray(missed), np.asarray(inside)
    th = cfg.colour_threshold
    print(f"colour check (threshold {th}): true dissolves the whole-frame test misses: {len(missed)}, "
          f">= threshold {int((missed >= th).sum())}, quartiles {np.percentile(missed, [0, 25, 50, 75, 100]).round(3).tolist()}; "
          f"frames inside shots: {len(inside)}, >= threshold {int((inside >= th).sum())}, max {inside.max():.3f}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
    colour_check(pathlib.Path(sys.argv[1]))
