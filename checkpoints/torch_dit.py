"""Canonical DiT parameters <-> the torch MUG-DiT, and the official `dit.pt` converter.

The torch model's parameter names ARE the canonical names (`core/dit.py::dit_schema`), so loading is
a copy of each rank's tensor-parallel slice; no layout transform happens here (the official layout
is handled once, in `official_dit.py`).

CLI: python -m mugv.checkpoints.torch_dit OFFICIAL_DIT_PT OUT_DIR
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

import numpy as np
import torch

from mugv.core.dit import DiTConfig, dit_schema
from mugv.checkpoints.official_dit import read_official, write_dit_checkpoint


def _tp_coordinates() -> tuple[int, int]:
    try:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            return (parallel_state.get_tensor_model_parallel_rank(),
                    parallel_state.get_tensor_model_parallel_world_size())
    except ImportError:
        pass
    return 0, 1


@torch.no_grad()
def load_canonical(model: torch.nn.Module, cfg: DiTConfig, params: Mapping[str, np.ndarray]) -> None:
    """Copy GLOBAL canonical arrays into `model`, each rank taking its tensor-parallel slice of the
    parameters its pipeline stage holds. Every schema name must be given with its global shape;
    names outside the schema fail."""
    rank, tp = _tp_coordinates()
    schema = dit_schema(cfg).as_dict()
    extra, missing = sorted(set(params) - set(schema)), sorted(set(schema) - set(params))
    if extra or missing:
        raise KeyError(f"canonical DiT params: missing {missing[:8]}, extra {extra[:8]}")
    mine = dict(model.named_parameters())
    for name, spec in schema.items():
        if name not in mine:  # another pipeline stage's
            continue
        arr = np.asarray(params[name])
        if tuple(arr.shape) != spec.shape:
            raise ValueError(f"canonical {name}: shape {tuple(arr.shape)}, expected {spec.shape}")
        if arr.dtype.kind == "V" or str(arr.dtype) == "bfloat16":
            arr = arr.astype(np.float32)
        local = torch.from_numpy(np.ascontiguousarray(arr[spec.shard_index(rank, tp)]))
        mine[name].copy_(local.to(mine[name].device))


def canonical_local(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters by canonical name (TP-local slices; what `save_torch` expects)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def convert_official_dit(src_path: str | os.PathLike, dst_dir: str | os.PathLike | None = None,
                         step: int = 0) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """Read an official MUG-V `dit.pt` (or .safetensors), import it into the canonical layout
    (every key consumed, every shape checked) and, if `dst_dir` is given, save it as a mugv
    checkpoint (group "model") at `step`. Returns (config, canonical arrays)."""
    cfg, params = read_official(str(src_path))
    if dst_dir is not None:
        write_dit_checkpoint(cfg, params, dst_dir, step)
    return cfg, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Import an official MUG-V dit.pt into a mugv checkpoint.")
    parser.add_argument("src", help="official dit.pt or .safetensors")
    parser.add_argument("dst", help="checkpoint root directory to write")
    parser.add_argument("--step", type=int, default=0)
    args = parser.parse_args(argv)
    cfg, params = convert_official_dit(args.src, args.dst, args.step)
    print(f"imported {len(params)} tensors, {sum(a.size for a in params.values()):,} parameters "
          f"(hidden {cfg.hidden_size}, depth {cfg.depth}) into {args.dst}")


if __name__ == "__main__":
    main()
