"""Worker of parity_tests/test_grad_norm.py, run through `python -m mugv.torch_backend.parallel.launch`.

    grad_norm_worker.py OUT_JSON [--lora]

Builds the tiny DiT at the launcher's layout (optionally with LoRA adapters), runs one
forward/backward, and writes Megatron's gradient norm (the one its optimizer clips with) next to
the norm of the gathered global gradient.
"""
from __future__ import annotations

import json
import sys


def main(out: str, lora: bool) -> None:
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    from mugv.core.dit import dit_config, dit_schema
    from mugv.torch_backend.training.parallelize import finalize_grads
    from mugv.core.train import OptimizerConfig
    from mugv.parity_tests.test_dit import loss_weights, make_inputs
    from mugv.torch_backend.parallel.launch import worker_layout
    from mugv.torch_backend.training.parallelize import forward_backward, megatron_optimizer, parallelize

    torch.manual_seed(0)
    cfg = dit_config("tiny")
    par = worker_layout()
    pm = parallelize(cfg, par, seed=3, wrap_ddp=not lora)
    specs = dit_schema(cfg).as_dict()
    if lora:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from mugv.core.lora import LoRAConfig
        from mugv.torch_backend.models.lora import apply_lora
        specs.update(apply_lora(pm.stages[0], cfg, LoRAConfig(rank=4, alpha=4.0), seed=5).as_dict())
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        with torch.no_grad():   # B = 0 at init gives A no gradient: draw the GLOBAL B, keep our slice
            for i, (name, q) in enumerate(pm.stages[0].named_parameters()):
                if "lora_b" in name:
                    full = torch.randn(specs[name].shape, generator=torch.Generator().manual_seed(i)) * 0.02
                    q.copy_(full[specs[name].shard_index(tp_rank, tp)])
        pm.chunks = [DistributedDataParallel(config=pm.config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True), module=pm.stages[0])]
        pm.config.no_sync_func = pm.chunks[0].no_sync
        pm.config.finalize_model_grads_func = finalize_grads
    inputs = {k: torch.from_numpy(v.copy()) for k, v in make_inputs("t2v").items()}
    inputs["frame_indice"] = inputs["frame_indice"].long()
    weights = torch.from_numpy(loss_weights().copy())

    def loss_fn(out, batch):
        loss = (out.float() * weights).sum()
        return loss, {"loss": loss.detach()}

    opt = megatron_optimizer(pm, OptimizerConfig(lr=1e-3, clip_grad=1.0))
    for c in pm.chunks:
        c.zero_grad_buffer()
    forward_backward(pm, iter([inputs]), loss_fn, num_microbatches=1)
    opt.prepare_grads()
    megatron_norm = float(opt.get_grad_norm())
    # The true norm, from the schema rather than the parameters' tags: a slice of a split tensor
    # counts on every TP rank, a replicated one once (equal on all ranks after finalize_grads).
    tp_rank = ps.get_tensor_model_parallel_rank()
    local = torch.zeros((), dtype=torch.float64)
    for name, q in pm.chunks[0].module.named_parameters():
        if q.requires_grad and (specs[name].tp_axis is not None or tp_rank == 0):
            local += (q.main_grad.double() ** 2).sum()
    dist.all_reduce(local, group=ps.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"megatron": megatron_norm, "true": float(local.sqrt())}, f)


if __name__ == "__main__":
    main(sys.argv[1], "--lora" in sys.argv[2:])
