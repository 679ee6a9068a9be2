"""The data pipeline as the trainer's `BatchSource`: sampler position -> cached moments -> latents.

`CachedBatches` walks `data/sampler.py`'s deterministic schedule over a `DatasetIndex`, reads each
global batch's posterior moments and text states from the latent/text cache (`data/cache.py`, or
the online encoders through the same `get` interface), and draws z = mean + std * eps with a
generator seeded by (seed, step): the batch of step s is a function of (seed, s) alone, so the
state dict - the sampler state - is all a checkpoint needs for an exact resume.
"""
from __future__ import annotations

import torch

from mugv.core.data import TaskMix
from mugv.torch_backend.data import sampler
from mugv.torch_backend.data.cache import sample_latents
from mugv.torch_backend.data.dataset import DatasetIndex
from mugv.torch_backend.data.batch import TrainBatch


class CachedBatches:
    """A resumable `BatchSource` over an indexed, cached dataset.

    index: the stage's dataset index (its buckets decide the batch shapes and sizes).
    source: `CachedSource` or `OnlineSource` (anything with get(positions) -> (mean, std, text, mask)).
    task_mix: image vs video batches (t2i weight); the trainer itself splits video batches into
        t2v / i2v by its stage settings.
    sample_posterior: z = mean + std * eps (the official encode); False trains on the posterior
        means (for a briefly trained VAE whose posterior std is still large against the spread of
        its means, the samples would be mostly noise).
    """

    def __init__(self, index: DatasetIndex, source, task_mix: TaskMix, seed: int, world: int = 1,
                 sample_posterior: bool = True):
        self.index, self.source, self.seed = index, source, seed
        self.sample_posterior = sample_posterior
        self.plan = sampler.SamplerPlan(index.buckets, index.members(), task_mix, seed, world, index.weights())
        self.state = sampler.init(seed)

    def next_batch(self) -> TrainBatch:
        batch, self.state = sampler.step(self.plan, self.state)
        mean, std, text, mask = self.source.get(list(batch.positions))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch.step)
        latents = sample_latents(mean.float(), std.float(), g) if self.sample_posterior else mean.float()
        spec = self.index.buckets[batch.bucket]
        ids = [int(p) for p in batch.positions]
        return TrainBatch(latents, text.float(), mask.bool(), torch.full((len(ids),), float(spec.fps)),
                          (spec.height, spec.width), ids)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state seed {state['seed']} != this source's seed {self.seed}")
        self.state = {"seed": int(state["seed"]), "step": int(state["step"]),
                      "image": list(state["image"]), "video": list(state["video"])}
        if "drawn" in state:   # a weighted plan's batches per bucket (data/sampler.py)
            self.state["drawn"] = [int(n) for n in state["drawn"]]
