"""Multi-GPU runs of MUG-DiT through torch_backend/training/parallelize.py (issue 14): sharded parity,
weak scaling and a checkpoint resharded between layouts. Launched with torchrun; N = the world.

    # device machine (N GPUs, NCCL, bf16), repo root, after `source scripts/install_gpu_offline.sh`:
    torchrun --nproc_per_node 1 benchmarks/multi_gpu.py --parts scaling --out $OUT/multi_gpu_1
    torchrun --nproc_per_node N benchmarks/multi_gpu.py --out $OUT/multi_gpu_N \
        --baseline $OUT/multi_gpu_1/multi_gpu.json
    # here (CPU, gloo, 2 processes, tiny model, fp32; checks the script, ~1-2 min on 2 cores):
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py --cpu --out /tmp/mgpu

Parts (`--parts`, default parity,scaling,reshard; each writes into OUT/multi_gpu.json, rank 0):

(a) parity: a small MUG-DiT (GPU: the "small" size, hidden 288, 4 heads, 4 layers; CPU: "tiny"),
    random nonzero weights, a batch of N samples (T2V and I2V rows, padded text), loss
    sum(output * w). Reference: the same model computed whole on every rank (layout TP=PP=CP=1;
    every rank takes the whole batch, so the DDP average of identical gradients is the one-GPU
    gradient exactly). Layouts: TP=2 + SP, PP=2 (1F1B, 2 micro-batches), DP=2 with the
    distributed optimizer, CP=2 (Ulysses, torch_backend/models/context_parallel.py; recorded "not
    available" where `parallelize` refuses it); with N > 2 the rest of the world is data parallel
    (each layout's `sizes` in the JSON; the "dp2_distopt" case is then DP=N). Each layout's loss and every global gradient
    (`gather_full_grads`, DP sums restored) against the reference: per tensor max|a - b| / max|b|
    (the worst tensor is reported) and the relative L2 error over all gradients. On the GPU
    (bf16) the same model is also run in fp32 (TF32 off): `bf16_vs_fp32` is the one-GPU bf16
    run's own error, the scale any sharded bf16 error should be compared with. Pass: the
    parity_tests/tolerances.py rows ("sharded" for loss and outputs, "sharded_grad" for gradients,
    per dtype).
(b) scaling: the 10B width (hidden 3456, 48 heads) with the most layers that fit one GPU
    (core/memory.py estimate with full recompute, <= 85% of the GPU; `--layers` to force), one
    720p sample per GPU (latent 14 x 90 x 160 = 50,400 tokens), text 300, full recompute, data
    parallel with the distributed optimizer (the layout docs/parallelism.md recommends when the
    model fits one GPU; `--scaling-layout cp` for Ulysses CP when available). `--warmup` + `--steps`
    Adam steps; per GPU: median step time, tokens/s, MFU (core/flops.py model FLOPs over the H100
    bf16 peak of the GPU, core/flops.py BF16_PEAKS), peak memory. Weak-scaling efficiency = tokens/s per GPU at N / at 1
    GPU, the 1-GPU number from `--baseline` (the JSON of a 1-process run; the launch with N = 1
    is the baseline).
(c) reshard: at TP=2 (+SP), one Adam step on batch 1, the weights saved with
    checkpoints/torch_io.py (each TP rank its slices), the loss and gradients of batch 2 taken;
    then the same checkpoint (in the local temp dir) is read at PP=2 (a different layout: the read
    reshards) and batch 2's loss and gradients are recomputed there. They must agree within the "sharded" rows. (Only the
    weights are carried: the optimizer state is not part of this check.)

Every case that fails records its error and the script goes on to the next. Prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

warnings.filterwarnings("ignore")  # Megatron's Apex/Transformer Engine fallbacks

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# set-up helpers

def _env(cpu: bool):
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
    import torch
    if cpu:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def random_params(cfg, seed: int = 1) -> dict:
    """Every parameter random and nonzero (`parity_tests/helpers.py`; the schema's init has
    zero-initialised output tables, which would hide sharding mistakes)."""
    from mugv.parity_tests.helpers import random_params as draw
    return draw(cfg, seed)


def make_batch(cfg, thw, text_len: int, batch: int, seed: int, device) -> tuple[dict, object]:
    """Model inputs (half the rows I2V, padded text) and the loss weights, on `device`."""
    import torch

    from mugv.core.dit import patch_grid
    g = torch.Generator().manual_seed(seed)
    t, h, w = thw
    tp = patch_grid(cfg, thw)[0]
    x_mask = torch.ones(batch, t, dtype=torch.bool)
    x_mask[1::2, 0] = False                                   # odd rows: image-to-video
    lengths = torch.randint(1, text_len + 1, (batch,), generator=g)
    text_mask = torch.arange(text_len)[None] < lengths[:, None]
    text_mask[0] = True
    b = {"x": torch.randn(batch, cfg.in_channels, t, h, w, generator=g),
         "timestep": torch.rand(batch, generator=g) * 1000,
         "text": torch.randn(batch, text_len, cfg.text_dim, generator=g),
         "text_mask": text_mask, "x_mask": x_mask, "fps": torch.full((batch,), 24.0),
         "frame_indice": (torch.arange(tp + 2)[None] + torch.arange(batch)[:, None]).long()}
    weights = torch.randn(batch, cfg.out_channels, t, h, w, generator=g)
    return {k: v.to(device) for k, v in b.items()}, weights.to(device)


def _device():
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _coords(pm) -> dict:
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "cp": ps.get_context_parallel_rank() if hasattr(ps, "get_context_parallel_rank") else 0,
            "dp": ps.get_data_parallel_rank() if pm.data_parallel > 1 else 0,
            "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True)}


def loss_and_grads(pm, batch: dict, weights, whole_batch: bool, microbatches: int = 1,
                   forward_only: bool = False) -> tuple[float, dict]:
    """Loss sum(output * w) over the global batch and every GLOBAL gradient (as a sum over the
    batch). Each data-parallel rank takes its rows (unless `whole_batch`: every rank the whole
    batch, the reference). Pipeline layouts split the rows into `microbatches`."""
    import torch
    import torch.distributed as dist

    from mugv.torch_backend.training.parallelize import forward_backward, gather_full_grads
    c = _coords(pm)
    n = batch["x"].shape[0]
    dp = 1 if whole_batch else pm.data_parallel
    r = 0 if whole_batch else c["dp"]
    rows = slice(r * n // dp, (r + 1) * n // dp)
    mine = {k: v[rows] for k, v in batch.items()}
    w = weights[rows]
    per = mine["x"].shape[0] // microbatches
    micro = [{k: v[i * per:(i + 1) * per] for k, v in mine.items()} for i in range(microbatches)]
    ws = iter([w[i * per:(i + 1) * per] for i in range(microbatches)])
    losses = []

    def loss_fn(output, _batch):
        loss = (output.float() * next(ws)).sum()
        losses.append(loss.detach().clone())  # Megatron divides the returned loss in place
        return loss, {"loss": loss.detach().clone()}

    for chunk in pm.chunks:
        chunk.zero_grad_buffer()
    forward_backward(pm, iter(micro), loss_fn, num_microbatches=microbatches, forward_only=forward_only)
    # One rank per data-parallel replica reports its rows' loss: the last stage, TP and CP rank 0.
    reports = c["last_stage"] and c["tp"] == 0 and c["cp"] == 0 and (not whole_batch or dist.get_rank() == 0)
    total = torch.stack(losses).sum().reshape(1).float() if (losses and reports) else torch.zeros(1, device=w.device)
    dist.all_reduce(total)
    if forward_only:
        return float(total.item()), {}
    # Megatron's schedule scales each micro-batch by 1/microbatches and DDP averages over DP.
    scale = microbatches * dp
    grads = {k: (g * scale).cpu() for k, g in gather_full_grads(pm).items()}
    return float(total.item()), grads


def compare(grads: dict, ref: dict, tol: dict | None = None) -> dict:
    """Worst per-tensor relative error (max|a - b| / max|b|), the relative L2 error over all
    gradients, and (with `tol` = {"rtol", "atol"}) the tensors outside max|a - b| <= atol + rtol max|b|
    (the rule of parity_tests/tolerances.py, per tensor)."""
    worst, worst_name, num, den, failing = 0.0, None, 0.0, 0.0, []
    for name, b in ref.items():
        if name not in grads:
            continue
        a, b = grads[name].double(), b.double()
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        err = diff / scale if scale > 0 else diff
        if not err <= worst:  # also catches NaN
            worst, worst_name = err, name
        if tol is not None and not diff <= tol["atol"] + tol["rtol"] * scale:
            failing.append(name)
        num += ((a - b) ** 2).sum().item()
        den += (b ** 2).sum().item()
    missing = sorted(set(ref) - set(grads))
    return {"grad_worst_rel": worst, "grad_worst_name": worst_name,
            "grad_l2_rel": (num / den) ** 0.5 if den > 0 else float("nan"), "missing": missing[:5],
            "grads_outside_tolerance": failing[:10], "n_grads_outside_tolerance": len(failing)}


def _loss_ok(loss: float, ref: float, tol: dict) -> bool:
    return abs(loss - ref) <= tol["atol"] + tol["rtol"] * abs(ref)


def tolerance_rows(dtype: str) -> dict:
    try:
        from mugv.parity_tests.tolerances import tolerance
        return {"sharded": dataclasses.asdict(tolerance("sharded", dtype)),
                "sharded_grad": dataclasses.asdict(tolerance("sharded_grad", dtype))}
    except Exception:  # noqa: BLE001 (parity_tests absent from an install)
        rows = {"float32": ({"rtol": 1e-5, "atol": 1e-7}, {"rtol": 1e-5, "atol": 1e-7}),
                "bfloat16": ({"rtol": 2e-2, "atol": 1e-3}, {"rtol": 5e-2, "atol": 0.0})}[dtype]
        return {"sharded": rows[0], "sharded_grad": rows[1]}


def _record(results: dict, key: str, fn) -> None:
    import torch.distributed as dist
    t0 = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 (record and go on; all ranks fail the same way in practice)
        msg = f"{type(e).__name__}: {e}"
        results[key] = {"error": msg[-3000:], "traceback": traceback.format_exc()[-3000:]}
        print(f"[multi_gpu rank {dist.get_rank()}] {key} failed: {msg[-500:]}", file=sys.stderr, flush=True)
    if isinstance(results[key], dict):
        results[key]["seconds"] = time.perf_counter() - t0
    dist.barrier()
    _free()


def _free() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cp_available() -> bool:
    """Whether this checkout's parallelize accepts context_parallel > 1 (Ulysses)."""
    import inspect

    from mugv.torch_backend.training import parallelize as par_mod
    src = inspect.getsource(par_mod.parallelize)
    return "no context-parallel" not in src and "context_parallel" in src


