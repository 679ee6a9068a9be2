"""The LAION aesthetic predictor's loading path, on a tiny random CLIP and head built here."""
from __future__ import annotations

import numpy as np
import pytest

from mugv.core.curation import FilterConfig
from mugv.torch_backend.data.curation import scorers


def _tiny_predictor(directory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=24)
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModelWithProjection(config).eval()
    clip.save_pretrained(directory / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory / "clip")
    g = torch.Generator().manual_seed(1)
    # the LAION layout: linear layers at indices 0, 2, 4, 6, 7 (dropouts between, no activations)
    dims, idx = [24, 16, 8, 4, 3, 1], [0, 2, 4, 6, 7]
    head = {}
    for i, (a, b) in zip(idx, zip(dims[:-1], dims[1:])):
        head[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        head[f"layers.{i}.bias"] = torch.randn(b, generator=g)
    save_file(head, str(directory / "head.safetensors"))
    return clip, head, idx


def test_aesthetic_score_is_the_head_on_normalised_clip_embeddings(tmp_path):
    import torch
    from mugv.torch_backend.data.curation.aesthetic import AestheticPredictor
    clip, head, idx = _tiny_predictor(tmp_path)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (37, 45, 3), dtype=np.uint8) for _ in range(3)]
    got = AestheticPredictor(tmp_path)(frames)
    processor = __import__("transformers").CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        emb = clip(**processor(images=frames, return_tensors="pt")).image_embeds.double()
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in idx:
            x = x @ head[f"layers.{i}.weight"].double().T + head[f"layers.{i}.bias"].double()
    want = x[:, 0].numpy()
    assert np.abs(got - want).max() < 1e-5, f"scores {got} vs float64 reference {want}"


def test_aesthetic_filter_runs_in_the_scorer_and_judges(tmp_path):
    _tiny_predictor(tmp_path)
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
    clip = scorers.ClipFrames(0, 6, 3.0, 24, 32, small, {i: small[i] for i in range(6)})
    scores, skipped = scorers.score(clip, FilterConfig(aesthetic_weights=str(tmp_path)))
    assert "aesthetic" not in skipped and np.isfinite(scores["aesthetic"]), (scores, skipped)
    bar = scores["aesthetic"] + 1.0
    failed = scorers.decide(scores, FilterConfig(aesthetic_min=min(max(bar, 0.0), 10.0)), 2.0)
    assert "aesthetic" in [f["filter"] for f in failed] or bar > 10.0, failed
