"""mugv's checkpoint format: one zarr3 array per canonical tensor, a JSON manifest, atomic commits.

Layout of one checkpoint (full description: docs/checkpoint-format.md):

    <root>/step_000000100/
        manifest.json                    format version, step, config, schema hash, array table,
                                         sha256 of every state blob, checksum of itself
        arrays/<group>/<name>/zarr.json  one zarr3 array per tensor, holding the GLOBAL tensor
        arrays/<group>/<name>/c/...      chunks (raw little-endian + crc32c checksum)
        state/<key>/rank_00000.bin       opaque per-rank blobs (RNG, data-loader position)

Groups separate kinds of state: "model", "ema", "optimizer.exp_avg", ... Each group holds arrays
named by the schema of `core/` and shaped globally; a tensor-parallel run writes each rank's slice
into the same array concurrently (chunks are aligned to the writer's slices, so no two processes
touch one chunk) and any reader reads just the slice it needs: resharding happens on read.

Commits are atomic: everything is written under `<root>/.partial.step_*`; after every process has
finished (barrier), process 0 writes the manifest last, fsyncs and renames the directory to
`step_*`. A checkpoint directory named `step_*` is therefore always complete; a save killed at any
moment leaves a `.partial.*` directory that readers ignore and the next save removes.
This module uses numpy and tensorstore only: the torch and JAX front ends are `torch_io.py` and
`jax_io.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import tensorstore as ts

from mugv.core.schema import ParamSpec, Schema

# 2: the manifest carries `state_sha256` (every state blob) and `checksum` (of the manifest
# itself), both verified on read. Version 1 checkpoints (no checksums) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_STEP_RE = re.compile(r"^step_(\d{9})$")
_NP_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match what the reader expects."""


def _no_barrier() -> None:
    return None


def step_dir_name(step: int) -> str:
    if step < 0 or step >= 10**9:
        raise ValueError(f"checkpoint step {step}: expected 0 <= step < 1e9")
    return f"step_{step:09d}"


def dtype_name(array: np.ndarray) -> str:
    if array.dtype == ml_dtypes.bfloat16:
        return "bfloat16"
    name = array.dtype.name
    if name not in _NP_DTYPES:
        raise CheckpointError(f"unsupported array dtype {name}; supported: {sorted(_NP_DTYPES)}")
    return name


def _array_spec(path: Path, shape=None, dtype=None, chunks=None) -> dict:
    # Every chunk is stored, also one equal to the fill value: a missing chunk file then always
    # means damage, never "all zeros" (zero-initialised biases would otherwise leave no file).
    spec: dict = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
                  "store_data_equal_to_fill_value": True}
    if shape is not None:
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            # crc32c makes a truncated or corrupted chunk a read error instead of silent garbage.
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        }
        spec["create"] = True
    return spec


@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    """One array of a checkpoint, as the manifest records it."""

    group: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    tp_axis: int | None
    chunks: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


def _chunks_for(spec: ParamSpec, tp_size: int) -> tuple[int, ...]:
    # Chunks equal to the writer's tensor-parallel slice: each rank owns whole chunks.
    # Scalars get a single chunk of shape ().
    return tuple(max(1, n) for n in spec.shard_shape(tp_size)) if spec.shape else ()