# ---------------------------------------------------------------------------------------------
# (a) parity

def parity(cpu: bool, world: int) -> dict:
    import torch

    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.core.dit import dit_config
    from mugv.core.parallel import ParallelConfig
    from mugv.torch_backend.training.parallelize import parallelize

    cfg = dit_config("tiny" if cpu else "small")
    thw, text_len = ((3, 8, 12), 10) if cpu else ((4, 16, 16), 24)
    bf16 = not cpu or os.environ.get("MUGV_BENCH_BF16") == "1"
    dtype = torch.bfloat16 if bf16 else torch.float32
    dname = "bfloat16" if bf16 else "float32"
    params = random_params(cfg)
    batch_n = max(2, world)
    batch, weights = make_batch(cfg, thw, text_len, batch_n, seed=5, device=_device())
    out: dict = {"model": f"hidden {cfg.hidden_size}, heads {cfg.num_heads}, depth {cfg.depth}",
                 "latent": list(thw), "text": text_len, "batch": batch_n, "dtype": dname,
                 "tolerances": tolerance_rows(dname), "layouts": {}}

    def build(par, pdtype):
        pm = parallelize(cfg, par, seed=None, params_dtype=pdtype, bucket_size=10 ** 6)
        for stage in pm.stages:
            load_canonical(stage, cfg, params)
        return pm

    sizes = {}

    def run(par, pdtype, whole=False, micro=1):
        pm = build(par, pdtype)
        loss, grads = loss_and_grads(pm, batch, weights, whole_batch=whole, microbatches=micro)
        sizes.update(tp=par.tensor_parallel, pp=par.pipeline_parallel, cp=par.context_parallel,
                     dp=pm.data_parallel, micro_batches=micro)
        del pm
        _free()
        return loss, grads

    ref_loss, ref = run(ParallelConfig(), dtype, whole=True)
    out["reference_loss"] = ref_loss
    if dtype != torch.float32:
        try:
            l32, g32 = run(ParallelConfig(), torch.float32, whole=True)
            out["bf16_vs_fp32"] = {"loss_rel": abs(ref_loss - l32) / abs(l32), **compare(ref, g32)}
            del g32
        except Exception as e:  # noqa: BLE001
            out["bf16_vs_fp32"] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    tol = out["tolerances"]
    cases = {"tp2_sp": (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 1),
             "pp2": (ParallelConfig(pipeline_parallel=2), 2),
             "dp2_distopt": (ParallelConfig(distributed_optimizer=True), 1),
             "cp2": (ParallelConfig(context_parallel=2), 1)}
    for tag, (par, micro) in cases.items():
        if world % par.model_parallel or (tag == "dp2_distopt" and world < 2):
            out["layouts"][tag] = {"skipped": f"world {world} does not hold this layout"}
            continue
        if tag == "cp2" and not _cp_available():
            out["layouts"][tag] = {"skipped": "not available: parallelize() refuses context_parallel > 1"}
            continue
        try:
            loss, grads = run(par, dtype, micro=micro)
            c = compare(grads, ref, tol["sharded_grad"])
            loss_rel = abs(loss - ref_loss) / abs(ref_loss)
            ok = _loss_ok(loss, ref_loss, tol["sharded"]) and not c["n_grads_outside_tolerance"] and not c["missing"]
            out["layouts"][tag] = {"sizes": dict(sizes), "loss": loss, "loss_rel": loss_rel, **c, "pass": bool(ok)}
        except Exception as e:  # noqa: BLE001
            out["layouts"][tag] = {"error": f"{type(e).__name__}: {e}"[-2000:],
                                   "traceback": traceback.format_exc()[-2000:]}
            _free()
    return out


