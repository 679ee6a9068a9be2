"""A training run in its own process, for the trainer tests (kill/resume, DP=2, failures).

    python parity_tests/train_worker.py OUT STEPS [--nan-steps 3,4] [--nonfinite-limit K]
        [--dp-opt] [--ckpt-every N] [--lr 1e-3] [--tp N] [--pp N] [--vpp N] [--cp N] [--async-save] [--check-api]
Under RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT it joins a multi-process world (as torchrun sets).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def api_check_class(Trainer):
    """A Trainer subclass exercising the preference stage's override points: a frozen copy of the
    initial weights as reference, its per-sample flow-matching errors from `forward_only` carried
    in the inputs, and a `loss_fn` that sees them. At step 0 the copy equals the policy, so the
    reference errors must equal the policy's per-sample losses; both are printed as a line
    `API-CHECK step <s> max|ref - policy| <d> ...` on the last pipeline stage."""
    class ApiCheck(Trainer):
        def prepare_inputs(self, batch, rows):
            inputs = super().prepare_inputs(batch, rows)
            if not hasattr(self, "reference"):
                self.reference = self.frozen_copy()

            def per_sample(out, mb):
                return Trainer.loss_fn(self, out, mb)[1]
            inputs["ref_err"] = self.forward_only(self.reference, inputs, reduce=per_sample)
            return inputs

        def loss_fn(self, out, mb):
            loss, samples = super().loss_fn(out, mb)
            self._seen = getattr(self, "_seen", []) + [(samples.detach(), mb["ref_err"])]
            return loss, samples

        def train_step(self, batch):
            self._seen = []
            step = self.step
            m = super().train_step(batch)
            if self._seen:
                d = max(float((s - r).abs().max()) for s, r in self._seen)
                print(f"API-CHECK step {step} max|ref - policy| {d:.3e} micro-batches {len(self._seen)}",
                      flush=True)
            return m

    return ApiCheck


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--nan-steps", default="")
    ap.add_argument("--nonfinite-limit", type=int, default=5)
    ap.add_argument("--dp-opt", action="store_true")
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--check-api", action="store_true",
                    help="train a subclass that uses the override points (see ApiCheck)")
    a = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from mugv.core.dit import dit_config
    from mugv.core.flow import FlowConfig
    from mugv.core.parallel import ParallelConfig
    from mugv.core.train import OptimizerConfig, TrainConfig
    from mugv.torch_backend.data.batch import SyntheticLatents
    from mugv.torch_backend.training.trainer import StageSettings, Trainer, TrainingStopped

    nan_steps = {int(s) for s in a.nan_steps.split(",") if s}

    def plant_nan(step, model):
        if step in nan_steps:
            next(model.parameters()).main_grad.view(-1)[0] = float("nan")

    cfg = dit_config("tiny", depth=a.depth)
    train = TrainConfig(steps=a.steps, micro_batch=2, precision="fp32", ema_decay=0.9,
                        checkpoint_every=a.ckpt_every, keep_last=3, log_every=1,
                        max_nonfinite_in_a_row=a.nonfinite_limit,
                        optimizer=OptimizerConfig(lr=a.lr, min_lr=0.0, warmup_steps=3, schedule="cosine"))
    source = SyntheticLatents(4, (3, 4, 6), text_len=6, text_dim=cfg.text_dim, seed=3)
    cls = api_check_class(Trainer) if a.check_api else Trainer
    trainer = cls(cfg, train, FlowConfig(), source, a.out,
                      parallel=ParallelConfig(distributed_optimizer=a.dp_opt, tensor_parallel=a.tp,
                                              pipeline_parallel=a.pp, virtual_pipeline=a.vpp,
                                              context_parallel=a.cp),
                      async_save=a.async_save,
                      stage=StageSettings(task_mix=(("t2v", 1.0), ("i2v", 1.0)), caption_dropout=0.2),
                      grad_hook=plant_nan, log=lambda m: print(m, flush=True))
    try:
        trainer.run()
    except TrainingStopped as err:
        print(f"STOPPED: {err}", flush=True)
        return 3
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
