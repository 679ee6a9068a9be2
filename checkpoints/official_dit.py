"""Adapter between the official MUG-V DiT state dict (`dit.pt`) and mugv's canonical layout.

Official names and layout: ../shared/reference/mugv_dit_10b_state_dict.json and
mugv-forward-notes.md section 4. Two things change on import:
- names (`blocks.N.attn.qkv` -> `layers.N.self_attn.qkv`, ...), and
- the fused projections' row order: official rows are (which, head, dim), canonical rows are
  (head, which, dim) (Megatron's order, so a contiguous tensor-parallel split gives whole heads).
Export applies the inverse. Arrays are numpy (bf16 via ml_dtypes); no framework is needed.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mugv.core.dit import DiTConfig, dit_schema

_TOP = {
    "start_token": "start_token",
    "end_token": "end_token",
    "x_embedder.proj.weight": "patch_embed.weight",
    "x_embedder.proj.bias": "patch_embed.bias",
    "t_embedder.mlp.0.weight": "t_embedder.fc1.weight",
    "t_embedder.mlp.0.bias": "t_embedder.fc1.bias",
    "t_embedder.mlp.2.weight": "t_embedder.fc2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.fc2.bias",
    "fps_embedder.mlp.0.weight": "fps_embedder.fc1.weight",
    "fps_embedder.mlp.0.bias": "fps_embedder.fc1.bias",
    "fps_embedder.mlp.2.weight": "fps_embedder.fc2.weight",
    "fps_embedder.mlp.2.bias": "fps_embedder.fc2.bias",
    "t_block.1.weight": "t_block.weight",
    "t_block.1.bias": "t_block.bias",
    "y_embedder.y_proj.fc1.weight": "text_embedder.fc1.weight",
    "y_embedder.y_proj.fc1.bias": "text_embedder.fc1.bias",
    "y_embedder.y_proj.fc2.weight": "text_embedder.fc2.weight",
    "y_embedder.y_proj.fc2.bias": "text_embedder.fc2.bias",
    "final_layer.scale_shift_table": "final_layer.scale_shift_table",
    "final_layer.linear.weight": "final_layer.linear.weight",
    "final_layer.linear.bias": "final_layer.linear.bias",
}
_BLOCK = {
    "scale_shift_table": "scale_shift_table",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.proj.weight": "self_attn.proj.weight",
    "attn.proj.bias": "self_attn.proj.bias",
    "cross_attn_norm.weight": "cross_attn_norm.weight",
    "cross_attn_norm.bias": "cross_attn_norm.bias",
    "cross_attn.q_linear.weight": "cross_attn.q.weight",
    "cross_attn.q_linear.bias": "cross_attn.q.bias",
    "cross_attn.kv_linear.weight": "cross_attn.kv.weight",
    "cross_attn.kv_linear.bias": "cross_attn.kv.bias",
    "cross_attn.q_norm.weight": "cross_attn.q_norm.weight",
    "cross_attn.k_norm.weight": "cross_attn.k_norm.weight",
    "cross_attn.proj.weight": "cross_attn.proj.weight",
    "cross_attn.proj.bias": "cross_attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
# canonical suffix -> number of fused projections whose rows are reordered
_FUSED = {"self_attn.qkv.weight": 3, "self_attn.qkv.bias": 3,
          "cross_attn.kv.weight": 2, "cross_attn.kv.bias": 2}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class OfficialLayoutError(KeyError):
    """An official state dict does not match the expected names or shapes."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def official_name_to_canonical(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    raise OfficialLayoutError(f"unexpected key {name!r} in the official DiT state dict")


def canonical_name_to_official(name: str) -> str:
    for off, can in _TOP.items():
        if can == name:
            return off
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m:
        for off, can in _BLOCK.items():
            if can == m.group(2):
                return f"blocks.{m.group(1)}.{off}"
    raise OfficialLayoutError(f"canonical parameter {name!r} has no official counterpart")


def _reorder_rows(x: np.ndarray, groups: int, heads: int, to_canonical: bool) -> np.ndarray:
    """(which, head, dim) rows <-> (head, which, dim) rows; columns untouched."""
    rows = x.shape[0]
    dim = rows // (groups * heads)
    rest = x.shape[1:]
    if to_canonical:
        y = x.reshape(groups, heads, dim, *rest).swapaxes(0, 1)
    else:
        y = x.reshape(heads, groups, dim, *rest).swapaxes(0, 1)
    return np.ascontiguousarray(y.reshape(rows, *rest))


