"""Latent and text caching to tensorstore zarr3, by a resumable job; cached and online sources.

Layout of a cache directory:
  meta.json                      what it was built from: buckets, sample ids per bucket, encoders
  latents/<bucket>/{mean,std}    float32 (N_b, C, T_l, H_l, W_l), row r = r-th item of the bucket
  latents/<bucket>/done          uint8 (N_b,): 1 once row r's mean and std are written
  text/{embedding,mask,done}     float32 (N, L, D), uint8 (N, L), uint8 (N,), row = index position

Arrays are zarr3 with the sharding codec (one shard file per `SHARD` rows, one inner chunk per
row). The job writes a row's data, waits for it, and only then its `done` flag; tensorstore's file
store replaces a shard file atomically (temp file + rename), so a kill at any instant leaves each
row either marked done with its data or not marked - a restart redoes exactly the unmarked rows.

Data parallel (`rank`, `world`, `barrier` of `build_cache`; `mugv cache` under torchrun): each
bucket's rows are cut into the same batches as on one process, and each rank encodes a contiguous
block of those batches, so every row is computed by the same arithmetic (the same batch) at any
world size and the arrays are bit-equal to the one-process cache. Rank 0 writes `meta.json` and
creates the arrays; ranks writing rows of the same shard file are serialised by tensorstore's file
locking (optimistic concurrency: a shard's read-modify-write is retried, never lost).

Latents are cached as the VAE posterior's mean and std (the official encoder samples
z = mean + std * eps, notes 3.5); training draws eps itself (`sample_latents`), so one cache
serves every epoch with fresh noise, and the cached and online paths agree exactly.

The video encoder is pluggable: any callable (B, 3, T, H, W) float32 in [-1, 1] -> (mean, std)
each (B, C, T_l, H_l, W_l). `vae_encoder(model)` wraps `torch_backend/models/vae.py::VideoVAE`
(moments in the normalised latent space the DiT sees); `pool_encoder` is a cheap stand-in with the
VAE's 8x8x8 geometry (front padding rule included) for tests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Callable

import numpy as np
import tensorstore as ts
import torch

from mugv.core import vae as core_vae
from mugv.torch_backend.data.dataset import DatasetIndex, load_item

log = logging.getLogger(__name__)
SHARD = 64
VideoEncoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def pool_encoder(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in encoder: mean and std of each 8x8x8 block after the VAE's front padding.

    Not a VAE (3 channels, no learning); it has the real latent shape `core.vae.latent_shape`.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    b, c, t, h, w = pixels.shape
    pad, how = core_vae.front_padding(t)
    if pad:
        front = np.repeat(pixels[:, :, :1], pad, axis=2) if how == "repeat_first" else \
            np.zeros((b, c, pad, h, w), np.float32)
        pixels = np.concatenate([front, pixels], axis=2)
    f = core_vae.TEMPORAL_FACTOR
    s = core_vae.SPATIAL_FACTOR
    blocks = pixels.reshape(b, c, pixels.shape[2] // f, f, h // s, s, w // s, s)
    return blocks.mean(axis=(3, 5, 7)), blocks.std(axis=(3, 5, 7))


def vae_encoder(vae: torch.nn.Module, autocast=None, **chunking) -> VideoEncoder:
    """The VAE posterior as cached moments in the DiT's normalised latent space.

    The official encode samples z = mean + exp(logvar / 2) * eps and normalises per channel,
    (z - mu_c) / sigma_c (notes 3.5). That equals mean_n + std_n * eps with mean_n =
    (mean - mu_c) / sigma_c and std_n = exp(logvar / 2) / sigma_c, which is what is cached.
    The pixels go to the VAE's device; `autocast` (a context factory, e.g. `VAERuntime.autocast`)
    wraps the encode; the moments come back as float32 numpy.
    """
    import contextlib
    param = next(vae.parameters())

    @torch.no_grad()
    def encode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        video = torch.as_tensor(pixels, dtype=param.dtype, device=param.device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            mean, logvar = vae.posterior(video, **chunking)
        mean, logvar = mean.float(), logvar.float()
        mu = vae.latent_mean[:, None, None, None]
        sigma = vae.latent_std[:, None, None, None]
        return (((mean - mu) / sigma).float().cpu().numpy(),
                (torch.exp(0.5 * logvar) / sigma).float().cpu().numpy())

    return encode


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std * eps, the official posterior sample (notes 3.5)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + std * eps


def _spec(path: pathlib.Path, shape: tuple[int, ...], dtype: str) -> dict:
    inner = [1, *shape[1:]]
    return {
        "driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD, *shape[1:]]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": inner, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}]}}],
            "fill_value": 0,
        },
    }


def _open(path: pathlib.Path, shape=None, dtype=None, create=False) -> ts.TensorStore:
    if create:
        return ts.open(_spec(path, shape, dtype), create=True, open=True).result()
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()


def _caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def _meta(index: DatasetIndex, video_name: str, text_name: str) -> dict:
    members = index.members()
    return {
        # 2: captions recorded per item (a changed caption must not reuse its old text row)
        "version": 2, "video_encoder": video_name, "text_encoder": text_name,
        "captions": [_caption_hash(it.entry.caption) for it in index.items],
        "buckets": [b.name for b in index.buckets],
        "samples": {index.buckets[b].name: [index.items[p].entry.sample_id for p in pos]
                    for b, pos in members.items()},
        "items": [f"{it.entry.sample_id}@{index.buckets[it.bucket].name}" for it in index.items],
    }


def my_batches(n: int, batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The row batches of n rows (the one-process batches [0, batch), [batch, 2 batch), ...) that
    rank `rank` of `world` encodes: a contiguous block of them, sizes differing by at most one."""
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    lo, hi = (len(batches) * rank) // world, (len(batches) * (rank + 1)) // world
    return batches[lo:hi]