# ---------------------------------------------------------------------------------------------
# (b) scaling

def fit_layers(cfg_fn, thw, text: int, gpu_bytes: float, fraction: float = 0.85) -> int:
    """Most layers whose one-GPU training estimate (core/memory.py, full recompute, TP=1, Adam
    unsharded, EMA included: conservative) stays under `fraction` of the GPU."""
    from mugv.core.memory import estimate
    from mugv.core.parallel import ParallelConfig
    best = 1
    for depth in range(1, 57):
        e = estimate(cfg_fn(depth), ParallelConfig(), 1, thw, text_tokens=text, recompute="full")
        if e.total <= fraction * gpu_bytes:
            best = depth
    return best


def scaling(cpu: bool, world: int, layers: int | None, warmup: int, steps: int, layout: str,
            baseline: str | None) -> dict:
    import torch
    import torch.distributed as dist

    from mugv.core.dit import dit_config, video_tokens
    from mugv.core.flops import benchmark_peak, step_flops
    peak_flops, _ = benchmark_peak(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                             os.environ.get("MUGV_PEAK_TFLOPS"))
    from mugv.core.parallel import ParallelConfig
    from mugv.core.train import OptimizerConfig
    from mugv.torch_backend.training.parallelize import forward_backward, megatron_optimizer, parallelize

    if cpu:
        def cfg_fn(d):
            return dit_config("tiny", depth=d)
        thw, text = (3, 8, 12), 10
        gpu_bytes = 2 * GIB
    else:
        def cfg_fn(d):
            return dit_config("10B", depth=d)
        thw, text = (14, 90, 160), 300
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    depth = layers or (2 if cpu else fit_layers(cfg_fn, thw, text, gpu_bytes))
    cfg = cfg_fn(depth)
    cp = 2 if layout == "cp" else 1
    if cp > 1 and not _cp_available():
        return {"skipped": "context parallel not available in parallelize()"}
    par = ParallelConfig(context_parallel=cp, distributed_optimizer=world > 1)
    dtype = torch.float32 if cpu else torch.bfloat16
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    pm = parallelize(cfg, par, seed=0, params_dtype=dtype, **recompute)
    opt = megatron_optimizer(pm, OptimizerConfig(lr=1e-5, min_lr=1e-5, warmup_steps=0))
    # one sample per data-parallel replica (CP ranks of a replica share it)
    batch, _ = make_batch(cfg, thw, text, 1, seed=11 + _coords(pm)["dp"], device=_device())
    target = torch.randn((1, cfg.out_channels, *thw), generator=torch.Generator().manual_seed(3)).to(batch["x"].device)

    def loss_fn(output, _b):
        loss = ((output.float() - target) ** 2).mean()
        return loss, {"loss": loss.detach().clone()}

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for chunk in pm.chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        metrics = forward_backward(pm, iter([batch]), loss_fn, num_microbatches=1)
        ok, _, _ = opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics[0]["loss"]) if metrics else None)
    step = statistics.median(times[warmup:])
    tokens = video_tokens(cfg, thw)
    replicas = pm.data_parallel
    per_gpu = tokens * replicas / world / step
    fl = step_flops(cfg, thw, text, layers=depth, recompute_layers=depth)
    out = {"layout": f"DP={pm.data_parallel} x CP={cp}, distributed optimizer {par.distributed_optimizer}, "
                     "full recompute", "world": world, "layers": depth, "hidden": cfg.hidden_size,
           "latent": list(thw), "tokens_per_sample": tokens, "text": text, "dtype": str(dtype),
           "step_times": times, "step_time_s": step, "losses": losses,
           "tokens_per_s_per_gpu": per_gpu,
           "mfu": fl.model * replicas / world / step / peak_flops,
           "hfu": fl.hardware * replicas / world / step / peak_flops}
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / GIB], device=_device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out["peak_gib_max_rank"] = peak.item()
    if world == 1:
        out["weak_scaling_efficiency"] = 1.0
    elif baseline and os.path.exists(baseline):
        with open(baseline) as f:
            base = json.load(f).get("scaling", {})
        if base.get("layers") == depth and "tokens_per_s_per_gpu" in base:
            out["baseline_tokens_per_s_per_gpu"] = base["tokens_per_s_per_gpu"]
            out["weak_scaling_efficiency"] = per_gpu / base["tokens_per_s_per_gpu"]
        else:
            out["weak_scaling_efficiency"] = None
            out["baseline_note"] = f"baseline {baseline} has no scaling run with {depth} layers"
    del pm, opt
    return out