class CheckpointWriter:
    """Writes one checkpoint from one or many processes; `commit` makes it visible atomically.

    Every process constructs the writer with the same arguments and calls `create` (process 0
    creates the arrays, the others wait), `write` for the slices it owns, and `commit`.

    Arguments:
        root: directory holding all checkpoints of a run.
        step: training step of this checkpoint.
        rank: this process's rank among the writers (0 creates and commits).
        barrier: callable synchronising all writing processes (no-op for one process).
    """

    def __init__(self, root: str | os.PathLike, step: int, rank: int = 0,
                 barrier: Callable[[], None] = _no_barrier):
        self.root = Path(root)
        self.step = step
        self.rank = rank
        self.barrier = barrier
        self.final = self.root / step_dir_name(step)
        self.partial = self.root / f".partial.{step_dir_name(step)}"
        self.entries: dict[str, ArrayEntry] = {}

    # -- phase 1: create -----------------------------------------------------------------------
    def create(self, groups: Mapping[str, Schema], tp_size: int = 1, overwrite: bool = False) -> None:
        """Declare every array of every group (global shapes); process 0 creates them on disk."""
        for group, schema in groups.items():
            _check_group_name(group)
            for p in schema:
                e = ArrayEntry(group, p.name, p.shape, p.dtype, p.tp_axis, _chunks_for(p, tp_size))
                self.entries[e.key] = e
        if self.rank == 0:
            check_writable(self.root)
            if self.final.exists() and not overwrite:
                raise CheckpointError(f"checkpoint {self.final} already exists (pass overwrite=True to replace)")
            if self.partial.exists():  # left by a save that was killed
                shutil.rmtree(self.partial)
            (self.partial / "arrays").mkdir(parents=True)
            (self.partial / "state").mkdir()
            futures = [ts.open(_array_spec(self._path(e), e.shape, e.dtype, e.chunks))
                       for e in self.entries.values()]
            for f in futures:
                f.result()
        self.barrier()

    def _path(self, e: ArrayEntry) -> Path:
        return self.partial / "arrays" / e.group / e.name

    # -- phase 2: write ------------------------------------------------------------------------
    def write(self, group: str, name: str, array: np.ndarray, index: tuple[slice, ...] | None = None) -> None:
        """Write `array` into the global array `group/name` at `index` (whole array if None)."""
        key = f"{group}/{name}"
        if key not in self.entries:
            raise CheckpointError(f"array {key} was not declared in create()")
        e = self.entries[key]
        array = np.asarray(array)
        if dtype_name(array) != e.dtype:
            raise CheckpointError(f"array {key}: dtype {dtype_name(array)}, declared {e.dtype}")
        index = index if index is not None else tuple(slice(0, n) for n in e.shape)
        want = tuple(s.stop - s.start for s in index)
        if tuple(array.shape) != want:
            raise CheckpointError(f"array {key}: slice shape {tuple(array.shape)}, expected {want} "
                                  f"for index {index} of global shape {e.shape}")
        store = ts.open(_array_spec(self._path(e)), open=True).result()
        store[index].write(array).result()

    def write_state(self, key: str, data: bytes, rank: int | None = None) -> None:
        """An opaque per-rank blob (RNG state, data-loader position)."""
        _check_group_name(key)
        rank = self.rank if rank is None else rank
        d = self.partial / "state" / key
        d.mkdir(parents=True, exist_ok=True)
        _write_file_durably(d / f"rank_{rank:05d}.bin", data)

    # -- phase 3: commit -----------------------------------------------------------------------
    def commit(self, config: dict | None = None, schema_hash: str | None = None,
               meta: dict | None = None, keep_last: int | None = None) -> Path:
        """Wait for every process, then (process 0) write the manifest and publish atomically."""
        self.barrier()
        if self.rank == 0:
            manifest = {
                "format": "mugv-checkpoint",
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "config": config or {},
                "schema_hash": schema_hash,
                "meta": meta or {},
                "arrays": [dataclasses.asdict(e) for e in self.entries.values()],
                "state": sorted(p.name for p in (self.partial / "state").iterdir()),
                "state_sha256": {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in sorted((self.partial / "state").glob("*/*.bin"))},
            }
            manifest["checksum"] = manifest_checksum(manifest)
            _write_file_durably(self.partial / "manifest.json", json.dumps(manifest, indent=1).encode())
            _fsync_tree(self.partial)
            if self.final.exists():  # overwrite=True: the old copy goes only once the new one is whole
                trash = self.root / f".trash.{self.final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(self.final, trash)
                os.rename(self.partial, self.final)
                shutil.rmtree(trash)
            else:
                os.rename(self.partial, self.final)   # the commit point
            _fsync_dir(self.root)
            if keep_last:
                prune(self.root, keep_last)
        self.barrier()
        return self.final


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its `checksum` field: an edited step,
    config or meta (or a flipped bit in them) no longer matches."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_group_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise CheckpointError(f"group/key name {name!r}: expected letters, digits, '_', '.', '-'")


def _write_file_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def check_writable(directory: str | os.PathLike) -> None:
    """Fail early, naming the directory, when checkpoints cannot be written there."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"checkpoint directory {d} is not writable: {err}") from None


# ---------------------------------------------------------------------------------------------
# Reading


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root`, oldest first. Partial ones are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "manifest.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (and stale partial ones)."""
    root = Path(root)
    found = list_checkpoints(root)
    for _, p in found[:-keep_last] if keep_last > 0 else []:
        # Rename first (atomic), delete after: a kill mid-delete must not leave a `step_*`
        # directory with a manifest but missing chunks.
        doomed = root / f".deleting.{p.name}"
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for p in root.iterdir():   # leftovers of a delete that was killed
        if p.name.startswith(".deleting."):
            shutil.rmtree(p, ignore_errors=True)


