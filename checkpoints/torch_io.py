"""torch front end of the checkpoint format: save and load state in any tensor-parallel layout.

Each process passes the tensors it holds (its tensor-parallel slice of sharded parameters, or the
whole tensor for replicated ones). Slices are located in the global array through the schema's
`tp_axis`, so a checkpoint written at TP=2 reads at TP=1 or TP=4: `load_torch` reads only the
slice the reading rank needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
import torch

from mugv.checkpoints.format import Checkpoint, CheckpointError, CheckpointWriter
from mugv.core.schema import Schema

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact numpy copy of a tensor; bf16 becomes ml_dtypes.bfloat16 bit for bit."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    # ascontiguousarray turns a 0-d array into shape (1,): restore the shape (scalars, e.g. logvar).
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).reshape(a.shape)
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape)


def _default_barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.barrier
    return lambda: None


def save_torch(root: str | os.PathLike, step: int,
               groups: Mapping[str, tuple[Schema, Mapping[str, torch.Tensor]]], *,
               rank: int | None = None, tp_rank: int = 0, tp_size: int = 1, write_replica: bool = True,
               barrier=None, config: dict | None = None, schema_hash: str | None = None,
               meta: dict | None = None, states: Mapping[str, bytes] | None = None,
               keep_last: int | None = None, overwrite: bool = False) -> Path:
    """Save `groups` = {group: (global schema, local tensors)} as checkpoint `step` under `root`.

    Every process calls this collectively. Arguments:
        rank: this process's global rank (defaults to torch.distributed's, or 0).
        tp_rank, tp_size: this process's tensor-parallel coordinates; sharded parameters are the
            `tp_rank`-th contiguous slice along their schema `tp_axis`.
        write_replica: False on data-parallel replicas other than the first (they hold copies).
        states: per-rank opaque blobs (RNG, data position), stored under this rank.
    Tensors a process does not hold (other pipeline stages) are simply absent from its mapping.
    """
    if rank is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    writer = CheckpointWriter(root, step, rank=rank, barrier=barrier or _default_barrier())
    writer.create({g: s for g, (s, _) in groups.items()}, tp_size=tp_size, overwrite=overwrite)
    for group, (schema, tensors) in groups.items():
        specs = schema.as_dict()
        for name, tensor in tensors.items():
            if name not in specs:
                raise CheckpointError(f"group {group!r}: tensor {name!r} is not in the schema")
            spec = specs[name]
            sharded = spec.tp_axis is not None and tp_size > 1
            if not write_replica or (not sharded and tp_rank != 0):
                continue
            want = spec.shard_shape(tp_size) if sharded else spec.shape
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"group {group!r}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"expected {want} at tp_rank {tp_rank} of {tp_size}")
            index = spec.shard_index(tp_rank, tp_size) if sharded else None
            writer.write(group, name, to_numpy(tensor), index)
    for key, blob in (states or {}).items():
        writer.write_state(key, blob)
    return writer.commit(config=config, schema_hash=schema_hash, meta=meta, keep_last=keep_last)


def load_torch(path: str | os.PathLike | Checkpoint, schema: Schema, group: str = "model", *,
               tp_rank: int = 0, tp_size: int = 1, dtype: torch.dtype | None = None,
               expect_dtype: str | None = None, device: str | torch.device = "cpu",
               subset: bool = False) -> dict[str, torch.Tensor]:
    """Read `group` for one rank of a `tp_size` layout: its slice of every sharded parameter.

    The group must match `schema` exactly (names, global shapes and, if given, `expect_dtype`),
    else CheckpointError names every mismatched parameter. subset: `schema` is only part of the
    model (a pipeline stage's parameters); the group's other arrays are left unread, so a
    checkpoint written at any pipeline layout loads at any other.
    """
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    ckpt.validate(group, schema, dtype=expect_dtype or _common_dtype(ckpt, group), subset=subset)
    out = {}
    for spec in schema:
        index = spec.shard_index(tp_rank, tp_size) if spec.tp_axis is not None else None
        t = from_numpy(ckpt.read(group, spec.name, index))
        out[spec.name] = t.to(device=device, dtype=dtype or t.dtype)
    return out


def _common_dtype(ckpt: Checkpoint, group: str) -> str | None:
    """Checkpoints may be stored in any one dtype (fp32 training, bf16 export); accept it if uniform."""
    dtypes = {ckpt.entry(group, n).dtype for n in ckpt.names(group)}
    return dtypes.pop() if len(dtypes) == 1 else None


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]