# ---------------------------------------------------------------------------------------------
# (c) a checkpoint written at TP=2 read at PP=2

def reshard(cpu: bool, world: int, ckpt_root: str) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.checkpoints.torch_io import load_torch, save_torch, to_numpy
    from mugv.core.dit import dit_config, dit_schema
    from mugv.core.parallel import ParallelConfig
    from mugv.core.train import OptimizerConfig
    from mugv.torch_backend.training.parallelize import megatron_optimizer, parallelize

    if world % 2:
        return {"skipped": f"world {world}: needs an even number of processes"}
    cfg = dit_config("tiny" if cpu else "small")
    thw, text_len = ((3, 8, 12), 10) if cpu else ((4, 16, 16), 24)
    dtype = torch.float32 if cpu else torch.bfloat16
    dname = "float32" if cpu else "bfloat16"
    n = max(2, world)
    b1, w1 = make_batch(cfg, thw, text_len, n, seed=21, device=_device())
    b2, w2 = make_batch(cfg, thw, text_len, n, seed=22, device=_device())

    a = parallelize(cfg, ParallelConfig(tensor_parallel=2, sequence_parallel=True), seed=None,
                    params_dtype=dtype, bucket_size=10 ** 6)
    load_canonical(a.stages[0], cfg, random_params(cfg))
    opt = megatron_optimizer(a, OptimizerConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, clip_grad=0.0))
    loss1, _ = loss_and_grads(a, b1, w1, whole_batch=False)
    ok, _, _ = opt.step()
    # Megatron's fp32 optimizer points param.grad at main_grad for its step: without zero_grad the
    # next backward would add each gradient twice.
    opt.zero_grad()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    # canonical names, TP slices; the format's model group is fp32 (bf16 values are exact in it)
    local = {k: p.detach().float() for k, p in a.stages[0].named_parameters()}
    path = save_torch(ckpt_root, 1, {"model": (dit_schema(cfg), local)}, tp_rank=tp_rank, tp_size=tp,
                      write_replica=_coords(a)["dp"] == 0, overwrite=True)
    loss_a, grads_a = loss_and_grads(a, b2, w2, whole_batch=False)
    del a, opt
    _free()
    dist.barrier()

    b = parallelize(cfg, ParallelConfig(pipeline_parallel=2), seed=None, params_dtype=dtype, bucket_size=10 ** 6)
    arrays = {k: to_numpy(v).astype(np.float32) for k, v in load_torch(path, dit_schema(cfg)).items()}
    for stage in b.stages:
        load_canonical(stage, cfg, arrays)
    loss_b, grads_b = loss_and_grads(b, b2, w2, whole_batch=False, microbatches=2)
    del b
    tol = tolerance_rows(dname)
    c = compare(grads_b, grads_a, tol["sharded_grad"])
    loss_rel = abs(loss_b - loss_a) / abs(loss_a)
    ok_all = _loss_ok(loss_b, loss_a, tol["sharded"]) and not c["n_grads_outside_tolerance"] and not c["missing"]
    return {"written": "TP=2 + SP", "read": "PP=2", "checkpoint": str(path), "dtype": dname,
            "loss_step1": loss1, "adam_step_ok": bool(ok), "loss_next_written_layout": loss_a,
            "loss_next_read_layout": loss_b, "loss_rel": loss_rel, **c, "pass": bool(ok_all),
            "tolerances": tol}


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="multi_gpu_bench", help="output directory (multi_gpu.json)")
    ap.add_argument("--cpu", "--tiny", dest="cpu", action="store_true", help="gloo, tiny model, fp32")
    ap.add_argument("--parts", default="parity,scaling,reshard")
    ap.add_argument("--layers", type=int, default=None, help="scaling: layers (default: most that fit one GPU)")
    ap.add_argument("--scaling-layout", choices=("dp", "cp"), default="dp")
    ap.add_argument("--baseline", default=None, help="scaling: JSON of the 1-GPU run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="with --cpu: run the parity part in bf16 too")
    a = ap.parse_args(argv)
    if not a.cpu and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        import torch
        if not torch.cuda.is_available():
            print("[multi_gpu] no CUDA device: running the CPU configuration (--cpu)", file=sys.stderr)
            a.cpu = True
    if a.bf16:
        os.environ["MUGV_BENCH_BF16"] = "1"
    torch = _env(a.cpu)
    import torch.distributed as dist

    from mugv.torch_backend.parallel.launch import init_distributed
    if "RANK" not in os.environ:  # plain `python`: a world of one
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(900.0)
    world, rank = dist.get_world_size(), dist.get_rank()
    results: dict = {"world": world, "backend": dist.get_backend(), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    os.makedirs(a.out, exist_ok=True)
    parts = a.parts.split(",")
    if "parity" in parts:
        _record(results, "parity", lambda: parity(a.cpu, world))
    if "reshard" in parts:
        # the checkpoint goes to the local temp dir, not OUT (it is not a result)
        ckpt = os.path.join(tempfile.gettempdir(), f"mugv_multi_gpu_reshard_{os.environ.get('MASTER_PORT', '0')}")
        _record(results, "reshard", lambda: reshard(a.cpu, world, ckpt))
    if "scaling" in parts:
        _record(results, "scaling", lambda: scaling(a.cpu, world, a.layers, a.warmup, a.steps,
                                                    a.scaling_layout, a.baseline))
    if rank == 0:
        with open(os.path.join(a.out, "multi_gpu.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(table(results), flush=True)
    from mugv.torch_backend.parallel import megatron_compat
    megatron_compat.destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def table(r: dict) -> str:
    lines = [f"multi_gpu: world {r['world']} ({r['backend']}, {r['device']})"]
    p = r.get("parity", {})
    if "layouts" in p:
        lines += [f"(a) parity, {p['dtype']}, {p['model']}, latent {p['latent']}, batch {p['batch']}; "
                  f"tolerances {p['tolerances']}"]
        if "bf16_vs_fp32" in p and "grad_worst_rel" in p["bf16_vs_fp32"]:
            e = p["bf16_vs_fp32"]
            lines.append(f"  one-GPU bf16 vs fp32: loss {e['loss_rel']:.2e}, worst grad {e['grad_worst_rel']:.2e} "
                         f"({e['grad_worst_name']}), grad L2 {e['grad_l2_rel']:.2e}")
        lines += ["| layout | loss rel | worst grad rel (tensor) | grad L2 rel | pass |", "|---|---|---|---|---|"]
        for tag, v in p["layouts"].items():
            if "loss_rel" in v:
                lines.append(f"| {tag} | {v['loss_rel']:.2e} | {v['grad_worst_rel']:.2e} ({v['grad_worst_name']}) | "
                             f"{v['grad_l2_rel']:.2e} | {v['pass']} |")
            else:
                lines.append(f"| {tag} | {v.get('skipped') or 'error: ' + v.get('error', '?')[-120:]} | | | |")
    elif p:
        lines.append(f"(a) parity: error: {p.get('error', '?')[-300:]}")
    s = r.get("reshard", {})
    if "loss_rel" in s:
        lines.append(f"(c) reshard {s['written']} -> {s['read']}: next loss {s['loss_next_written_layout']:.6g} vs "
                     f"{s['loss_next_read_layout']:.6g} (rel {s['loss_rel']:.2e}), worst grad rel "
                     f"{s['grad_worst_rel']:.2e}, pass {s['pass']}")
    elif s:
        lines.append(f"(c) reshard: {s.get('skipped') or 'error: ' + s.get('error', '?')[-300:]}")
    c = r.get("scaling", {})
    if "step_time_s" in c:
        eff = c.get("weak_scaling_efficiency")
        lines.append(f"(b) scaling: {c['layout']}, {c['layers']} layers x hidden {c['hidden']}, "
                     f"{c['tokens_per_sample']} tokens/sample, world {c['world']}: step {c['step_time_s']:.3f} s, "
                     f"{c['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, MFU {100 * c['mfu']:.1f}% "
                     f"(HFU {100 * c['hfu']:.1f}%), peak {c.get('peak_gib_max_rank', float('nan')):.1f} GiB, "
                     f"weak-scaling efficiency {'n/a' if eff is None else f'{100 * eff:.1f}%'}")
    elif c:
        lines.append(f"(b) scaling: {c.get('skipped') or 'error: ' + c.get('error', '?')[-300:]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