class Checkpoint:
    """A committed checkpoint opened for reading, in any parallel layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise CheckpointError(f"{self.path} is not a committed mugv checkpoint (no manifest.json)")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{mf}: manifest is not valid JSON ({err})") from None
        version = self.manifest.get("format_version")
        if self.manifest.get("format") != "mugv-checkpoint" or version not in READABLE_VERSIONS:
            raise CheckpointError(f"{mf}: format {self.manifest.get('format')!r} version {version!r}, "
                                  f"expected mugv-checkpoint version {' or '.join(map(str, READABLE_VERSIONS))}")
        if version >= 2 and self.manifest.get("checksum") != manifest_checksum(self.manifest):
            raise CheckpointError(f"{mf}: checksum mismatch: the manifest (step, config, meta or array "
                                  "table) was edited or corrupted after it was written")
        self.entries: dict[str, ArrayEntry] = {}
        for raw in self.manifest["arrays"]:
            raw = {**raw, "shape": tuple(raw["shape"]), "chunks": tuple(raw["chunks"])}
            e = ArrayEntry(**raw)
            self.entries[e.key] = e

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    def groups(self) -> list[str]:
        return sorted({e.group for e in self.entries.values()})

    def names(self, group: str) -> list[str]:
        return [e.name for e in self.entries.values() if e.group == group]

    def entry(self, group: str, name: str) -> ArrayEntry:
        key = f"{group}/{name}"
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: no array {key!r} (group {group!r} has "
                                  f"{len(self.names(group))} arrays)")
        return self.entries[key]

    def read(self, group: str, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The global array `group/name`, or the slice `index` of it."""
        e = self.entry(group, name)
        path = self.path / "arrays" / group / name
        index = index if index is not None else tuple(slice(0, n) for n in e.shape)
        _check_chunks_present(path, e, index)
        try:
            store = ts.open(_array_spec(path), open=True).result()
            if tuple(store.shape) != e.shape or str(store.dtype.name) != e.dtype:
                raise CheckpointError(f"{path}: on-disk array is {tuple(store.shape)} {store.dtype.name}, "
                                      f"manifest says {e.shape} {e.dtype}")
            out = store[index].read().result()
        except (ValueError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{self.path}: array {group}/{name} is unreadable "
                                  f"(truncated or corrupt?): {err}") from None
        return np.asarray(out)

    def verify_chunks(self, group: str, name: str) -> None:
        """Every chunk file of `group/name` exists (zarr would read a missing one as zeros)."""
        e = self.entry(group, name)
        _check_chunks_present(self.path / "arrays" / group / name, e, tuple(slice(0, n) for n in e.shape))

    def read_state(self, key: str, rank: int = 0) -> bytes:
        f = self.path / "state" / key / f"rank_{rank:05d}.bin"
        if not f.is_file():
            raise CheckpointError(f"{self.path}: no state {key!r} for rank {rank}")
        data = f.read_bytes()
        if self.manifest["format_version"] >= 2:
            want = self.manifest.get("state_sha256", {}).get(f"{key}/{f.name}")
            if want != hashlib.sha256(data).hexdigest():
                raise CheckpointError(f"{f}: sha256 does not match the manifest's (corrupt or replaced "
                                      "after the checkpoint was written)")
        return data

    def validate(self, group: str, schema: Schema, dtype: str | None = None, subset: bool = False) -> None:
        """Check that `group` holds exactly the schema's arrays with its shapes (and `dtype`).
        subset: the schema is part of the model (a pipeline stage's parameters): arrays of the
        group that are not in it are allowed.

        Raises CheckpointError naming every missing, extra or mismatched parameter.
        """
        problems = []
        have = {n: self.entry(group, n) for n in self.names(group)}
        for p in schema:
            e = have.pop(p.name, None)
            if e is None:
                problems.append(f"missing parameter {p.name} (expected shape {p.shape})")
                continue
            if e.shape != p.shape:
                problems.append(f"parameter {p.name}: checkpoint shape {e.shape}, expected {p.shape}")
            want = dtype or p.dtype
            if e.dtype != want:
                problems.append(f"parameter {p.name}: checkpoint dtype {e.dtype}, expected {want}")
        for name, e in have.items() if not subset else ():
            problems.append(f"unexpected parameter {name} (shape {e.shape}) not in the schema")
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
            raise CheckpointError(f"{self.path} group {group!r} does not match the model: {shown}")

    def check_config(self, config: dict, section: str | None = None) -> None:
        """Fail naming every field whose value differs from the checkpoint's config."""
        saved = self.config.get(section, {}) if section else self.config
        diffs = _dict_diff(saved, config)
        if diffs:
            raise CheckpointError(f"{self.path} was written with a different config: " + "; ".join(
                f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs))


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{k}.")
        elif (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            out.append((f"{prefix}{k}", va, vb))
    return out


def _check_chunks_present(path: Path, e: ArrayEntry, index: tuple[slice, ...]) -> None:
    """zarr reads a missing chunk as the fill value; a deleted chunk file must be an error."""
    if not e.shape:
        ranges: Iterable[tuple[int, ...]] = [()]
        key = lambda c: path / "c"  # noqa: E731  (a scalar array has the single chunk "c")
    else:
        spans = [range(s.start // c, -(-s.stop // c)) for s, c in zip(index, e.chunks)]
        ranges = np.ndindex(*[len(r) for r in spans])
        ranges = ([sp[i] for sp, i in zip(spans, idx)] for idx in ranges)
        key = lambda c: path.joinpath("c", *map(str, c))  # noqa: E731
    for c in ranges:
        if not key(c).is_file():
            raise CheckpointError(f"{path}: chunk {key(c).relative_to(path)} of array {e.key} is missing "
                                  f"(the checkpoint is incomplete or was modified)")


def np_dtype(name: str):
    return _NP_DTYPES[name]
