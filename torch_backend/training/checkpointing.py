"""The trainer's checkpoints: save (synchronous or asynchronous), resume, start from another stage.

A mixin of `trainer.py::Trainer` (it uses the trainer's optimizer, parameters, EMA shards,
schemas and layout); see docs/training.md "Checkpoints and exact resume" for the contents and
the layout rules: each pipeline stage writes its own parameters, the distributed optimizer's
ranges are assembled over data-parallel ranks, and reading reshards to the reader's layout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mugv.checkpoints.format import (Checkpoint, CheckpointError, check_writable, latest_checkpoint,
                                     list_checkpoints)
from mugv.checkpoints.torch_io import load_torch
from mugv.core import provenance
from mugv.core.validate import to_dict
from mugv.torch_backend.training import optim_state, rng
from mugv.torch_backend.training.saving import to_host

# Fields of TrainConfig that may change when a run is resumed (they do not change the math).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "log_every")


class CheckpointMixin:
    """Checkpoint methods of the Trainer."""

    def _check_output_dir(self) -> None:
        check_writable(self.out_dir)
        # Fail at start, not at the first save: the run keeps `keep_last` checkpoints and writes one
        # more before pruning; those already on disk count as kept.
        one = 4 * self.checkpoint_numel()
        have = len(list_checkpoints(self.ckpt_dir))
        need = one * max(1, self.train.keep_last + 1 - have)
        free = shutil.disk_usage(self.out_dir).free
        if free < need:
            partial = sorted(self.ckpt_dir.glob(".partial.step_*")) if self.ckpt_dir.is_dir() else []
            leftover = (f"; leftover partial checkpoints of killed saves (safe to delete): "
                        f"{', '.join(str(p) for p in partial)}" if partial else "")
            raise CheckpointError(
                f"output directory {self.out_dir} has {free / 1e9:.2f} GB free; this run needs about "
                f"{need / 1e9:.2f} GB ({one / 1e9:.2f} GB a checkpoint, keep_last {self.train.keep_last} "
                f"+ 1 being written, {have} already there){leftover}")

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save(self, wait: bool = False) -> Path:
        """Collective: every rank calls it. Atomic; keeps the last `keep_last`. The state is copied
        to host memory here; the write runs in the background with `async_save` (until the next
        save, `run`'s end, `close` or `wait=True`)."""
        from megatron.core import parallel_state as ps

        self.log(f"[mugv] checkpoint: saving step {self.step}")
        states = optim_state.gather_states(self.optimizer, self.params, extra={"ema": self.ema})
        # One writer per tensor: the first data-parallel replica (context-parallel ranks hold
        # copies too) writes the frozen parameters; the trainable ones' writer is the rank that
        # gather_states assembled them on (any replica under the distributed optimizer).
        first = ps.get_data_parallel_rank(with_context_parallel=True) == 0
        # Frozen parameters (LoRA's base) may be held in bf16; the checkpoint's model group is fp32.
        # With `frozen_from` they stay out: the model_hook reloads them from there.
        weights = {} if self.frozen_from or not first else {
            n: to_host(q.float()) for n, q in self.params.named_parameters() if not q.requires_grad}
        weights.update({n: s["param"] for n, s in states.items()})   # fp32 main values
        groups = {
            "model": (self.trainable if self.frozen_from else self.schema, weights),
            "ema": (self.trainable, {n: s["ema"] for n, s in states.items()}),
            "optimizer.exp_avg": (self.trainable, {n: s["exp_avg"] for n, s in states.items()}),
            "optimizer.exp_avg_sq": (self.trainable, {n: s["exp_avg_sq"] for n, s in states.items()}),
        }
        meta = {"step": self.step, "optimizer_step": optim_state.optimizer_step_count(self.optimizer),
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "tokens_seen": self.tokens_seen, "world_size": dist.get_world_size(),
                "versions": provenance.package_versions(),
                **({"frozen_from": self.frozen_from} if self.frozen_from else {})}
        data_state = json.dumps(self.source.state_dict()).encode()
        path = self.saver.save(self.ckpt_dir, self.step, groups, tp_rank=self.tp_rank,
                               tp_size=self.parallel.tensor_parallel,
                               write_replica=first or optim_state.shards_state(self.optimizer),
                               config=self.config_dict(), schema_hash=self.schema.hash(), meta=meta,
                               states={"rng": rng.capture(), "data": data_state},
                               keep_last=self.train.keep_last, overwrite=True)
        if wait:
            self.saver.wait()
        return path

    def _load_groups(self, ckpt: Checkpoint, optimizer: bool) -> None:
        tp = self.parallel.tensor_parallel
        load = lambda g, s: load_torch(ckpt, s, g, tp_rank=self.tp_rank, tp_size=tp, subset=True)  # noqa: E731
        trainable = set(self.local_trainable.names)
        frozen_from = ckpt.manifest["meta"].get("frozen_from")
        if frozen_from is not None:  # only the trainable parameters are stored (see `frozen_from`)
            if frozen_from != self.frozen_from:
                now = f"come from {self.frozen_from}" if self.frozen_from else "are not loaded from anywhere"
                raise CheckpointError(f"{ckpt.path} holds only the trainable parameters; its frozen ones come "
                                      f"from {frozen_from}, but this run's {now}: start it with that base "
                                      "(finetune's `base`)")
            model = load("model", self.local_trainable)
        else:
            model = load("model", self.local_schema)
            with torch.no_grad():
                for name, q in self.params.named_parameters():
                    if name not in trainable:
                        q.copy_(model[name].to(q))
        model = {n: model[n] for n in trainable}
        if optimizer:
            m, v = load("optimizer.exp_avg", self.local_trainable), load("optimizer.exp_avg_sq", self.local_trainable)
            states = {n: {"param": model[n], "exp_avg": m[n], "exp_avg_sq": v[n]} for n in model}
            optim_state.scatter_states(self.optimizer, self.params, states,
                                       int(ckpt.manifest["meta"]["optimizer_step"]))
            ema = load("ema", self.local_trainable)
        else:
            optim_state.scatter_states(self.optimizer, self.params, {
                n: {"param": model[n], "exp_avg": torch.zeros_like(model[n]),
                    "exp_avg_sq": torch.zeros_like(model[n])} for n in model}, 0)
            ema = model
        for name, shard in optim_state.shard_like(self.optimizer, self.params, ema).items():
            self.ema[name].copy_(shard)

    def _resume(self) -> bool:
        incomplete = sorted(p.name for p in self.ckpt_dir.glob("step_*")
                            if p.is_dir() and not (p / "manifest.json").is_file()) if self.ckpt_dir.is_dir() else []
        if incomplete:
            self.log(f"[mugv] warning: {self.ckpt_dir} holds step folders without a manifest (not committed "
                     f"checkpoints; ignored): {', '.join(incomplete)}")
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            if self.rank == 0 and self._truncate_metrics(0):
                self.log(f"[mugv] warning: no committed checkpoint in {self.ckpt_dir}, so this run starts "
                         f"at step 0; the metric lines of an earlier attempt were dropped from "
                         f"{self._metrics_path} so steps do not repeat")
            return False
        ckpt = Checkpoint(path)
        saved = ckpt.config
        for section, now in (("dit", to_dict(self.dit)), ("flow", to_dict(self.flow))):
            Checkpoint.check_config(ckpt, now, section=section)
        normal = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples and lists compare equal)
        train_now = {k: v for k, v in normal(to_dict(self.train)).items() if k not in RESUMABLE_CHANGES}
        train_then = {k: v for k, v in saved.get("train", {}).items() if k not in RESUMABLE_CHANGES}
        if train_now != train_then:
            diffs = [f"train.{k}: checkpoint {train_then.get(k)!r}, now {train_now.get(k)!r}"
                     for k in sorted(set(train_now) | set(train_then)) if train_now.get(k) != train_then.get(k)]
            raise CheckpointError(f"{path} was written with a different config: " + "; ".join(diffs))
        self._load_groups(ckpt, optimizer=True)
        meta = ckpt.manifest["meta"]
        self.step = int(meta["step"])
        self.nonfinite_total = int(meta["nonfinite_total"])
        self.nonfinite_in_a_row = int(meta["nonfinite_in_a_row"])
        self.tokens_seen = int(meta["tokens_seen"])
        rank_blob = self.rank if self.rank < int(meta.get("world_size", 1)) else 0
        try:
            rng.restore(ckpt.read_state("rng", rank_blob))
        except rng.RngStateError as err:
            raise CheckpointError(f"{path}: state/rng/rank_{rank_blob:05d}.bin: {err}") from None
        self.source.load_state_dict(json.loads(ckpt.read_state("data", 0)))
        if self.rank == 0:
            self._truncate_metrics(self.step)
        self.log(f"[mugv] resumed from {path} at step {self.step}")
        return True

    def _init_from(self, path: str, weights_only: bool) -> None:
        ckpt = Checkpoint(path) if (Path(path) / "manifest.json").is_file() else Checkpoint(latest_checkpoint(path) or path)
        ckpt.check_config(to_dict(self.dit), section="dit")
        self._load_groups(ckpt, optimizer=not weights_only)
        self.log(f"[mugv] stage starts from {ckpt.path} ({'weights only' if weights_only else 'weights, EMA and optimizer'})")

    def _truncate_metrics(self, step: int) -> int:
        """Drop metric lines written after the checkpoint we resume from (`truncate_metrics`)."""
        return truncate_metrics(self._metrics_path, step, self.log)


def truncate_metrics(path: Path, step: int, log=print, key: str = "step") -> int:
    """Drop the metric lines of `path` whose `key` is after `step` (the checkpoint a run resumes
    from: they will be redone), and a torn last line (a crash or a full disk mid-write). Returns
    how many lines were dropped; a damaged line before the last is an error naming file:line (it
    was not a torn write)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    keep, dropped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = int(row[key])
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                log(f"[mugv] warning: {path}:{i + 1}: torn last line dropped")
                dropped += 1
                continue
            raise CheckpointError(f"{path}:{i + 1}: not a metrics line (JSON with a "
                                  f"{key!r}): {line[:80]!r}") from None
        if row_step <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        path.write_text("".join(ln + "\n" for ln in keep))
    return dropped
