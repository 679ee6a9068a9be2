"""`mugv evaluate`: caption following of videos, read by the analyzer (colour, shape, motion).

`analyzer_accuracy` is the one scoring rule the demo, the preference data and the experiments use;
`majority_accuracy` (the always-the-most-frequent-value baseline) and `per_value` (hits per value
of one attribute) read the same rows.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def analyzer_accuracy(videos: list[np.ndarray], captions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Per attribute: the share of clips whose analyzed value is the one the caption names."""
    from mugv.torch_backend.data.analyzer import analyze, parse_caption
    hits: dict[str, list[bool]] = {}
    rows = []
    for video, caption in zip(videos, captions):
        wanted = parse_caption(caption)
        result = analyze(video)
        row = {"caption": caption}
        for attribute, value in wanted.items():
            if value is None:
                continue
            got = result.best(attribute)
            hits.setdefault(attribute, []).append(got == value)
            row[attribute] = got
        rows.append(row)
    return {k: float(np.mean(h)) for k, h in hits.items()}, rows


ATTRIBUTES = ("colour", "shape", "motion")


def majority_accuracy(captions: list[str]) -> dict[str, float]:
    """Per attribute, what always answering the prompts' most frequent value would score."""
    from collections import Counter

    from mugv.torch_backend.data.analyzer import parse_caption
    parsed = [parse_caption(c) for c in captions]
    return {a: Counter(x[a] for x in parsed).most_common(1)[0][1] / len(parsed) for a in ATTRIBUTES}


def per_value(rows: list[dict], captions: list[str], attribute: str = "colour") -> dict[str, list[int]]:
    """value -> [hits, prompts] of one attribute over analyzer rows (evaluate.analyzer_accuracy)."""
    from mugv.torch_backend.data.analyzer import parse_caption
    out: dict[str, list[int]] = {}
    for row, c in zip(rows, captions):
        want = parse_caption(c)[attribute]
        hit = out.setdefault(want, [0, 0])
        hit[0] += row.get(attribute) == want
        hit[1] += 1
    return out


def evaluate(ns) -> int:
    """`mugv evaluate --manifest M`: accuracy per attribute of M's videos against their captions."""
    from mugv.torch_backend.data.decode import read_frames
    from mugv.torch_backend.data.manifest import read_manifest
    from mugv.torch_backend.data.media import decode_each
    decoded, skipped = decode_each(read_manifest(ns.manifest), lambda e: read_frames(e.path),
                                   what=f"evaluate --manifest {ns.manifest}")
    if not decoded:
        print(f"mugv evaluate: error: {ns.manifest}: no video could be decoded ({skipped})", file=sys.stderr)
        return 2
    acc, rows = analyzer_accuracy([v for _, v in decoded], [e.caption for e, _ in decoded])
    print(json.dumps({"accuracy": acc, "clips": len(decoded), "skipped": skipped}, indent=1))
    return 0
