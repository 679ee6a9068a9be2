"""Adapter between the official MUG-V `vae.pt` state dict and mugv's canonical VAE layout.

Official names: ../shared/reference/mugv_vae_state_dict.json, notes section 4.3. Only names and
two shapes change; conv/linear weights keep torch's layout on both sides:
- `spatial_vae.module.*` (diffusers names) -> `spatial.*`; `temporal_vae.*` -> `temporal.*`
  without the `.conv` of every CausalConv3d wrapper;
- `shift`/`scale` (1, 24, 1, 1, 1) buffers -> `latent_mean`/`latent_std` (24,);
- the three tensors the official forward never runs (`spatial_vae.module.encoder.conv_norm_out`,
  `encoder.conv_out`, `decoder.conv_in`) are kept, not dropped, as non-trainable
  `unused.{encoder_norm_out, encoder_conv_out, decoder_conv_in}`: import consumes them (shapes
  checked), export writes them back, so a round trip is exact and the official strict load works.
Every official key must be consumed and every canonical parameter produced; shapes are checked.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mugv.core.vae import SDXL_LATENT_CHANNELS, VAEConfig, vae_schema

# Applied in order to a canonical name; each pattern occurs at most once per name.
_RULES: list[tuple[str, str]] = [
    # unused SDXL tensors
    (r"^unused\.encoder_norm_out\.", "spatial_vae.module.encoder.conv_norm_out."),
    (r"^unused\.encoder_conv_out\.", "spatial_vae.module.encoder.conv_out."),
    (r"^unused\.decoder_conv_in\.", "spatial_vae.module.decoder.conv_in."),
    (r"^latent_mean$", "shift"),
    (r"^latent_std$", "scale"),
    # 2D stage (diffusers names)
    (r"\.down\.(\d+)\.res\.(\d+)\.", r".down_blocks.\1.resnets.\2."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.conv."),
    (r"\.up\.(\d+)\.res\.(\d+)\.", r".up_blocks.\1.resnets.\2."),
    (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0.conv."),
    (r"\.mid\.res\.(\d+)\.", r".mid_block.resnets.\1."),
    (r"\.mid\.attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.mid\.attn\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"^spatial\.decoder\.norm_out\.", "spatial.decoder.conv_norm_out."),
    (r"^spatial\.", "spatial_vae.module."),
]
_TEMPORAL_RULES: list = [
    (r"\.levels\.(\d+)\.res\.(\d+)\.", r".block_res_blocks.\1.\2."),
    (r"\.levels\.(\d+)\.down\.", r".conv_blocks.\1."),
    # the official decoder's conv_blocks[i - 1] belongs to level i (conv_blocks.0 is an Identity)
    (r"\.levels\.(\d+)\.up\.", lambda m: f".conv_blocks.{int(m.group(1)) - 1}."),
    (r"^temporal\.encoder\.mid\.res\.", "temporal.encoder.res_blocks."),
    (r"^temporal\.decoder\.mid\.res\.", "temporal.decoder.res_blocks."),
    (r"^temporal\.decoder\.upsample\.", "temporal.decoder.upsample_block."),
    (r"^temporal\.encoder\.norm_out\.", "temporal.encoder.norm1."),
    (r"^temporal\.decoder\.norm_out\.", "temporal.decoder.norm1."),
    (r"^temporal\.encoder\.conv_out\.", "temporal.encoder.conv2."),
    (r"^temporal\.decoder\.conv_in\.", "temporal.decoder.conv1."),
    (r"\.shortcut\.", ".conv3."),
    (r"^temporal\.", "temporal_vae."),
]
_NORM_RE = re.compile(r"(^|\.)norm[^.]*\.(weight|bias)$")


class OfficialLayoutError(KeyError):
    """An official VAE state dict does not match the expected names or shapes."""

    def __str__(self) -> str:
        return str(self.args[0])


def canonical_name_to_official(name: str) -> str:
    """`temporal.encoder.levels.1.res.0.conv1.weight` -> `temporal_vae.encoder.block_res_blocks.1.0.conv1.conv.weight`."""
    if name.startswith("temporal."):
        out = name
        for pat, rep in _TEMPORAL_RULES:
            out = re.sub(pat, rep, out)
        # every temporal conv is a CausalConv3d wrapping `.conv`; GroupNorms are not wrapped
        if not _NORM_RE.search(name):
            out = re.sub(r"\.(weight|bias)$", r".conv.\1", out)
        return out
    out = name
    for pat, rep in _RULES:
        out = re.sub(pat, rep, out)
    return out


def name_map(cfg: VAEConfig) -> dict[str, str]:
    """canonical -> official for every schema entry; checked to be one-to-one."""
    table = {p.name: canonical_name_to_official(p.name) for p in vae_schema(cfg)}
    if len(set(table.values())) != len(table):
        raise AssertionError("canonical -> official VAE name map is not one-to-one")
    return table


def _official_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, shape[0], 1, 1, 1) if name in ("latent_mean", "latent_std") else shape


def config_from_official(state: Mapping[str, np.ndarray], **overrides) -> VAEConfig:
    """Infer widths and depths from an official state dict's shapes."""
    try:
        spatial = tuple(int(state[f"spatial_vae.module.encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                        for i in range(4))
        layers = 1 + max(int(m.group(1)) for k in state
                         if (m := re.match(r"spatial_vae\.module\.encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        filters = int(state["temporal_vae.encoder.conv_in.conv.weight"].shape[0])
        mult = tuple(int(state[f"temporal_vae.encoder.block_res_blocks.{i}.0.conv1.conv.weight"].shape[0]) // filters
                     for i in range(4))
        blocks = 1 + max(int(m.group(1)) for k in state
                         if (m := re.match(r"temporal_vae\.encoder\.res_blocks\.(\d+)\.", k)))
        latent = int(state["temporal_vae.post_quant_conv.conv.weight"].shape[0])
        image = int(state["spatial_vae.module.encoder.conv_in.weight"].shape[1])
    except KeyError as e:
        raise OfficialLayoutError(f"official VAE state dict lacks {e.args[0]!r}") from None
    # GroupNorm group counts are not stored; the official model uses 32 (the goldens 4).
    kw = dict(spatial_channels=spatial, spatial_layers_per_block=layers, temporal_filters=filters,
              temporal_channel_mult=mult, temporal_res_blocks=blocks, latent_channels=latent,
              image_channels=image)
    return VAEConfig(**{**kw, **overrides})


def import_official(state: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, np.ndarray]:
    """Official state dict -> canonical {name: array}; every key consumed, every shape checked."""
    schema = vae_schema(cfg).as_dict()
    to_canonical = {off: can for can, off in name_map(cfg).items()}
    out: dict[str, np.ndarray] = {}
    for off_name, arr in state.items():
        if off_name not in to_canonical:
            raise OfficialLayoutError(f"unexpected key {off_name!r} in the official VAE state dict "
                                      f"(config {cfg})")
        name = to_canonical[off_name]
        arr = np.asarray(arr)
        want = _official_shape(name, schema[name].shape)
        if tuple(arr.shape) != want:
            raise OfficialLayoutError(f"official key {off_name!r}: shape {tuple(arr.shape)}, expected {want} "
                                      f"(canonical {name!r})")
        out[name] = arr.reshape(schema[name].shape)
    missing = [n for n in schema if n not in out]
    if missing:
        shown = ", ".join(f"{canonical_name_to_official(n)} {_official_shape(n, schema[n].shape)}" for n in missing[:8])
        raise OfficialLayoutError(f"official VAE state dict is missing {len(missing)} key(s): {shown}"
                                  + (" ..." if len(missing) > 8 else ""))
    return out


def export_official(params: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, np.ndarray]:
    """Canonical {name: array} -> official state dict (inverse of `import_official`)."""
    schema = vae_schema(cfg).as_dict()
    extra = sorted(set(params) - set(schema))
    if extra:
        raise OfficialLayoutError(f"parameters not in the VAE schema: {extra[:8]}")
    out: dict[str, np.ndarray] = {}
    for name, off_name in name_map(cfg).items():
        if name not in params:
            raise OfficialLayoutError(f"canonical parameter {name!r} {schema[name].shape} is missing")
        arr = np.asarray(params[name])
        if tuple(arr.shape) != schema[name].shape:
            raise OfficialLayoutError(f"parameter {name!r}: shape {tuple(arr.shape)}, expected {schema[name].shape}")
        out[off_name] = arr.reshape(_official_shape(name, schema[name].shape))
    return out


def load_official_file(path: str) -> dict[str, np.ndarray]:
    """Read an official `vae.pt` (torch pickle) or a .safetensors file as numpy arrays.

    A goldens file (`param.`-prefixed keys plus inputs/outputs) yields its `param.*` entries."""
    from mugv.checkpoints.official_dit import load_official_file as _load
    state = _load(path)
    if any(k.startswith("param.") for k in state):
        state = {k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}
    return state


def read_official(path: str, size: str | None = None) -> tuple[VAEConfig, dict[str, np.ndarray]]:
    """Official `vae.pt` / .safetensors -> (config, canonical arrays). `size` names a core/vae.py
    size; None (or "official") infers widths/depths from the shapes (GroupNorm groups: the
    official 32). The one path from an official VAE file to arrays."""
    from mugv.core.vae import vae_config
    state = load_official_file(str(path))
    cfg = config_from_official(state) if size in (None, "official") else vae_config(size)
    return cfg, import_official(state, cfg)


def import_to_checkpoint(official_path: str, out_root: str, size: str | None = None, step: int = 0):
    """Official vae.pt -> a mugv checkpoint (group "model") under `out_root`; returns its path.
    `size` None infers widths/depths from the shapes (GroupNorm groups: the official 32)."""
    import torch  # noqa: F401  (torch_io needs it)
    from mugv.checkpoints.torch_io import from_numpy, save_torch
    cfg, params = read_official(official_path, size)
    schema = vae_schema(cfg)
    dtypes = {str(a.dtype) for a in params.values()}
    if len(dtypes) == 1:
        schema = schema.with_dtype(dtypes.pop())
    import dataclasses
    return save_torch(out_root, step, {"model": (schema, {k: _tensor(v, from_numpy) for k, v in params.items()})},
                      config={"vae": dataclasses.asdict(cfg)}, schema_hash=vae_schema(cfg).hash())


def export_from_checkpoint(checkpoint: str, out_path: str, size: str) -> None:
    """A mugv checkpoint's "model" group -> an official vae.pt (torch.save of the state dict)."""
    import torch
    from mugv.checkpoints.torch_io import load_torch, to_numpy
    from mugv.core.vae import vae_config
    cfg = vae_config(size)
    schema = vae_schema(cfg).as_dict()
    tensors = load_torch(checkpoint, vae_schema(cfg), "model")
    # reshape: torch_io's from_numpy returns the 0-d `logvar` as shape (1,)
    official = export_official({k: to_numpy(t).reshape(schema[k].shape) for k, t in tensors.items()}, cfg)
    torch.save({k: _tensor(v, torch.from_numpy) for k, v in official.items()}, out_path)


def _tensor(a: np.ndarray, convert):
    # np.ascontiguousarray turns the 0-d `logvar` into shape (1,); reshape keeps it a scalar
    return convert(np.ascontiguousarray(a)).reshape(a.shape)


def main(argv: list[str] | None = None) -> int:
    """`import <vae.pt> <out_root> [--size S]` or `export <checkpoint> <vae.pt> --size S`."""
    import argparse
    ap = argparse.ArgumentParser(prog="mugv vae-convert", description="official vae.pt <-> mugv checkpoint")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import")
    imp.add_argument("official")
    imp.add_argument("out_root")
    imp.add_argument("--size", default=None)
    exp = sub.add_parser("export")
    exp.add_argument("checkpoint")
    exp.add_argument("out_path")
    exp.add_argument("--size", default="official")
    a = ap.parse_args(argv)
    if a.cmd == "import":
        print(import_to_checkpoint(a.official, a.out_root, a.size))
    else:
        export_from_checkpoint(a.checkpoint, a.out_path, a.size)
    return 0


__all__ = ["export_from_checkpoint", "import_to_checkpoint", "read_official", "main", "OfficialLayoutError", "SDXL_LATENT_CHANNELS", "canonical_name_to_official", "config_from_official",
           "export_official", "import_official", "load_official_file", "name_map"]
