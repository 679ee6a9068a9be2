"""What every job loads, written once: user paths checked, the VAE (mugv checkpoint, official file
or seeded init), the text encoder, the DiT for sampling (mugv checkpoint, official file, or
random), and fine-tuning's base weights.

Official files go through `checkpoints/official_dit.py::read_official` and
`checkpoints/official_vae.py::read_official` (file -> config -> canonical arrays, once each).
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional

import numpy as np
import torch

from mugv.core.dit import DiTConfig

OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def require_path(field: str, path: str, what: str = "file or directory") -> pathlib.Path:
    """A user-given path that must exist; the error names the option."""
    p = pathlib.Path(path) if path else None
    if p is None or not p.exists():
        raise FileNotFoundError(f"--{field} = {path!r}: no such {what}")
    return p


def is_official_file(path: str | os.PathLike) -> bool:
    return pathlib.Path(path).is_file() and pathlib.Path(path).suffix in OFFICIAL_SUFFIXES


# ---------------------------------------------------------------------------------------------
# VAE


def vae_model(size: Optional[str] = "tiny", checkpoint: str | None = None, official: str | None = None,
              seed: int = 0):
    """A trainable VideoVAE (fp32, train mode) from a mugv checkpoint directory (with its latent
    normalisation), an official vae.pt / .safetensors (`size` None or "official": widths read
    from the weights, norm groups 32), or seeded random init."""
    from mugv.core import vae as spec
    from mugv.torch_backend.models.vae import VideoVAE, init_vae

    if official is not None:
        from mugv.checkpoints import official_vae
        cfg, params = official_vae.read_official(str(official), size)
        model = VideoVAE(cfg)
        model.load_state_dict({k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in params.items()})
        return model
    cfg = spec.vae_config(size)
    if checkpoint is not None:
        from mugv.checkpoints.torch_io import load_torch
        model = VideoVAE(cfg)
        model.load_state_dict(load_torch(checkpoint, spec.vae_schema(cfg), "model"), strict=True)
        return model
    return init_vae(cfg, seed)


def weights_identity(path: str | os.PathLike) -> str:
    """What a cache built with these weights records: the resolved path and a digest of the
    committed checkpoint's manifest (its step, config, checksums and array table), or of an
    official file's bytes, so other weights at the same path do not pass as the same."""
    import hashlib

    from mugv.checkpoints.format import latest_checkpoint
    p = pathlib.Path(path).resolve()
    if p.is_file():
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"{p}#sha256:{digest.hexdigest()[:16]}"
    step = p if (p / "manifest.json").is_file() else latest_checkpoint(p)
    if step is None:
        return str(p)
    return f"{step}#manifest-sha256:{hashlib.sha256((step / 'manifest.json').read_bytes()).hexdigest()[:16]}"


def text_identity(spec: str, dit: DiTConfig) -> str:
    """A text encoder and the settings its states depend on (width, token limit)."""
    where = spec if spec == "embedded" else str(pathlib.Path(spec).resolve())
    return f"text:{where}:dim{dit.text_dim}:max_len{dit.text_max_len}"


def load_vae(size: Optional[str], checkpoint: str | None = None, official: str | None = None,
             device: str | torch.device = "cpu"):
    """The VideoVAE for encoding/decoding: `vae_model(...)` in eval mode, frozen."""
    return vae_model(size, checkpoint, official).to(device).eval().requires_grad_(False)


def load_official_vae(path: str | os.PathLike, size: Optional[str] = None, device: str | torch.device = "cpu"):
    """The official VAE (`vae.pt` / `.safetensors`) as our VideoVAE, eval mode, fp32. `size` names
    a `core/vae.py` size; None infers it from the shapes (GroupNorm groups: the official 32)."""
    return load_vae(size, official=str(path), device=device)


def text_encoder(spec: str, dit: DiTConfig):
    """"embedded" (no download) or a local T5 directory, sized for the DiT's text input."""
    from mugv.torch_backend.data.text import load_text_encoder
    return load_text_encoder(spec, dim=dit.text_dim, max_len=dit.text_max_len)


# ---------------------------------------------------------------------------------------------
# DiT


def read_official_dit(path: str | pathlib.Path) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """Official `dit.pt` / .safetensors -> (config, canonical arrays) (official_dit.read_official)."""
    from mugv.checkpoints.official_dit import read_official
    return read_official(str(path))


def official_dit_file(official: str | os.PathLike) -> pathlib.Path:
    """`--official`: the file itself, or the first *dit*.pt / *dit*.safetensors in a folder."""
    from mugv.torch_backend.jobs.preflight import InputError
    path = pathlib.Path(official)
    if not path.is_dir():
        return path
    found = sorted(f for f in [*path.glob("*dit*.pt"), *path.glob("*dit*.safetensors")]
                   if ".extra." not in f.name)   # goldens keep fp64 outputs in *.extra.*
    if not found:
        raise InputError(f"--official = {str(official)!r}: no *dit*.pt or *dit*.safetensors in this folder")
    return found[0]


def load_dit(cfg: DiTConfig, checkpoint: str | None = None, official: str | None = None,
             group: str = "model"):
    """MUG-DiT for sampling on one process: from a mugv checkpoint (trainer output: group
    "model" or "ema"; a run folder picks its newest step), from an official-layout dit.pt /
    .safetensors file or a local directory holding one, or seeded random weights.
    Megatron's parallel state must be initialised (`megatron_compat.initialize_parallel`)."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.checkpoints.torch_io import load_torch
    from mugv.core.dit import dit_schema
    from mugv.torch_backend.models.dit import build_dit

    if official is not None:
        cfg, params = read_official_dit(official_dit_file(official))
        model = build_dit(cfg, seed=None)
        load_canonical(model, cfg, params)
        return cfg, model.eval()
    model = build_dit(cfg, seed=0 if checkpoint is None else None)
    if checkpoint is not None:
        path = pathlib.Path(checkpoint)
        if not (path / "manifest.json").is_file():
            path = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints") or path
        weights = load_torch(path, dit_schema(cfg), group)
        with torch.no_grad():
            for name, q in model.named_parameters():
                q.copy_(weights[name].to(q))
    return cfg, model.eval()


def load_base(path: str | os.PathLike) -> tuple[DiTConfig, Mapping[str, np.ndarray] | str]:
    """(DiT config, base) of fine-tuning's base: an official weights file or a mugv checkpoint.

    For an official file the base is the canonical arrays (every key checked by the importer);
    for a checkpoint it is the checkpoint path (read later, each rank its slices)."""
    from mugv.core import validate as v
    from mugv.torch_backend.models.lora import open_checkpoint

    if is_official_file(path):
        return read_official_dit(path)
    if not pathlib.Path(path).exists():
        raise FileNotFoundError(f"base weights {path}: no such file or directory (expected an official "
                                f"{'/'.join(OFFICIAL_SUFFIXES)} file or a mugv checkpoint directory)")
    ckpt = open_checkpoint(path)
    if "dit" not in ckpt.config:
        raise ValueError(f"{ckpt.path}: its config has no 'dit' section; not a DiT checkpoint")
    return v.from_dict(DiTConfig, ckpt.config["dit"]), str(ckpt.path)
