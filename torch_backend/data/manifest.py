"""Dataset manifests: JSONL or CSV rows of (path, caption, optional reference image, fps, weight).

`weight` (optional, a number >= 0) is the row's sampling weight: when any row carries one, the
training sampler draws clips in proportion to it (`data/sampler.py`), rows without one count as
1 (`mugv curate` writes mean-1 balance weights). A manifest without weights is sampled uniformly,
epoch by epoch, as before.

A row's `path` is relative to the manifest's folder unless absolute. A row without a caption is
an error naming the file and line, raised before any work: a silent empty caption would train the
model on unconditional samples. Missing or broken *media* files are not manifest errors; the
index skips and counts them (`torch_backend/data/dataset.py`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib

FIELDS = ("path", "caption", "reference", "fps", "id", "weight", "start_s", "end_s")


class ManifestError(ValueError):
    """A manifest row is malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One sample. `sample_id` is stable: the row's `id` field or its 0-based row index."""

    sample_id: str
    path: pathlib.Path
    caption: str
    reference: pathlib.Path | None = None
    fps: float | None = None
    line: int = 0
    weight: float | None = None
    start_s: float | None = None
    end_s: float | None = None
    manifest: pathlib.Path | None = None   # the file the row came from (for messages)


def read_manifest(manifest: str | pathlib.Path) -> list[ManifestEntry]:
    """Rows of a `.jsonl` or `.csv` manifest (CSV needs a header with at least path, caption)."""
    manifest = pathlib.Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest}: file not found")
    suffix = manifest.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = jsonl_rows(manifest)
    elif suffix == ".csv":
        rows = _csv_rows(manifest)
    else:
        raise ManifestError(f"manifest {manifest}: expected a .jsonl or .csv file, got {suffix!r}")
    entries, seen = [], {}
    for index, (line, row) in enumerate(rows):
        entry = _entry(manifest, line, index, row)
        if entry.sample_id in seen:
            raise ManifestError(f"{manifest}:{line}: id {entry.sample_id!r} already used on line "
                                f"{seen[entry.sample_id]}")
        seen[entry.sample_id] = line
        entries.append(entry)
    weighted = [e for e in entries if e.weight is not None]
    if weighted and not any(e.weight > 0 for e in weighted) and len(weighted) == len(entries):
        raise ManifestError(f"{manifest}: field 'weight' is 0 on every row (lines {weighted[0].line}-"
                            f"{weighted[-1].line}); at least one row needs a weight > 0 to be drawn")
    return entries


def write_manifest(manifest: str | pathlib.Path, rows: list[dict]) -> None:
    """Write rows (dicts with FIELDS keys) as JSONL; paths are written as given."""
    manifest = pathlib.Path(manifest)
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps({k: (str(v) if isinstance(v, pathlib.Path) else v)
                                for k, v in row.items() if v is not None}) + "\n")


def jsonl_rows(manifest: pathlib.Path, error: "type[Exception] | None" = None):
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON
    object raises `error` (default ManifestError) naming `file:line`."""
    error = error or ManifestError
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first row
    with open(manifest, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{manifest}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "save the manifest as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise error(f"{manifest}:{line}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{manifest}:{line}: expected a JSON object, got {type(row).__name__}")
            yield line, row


def _csv_rows(manifest: pathlib.Path):
    try:
        pathlib.Path(manifest).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{manifest}: not UTF-8 (byte offset {e.start}); save the manifest as UTF-8") from None
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [k for k in ("path", "caption") if k not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{manifest}:1: CSV header {reader.fieldnames} lacks {missing}")
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None and v not in (None, "")}


def _entry(manifest: pathlib.Path, line: int, index: int, row: dict) -> ManifestEntry:
    where = f"{manifest}:{line}"
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}; known: {list(FIELDS)}")
    path = row.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ManifestError(f"{where}: field 'path' is missing or empty")
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ManifestError(f"{where}: field 'caption' is missing or empty (path {path!r})")
    fps = _number(where, row, "fps", "expected a number > 0", positive=True)
    weight = _number(where, row, "weight", "expected a finite number >= 0 (the row's sampling weight)")
    seconds = "expected a finite number of seconds >= 0 from the file's first frame"
    start_s, end_s = _number(where, row, "start_s", seconds), _number(where, row, "end_s", seconds)
    if start_s is not None and end_s is not None and not end_s > start_s:
        raise ManifestError(f"{where}: field 'end_s' = {row['end_s']!r} is not after 'start_s' = "
                            f"{row['start_s']!r}: expected start_s < end_s")
    root = manifest.parent
    reference = row.get("reference")
    return ManifestEntry(
        sample_id=str(row.get("id", index)),
        path=_resolve(root, path),
        caption=caption.strip(),
        reference=_resolve(root, reference) if reference else None,
        fps=fps,
        line=line,
        weight=weight,
        start_s=start_s,
        end_s=end_s,
        manifest=manifest,
    )


def _number(where: str, row: dict, field: str, expected: str, positive: bool = False) -> float | None:
    """A numeric field: None when absent, else a finite number >= 0 (> 0 when `positive`); CSV
    gives text, so numeric strings count; a bool or any other type does not."""
    value = row.get(field)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: field '{field}' = {value!r}: {expected}") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ManifestError(f"{where}: field '{field}' = {value!r}: {expected}")
    return number


def _resolve(root: pathlib.Path, path: str) -> pathlib.Path:
    p = pathlib.Path(path)
    return p if p.is_absolute() else root / p