def build_cache(index: DatasetIndex, out_dir: str | pathlib.Path, encode_video: VideoEncoder,
                encode_text: TextEncoder, video_name: str, text_name: str, batch: int = 4,
                on_row: Callable[[str, int], None] | None = None, rank: int = 0, world: int = 1,
                barrier: Callable[[], None] | None = None) -> dict[str, int]:
    """Encode every item not yet done; returns this process's {"encoded": n, "skipped_done": m}.

    `video_name` / `text_name` identify the encoders (with their weights' version): a directory
    built with other encoders or another index is an error, not silently mixed. `on_row` is called
    after each row is committed (progress reporting, tests). Data parallel: every one of `world`
    processes calls it with its `rank` and a `barrier` over them (e.g. torch.distributed.barrier);
    each encodes its block of batches (`my_batches`), and all return once every row is written.
    """
    if world > 1 and barrier is None:
        raise ValueError(f"build_cache: world {world} needs a barrier over the processes")
    barrier = barrier or (lambda: None)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = _meta(index, video_name, text_name)
    meta_path = out / "meta.json"
    if rank == 0 and not meta_path.exists():
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.rename(meta_path)
    barrier()
    check_cache(out, index, video_name, text_name)
    counts = {"encoded": 0, "skipped_done": 0}
    members = {b: positions for b, positions in index.members().items() if positions}
    if rank == 0:   # rank 0 creates the arrays (one probe encode each); the others open them
        for b, positions in members.items():
            _bucket_arrays(out, index, b, encode_video, positions)
    barrier()
    for b, positions in members.items():
        spec = index.buckets[b]
        done, mean_ts, std_ts = _bucket_arrays(out, index, b, encode_video, positions)
        for rows in my_batches(len(positions), batch, rank, world):
            flags = done[rows[0]:rows[-1] + 1].read().result()
            todo = [r for r, f in zip(rows, flags) if not f]
            counts["skipped_done"] += len(rows) - len(todo)
            if not todo:
                continue
            pixels = np.stack([load_item(index.items[positions[r]], spec) for r in todo])
            mean, std = (np.asarray(a, dtype=np.float32) for a in encode_video(pixels))
            for i, r in enumerate(todo):
                mean_ts[r].write(mean[i]).result()
                std_ts[r].write(std[i]).result()
                done[r].write(np.uint8(1)).result()   # only after the data is on disk
                counts["encoded"] += 1
                if on_row:
                    on_row(spec.name, r)
    _build_text(index, out, encode_text, batch, on_row, rank, world, barrier)
    barrier()
    return counts


