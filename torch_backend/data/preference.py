"""Preference data: DPO pairs and KTO labelled samples as JSONL manifests, and the resumable batch
source the preference stage trains on.

Manifests (one JSON object a line; paths relative to the manifest's folder unless absolute):

    DPO:  {"id": "p3", "caption": "a red cone, the camera pans left",
           "preferred": "cand/p3_1.npy", "rejected": "cand/p3_4.npy",
           "reference": "ref.png" (optional), "fps": 16 (optional), "scores": [0.91, 0.12] (optional)}
    KTO:  {"id": "k7", "caption": "...", "path": "cand/p3_1.npy", "desirable": "yes",
           "reference": ..., "fps": ..., "score": 0.91 (optional)}

Media are either video files (anything `data/decode.py` reads: mp4, mkv, webm, png...) or cached
latents: `.npy` arrays (C, T, h, w) in the DiT's normalised latent space (what the sampler
produces and what `data/cache.py` caches as the posterior mean). A manifest uses one kind
throughout. `desirable` is "yes"/"no" (JSON true/false also read). The reference image is
validated and carried; the stage conditions image-to-video samples on latent frame 0 of each video
as pre-training does, which for pairs sampled from one reference image is that image's latent.

Every problem is a `PreferenceError` naming `file:line` and the field before any training starts:
malformed JSON, unknown or missing fields, a label that is not yes/no, a missing media file, and a
pair whose two videos differ in size (the pair shares one noise tensor and t, so they must).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Optional

import numpy as np
import torch

from mugv.torch_backend.data.manifest import jsonl_rows
from mugv.torch_backend.data.batch import TrainBatch

DPO_FIELDS = ("id", "caption", "preferred", "rejected", "reference", "fps", "scores")
KTO_FIELDS = ("id", "caption", "path", "desirable", "reference", "fps", "score")
LATENT_SUFFIX = ".npy"
YES, NO = ("yes", "true", "1"), ("no", "false", "0")


class PreferenceError(ValueError):
    """A preference manifest row is malformed; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One DPO pair (media = (preferred, rejected)) or one KTO sample (media = (path,)), with its
    label (KTO: True = desirable; DPO: always True) and the media's shape (C,T,h,w or T,H,W)."""

    sample_id: str
    caption: str
    media: tuple[pathlib.Path, ...]
    desirable: bool
    shape: tuple[int, ...]
    reference: Optional[pathlib.Path] = None
    fps: Optional[float] = None
    line: int = 0

    @property
    def is_latent(self) -> bool:
        return self.media[0].suffix == LATENT_SUFFIX


def read_dpo_manifest(manifest: str | pathlib.Path) -> list[PreferenceRow]:
    """The pairs of a DPO manifest, every media file checked to exist and each pair's two
    videos checked to have one size."""
    return _read(pathlib.Path(manifest), "dpo")


def read_kto_manifest(manifest: str | pathlib.Path) -> list[PreferenceRow]:
    """The labelled samples of a KTO manifest (desirable yes/no), media files checked."""
    return _read(pathlib.Path(manifest), "kto")


def write_manifest(manifest: str | pathlib.Path, rows: list[dict]) -> pathlib.Path:
    """Write rows (dicts of DPO_FIELDS or KTO_FIELDS) as JSONL, paths as given."""
    manifest = pathlib.Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps({k: (str(x) if isinstance(x, pathlib.Path) else x)
                                for k, x in row.items() if x is not None}) + "\n")
    return manifest


def _read(manifest: pathlib.Path, kind: str) -> list[PreferenceRow]:
    if not manifest.is_file():
        raise PreferenceError(f"{kind} manifest {manifest}: file not found")
    rows, seen, kinds = [], {}, set()
    for line, obj in jsonl_rows(manifest, PreferenceError):
        where = f"{manifest}:{line}"
        row = _row(manifest, where, line, len(rows), obj, kind)
        if row.sample_id in seen:
            raise PreferenceError(f"{where}: id {row.sample_id!r} already used on line {seen[row.sample_id]}")
        seen[row.sample_id] = line
        kinds.add(row.is_latent)
        if len(kinds) > 1:
            raise PreferenceError(f"{where}: mixes latent ({LATENT_SUFFIX}) and video media; a manifest "
                                  "holds one kind")
        rows.append(row)
    if not rows:
        raise PreferenceError(f"{kind} manifest {manifest}: no rows")
    return rows


