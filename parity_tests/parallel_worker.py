"""Worker of parity_tests/test_parallel_layouts.py, run through `python -m mugv.torch_backend.parallel.launch`.

    parallel_worker.py layouts OUT_DIR   every 2-process layout of the tiny DiT (the launcher's
                                         own layout first), results to OUT_DIR/layouts.npz, a TP=2
                                         checkpoint to OUT_DIR/ckpt
    parallel_worker.py mixed OUT_DIR     the launcher's layout alone (4 processes: TP=2+SP x PP=2)
    parallel_worker.py die|hang          rank 1 exits (code 7) or sleeps before an all_reduce
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

KINDS = ("t2v", "i2v")  # both with padded text (make_inputs masks sample 1's last tokens)


def failing(mode: str) -> None:
    import torch
    import torch.distributed as dist

    from mugv.torch_backend.parallel.launch import init_distributed, worker_layout
    init_distributed(worker_layout().timeout_s)
    x = torch.ones(3) * dist.get_rank()
    dist.barrier()
    if dist.get_rank() == 1:
        if mode == "die":
            os._exit(7)
        time.sleep(3600)  # hang
    dist.all_reduce(x)


ODD_W = 5  # context-parallel batches: latent W 5 -> 3 x 3 x 3 = 27 video tokens + start/end = 29


def odd_batches():
    """T2V and I2V batches (padded text) whose sequence, 29 tokens, divides neither by CP=2 nor by
    CP x TP = 4: make_inputs' latents cropped to width ODD_W, and the loss weights likewise."""
    import torch

    from mugv.parity_tests.test_dit import loss_weights, make_inputs
    batches = {}
    for kind in KINDS:
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in make_inputs(kind).items()}
        t["x"] = t["x"][..., :ODD_W].contiguous()
        t["frame_indice"] = t["frame_indice"].long()
        batches[kind] = t
    return batches, torch.from_numpy(np.ascontiguousarray(loss_weights()[..., :ODD_W]))