def config_from_official(state: Mapping[str, np.ndarray], **overrides) -> DiTConfig:
    """Infer the DiT architecture from an official state dict's shapes."""
    try:
        hidden = state["start_token"].shape[0]
        w = state["x_embedder.proj.weight"]
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k)))
        text_dim = state["y_embedder.y_proj.fc1.weight"].shape[1]
        out = state["final_layer.linear.weight"].shape[0]
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise OfficialLayoutError(f"official DiT state dict lacks {e.args[0]!r}") from None
    patch = tuple(int(n) for n in w.shape[2:])
    kw = dict(hidden_size=hidden, depth=depth, num_heads=hidden // head_dim, patch_size=patch,
              in_channels=w.shape[1], out_channels=out // int(np.prod(patch)),
              mlp_ratio=mlp / hidden, text_dim=text_dim)
    return DiTConfig(**{**kw, **overrides})


def import_official(state: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Official state dict -> canonical {name: array}; every key consumed, every shape checked."""
    schema = dit_schema(cfg).as_dict()
    out: dict[str, np.ndarray] = {}
    for off_name, arr in state.items():
        name = official_name_to_canonical(off_name)
        if name not in schema:
            raise OfficialLayoutError(f"official key {off_name!r} (canonical {name!r}) is not part of "
                                      f"a {cfg.depth}-layer model")
        spec = schema[name]
        arr = np.asarray(arr)
        if tuple(arr.shape) != spec.shape:
            raise OfficialLayoutError(f"official key {off_name!r}: shape {tuple(arr.shape)}, expected "
                                      f"{spec.shape} for canonical {name!r}")
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if suffix in _FUSED:
            arr = _reorder_rows(arr, _FUSED[suffix], cfg.num_heads, to_canonical=True)
        out[name] = arr
    missing = [canonical_name_to_official(n) for n in schema if n not in out]
    if missing:
        shown = ", ".join(f"{m} {schema[official_name_to_canonical(m)].shape}" for m in missing[:8])
        raise OfficialLayoutError(f"official DiT state dict is missing {len(missing)} key(s): {shown}"
                                  + (" ..." if len(missing) > 8 else ""))
    return out


def export_official(params: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Canonical {name: array} -> official state dict (inverse of `import_official`)."""
    schema = dit_schema(cfg).as_dict()
    extra = sorted(set(params) - set(schema))
    if extra:
        raise OfficialLayoutError(f"parameters not in the {cfg.depth}-layer schema: {extra[:8]}")
    out: dict[str, np.ndarray] = {}
    for name, spec in schema.items():
        if name not in params:
            raise OfficialLayoutError(f"canonical parameter {name!r} {spec.shape} is missing")
        arr = np.asarray(params[name])
        if tuple(arr.shape) != spec.shape:
            raise OfficialLayoutError(f"parameter {name!r}: shape {tuple(arr.shape)}, expected {spec.shape}")
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if suffix in _FUSED:
            arr = _reorder_rows(arr, _FUSED[suffix], cfg.num_heads, to_canonical=False)
        out[canonical_name_to_official(name)] = arr
    return out


def load_official_file(path: str) -> dict[str, np.ndarray]:
    """Read an official `dit.pt` (torch pickle of tensors) or a .safetensors file as numpy.

    bf16 tensors become ml_dtypes.bfloat16 arrays (bit-exact)."""
    import ml_dtypes
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    out = {}
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_official(path: str) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """Official `dit.pt` / .safetensors -> (config read from the shapes, canonical arrays; every
    key consumed, every shape checked). A goldens bundle (`param.`-prefixed keys next to inputs
    and outputs) yields its `param.*` entries. The one path from an official DiT file to arrays."""
    state = load_official_file(str(path))
    if any(k.startswith("param.") for k in state):
        state = {k[len("param."):]: a for k, a in state.items() if k.startswith("param.")}
    cfg = config_from_official(state)
    return cfg, import_official(state, cfg)


def write_dit_checkpoint(cfg: DiTConfig, params: Mapping[str, np.ndarray], root, step: int = 0):
    """Canonical DiT arrays (e.g. from `import_official`) as a mugv checkpoint: group "model",
    stored in the weights' own dtype when they share one. Returns the committed path."""
    import dataclasses

    from mugv.checkpoints.format import CheckpointWriter

    schema = dit_schema(cfg)
    dtypes = {str(a.dtype) for a in params.values()}
    if len(dtypes) == 1:
        schema = schema.with_dtype(dtypes.pop())
    writer = CheckpointWriter(root, step)
    writer.create({"model": schema})
    for name, arr in params.items():
        writer.write("model", name, arr)
    return writer.commit(config={"dit": dataclasses.asdict(cfg)}, schema_hash=schema.hash())
