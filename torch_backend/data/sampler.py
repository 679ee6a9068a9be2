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

Weighted plans (`weights`, one number >= 0 per index position, from the manifest's `weight`
field) draw each item in proportion to its weight, still one bucket per batch:

- the bucket of step s (within the kind drawn as above) is drawn from PCG64([seed, s, 3]) with
  probability proportional to W_b / B_b (W_b its items' total weight, B_b its batch size), so a
  batch of bucket b carries B_b items and item i is drawn at rate proportional to w_i;
- each bucket walks its own stream of item slots: epoch e of bucket b is n_b slots (its member
  count) filled by systematic resampling (one uniform offset, PCG64([seed, e, b, 5])) over a
  seeded permutation of its items, so item i fills floor or ceil of n_b * w_i / W_b slots and
  exactly that many in expectation; the slots are permuted and the bucket's j-th batch is slots
  [j B_b, (j+1) B_b) of the stream (epochs concatenated: no remainder is dropped, so no item of a
  bucket is favoured). An item may repeat within a batch only when its weight gives it several
  slots per epoch (or across an epoch boundary).

The state adds "drawn" (batches taken from each bucket); with it the schedule is again a pure
function of (seed, step) and a resumed run sees the same batches. Without weights nothing of
the above runs: the plan and its state are exactly the unweighted ones.
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
                 task_mix: TaskMix, seed: int, world: int = 1, weights: "list[float] | None" = None):
        self.buckets, self.task_mix, self.seed = buckets, task_mix, seed
        self.members = {b: tuple(p) for b, p in members.items()}
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        for b, spec in enumerate(buckets):
            if spec.batch_size % world:
                raise ValueError(f"bucket {spec.name}: batch_size {spec.batch_size} is not divisible "
                                 f"by the data-parallel size {world}")
        if self.weights is not None:
            bad = [i for i, w in enumerate(self.weights) if not (np.isfinite(w) and w >= 0)]
            if bad:
                raise ValueError(f"sampler weights: position {bad[0]} has weight {self.weights[bad[0]]}; "
                                 f"expected finite numbers >= 0")
            # a weighted bucket needs a full batch of distinct drawable items, like an unweighted one
            self.drawable = {b: tuple(p for p in ps if self.weights[p] > 0) for b, ps in self.members.items()}
        else:
            self.drawable = self.members
        self.kinds = {}
        for kind, is_image in (("image", True), ("video", False)):
            full = [b for b, spec in enumerate(buckets) if (spec.frames == 1) == is_image
                    and len(self.drawable.get(b, ())) >= spec.batch_size]
            if full:
                self.kinds[kind] = full
        want_image = task_mix.t2i > 0
        want_video = task_mix.t2v + task_mix.i2v > 0
        if want_image and "image" not in self.kinds or want_video and "video" not in self.kinds:
            sizes = {spec.name: (len(self.drawable.get(b, ())), spec.batch_size) for b, spec in enumerate(buckets)}
            items = "items with weight > 0" if self.weights is not None else "items"
            raise ValueError(f"task mix {task_mix} needs image and/or video batches, but no bucket of "
                             f"that kind holds a full batch: ({items}, batch_size) per bucket {sizes}")

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

    def bucket_odds(self, kind: str) -> np.ndarray:
        """Weighted plans: the probability of each of `kind`'s buckets, proportional to W_b / B_b."""
        mass = np.array([self.weights[list(self.members[b])].sum() / self.buckets[b].batch_size
                         for b in self.kinds[kind]])
        return mass / mass.sum()

    @functools.lru_cache(maxsize=32)
    def weighted_epoch(self, bucket: int, epoch: int) -> np.ndarray:
        """Weighted plans: epoch `epoch` of `bucket`'s slot stream, n_b positions where item i
        fills floor or ceil of n_b * w_i / W_b slots (systematic resampling), in seeded order."""
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, bucket, 5]))
        items = rng.permutation(np.array(self.members[bucket], dtype=np.int64))
        n = len(items)
        cum = np.cumsum(self.weights[items])
        edges = n * cum / cum[-1]
        edges[-1] = n                    # exactly n slots, whatever the rounding of the sum
        filled = np.floor(np.concatenate([[0.0], edges]) + rng.random()).astype(np.int64)
        slots = np.repeat(items, np.diff(filled))
        return rng.permutation(slots)

    def weighted_batch(self, bucket: int, j: int) -> tuple[int, ...]:
        """Weighted plans: the j-th batch of `bucket`, slots [j B, (j+1) B) of its stream."""
        size, n = self.buckets[bucket].batch_size, len(self.members[bucket])
        out = []
        for slot in range(j * size, (j + 1) * size):
            out.append(int(self.weighted_epoch(bucket, slot // n)[slot % n]))
        return tuple(out)


def init(seed: int) -> dict:
    """The sampler state at step 0."""
    return {"seed": int(seed), "step": 0, "image": [0, 0], "video": [0, 0]}


def step(plan: SamplerPlan, state: dict) -> tuple[GlobalBatch, dict]:
    """The global batch of `state["step"]` and the state after it. Pure: `state` is not changed."""
    if state["seed"] != plan.seed:
        raise ValueError(f"sampler state seed {state['seed']} != plan seed {plan.seed}: the state "
                         f"belongs to another run")
    if ("drawn" in state) != (plan.weights is not None) and state["step"] > 0:
        which = "a weighted" if "drawn" in state else "an unweighted"
        raise ValueError(f"sampler state at step {state['step']} comes from {which} plan, this plan is "
                         f"the other kind: the manifest's weight fields changed since the state was saved")
    s = state["step"]
    rng = np.random.Generator(np.random.PCG64([plan.seed, s, 0]))
    mix = plan.task_mix
    u_kind, u_task = rng.random(2)
    kind = "image" if u_kind < mix.t2i else "video"
    task = "t2i" if kind == "image" else ("i2v" if u_task * (mix.t2v + mix.i2v) < mix.i2v else "t2v")
    if plan.weights is not None:
        odds = plan.bucket_odds(kind)
        u_bucket = np.random.Generator(np.random.PCG64([plan.seed, s, 3])).random()
        bucket = plan.kinds[kind][min(int(np.searchsorted(np.cumsum(odds), u_bucket, side="right")),
                                      len(odds) - 1)]
        drawn = list(state.get("drawn", [0] * len(plan.buckets)))
        positions = plan.weighted_batch(bucket, drawn[bucket])
        drawn[bucket] += 1
        return GlobalBatch(s, bucket, task, positions), {**state, "step": s + 1, "drawn": drawn}
    epoch, position = state[kind]
    batches = plan.epoch(kind, epoch)
    bucket, positions = batches[position]
    position += 1
    if position == len(batches):
        epoch, position = epoch + 1, 0
    new_state = {**state, "step": s + 1, kind: [epoch, position]}
    return GlobalBatch(s, bucket, task, positions), new_state
