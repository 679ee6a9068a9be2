"""JAX front end of the checkpoint format: reads through orbax-checkpoint, writes through tensorstore.

A group directory (`arrays/<group>/`) holds one zarr3 array per canonical parameter, named by its
dotted canonical name. orbax-checkpoint's PyTreeCheckpointHandler (use_ocdbt=False, use_zarr3=True)
reads that directory as the nested tree obtained by splitting the names at dots, so reading
builds that nested abstract tree from the schema and flattens the result back to dotted names.
Writing goes through `format.CheckpointWriter` (orbax's own writer would add files of its own and
use its own chunking); the result is the same format the torch side writes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mugv.checkpoints.format import Checkpoint, CheckpointWriter, np_dtype
from mugv.core.schema import Schema


def save_jax(root: str | os.PathLike, step: int, groups: Mapping[str, tuple[Schema, Mapping[str, jax.Array]]],
             *, config: dict | None = None, schema_hash: str | None = None, meta: dict | None = None,
             states: Mapping[str, bytes] | None = None, keep_last: int | None = None,
             overwrite: bool = False) -> Path:
    """Single-process save of unsharded JAX arrays (the oracle runs on one device)."""
    writer = CheckpointWriter(root, step)
    writer.create({g: s for g, (s, _) in groups.items()}, overwrite=overwrite)
    for group, (schema, arrays) in groups.items():
        for spec in schema:
            if spec.name not in arrays:
                raise KeyError(f"group {group!r}: parameter {spec.name} {spec.shape} is missing")
            writer.write(group, spec.name, np.asarray(arrays[spec.name]))
        extra = sorted(set(arrays) - set(schema.names))
        if extra:
            raise KeyError(f"group {group!r}: arrays not in the schema: {extra[:8]}")
    for key, blob in (states or {}).items():
        writer.write_state(key, blob)
    return writer.commit(config=config, schema_hash=schema_hash, meta=meta, keep_last=keep_last)


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_jax(path: str | os.PathLike | Checkpoint, schema: Schema, group: str = "model",
             expect_dtype: str | None = None) -> dict[str, jax.Array]:
    """Read `group` of a checkpoint into {canonical name: jax array} through orbax-checkpoint."""
    import orbax.checkpoint as ocp

    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    dtypes = {ckpt.entry(group, n).dtype for n in ckpt.names(group)}
    ckpt.validate(group, schema, dtype=expect_dtype or (dtypes.pop() if len(dtypes) == 1 else None))
    for name in schema.names:  # orbax would read a deleted chunk as zeros
        ckpt.verify_chunks(group, name)
    abstract = {p.name: jax.ShapeDtypeStruct(p.shape, np_dtype(ckpt.entry(group, p.name).dtype))
                for p in schema}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=v.shape, dtype=v.dtype)
                    for k, v in abstract.items()}
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)
    try:
        tree = handler.restore(ckpt.path / "arrays" / group,
                               args=ocp.args.PyTreeRestore(item=_nest(abstract), restore_args=_nest(restore_args)))
    except Exception:
        for name in schema.names:  # find the culprit: raises a CheckpointError naming the array
            ckpt.read(group, name)
        raise
    return {k: jnp.asarray(v) for k, v in _flatten(tree).items()}
