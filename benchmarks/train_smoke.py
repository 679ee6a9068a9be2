"""GPU smoke run of the trainer: a small MUG-DiT (1B width, 4 layers) in bf16 for a few hundred
steps on deterministic synthetic latents; prints the loss trajectory, step time and MFU (model
FLOPs from core/flops.py over the H100 bf16 peak) and writes JSON.

    python benchmarks/train_smoke.py --steps 300 --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="train_smoke.json")
    ap.add_argument("--run-dir", default="/tmp/mugv_smoke")
    a = ap.parse_args()

    import torch

    from mugv.core.dit import dit_config
    from mugv.core.flow import FlowConfig
    from mugv.core.train import OptimizerConfig, TrainConfig
    from mugv.torch_backend.data.batch import SyntheticLatents
    from mugv.torch_backend.training.trainer import Trainer

    cfg = dit_config("1B", depth=4)
    train = TrainConfig(steps=a.steps, micro_batch=a.batch, precision="bf16", ema_decay=0.999,
                        checkpoint_every=10 * a.steps, log_every=50,
                        optimizer=OptimizerConfig(lr=2e-4, min_lr=2e-5, warmup_steps=20, schedule="cosine"))
    source = SyntheticLatents(a.batch, (4, 32, 32), text_len=64, text_dim=cfg.text_dim, seed=0)
    rows = []
    t0 = time.time()
    trainer = Trainer(cfg, train, FlowConfig(), source, a.run_dir, on_metrics=rows.append)
    trainer.run()
    trainer.close()
    wall = time.time() - t0
    losses = [r["loss"] for r in rows if not r.get("skipped")]
    late = rows[len(rows) // 5:]
    summary = {
        "device": torch.cuda.get_device_name(0), "model": "MUG-DiT 1B width (hidden 1152, 16 heads), 4 layers",
        "latent": [4, 32, 32], "tokens_per_sample": 4 * 16 * 16, "batch": a.batch, "steps": a.steps,
        "loss_first20": statistics.mean(losses[:20]), "loss_last20": statistics.mean(losses[-20:]),
        "step_time_median_s": statistics.median(r["step_time"] for r in late),
        "mfu_median": statistics.median(r["mfu"] for r in late),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in late),
        "skipped": sum(bool(r.get("skipped")) for r in rows), "wall_s": wall,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_every_25": losses[::25],
    }
    json.dump(summary, open(a.out, "w"), indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
