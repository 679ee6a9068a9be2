"""What the trainer consumes: a homogeneous batch of latents and text states, and the protocol of a
resumable batch source (position = a small JSON-able state dict).

The data pipeline (`torch_backend/data/`) provides the real sources; `SyntheticLatents` is a
deterministic stand-in for tests and benchmarks: batch k depends only on (seed, k).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass
class TrainBatch:
    """One global batch (all samples share one latent size).

    latents: (B, C, T, H, W) normalised VAE latents x0.
    text: (B, L, D) text-encoder states; text_mask: bool (B, L), True = real token.
    fps: (B,) frame rate the clip was sampled at.
    pixel_hw: (H, W) in pixels, for the timestep shift (core.flow.shift_ratio).
    ids: sample ids, for resume checks and logs.
    reference: optional (B, C, 1, H, W) latent of the image-to-video reference frame; when absent
        the clip's own latent frame 0 serves (as in the anchor).
    """

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    fps: torch.Tensor
    pixel_hw: tuple[int, int]
    ids: list[int]

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Samples [start, stop): a data-parallel rank's or a micro-batch's share."""
        return TrainBatch(self.latents[start:stop], self.text[start:stop], self.text_mask[start:stop],
                          self.fps[start:stop], self.pixel_hw, self.ids[start:stop])


class BatchSource(Protocol):
    def next_batch(self) -> TrainBatch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class SyntheticLatents:
    """Deterministic batches of a fixed shape: batch k is drawn from a generator seeded by
    (seed, k), so a resumed source continues exactly. Latents carry a learnable structure (a
    per-sample smooth pattern tied to the text), not pure noise, so training losses go down."""

    def __init__(self, batch: int, latent_thw: tuple[int, int, int], channels: int = 24,
                 text_len: int = 8, text_dim: int = 64, seed: int = 0, fps: float = 24.0):
        self.batch, self.thw, self.channels = batch, latent_thw, channels
        self.text_len, self.text_dim, self.seed, self.fps = text_len, text_dim, seed, fps
        self.position = 0

    def next_batch(self) -> TrainBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        b, (t, h, w) = self.batch, self.thw
        code = torch.randn(b, self.text_dim, generator=g)
        basis = torch.randn(self.text_dim, self.channels, generator=g.manual_seed(self.seed)) / self.text_dim ** 0.5
        g.manual_seed(self.seed * 1_000_003 + self.position + 7)
        grid = torch.linspace(-1, 1, h)[:, None] * torch.linspace(-1, 1, w)[None, :]
        lat = (code @ basis)[:, :, None, None, None] * grid + 0.1 * torch.randn(b, self.channels, t, h, w, generator=g)
        lengths = torch.randint(1, self.text_len + 1, (b,), generator=g)
        mask = torch.arange(self.text_len)[None, :] < lengths[:, None]
        text = code[:, None, :].expand(b, self.text_len, self.text_dim) + 0.01 * torch.randn(
            b, self.text_len, self.text_dim, generator=g)
        ids = list(range(self.position * b, (self.position + 1) * b))
        self.position += 1
        return TrainBatch(lat, text * mask[..., None], mask, torch.full((b,), self.fps), (8 * h, 8 * w), ids)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
