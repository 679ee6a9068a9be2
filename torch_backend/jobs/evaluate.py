"""`mugv evaluate`: caption following of videos, read by the analyzer (colour, shape, motion).

`analyzer_accuracy` is the one scoring rule the demo, the preference data and the experiments use.
"""
from __future__ import annotations

import json

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


def evaluate(ns) -> int:
    """`mugv evaluate --manifest M`: accuracy per attribute of M's videos against their captions."""
    from mugv.torch_backend.data.analyzer import _read
    from mugv.torch_backend.data.manifest import read_manifest
    entries = read_manifest(ns.manifest)
    acc, rows = analyzer_accuracy([_read(e.path) for e in entries], [e.caption for e in entries])
    print(json.dumps({"accuracy": acc, "clips": len(entries)}, indent=1))
    return 0
