"""The dataset index: manifest rows probed once, assigned to buckets, broken files skipped and
counted with their reasons; and the loader that turns sampler batches into pixel tensors.

Probing decodes each file once (`decode.probe`), so a truncated or corrupt file is found here and
not in the middle of a run; the index then lists only samples that decode. Videos are assigned to
the stage's nearest video bucket they can fill; if the stage has image buckets, every video and
image can also give one frame to the nearest image bucket (t2i from video data).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib

import numpy as np
import torch

from mugv.core.data import BucketSpec, assign_bucket, centre_window_start
from mugv.torch_backend.data.decode import MediaError, decode_clip, probe, to_model_range
from mugv.torch_backend.data.manifest import ManifestEntry, read_manifest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexItem:
    """One usable (sample, bucket) pair."""

    entry: ManifestEntry
    bucket: int
    source_fps: float
    num_frames: int = 0   # source frames of the clip (its time range); 0 = unknown: decode from its start


@dataclasses.dataclass
class DatasetIndex:
    """Usable items, the buckets they index into, and what was skipped and why."""

    buckets: tuple[BucketSpec, ...]
    items: list[IndexItem]
    skipped: list[tuple[str, str, str]]  # (sample id, reason, detail)

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(collections.Counter(reason for _, reason, _ in self.skipped))

    def members(self) -> dict[int, list[int]]:
        """Bucket index -> positions in `items` (in manifest order)."""
        out: dict[int, list[int]] = {i: [] for i in range(len(self.buckets))}
        for pos, item in enumerate(self.items):
            out[item.bucket].append(pos)
        return out

    def weights(self) -> list[float] | None:
        """Per position, the manifest's sampling weight (rows without one count 1); None when no
        row has a weight, so an unweighted manifest keeps the unweighted sampler."""
        if all(item.entry.weight is None for item in self.items):
            return None
        return [1.0 if item.entry.weight is None else item.entry.weight for item in self.items]

    def report(self) -> str:
        counts = collections.Counter(item.bucket for item in self.items)
        lines = [f"{len(self.items)} items, {len(self.skipped)} skipped {self.skip_counts}"]
        lines += [f"  {b.name} batch {b.batch_size}: {counts.get(i, 0)} items"
                  for i, b in enumerate(self.buckets)]
        return "\n".join(lines)


def build_index(manifest: str | pathlib.Path | list[ManifestEntry],
                buckets: tuple[BucketSpec, ...], on_skip=None, probed: dict | None = None) -> DatasetIndex:
    """Probe every row, assign buckets, skip and count what cannot be used.

    on_skip(entry, reason, detail) is told of each skipped row (default: a logged warning per
    file); `probed` keeps each file's probe result (or its MediaError) so several indexes of one
    manifest (a curriculum's stages) decode each file once."""
    entries = read_manifest(manifest) if not isinstance(manifest, list) else manifest
    video_buckets = any(b.frames > 1 for b in buckets)
    image_buckets = any(b.frames == 1 for b in buckets)
    probed = {} if probed is None else probed
    if on_skip is None:
        def on_skip(entry, reason, detail):
            log.warning("skip %s (%s, line %d): %s%s", entry.sample_id, entry.path, entry.line, reason,
                        f" ({detail})" if detail else "")
    items, skipped = [], []
    for entry in entries:
        key = (str(entry.path), entry.fps)
        if key not in probed:
            try:
                probed[key] = probe(entry.path, entry.fps)
            except MediaError as e:
                probed[key] = e
        info = probed[key]
        if not isinstance(info, MediaError) and (entry.start_s is not None or entry.end_s is not None):
            try:   # a time range of the file: its own frame count, checked against the file
                info = info.clip(entry.start_s, entry.end_s, f"{entry.manifest or entry.path}:{entry.line}")
            except MediaError as e:
                info = e
        if isinstance(info, MediaError):
            skipped.append((entry.sample_id, info.reason, info.detail))
            on_skip(entry, info.reason, info.detail)
            continue
        placed, reasons = False, []
        if info.num_frames > 1 and video_buckets:
            b, why = assign_bucket(buckets, info.height, info.width, info.num_frames, info.fps)
            if b is not None:
                items.append(IndexItem(entry, b, info.fps, info.num_frames))
                placed = True
            else:
                reasons.append(why)
        if image_buckets:  # any decodable file can give one frame to an image bucket
            b, why = assign_bucket(buckets, info.height, info.width, 1, info.fps)
            if b is not None:
                items.append(IndexItem(entry, b, info.fps, info.num_frames))
                placed = True
            else:
                reasons.append(why)
        if not placed:
            why = reasons[0] if reasons else f"{info.num_frames} frame(s), no image bucket in this stage"
            reason = "too small" if why.startswith("too small") else "too short"
            skipped.append((entry.sample_id, reason, why))
            on_skip(entry, reason, why)
    index = DatasetIndex(tuple(buckets), items, skipped)
    log.info("dataset index: %s", index.report())
    return index


def window_start(item: IndexItem, bucket: BucketSpec) -> int:
    """First source frame of the frames an item gives its bucket: the middle of a longer clip
    (core/data.py::centre_window_start)."""
    return centre_window_start(item.num_frames, bucket.frames, item.source_fps, bucket.fps)


def load_item(item: IndexItem, bucket: BucketSpec) -> np.ndarray:
    """float32 (3, T, H, W) in [-1, 1] for one indexed item: the middle `bucket.frames` frames."""
    clip = decode_clip(item.entry.path, bucket.frames, bucket.height, bucket.width, bucket.fps,
                       source_fps=item.source_fps, start=window_start(item, bucket),
                       start_s=item.entry.start_s, end_s=item.entry.end_s)
    return to_model_range(clip)


def load_reference(item: IndexItem, bucket: BucketSpec) -> np.ndarray:
    """float32 (3, 1, H, W) in [-1, 1]: the i2v reference image of an item (its manifest
    `reference`, else the first frame of what `load_item` gives), resized and cropped like the clip."""
    if item.entry.reference:
        frame = decode_clip(item.entry.reference, 1, bucket.height, bucket.width, bucket.fps)
    else:
        frame = decode_clip(item.entry.path, 1, bucket.height, bucket.width, bucket.fps, source_fps=item.source_fps,
                            start=window_start(item, bucket), start_s=item.entry.start_s, end_s=item.entry.end_s)
    return to_model_range(frame)


@dataclasses.dataclass
class Batch:
    """What one rank trains on in one step."""

    bucket: int
    task: str
    sample_ids: list[str]
    captions: list[str]
    pixels: torch.Tensor  # (B, 3, T, H, W) float32 in [-1, 1]


def load_batch(index: DatasetIndex, positions: list[int], bucket: int, task: str,
               failures: collections.Counter | None = None) -> Batch:
    """Decode the items at `positions`. A file that fails now (changed since indexing) is
    dropped from the batch and counted in `failures`; the run goes on."""
    spec = index.buckets[bucket]
    arrays, ids, captions = [], [], []
    for pos in positions:
        item = index.items[pos]
        try:
            arrays.append(load_item(item, spec))
        except MediaError as e:
            if failures is not None:
                failures[e.reason] += 1
            log.warning("dropped %s from its batch: %s", item.entry.sample_id, e)
            continue
        ids.append(item.entry.sample_id)
        captions.append(item.entry.caption)
    shape = (0, 3, spec.frames, spec.height, spec.width)
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(shape)
    return Batch(bucket, task, ids, captions, pixels)