# CP=2 with recomputation: it re-runs the all-to-alls and carries the padding mask through checkpoints
CP_RECOMPUTE = {"cp2_full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                "cp2_selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"])}


def four_head_config():
    """The tiny DiT with 4 heads of 36 (TP=2 x CP=2 needs heads divisible by 4)."""
    import dataclasses

    from mugv.parity_tests.test_dit import CFG
    return dataclasses.replace(CFG, num_heads=4)


def layouts(out_dir: str, mixed: bool = False) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.dit import dit_schema
    from mugv.core.parallel import ParallelConfig
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs
    from mugv.torch_backend.parallel.launch import worker_layout

    torch.set_num_threads(1)
    weights = torch.from_numpy(loss_weights())
    batches = {}
    for kind in KINDS:
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in make_inputs(kind).items()}
        t["frame_indice"] = t["frame_indice"].long()
        batches[kind] = t
    odd, odd_weights = odd_batches()
    launched = worker_layout()
    timeout = launched.timeout_s
    if mixed:  # 4 processes
        cases = [("mixed", launched, CFG, batches, weights),
                 ("tp2sp_cp2", ParallelConfig(tensor_parallel=2, sequence_parallel=True, context_parallel=2,
                                              timeout_s=timeout), four_head_config(), odd, odd_weights),
                 ("pp2_cp2", ParallelConfig(pipeline_parallel=2, context_parallel=2, timeout_s=timeout),
                  CFG, odd, odd_weights)]
    else:
        cases = [("tp2sp", launched, CFG, batches, weights),
                 ("tp2", dataclasses.replace(launched, sequence_parallel=False), CFG, batches, weights),
                 ("pp2", ParallelConfig(pipeline_parallel=2, timeout_s=timeout), CFG, batches, weights),
                 ("dp2", ParallelConfig(distributed_optimizer=True, timeout_s=timeout), CFG, batches, weights),
                 ("cp2", ParallelConfig(context_parallel=2, distributed_optimizer=True, timeout_s=timeout),
                  CFG, odd, odd_weights)]
        cases += [(tag, ParallelConfig(context_parallel=2, timeout_s=timeout), CFG, odd, odd_weights)
                  for tag in CP_RECOMPUTE]
    results = {}
    for tag, par, cfg, case_batches, case_weights in cases:
        t0 = time.perf_counter()
        pm, grads, case_results = run_layout(tag, par, cfg, case_batches, case_weights, **CP_RECOMPUTE.get(tag, {}))
        results.update(case_results)
        if tag == "dp2":  # one distributed-Adam step from the i2v gradients just reduced
            results.update(adam_step(pm, grads))
        if tag == "tp2sp":  # the output at TP=2, and a checkpoint written at TP=2
            from megatron.core import parallel_state as ps
            with torch.no_grad():
                results["tp2sp.t2v.out"] = pm.stages[0](**batches["t2v"]).numpy()
            save_torch(os.path.join(out_dir, "ckpt"), 0, {"model": (dit_schema(CFG), pm.stages[0].state_dict())},
                       tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
        if tag == "cp2":  # the forward alone: every CP rank returns the whole output
            with torch.no_grad():
                out = pm.stages[0](**odd["i2v"])
            whole = [torch.empty_like(out) for _ in range(dist.get_world_size())]
            dist.all_gather(whole, out)
            results["cp2.i2v.out"] = torch.stack(whole).numpy()
        results[f"{tag}.seconds"] = np.array(time.perf_counter() - t0)
    if not mixed:
        results.update(interleaved(batches, weights))
    if dist.get_rank() == 0:
        np.savez(os.path.join(out_dir, "layouts.npz"), **results)
    from mugv.torch_backend.parallel import megatron_compat
    megatron_compat.destroy_parallel()


def run_layout(tag, par, cfg, batches, weights, **config_overrides):
    """`par` through parallelize + DDP + forward_backward for each batch kind: the loss and the
    global gradients (keys "{tag}.{kind}.loss" / ".{param}"), scaled to the reference's sum over
    the batch. Data-parallel ranks take their own rows; tensor- and context-parallel ranks the
    whole batch (the model shards the sequence over CP itself and returns the whole output).
    `config_overrides` go to the TransformerConfig (recomputation)."""
    import torch
    import torch.distributed as dist

    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.parity_tests.test_dit import random_params
    from mugv.torch_backend.training.parallelize import forward_backward, gather_full_grads, parallelize

    params = random_params(cfg)
    pm = parallelize(cfg, par, seed=None, bucket_size=4000, **config_overrides)
    for stage in pm.stages:
        load_canonical(stage, cfg, params)
    dp = pm.data_parallel
    dp_rank = dist.get_rank() if dp > 1 else 0  # (DP only in the pure DP=2 case)
    results, grads = {}, None
    for kind in KINDS:
        batch, w = batches[kind], weights
        if dp > 1:
            rows = slice(dp_rank * 2 // dp, (dp_rank + 1) * 2 // dp)
            batch, w = {k: v[rows] for k, v in batch.items()}, weights[rows]
        for chunk in pm.chunks:
            chunk.zero_grad_buffer()

        def loss_fn(output, _batch, w=w):
            loss = (output * w).sum()
            return loss, {"loss": loss.detach().clone()}
        metrics = forward_backward(pm, iter([batch]), loss_fn, num_microbatches=1)
        loss = metrics[0]["loss"].reshape(1) if metrics else torch.zeros(1)
        dist.all_reduce(loss)  # the last stage's loss (PP) or the DP ranks' parts summed
        if dp == 1:  # every TP x CP rank of the last stage computed the same loss
            loss /= pm.par.tensor_parallel * pm.par.context_parallel
        grads = gather_full_grads(pm)
        # Megatron's DDP averages over data-parallel ranks; the reference sums the batch.
        results[f"{tag}.{kind}.loss"] = loss.numpy()
        for name, g in grads.items():
            results[f"{tag}.{kind}.{name}"] = (g * dp).numpy()
    return pm, grads, results


def adam_step(pm, grads) -> dict:
    """Megatron's distributed Adam (parallelize.megatron_optimizer, state sharded over the 2 DP
    ranks, no clipping) takes one step; Adam's first step is lr * g / (|g| + eps) per element with
    g the DP-averaged gradient. Returns the largest deviation in units of lr."""
    from mugv.core.train import OptimizerConfig
    from mugv.torch_backend.training.parallelize import megatron_optimizer

    lr = 1e-3
    before = {n: p.detach().clone() for n, p in pm.stages[0].named_parameters()}
    opt = megatron_optimizer(pm, OptimizerConfig(lr=lr, min_lr=0.0, eps=1e-8, clip_grad=0.0))
    ok, _, _ = opt.step()
    worst = 0.0
    for n, p in pm.stages[0].named_parameters():
        g = grads[n]
        expected = before[n] - lr * g / (g.abs() + 1e-8)
        worst = max(worst, ((p.detach() - expected).abs().max() / lr).item())
    return {"dp2.adam_step_ok": np.array(bool(ok)), "dp2.adam_maxdiff_over_lr": np.array(worst)}


def interleaved(batches, weights) -> dict:
    """PP=2 x 2 virtual stages (interleaved 1F1B) on a 4-layer variant of the tiny DiT, two
    micro-batches of one sample; loss and global gradients (Megatron scales each micro-batch's
    loss by 1 / num_microbatches, undone here)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.core.parallel import ParallelConfig
    from mugv.parity_tests.test_dit import CFG, random_params
    from mugv.torch_backend.training.parallelize import forward_backward, gather_full_grads, parallelize

    cfg = dataclasses.replace(CFG, depth=4)
    params = random_params(cfg)
    pm = parallelize(cfg, ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), seed=None)
    for stage in pm.stages:
        load_canonical(stage, cfg, params)
    results = {"pp2vpp2.layers": np.array([list(s.layer_range) for s in pm.stages])}
    for kind in KINDS:
        for chunk in pm.chunks:
            chunk.zero_grad_buffer()
        micro = [{k: v[i:i + 1] for k, v in batches[kind].items()} for i in range(2)]
        ws = iter([weights[0:1], weights[1:2]])
        losses = []

        def loss_fn(output, _batch):
            loss = (output * next(ws)).sum()
            losses.append(loss.detach().clone())  # Megatron divides the returned loss in place
            return loss, {"loss": loss.detach().clone()}
        forward_backward(pm, iter(micro), loss_fn, num_microbatches=2)
        loss = torch.stack(losses).sum().reshape(1) if losses else torch.zeros(1)
        dist.all_reduce(loss)
        results[f"pp2vpp2.{kind}.loss"] = loss.numpy()
        for name, g in gather_full_grads(pm).items():
            results[f"pp2vpp2.{kind}.{name}"] = (g * 2).numpy()
    return results


if __name__ == "__main__":
    if sys.argv[1] in ("layouts", "mixed"):
        layouts(sys.argv[2], mixed=sys.argv[1] == "mixed")
    else:
        failing(sys.argv[1])
