"""The machinery of a VAE training run (`jobs/vae_train.py`): data parallelism over a torchrun
world, checkpoints with everything an exact resume needs, and the position to resume at.

Data parallel: every rank draws the same global batch from the same seeded generators and keeps
its rows (`rows`), and each optimizer step averages the gradients of its parameters over the ranks
first (`GradientAveraging`): the update of the one-process run on the global batch, up to
summation order. This is what DDP computes; it is done at the optimizer rather than by wrapping
the module because the VAE's stages call sub-module methods (`encode_spatial`, `decode_temporal`,
...) rather than one `forward`, the adaptive GAN weight differentiates through `autograd.grad`
outside a DDP backward, and the discriminator has its own optimizer; one mechanism serves all of
them. Not FSDP: the official VAE is 412 M parameters (fp32 weights + Adam = 6.6 GB per GPU), while
its 720p activations (working set bounded by the chunking, docs/benchmarks.md) are what fills a
GPU, and FSDP shards parameters and optimizer state, not activations; it would add an all-gather
per layer per step for memory the GPU has.

Checkpoints (mugv tensorstore format, `checkpoints/torch_io.py`): group "model" (the VAE schema),
"discriminator", and per live optimizer "optimizer.<name>.exp_avg" / ".exp_avg_sq" (Adam's
moments by parameter name; its step count in `meta`); `meta.position` holds the steps done per
stage; states "rng" (`training/rng.py` JSON, per rank) and "data" (the numpy batch generator's and
the torch noise generator's states, JSON). A run in a folder with a committed checkpoint resumes
from the newest one; log lines after it are dropped (`checkpointing.truncate_metrics`); one run per
folder (`run_lock.RunLock`).
"""
from __future__ import annotations

import base64
import contextlib
import json
import pathlib

import numpy as np
import torch
import torch.distributed as dist

from mugv.core.schema import ParamSpec, Schema
from mugv.torch_backend.training import rng as rng_state

STAGES = ("spatial", "temporal", "end_to_end")


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DataParallel:
    """This rank's share of a global batch and averages over the ranks (no-ops on one process)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = world()

    def rows(self, n: int, what: str = "batch") -> slice:
        """Rows [r n / W, (r + 1) n / W) of a global batch of n (n must divide by the world)."""
        if n % self.size:
            raise ValueError(f"{what} {n} must be a multiple of the data-parallel size {self.size}")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor := its mean over the ranks (one flat all-reduce)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.size
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()

    def scalar_device(self) -> torch.device:
        """Where a collective's small tensors live: NCCL takes CUDA tensors only."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def mean(self, value: float) -> float:
        """A Python number averaged over the ranks (logs)."""
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.scalar_device())
        dist.all_reduce(t, group=self.group)
        return float(t[0]) / self.size