def _bucket_arrays(out, index, b, encode_video, positions):
    spec = index.buckets[b]
    folder = out / "latents" / spec.name
    if (folder / "done" / "zarr.json").exists():
        return _open(folder / "done"), _open(folder / "mean"), _open(folder / "std")
    # one probe encode gives the latent shape and channel count of this encoder
    probe_mean, _ = encode_video(load_item(index.items[positions[0]], spec)[None])
    shape = (len(positions), *np.asarray(probe_mean).shape[1:])
    mean_ts = _open(folder / "mean", shape, "float32", create=True)
    std_ts = _open(folder / "std", shape, "float32", create=True)
    done = _open(folder / "done", (len(positions),), "uint8", create=True)  # created last
    return done, mean_ts, std_ts


def _build_text(index, out, encode_text, batch, on_row, rank=0, world=1, barrier=lambda: None):
    n = len(index.items)
    folder = out / "text"
    if rank == 0 and not (folder / "done" / "zarr.json").exists() and n:
        # the first batch gives the width; it is encoded again below (text encoders are deterministic)
        emb, _ = encode_text([index.items[r].entry.caption for r in range(min(batch, n))])
        _open(folder / "embedding", (n, *emb.shape[1:]), "float32", create=True)
        _open(folder / "mask", (n, emb.shape[1]), "uint8", create=True)
        _open(folder / "done", (n,), "uint8", create=True)
    barrier()
    if not n:
        return
    arrays = [_open(folder / k) for k in ("embedding", "mask", "done")]
    for rows in my_batches(n, batch, rank, world):
        flags = arrays[2][rows[0]:rows[-1] + 1].read().result()
        rows = [r for r, f in zip(rows, flags) if not f]
        if not rows:
            continue
        emb, mask = encode_text([index.items[r].entry.caption for r in rows])
        emb, mask = emb.float().numpy(), mask.numpy().astype(np.uint8)
        for i, r in enumerate(rows):
            arrays[0][r].write(emb[i]).result()
            arrays[1][r].write(mask[i]).result()
            arrays[2][r].write(np.uint8(1)).result()
            if on_row:
                on_row("text", r)


class CacheMismatch(ValueError):
    """A cache built by other encoders, from other captions or for another index."""


def check_cache(out_dir: str | pathlib.Path, index: DatasetIndex, video_name: str, text_name: str) -> None:
    """Raise CacheMismatch naming what differs between the cache at `out_dir` and what this run
    would put there: the video encoder (the VAE checkpoint's identity), the text encoder and its
    settings, the captions (rows by id) or the dataset index. Called on every use of a cache,
    complete or not: reusing latents of another VAE or text of old captions is a silent wrong result."""
    out = pathlib.Path(out_dir)
    old = json.loads((out / "meta.json").read_text())
    new = _meta(index, video_name, text_name)
    if old == new:
        return
    what = []
    for key in ("video_encoder", "text_encoder"):
        if old.get(key) != new[key]:
            what.append(f"{key} {old.get(key)!r}, now {new[key]!r}")
    if old.get("items") != new["items"] or old.get("samples") != new["samples"]:
        what.append("the dataset index (other clips or buckets)")
    elif old.get("captions") != new["captions"]:
        if old.get("captions") is None:
            what.append("captions not recorded (a cache from before 2026-12)")
        else:
            changed = [new["items"][i] for i, (a, b) in enumerate(zip(old["captions"], new["captions"])) if a != b]
            what.append(f"captions of {len(changed)} items changed (e.g. {changed[:3]})")
    if not what:
        what.append(f"format version {old.get('version')}, now {new['version']}")
    raise CacheMismatch(f"cache {out} was built from other inputs: {'; '.join(what)}. Use a new output "
                        f"folder or delete {out} to re-encode")


