"""Captions from a vision-language model in a local directory, for clips that came without one.

`VLMCaptioner(directory)` loads `AutoProcessor` + `AutoModelForImageTextToText` from a
`save_pretrained` directory with `local_files_only=True` and `HF_HUB_OFFLINE=1` (nothing is ever
downloaded, as `text.py`'s T5), and captions a clip's middle frame with greedy decoding, in
batches. Any image-to-text model transformers maps to that auto class works (BLIP, LLaVA-style
models with `prompt`); the tests build a tiny random BLIP. MUG-V captions whole clips with a
video VLM; one key frame is the cheap stand-in until such a model is wired here.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np


class VLMCaptioner:
    """Batched greedy captions of RGB uint8 frames (H, W, 3) by a local VLM."""

    def __init__(self, directory: str | pathlib.Path, prompt: str = "", max_new_tokens: int = 40,
                 batch_size: int = 8):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"captioner directory {directory} not found")
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(directory, local_files_only=True).eval()
        self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size
        self.name = directory.name

    def __call__(self, frames: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(frames), self.batch_size):
            batch = [np.ascontiguousarray(f) for f in frames[i:i + self.batch_size]]
            kwargs = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **kwargs)
            with self.torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            if self.prompt and "input_ids" in inputs:   # decoder-only VLMs echo the prompt
                ids = ids[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def caption_clips(clips: list[dict], input_dir: str, captioner: VLMCaptioner) -> dict[str, str]:
    """key -> caption of each clip's middle frame (native size), one decode per source."""
    from mugv.torch_backend.data.curation import media
    by_source: dict[str, list[dict]] = {}
    for c in clips:
        by_source.setdefault(c["source"], []).append(c)
    keys, frames = [], []
    for source, items in by_source.items():
        middle = {c["key"]: (c["start_frame"] + c["end_frame"]) // 2 for c in items}
        grabbed = media.grab(pathlib.Path(input_dir) / source, {i: None for i in middle.values()})
        for key, index in middle.items():
            keys.append(key)
            frames.append(grabbed[index])
    return dict(zip(keys, captioner(frames))) if frames else {}
