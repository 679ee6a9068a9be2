"""`mugv convert-official`: official MUG-V weights (dit.pt / vae.pt, or .safetensors) written as
mugv checkpoints (checkpoints/official_dit.py, checkpoints/official_vae.py)."""
from __future__ import annotations


def convert_official(ns) -> int:
    """`ns.kind` "dit" or "vae", `ns.src` the official file, `ns.dst` the checkpoint root."""
    if ns.kind == "dit":
        from mugv.checkpoints.official_dit import read_official, write_dit_checkpoint
        cfg, params = read_official(ns.src)
        write_dit_checkpoint(cfg, params, ns.dst)
        print(f"DiT: {len(params)} tensors (hidden {cfg.hidden_size}, depth {cfg.depth}) -> {ns.dst}")
    else:
        from mugv.checkpoints import official_vae
        path = official_vae.import_to_checkpoint(ns.src, ns.dst, size=ns.size)
        print(f"VAE -> {path}")
    return 0
