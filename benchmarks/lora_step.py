"""LoRA step time and peak memory of the 10B MUG-DiT on one GPU (issue 15), against the memory
arithmetic of full fine-tuning (core/memory.py).

    # device machine, repo root, after `source scripts/install_gpu_offline.sh`:
    python benchmarks/lora_step.py --out $OUT/lora
    # here (CPU, tiny DiT, fp32, tiny latent; checks the script, numbers mean nothing):
    python benchmarks/lora_step.py --tiny --inline --out /tmp/lora_bench

What it runs: the production path, `torch_backend/training/trainer.py::Trainer` with
`torch_backend/models/lora.py::lora_model_hook` (rank 64, alpha 32, the default targets: every block's
self-attention qkv/proj, cross-attention q/kv/proj, MLP fc1/fc2), bf16 (the Trainer's mixed
precision: bf16 weights, base frozen, fp32 gradient buffer, fp32 main copies and Adam moments of
the adapters only, fp32 EMA of the adapters), random base weights (the schema's init), one sample
of 256p: latent 14 x 32 x 56 (105 frames at 256 x 448) = 6,272 tokens, text 300 tokens of T5
width, synthetic latents. Per recompute policy (`--recompute`, default full, selective, none) one
child process builds the whole 10.8 B-parameter model, runs `--warmup` + `--steps` Trainer steps
(forward, backward, finalize, non-finite check, Adam, EMA) and records:
- step_time_s: median wall time of the timed steps (CUDA-synchronised by the Trainer's `.item()`);
- tokens_per_s, and mfu as core/flops.py counts a training step (forward + 2 x forward; a LoRA
  backward skips the frozen weights' gradients, so its real work is ~2/3 of that: mfu_lora_work
  counts forward + 1 x forward for the activation gradients);
- static_gib (after set-up: weights, adapters, optimizer, EMA) and peak_gib
  (`torch.cuda.max_memory_allocated` over all steps);
- the loss of each step (finite, no skipped step).
A policy whose estimate exceeds the GPU is skipped and says so; a failing one (e.g. out of memory)
records its error. Beside them, `arithmetic` holds core/memory.py's estimate for full fine-tuning
on one GPU (TP=1, distributed optimizer, same sample) per policy, the smallest GPU count that fits
full fine-tuning (`min_gpus`), and the same arithmetic for LoRA (base bf16 2 B/param, adapters
2 + 4 + 12 + 4 B/param, the same activations), to compare with the measured peak.

How to read it: peak_gib vs the LoRA arithmetic shows how close the model is; peak_gib vs the
full fine-tuning row shows what LoRA saves (full fine-tuning does not fit one GPU at all).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

warnings.filterwarnings("ignore")  # Megatron's Apex/Transformer Engine fallbacks, once per import

GIB = 2 ** 30


def setup(tiny: bool) -> dict:
    """Model, sample and LoRA sizes of the benchmark (the 10B one, or a tiny one for the CPU)."""
    from mugv.core.dit import dit_config
    from mugv.core.lora import LoRAConfig
    if tiny:
        return dict(cfg=dit_config("tiny"), thw=(3, 8, 12), text=16, precision="fp32",
                    lora=LoRAConfig(rank=4, alpha=2.0))
    return dict(cfg=dit_config("10B"), thw=(14, 32, 56), text=300, precision="bf16",
                lora=LoRAConfig(rank=64, alpha=32.0, base_dtype="bfloat16"))


def arithmetic(s: dict, gpu_gib: float) -> dict:
    """core/memory.py's per-GPU estimate for full fine-tuning at TP=1, and LoRA's equivalent."""
    from mugv.core.dit import dit_schema, video_tokens
    from mugv.core.lora import lora_schema
    from mugv.core.memory import estimate, min_gpus
    from mugv.core.parallel import ParallelConfig
    cfg, thw = s["cfg"], s["thw"]
    n_base, n_lora = dit_schema(cfg).numel, lora_schema(cfg, s["lora"]).numel
    out = {"tokens": video_tokens(cfg, thw), "base_params": n_base, "lora_params": n_lora,
           "full_finetune_gib": {}, "lora_gib": {}}
    for rc in ("full", "selective", "none"):
        e = estimate(cfg, ParallelConfig(distributed_optimizer=True), 1, thw, text_tokens=s["text"],
                     recompute=rc)
        out["full_finetune_gib"][rc] = e.gib()
        base = 2 * n_base if s["precision"] == "bf16" else 4 * n_base
        adapters = (2 + 4 + 12 + 4) * n_lora  # bf16 weight, fp32 grad, fp32 main + 2 moments, fp32 EMA
        out["lora_gib"][rc] = {"base": base / GIB, "adapters": adapters / GIB,
                               "activations": e.activations / GIB,
                               "total": (base + adapters + e.activations) / GIB}
    out["full_finetune_min_gpus"] = min_gpus(cfg, thw, 0.9 * gpu_gib * 1e9)
    return out


def run_case(recompute: str, tiny: bool, warmup: int, steps: int, run_dir: str) -> dict:
    """Build the model under `recompute` and time `warmup + steps` Trainer steps (this process)."""
    import torch

    from mugv.core.dit import video_tokens
    from mugv.core.flops import benchmark_peak, step_flops
    peak, _ = benchmark_peak(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                             os.environ.get("MUGV_PEAK_TFLOPS"))
    from mugv.core.flow import FlowConfig
    from mugv.core.train import OptimizerConfig, TrainConfig
    from mugv.torch_backend.models.lora import lora_model_hook
    from mugv.torch_backend.data.batch import SyntheticLatents
    from mugv.torch_backend.training.trainer import Trainer

    class BenchTrainer(Trainer):
        # The Trainer checks at start that the disk holds a full-model checkpoint (173 GB for 10B
        # in fp32 with Adam); this benchmark never saves.
        def _check_output_dir(self) -> None:
            os.makedirs(self.out_dir, exist_ok=True)

    s = setup(tiny)
    cfg, thw = s["cfg"], s["thw"]
    cuda = torch.cuda.is_available() and not tiny
    if not cuda:
        torch.set_num_threads(1)
    total = warmup + steps
    train = TrainConfig(steps=total, micro_batch=1, precision=s["precision"], recompute=recompute,
                        ema_decay=0.999, checkpoint_every=10 ** 9, log_every=10 ** 9,
                        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0))
    source = SyntheticLatents(1, thw, text_len=s["text"], text_dim=cfg.text_dim, seed=0)
    t0 = time.perf_counter()
    trainer = BenchTrainer(cfg, train, FlowConfig(), source, run_dir, log=lambda _m: None,
                           model_hook=lora_model_hook(cfg, s["lora"], seed=0))
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad)
    rows = []
    for _ in range(total):
        rows.append(trainer.train_step(source.next_batch()))
    timed = [r["step_time"] for r in rows[warmup:]]
    out = {"recompute": recompute, "setup_s": setup_s, "trainable_params": trainable, "frozen_params": frozen,
           "losses": [r.get("loss") for r in rows], "skipped": sum(bool(r.get("skipped")) for r in rows),
           "step_times": [r["step_time"] for r in rows], "step_time_s": statistics.median(timed)}
    tokens = video_tokens(cfg, thw)
    fl = step_flops(cfg, thw, s["text"])
    out["tokens_per_s"] = tokens / out["step_time_s"]
    out["mfu"] = fl.model / out["step_time_s"] / peak
    out["mfu_lora_work"] = 2 * fl.forward / out["step_time_s"] / peak
    if cuda:
        torch.cuda.synchronize()
        out["static_gib"] = static / GIB
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    trainer.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="lora_bench", help="output directory (lora_step.json)")
    ap.add_argument("--tiny", "--cpu", dest="tiny", action="store_true",
                    help="tiny DiT, fp32, on the CPU: tests the script")
    ap.add_argument("--recompute", default="full,selective,none",
                    help="comma-separated policies; one whose LoRA estimate exceeds the GPU is skipped")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--inline", action="store_true", help="run cases in this process (default: one child each)")
    ap.add_argument("--case", help=argparse.SUPPRESS)       # child: run one policy, write --case-json
    ap.add_argument("--case-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.tiny:
        import torch
        if not torch.cuda.is_available():
            print("[lora_step] no CUDA device: running the tiny CPU configuration (--tiny)", file=sys.stderr)
            a.tiny = True

    if a.case:  # child process
        with tempfile.TemporaryDirectory() as d:
            res = run_case(a.case, a.tiny, a.warmup, a.steps, d)
        with open(a.case_json, "w") as f:
            json.dump(res, f)
        return res

    import torch
    cuda = torch.cuda.is_available() and not a.tiny
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    s = setup(a.tiny)
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "model": f"MUG-DiT hidden {s['cfg'].hidden_size}, {s['cfg'].depth} layers",
                     "latent": list(s["thw"]), "text_tokens": s["text"], "precision": s["precision"],
                     "lora": {"rank": s["lora"].rank, "alpha": s["lora"].alpha, "base_dtype": s["lora"].base_dtype},
                     "gpu_gib": gpu_gib, "cases": {}}
    try:
        results["arithmetic"] = arithmetic(s, gpu_gib)
    except Exception as e:  # noqa: BLE001
        results["arithmetic"] = {"error": f"{type(e).__name__}: {e}"}
    os.makedirs(a.out, exist_ok=True)
    for rc in a.recompute.split(","):
        est = results["arithmetic"].get("lora_gib", {}).get(rc, {}).get("total")
        if cuda and est is not None and est > gpu_gib:
            results["cases"][rc] = {"skipped": f"LoRA estimate {est:.1f} GiB > {gpu_gib:.1f} GiB of the GPU"}
            continue
        t0 = time.perf_counter()
        try:
            if a.inline:
                with tempfile.TemporaryDirectory() as d:
                    results["cases"][rc] = run_case(rc, a.tiny, a.warmup, a.steps, d)
            else:
                path = os.path.join(a.out, f"case_{rc}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--case", rc, "--case-json", path,
                       "--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
                env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr[-3000:]}")
                with open(path) as f:
                    results["cases"][rc] = json.load(f)
        except Exception as e:  # noqa: BLE001 (record and continue with the next policy)
            results["cases"][rc] = {"error": f"{type(e).__name__}: {e}"[-3000:], "traceback": traceback.format_exc()[-3000:]}
            print(f"[lora_step] {rc} failed: {str(e)[-500:]}", file=sys.stderr)
        results["cases"][rc]["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(a.out, "lora_step.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    return results


def table(r: dict) -> str:
    ar = r.get("arithmetic", {})
    lines = [f"LoRA r{r['lora']['rank']} a{r['lora']['alpha']:g} on {r['model']}, {r['precision']}, latent "
             f"{r['latent']} ({ar.get('tokens', '?')} tokens), text {r['text_tokens']}, {r['device']}",
             "| recompute | step s | tokens/s | MFU (3x fwd / 2x fwd) | static GiB | peak GiB | LoRA est. GiB "
             "| full FT est. GiB (1 GPU) |", "|---|---|---|---|---|---|---|---|"]
    for rc, c in r["cases"].items():
        lora_est = ar.get("lora_gib", {}).get(rc, {}).get("total", float("nan"))
        full_est = ar.get("full_finetune_gib", {}).get(rc, {}).get("total", float("nan"))
        if "step_time_s" in c:
            lines.append(f"| {rc} | {c['step_time_s']:.3f} | {c['tokens_per_s']:.0f} | {100 * c['mfu']:.1f}% / "
                         f"{100 * c['mfu_lora_work']:.1f}% | {c.get('static_gib', float('nan')):.1f} | "
                         f"{c.get('peak_gib', float('nan')):.1f} | {lora_est:.1f} | {full_est:.1f} |")
        else:
            why = c.get("skipped") or ("error: " + c.get("error", "?")[-100:])
            lines.append(f"| {rc} | {why} | | | | | {lora_est:.1f} | {full_est:.1f} |")
    if "full_finetune_min_gpus" in ar:
        lines.append(f"full fine-tuning needs at least {ar['full_finetune_min_gpus']} x {r['gpu_gib']:.0f} GiB GPUs "
                     f"(core.memory.min_gpus, full recompute); LoRA trains {ar['lora_params'] / 1e6:.1f} M of "
                     f"{ar['base_params'] / 1e9:.2f} B parameters")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
