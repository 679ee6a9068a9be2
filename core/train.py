"""Training hyper-parameters: optimizer, schedule, precision, EMA, recompute, checkpointing and
failure handling. Defaults follow the anchor's scripts (mugv-forward-notes.md section 5):
Adam(0.9, 0.999, eps 1e-10), no weight decay, clip 1.0, lr 1e-5 after 100 warm-up steps, EMA 0.9999."""
from __future__ import annotations

import dataclasses

from mugv.core import validate as v


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-5
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-10
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    warmup_steps: int = 100
    schedule: str = "constant"          # after warm-up: "constant" or "cosine" (to min_lr)

    def __post_init__(self) -> None:
        v.in_range(self, "lr", 0, 1, lo_open=True)
        v.in_range(self, "min_lr", 0, self.lr)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            v.fail(self, "betas", "a pair of values in [0, 1)")
        v.in_range(self, "eps", 0, 1, lo_open=True)
        v.in_range(self, "weight_decay", 0, None)
        v.in_range(self, "clip_grad", 0, None)   # 0 disables clipping
        v.non_negative_int(self, "warmup_steps")
        v.one_of(self, "schedule", ("constant", "cosine"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage's loop settings."""

    steps: int = 1000
    micro_batch: int = 1
    grad_accumulation: int = 1
    precision: str = "bf16"             # "bf16" mixed precision on GPU, "fp32" (CPU default)
    ema_decay: float = 0.9999           # 0 disables EMA
    recompute: str = "none"             # "none", "selective" or "full"
    recompute_layers: int = 0           # with "full": how many layers recompute (0 = all)
    seed: int = 6309
    checkpoint_every: int = 500
    keep_last: int = 3
    max_nonfinite_in_a_row: int = 5
    log_every: int = 10
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self) -> None:
        v.positive_int(self, "steps", "micro_batch", "grad_accumulation", "checkpoint_every", "keep_last",
                       "max_nonfinite_in_a_row", "log_every")
        v.non_negative_int(self, "recompute_layers", "seed")
        v.one_of(self, "precision", ("bf16", "fp32"))
        v.one_of(self, "recompute", ("none", "selective", "full"))
        v.in_range(self, "ema_decay", 0, 1, hi_open=True)


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over
    `warmup_steps`, then constant, or cosine from lr down to min_lr at `total_steps`."""
    import math

    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def ema_update(ema, param, decay: float):
    """One EMA step, ema <- decay * ema + (1 - decay) * param, on any array type (pure: returns
    the new value; the backends apply it in place with their own mechanics)."""
    return ema * decay + param * (1.0 - decay)