class GradientAveraging:
    """An optimizer whose `step` first averages its parameters' gradients over the data-parallel
    ranks, so code written for one process (`opt.zero_grad(); loss.backward(); opt.step()`) trains
    data parallel unchanged."""

    def __init__(self, optimizer: torch.optim.Optimizer, dp: DataParallel):
        self.optimizer, self.dp = optimizer, dp

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.dp.average_(grads)
        self.optimizer.step()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VAERun:
    """One VAE training run's resumable state.

    `optimizer(name, params, **adam)` builds each stage's Adam (restoring its moments when the run
    resumed), `done(stage)` counts a step and saves every `checkpoint_every` steps (all ranks call
    it), `position` says where a resumed run stands. `out` None: nothing is saved or resumed."""

    def __init__(self, model, disc, out: str | pathlib.Path | None, config: dict, schema: Schema,
                 checkpoint_every: int = 0, keep_last: int = 2, log=print, dp: DataParallel | None = None):
        self.model, self.disc, self.config, self.schema = model, disc, config, schema
        self.out = pathlib.Path(out) if out is not None else None
        self.checkpoint_every, self.keep_last, self.log = checkpoint_every, keep_last, log
        self.dp = dp or DataParallel()
        self.position = {s: 0 for s in STAGES}
        self.optimizers: dict[str, tuple[GradientAveraging, dict]] = {}
        self._pending: dict[str, dict] = {}
        self.np_rng: np.random.Generator | None = None
        self.torch_gen: torch.Generator | None = None
        self.autocast = contextlib.nullcontext     # the VAE runtime's precision context (train sets it)
        self.param_names = {p: n for n, p in model.named_parameters()}
        if disc is not None:
            self.param_names.update({p: f"discriminator.{n}" for n, p in disc.named_parameters()})

    @property
    def ckpt_dir(self) -> pathlib.Path:
        return self.out / "ckpt"

    @property
    def global_step(self) -> int:
        return sum(self.position.values())

    def optimizer(self, name: str, params, **adam) -> GradientAveraging:
        params = list(params)
        opt = GradientAveraging(torch.optim.Adam(params, **adam), self.dp)
        self.optimizers[name] = (opt, {p: self.param_names[p] for p in params})
        pending = self._pending.pop(name, None)
        if pending is not None:
            by_name = {self.param_names[p]: p for p in params}
            for pname, (step, m, v) in pending.items():
                p = by_name[pname]
                opt.optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                          "exp_avg": m.to(p), "exp_avg_sq": v.to(p)}
        return opt

    def done(self, stage: str, live: tuple[str, ...]) -> None:
        """Count one step of `stage`; save when due (`live`: the optimizers to store)."""
        self.position[stage] += 1
        if self.out is not None and self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.save(live)

    # ------------------------------------------------------------------------------ save / load
    def save(self, live: tuple[str, ...], final: bool = False) -> pathlib.Path:
        """Collective. Rank 0 writes the arrays; every rank its RNG blob."""
        from mugv.checkpoints.torch_io import save_torch
        from mugv.core import provenance
        model_state = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        groups = {"model": (self.schema, model_state)}
        if self.disc is not None:
            d = {k: v.detach().float().cpu() for k, v in self.disc.state_dict().items()}
            groups["discriminator"] = (Schema(tuple(ParamSpec(n, tuple(t.shape)) for n, t in d.items())), d)
        steps = {}
        for name in live:
            if name not in self.optimizers:
                continue
            opt, names = self.optimizers[name]
            held = [(names[p], s) for p, s in opt.optimizer.state.items() if "exp_avg" in s]
            if not held:
                continue
            schema = Schema(tuple(ParamSpec(n, tuple(s["exp_avg"].shape)) for n, s in held))
            for key in ("exp_avg", "exp_avg_sq"):
                groups[f"optimizer.{name}.{key}"] = (schema, {n: s[key].detach().cpu() for n, s in held})
            steps[name] = {n: int(s["step"]) for n, s in held}
        data = {"numpy": self.np_rng.bit_generator.state if self.np_rng is not None else None,
                "torch_gen": _b64(self.torch_gen.get_state().numpy().tobytes()) if self.torch_gen is not None else None}
        meta = {"step": self.global_step, "position": dict(self.position), "optimizer_steps": steps,
                "world_size": self.dp.size, "final": final, "versions": provenance.package_versions()}
        return save_torch(self.ckpt_dir, self.global_step, groups, rank=self.dp.rank,
                          write_replica=self.dp.rank == 0, config=self.config,
                          schema_hash=self.schema.hash(), meta=meta,
                          states={"rng": rng_state.capture(), "data": json.dumps(data).encode()},
                          keep_last=self.keep_last, overwrite=True)

    def resume(self) -> bool:
        """Load the newest committed checkpoint under `out/ckpt`, if any: weights, the position,
        generators and (lazily, in `optimizer`) Adam's moments. Refuses another config."""
        from mugv.checkpoints.format import Checkpoint, CheckpointError, latest_checkpoint
        from mugv.checkpoints.torch_io import load_torch
        path = latest_checkpoint(self.ckpt_dir) if self.out is not None and self.ckpt_dir.is_dir() else None
        if path is None:
            return False
        ckpt = Checkpoint(path)
        normal = lambda d: json.loads(json.dumps(d, default=str))  # noqa: E731
        then, now = ckpt.config.get("resume_check"), normal(self.config).get("resume_check")
        if then != now:
            diffs = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(then or {}) | set(now or {}))
                     if (then or {}).get(k) != (now or {}).get(k)]
            raise CheckpointError(f"{path} was written by a run with other settings: {'; '.join(diffs)}; "
                                  f"use another --out")
        weights = load_torch(ckpt, self.schema, "model")
        self.model.load_state_dict(weights, strict=True)
        if self.disc is not None:
            d = self.disc.state_dict()
            schema = Schema(tuple(ParamSpec(n, tuple(t.shape)) for n, t in d.items()))
            self.disc.load_state_dict(load_torch(ckpt, schema, "discriminator"), strict=True)
        meta = ckpt.manifest["meta"]
        self.position = {s: int(meta["position"][s]) for s in STAGES}
        for name, steps in meta.get("optimizer_steps", {}).items():
            schema = Schema(tuple(ParamSpec(n, tuple(ckpt.entry(f"optimizer.{name}.exp_avg", n).shape))
                                  for n in steps))
            m = load_torch(ckpt, schema, f"optimizer.{name}.exp_avg")
            v = load_torch(ckpt, schema, f"optimizer.{name}.exp_avg_sq")
            self._pending[name] = {n: (steps[n], m[n], v[n]) for n in steps}
        blob_rank = self.dp.rank if self.dp.rank < int(meta.get("world_size", 1)) else 0
        try:
            rng_state.restore(ckpt.read_state("rng", blob_rank))
        except rng_state.RngStateError as err:
            raise CheckpointError(f"{path}: state/rng: {err}") from None
        data = json.loads(ckpt.read_state("data", 0))
        if self.np_rng is not None and data["numpy"] is not None:
            self.np_rng.bit_generator.state = data["numpy"]
        if self.torch_gen is not None and data["torch_gen"] is not None:
            raw = base64.b64decode(data["torch_gen"])
            self.torch_gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.log(f"[mugv] resumed from {path} at step {self.global_step} ({self.position})")
        return True