def cache_complete(out_dir: str | pathlib.Path) -> bool:
    """Whether every latent and text row of the cache is marked done."""
    out = pathlib.Path(out_dir)
    if not (out / "meta.json").exists():
        return False
    meta = json.loads((out / "meta.json").read_text())
    for name, ids in meta["samples"].items():
        if ids and not (out / "latents" / name / "done" / "zarr.json").exists():
            return False
        if ids and not _open(out / "latents" / name / "done").read().result().all():
            return False
    text_done = out / "text" / "done"
    return (text_done / "zarr.json").exists() and bool(_open(text_done).read().result().all())


class CachedSource:
    """Reads a complete cache: (mean, std, text embedding, text mask) for index positions."""

    def __init__(self, index: DatasetIndex, out_dir: str | pathlib.Path, video_name: str, text_name: str):
        self.out = pathlib.Path(out_dir)
        if not cache_complete(self.out):
            raise ValueError(f"cache {self.out}: incomplete; run build_cache to finish it")
        check_cache(self.out, index, video_name, text_name)
        self.row = {}
        for b, positions in index.members().items():
            for r, p in enumerate(positions):
                self.row[p] = (index.buckets[b].name, r)
        self.arrays: dict[str, ts.TensorStore] = {}

    def _array(self, key: str) -> ts.TensorStore:
        if key not in self.arrays:
            self.arrays[key] = _open(self.out / key)
        return self.arrays[key]

    def get(self, positions: list[int]) -> tuple[torch.Tensor, ...]:
        bucket = {self.row[p][0] for p in positions}
        if len(bucket) != 1:
            raise ValueError(f"positions {positions} span buckets {sorted(bucket)}")
        name = bucket.pop()
        rows = [self.row[p][1] for p in positions]
        mean = np.stack([self._array(f"latents/{name}/mean")[r].read().result() for r in rows])
        std = np.stack([self._array(f"latents/{name}/std")[r].read().result() for r in rows])
        emb = np.stack([self._array("text/embedding")[p].read().result() for p in positions])
        mask = np.stack([self._array("text/mask")[p].read().result() for p in positions])
        return (torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(emb),
                torch.from_numpy(mask.astype(bool)))


class OnlineSource:
    """The same tuples as `CachedSource`, computed from the files with the encoders."""

    def __init__(self, index: DatasetIndex, encode_video: VideoEncoder, encode_text: TextEncoder):
        self.index, self.encode_video, self.encode_text = index, encode_video, encode_text

    def get(self, positions: list[int]) -> tuple[torch.Tensor, ...]:
        items = [self.index.items[p] for p in positions]
        spec = self.index.buckets[items[0].bucket]
        pixels = np.stack([load_item(it, spec) for it in items])
        mean, std = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in self.encode_video(pixels))
        emb, mask = self.encode_text([it.entry.caption for it in items])
        return mean, std, emb.float(), mask.bool()


def latent_source(index: DatasetIndex, cache_dir: str | pathlib.Path | None, encode_video: VideoEncoder,
                  encode_text: TextEncoder, video_name: str = "", text_name: str = "") -> CachedSource | OnlineSource:
    """What training reads from: the cache when it is complete (and built by these encoders from
    these captions: `check_cache`), else the files with the encoders."""
    if cache_dir is not None and cache_complete(cache_dir):
        return CachedSource(index, cache_dir, video_name, text_name)
    if cache_dir is not None:
        log.warning("cache %s missing or incomplete: encoding online", cache_dir)
    return OnlineSource(index, encode_video, encode_text)