def _row(manifest, where, line, index, obj, kind) -> PreferenceRow:
    fields = DPO_FIELDS if kind == "dpo" else KTO_FIELDS
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise PreferenceError(f"{where}: unknown field(s) {unknown}; a {kind.upper()} row has {list(fields)}")
    caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise PreferenceError(f"{where}: field 'caption' is missing or empty")
    media_fields = ("preferred", "rejected") if kind == "dpo" else ("path",)
    media = tuple(_media(manifest, where, obj, name) for name in media_fields)
    shapes = [media_shape(p, where, name) for p, name in zip(media, media_fields)]
    if kind == "dpo":
        if media[0].suffix != media[1].suffix and LATENT_SUFFIX in (media[0].suffix, media[1].suffix):
            raise PreferenceError(f"{where}: 'preferred' and 'rejected' must both be latents or both videos")
        if shapes[0] != shapes[1]:
            raise PreferenceError(
                f"{where}: pair {obj.get('id', index)!r}: 'preferred' {media[0].name} has size {shapes[0]} but "
                f"'rejected' {media[1].name} has {shapes[1]}; the two videos of a pair must have one size "
                "(they share one noise tensor and timestep)")
        desirable = True
    else:
        desirable = parse_label(obj.get("desirable"), where)
    fps = obj.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise PreferenceError(f"{where}: field 'fps' = {fps!r}: expected a number > 0")
    reference = _media(manifest, where, obj, "reference") if obj.get("reference") else None
    return PreferenceRow(str(obj.get("id", index)), caption.strip(), media, desirable, shapes[0],
                         reference, None if fps is None else float(fps), line)


