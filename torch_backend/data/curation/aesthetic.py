"""LAION aesthetic score (the "improved aesthetic predictor" MUG-V filters at >= 4.5).

The predictor is a CLIP ViT-L/14 image embedding, L2-normalised, through a small MLP of linear
layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between them at training, no activations).
`aesthetic_weights` is a local directory holding:
  clip/              a transformers `save_pretrained` CLIPVisionModelWithProjection + its
                     image processor (nothing is downloaded: local_files_only, HF_HUB_OFFLINE=1);
  head.safetensors   the MLP's state dict (keys `layers.<i>.weight` / `.bias`, as the LAION
                     checkpoint names them once converted from .pth; never unpickled here).
The linear layers are applied in index order, so any depth of head loads. A clip's score is the
mean over its key frames. Models are cached per process: a worker loads them once.
"""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np

_CACHE: dict[str, "AestheticPredictor"] = {}


class AestheticPredictor:
    def __init__(self, directory: str | pathlib.Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection
        directory = pathlib.Path(directory)
        for need in (directory / "clip", directory / "head.safetensors"):
            if not need.exists():
                raise FileNotFoundError(f"aesthetic_weights {directory}: {need.name} is missing")
        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(directory / "clip", local_files_only=True)
        self.clip = CLIPVisionModelWithProjection.from_pretrained(directory / "clip", local_files_only=True).eval()
        state = load_file(str(directory / "head.safetensors"))
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.weight$", k))})
        if not indices:
            raise ValueError(f"{directory / 'head.safetensors'}: no layers.<i>.weight tensors")
        self.layers = [(state[f"layers.{i}.weight"].float(), state[f"layers.{i}.bias"].float()) for i in indices]

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """(N,) scores of RGB uint8 frames."""
        inputs = self.processor(images=[np.ascontiguousarray(f) for f in frames], return_tensors="pt")
        with self.torch.no_grad():
            emb = self.clip(**inputs).image_embeds.float()
            x = emb / emb.norm(dim=-1, keepdim=True)
            for weight, bias in self.layers:
                x = x @ weight.T + bias
        return x[:, 0].numpy().astype(np.float64)


def aesthetic_score(frames: list[np.ndarray], directory: str) -> float:
    """Mean aesthetic score of `frames` with the predictor in `directory` (loaded once)."""
    if directory not in _CACHE:
        _CACHE[directory] = AestheticPredictor(directory)
    return float(_CACHE[directory](frames).mean())
