"""Captions for curated clips, and balance weights from the attributes the captions name.

Caption sources, first found wins:
  1. `captions.jsonl` in the input folder: rows {path, caption, optional start, end (seconds)};
     a clip takes the row of its source whose time range overlaps it most (a row without a range
     covers the whole source). Real crawls ship captions this way; so do the generated sources.
  2. `<video>.txt` beside the video (whole source).
A clip with neither has no caption: it is not written to the training manifest (a row without a
caption is a manifest error, `manifest.py`) and the report counts it. A VLM captioner (a local
transformers directory) is not implemented yet.

Balance: an extractor maps a caption to attributes (default: the product analyzer's vocabulary,
`analyzer.parse_caption`: colour, shape, motion). Each kept clip's weight is the inverse frequency
of its attribute combination among kept clips, normalised to mean 1, so every combination is drawn
equally often in expectation (the stratified sampling MUG-V builds on its entity ontology).
"""
from __future__ import annotations

import json
import pathlib
from collections import Counter
from typing import Callable

from mugv.torch_backend.data.manifest import jsonl_rows


class CaptionIndex:
    """Caption lookup by (source, start_s, end_s) from an input folder."""

    def __init__(self, input_dir: str | pathlib.Path):
        self.root = pathlib.Path(input_dir)
        self.rows: dict[str, list[tuple[float, float, str]]] = {}
        index = self.root / "captions.jsonl"
        if index.is_file():
            for _, row in jsonl_rows(index, ValueError):
                if isinstance(row.get("path"), str) and isinstance(row.get("caption"), str) and row["caption"].strip():
                    start, end = float(row.get("start", 0.0)), float(row.get("end", float("inf")))
                    self.rows.setdefault(row["path"], []).append((start, end, row["caption"].strip()))

    def caption(self, source: str, start_s: float, end_s: float) -> str:
        best, overlap = "", 0.0
        for a, b, text in self.rows.get(source, []):
            o = min(b, end_s) - max(a, start_s)
            if o > overlap:
                best, overlap = text, o
        if best:
            return best
        txt = (self.root / source).with_suffix(".txt")
        return txt.read_text().strip() if txt.is_file() else ""


def product_attributes(caption: str) -> dict[str, str]:
    """Colour, shape and motion named by a caption (the embedded data's vocabulary)."""
    from mugv.torch_backend.data.analyzer import parse_caption
    return {k: v for k, v in parse_caption(caption).items() if v is not None}


def balance_weights(captions: dict[str, str],
                    extractor: Callable[[str], dict[str, str]] = product_attributes) -> dict[str, dict]:
    """id -> {"attributes", "weight"}: inverse frequency of the attribute combination, mean 1."""
    attrs = {k: extractor(c) for k, c in captions.items()}
    combo = {k: json.dumps(a, sort_keys=True) for k, a in attrs.items()}
    counts = Counter(combo.values())
    raw = {k: 1.0 / counts[combo[k]] for k in captions}
    mean = sum(raw.values()) / max(len(raw), 1)
    return {k: {"attributes": attrs[k], "weight": raw[k] / mean} for k in captions}
