"""Deterministic, resumable bucket sampler: pure `init` / `step` over a small state dict.

The whole schedule is a function of (seed, index membership, step): step s draws its kind (image
or video batch, by the stage's task mix) and its task (t2v or i2v for a video batch) from
PCG64([seed, s]); each kind walks an epoch plan - per bucket a seeded permutation cut into full
global batches (the remainder waits for the next epoch's permutation), then the batches of all
buckets of that kind in a seeded order. The state is {"step", "image": [epoch, position],
"video": [epoch, position]} plus the seed: saving it in the checkpoint and resuming gives exactly
the batches the uninterrupted run would have seen.

Data parallelism slices each global batch: rank r of d takes rows [r*B/d, (r+1)*B/d). Every
global batch is the same for any d, so concatenating the ranks' slices gives the same sequence
for every d that divides each bucket's batch size (checked, with the bucket named).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from mugv.core.data import BucketSpec, TaskMix


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """One step's global batch: positions in the dataset index, all from one bucket."""

    step: int
    bucket: int
    task: str
    positions: tuple[int, ...]

    def rank_slice(self, rank: int, world: int) -> tuple[int, ...]:
        """The positions data-parallel rank `rank` of `world` loads."""
        n = len(self.positions)
        if world <= 0 or n % world or not 0 <= rank < world:
            raise ValueError(f"rank={rank}, world={world}: expected 0 <= rank < world and world "
                             f"dividing the global batch {n} (bucket {self.bucket})")
        per = n // world
        return self.positions[rank * per:(rank + 1) * per]


class SamplerPlan:
    """Which index positions each bucket holds, and the batch sizes and task mix to draw with."""

    def __init__(self, buckets: tuple[BucketSpec, ...], members: dict[int, list[int]],
                 task_mix: TaskMix, seed: int, world: int = 1):
        self.buckets, self.task_mix, self.seed = buckets, task_mix, seed
        self.members = {b: tuple(p) for b, p in members.items()}
        for b, spec in enumerate(buckets):
            if spec.batch_size % world:
                raise ValueError(f"bucket {spec.name}: batch_size {spec.batch_size} is not divisible "
                                 f"by the data-parallel size {world}")
        self.kinds = {}
        for kind, is_image in (("image", True), ("video", False)):
            full = [b for b, spec in enumerate(buckets) if (spec.frames == 1) == is_image
                    and len(self.members.get(b, ())) >= spec.batch_size]
            if full:
                self.kinds[kind] = full
        want_image = task_mix.t2i > 0
        want_video = task_mix.t2v + task_mix.i2v > 0
        if want_image and "image" not in self.kinds or want_video and "video" not in self.kinds:
            sizes = {spec.name: (len(self.members.get(b, ())), spec.batch_size) for b, spec in enumerate(buckets)}
            raise ValueError(f"task mix {task_mix} needs image and/or video batches, but no bucket of "
                             f"that kind holds a full batch: (items, batch_size) per bucket {sizes}")

    @functools.lru_cache(maxsize=8)
    def epoch(self, kind: str, epoch: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The (bucket, positions) batches of one epoch of `kind`, in order."""
        batches = []
        for b in self.kinds[kind]:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, b, 1]))
            order = rng.permutation(np.array(self.members[b], dtype=np.int64))
            size = self.buckets[b].batch_size
            for i in range(len(order) // size):
                batches.append((b, tuple(int(p) for p in order[i * size:(i + 1) * size])))
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 2]))
        return tuple(batches[i] for i in rng.permutation(len(batches)))


def init(seed: int) -> dict:
    """The sampler state at step 0."""
    return {"seed": int(seed), "step": 0, "image": [0, 0], "video": [0, 0]}


def step(plan: SamplerPlan, state: dict) -> tuple[GlobalBatch, dict]:
    """The global batch of `state["step"]` and the state after it. Pure: `state` is not changed."""
    if state["seed"] != plan.seed:
        raise ValueError(f"sampler state seed {state['seed']} != plan seed {plan.seed}: the state "
                         f"belongs to another run")
    s = state["step"]
    rng = np.random.Generator(np.random.PCG64([plan.seed, s, 0]))
    mix = plan.task_mix
    u_kind, u_task = rng.random(2)
    kind = "image" if u_kind < mix.t2i else "video"
    task = "t2i" if kind == "image" else ("i2v" if u_task * (mix.t2v + mix.i2v) < mix.i2v else "t2v")
    epoch, position = state[kind]
    batches = plan.epoch(kind, epoch)
    bucket, positions = batches[position]
    position += 1
    if position == len(batches):
        epoch, position = epoch + 1, 0
    new_state = {**state, "step": s + 1, kind: [epoch, position]}
    return GlobalBatch(s, bucket, task, positions), new_state