def parse_label(value, where: str = "desirable") -> bool:
    """KTO label: "yes"/"no" (any case; JSON true/false also read) -> bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in YES + NO:
        return value.strip().lower() in YES
    raise PreferenceError(f"{where}: field 'desirable' = {value!r}: expected \"yes\" or \"no\"")


def _media(manifest: pathlib.Path, where: str, obj: dict, name: str) -> pathlib.Path:
    value = obj.get(name)
    if not isinstance(value, str) or not value.strip():
        raise PreferenceError(f"{where}: field {name!r} is missing or empty")
    path = pathlib.Path(value)
    path = path if path.is_absolute() else manifest.parent / path
    if not path.is_file():
        raise PreferenceError(f"{where}: field {name!r} = {value!r}: file not found ({path})")
    return path


def media_shape(path: pathlib.Path, where: str = "", name: str = "") -> tuple[int, ...]:
    """(C, T, h, w) of a latent .npy (header only), (T, H, W) of a video (decodes it once)."""
    try:
        if path.suffix == LATENT_SUFFIX:
            shape = tuple(np.load(path, mmap_mode="r").shape)
            if len(shape) != 4:
                raise PreferenceError(f"{where}: field {name!r}: latent {path} has shape {shape}: expected (C, T, h, w)")
            return shape
        from mugv.torch_backend.data.decode import probe
        info = probe(path)
        return (info.num_frames, info.height, info.width)
    except PreferenceError:
        raise
    except Exception as e:   # unreadable media is a row error here: a pair cannot be half-skipped
        raise PreferenceError(f"{where}: field {name!r}: cannot read {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Loading and batching


def load_latents(rows: list[PreferenceRow], encode_video: Optional[Callable] = None,
                 size: Optional[tuple[int, int]] = None, frames: Optional[int] = None,
                 fps: float = 16.0) -> torch.Tensor:
    """Media of every row as latents (N, M, C, T, h, w), M = 2 for pairs (preferred, rejected),
    1 for KTO. Latent manifests are read as they are; video manifests are decoded at `size`
    (H, W) and `frames` and encoded by `encode_video` (e.g. `data/cache.py::vae_encoder`, whose
    posterior mean is used, as the demo's pre-training does)."""
    from mugv.torch_backend.data.decode import decode_clip, to_model_range

    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        raise PreferenceError(f"rows have different media sizes {sorted(shapes)}; one manifest is one bucket")
    out = []
    for r in rows:
        if r.is_latent:
            out.append(np.stack([np.load(p).astype(np.float32) for p in r.media]))
            continue
        if encode_video is None or size is None or frames is None:
            raise PreferenceError(f"row {r.sample_id} (line {r.line}) holds videos: give encode_video, size and frames")
        pixels = np.stack([to_model_range(decode_clip(p, frames, size[0], size[1], fps, r.fps)) for p in r.media])
        out.append(np.asarray(encode_video(pixels)[0], dtype=np.float32))
    return torch.from_numpy(np.stack(out))


@dataclasses.dataclass
class PreferenceBatch(TrainBatch):
    """A TrainBatch of B pairs or KTO samples: `latents` = preferred (DPO) or the sample (KTO);
    `rejected` (B, C, T, h, w) for DPO, else None; `desirable` bool (B,)."""

    rejected: Optional[torch.Tensor] = None
    desirable: Optional[torch.Tensor] = None

    def rows(self, start: int, stop: int) -> "PreferenceBatch":
        return PreferenceBatch(self.latents[start:stop], self.text[start:stop], self.text_mask[start:stop],
                               self.fps[start:stop], self.pixel_hw, self.ids[start:stop],
                               None if self.rejected is None else self.rejected[start:stop],
                               None if self.desirable is None else self.desirable[start:stop])


class PreferenceSource:
    """A resumable `BatchSource` of preference batches held in memory.

    latents: (N, M, C, T, h, w) from `load_latents` (M = 2: pairs, M = 1: KTO samples);
    text, text_mask: (N, L, D), (N, L); desirable: bool (N,). Epoch e visits the rows in the
    permutation PCG64([seed, e]) cut into full batches (the last partial one dropped), so batch s
    is a function of (seed, s) alone: the state is just the position.
    """

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                 desirable: torch.Tensor, batch: int, seed: int, fps: float, pixel_hw: tuple[int, int],
                 ids: Optional[list[str]] = None):
        n = latents.shape[0]
        if batch > n:
            raise ValueError(f"PreferenceSource: batch {batch} > {n} rows")
        self.latents, self.text, self.text_mask = latents.float(), text.float(), text_mask.bool()
        self.desirable = desirable.bool()
        self.batch, self.seed, self.fps, self.pixel_hw = batch, seed, fps, pixel_hw
        self.ids = ids or [str(i) for i in range(n)]
        self.position = 0

    @property
    def is_pairs(self) -> bool:
        return self.latents.shape[1] == 2

    def next_batch(self) -> PreferenceBatch:
        n = self.latents.shape[0]
        per_epoch = n // self.batch
        epoch, k = divmod(self.position, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        pick = torch.from_numpy(order[k * self.batch:(k + 1) * self.batch].copy())
        self.position += 1
        lat = self.latents[pick]
        return PreferenceBatch(lat[:, 0], self.text[pick], self.text_mask[pick],
                               torch.full((len(pick),), float(self.fps)), self.pixel_hw,
                               [int(i) for i in pick], lat[:, 1] if self.is_pairs else None,
                               self.desirable[pick])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state seed {state['seed']} != this source's seed {self.seed}")
        self.position = int(state["position"])


def preference_source(rows: list[PreferenceRow], text_encoder: Callable, batch: int, seed: int,
                      fps: float = 16.0, pixel_hw: Optional[tuple[int, int]] = None, **load) -> PreferenceSource:
    """Rows -> latents (`load_latents`) and text states (text_encoder(captions) -> (text, mask))
    -> a `PreferenceSource`. pixel_hw (for the timestep shift) defaults to 8 x the latent size."""
    latents = load_latents(rows, **load)
    text, mask = text_encoder([r.caption for r in rows])
    hw = pixel_hw or (8 * latents.shape[-2], 8 * latents.shape[-1])
    return PreferenceSource(latents, text, mask, torch.tensor([r.desirable for r in rows]), batch, seed,
                            fps, hw, [r.sample_id for r in rows])
