"""Megatron-Core optimizer state <-> canonical, parameter-shaped tensors (for the checkpoint format).

The checkpoint stores, per canonical parameter, its fp32 main value and Adam's `exp_avg` and
`exp_avg_sq`, shaped like the (tensor-parallel-local) parameter. Megatron keeps them in three ways:
- FP32Optimizer: the model parameters themselves are the main parameters;
- Float16OptimizerWithFloat16Params (bf16 training): fp32 copies beside bf16 model parameters;
- DistributedOptimizer: each data-parallel rank owns a contiguous range of every flattened
  parameter; saving assembles the whole tensor (all-reduce over the data-parallel group of the
  zero-padded ranges), loading keeps the rank's range.
Adam's scalar `step` is the same for every parameter and travels as one integer.
"""
from __future__ import annotations

from typing import Iterator

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

KEYS = ("exp_avg", "exp_avg_sq")


def inner_optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _pairs(inner) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model parameter, main parameter) of a non-distributed Megatron optimizer."""
    if isinstance(inner, Float16OptimizerWithFloat16Params):
        for g16, g32, g_fp32 in zip(inner.float16_groups, inner.fp32_from_float16_groups,
                                    inner.fp32_from_fp32_groups):
            yield from zip(g16, g32)
            yield from ((p, p) for p in g_fp32)
    elif isinstance(inner, FP32Optimizer):
        for group in inner.optimizer.param_groups:
            yield from ((p, p) for p in group["params"])
    else:
        raise TypeError(f"unsupported Megatron optimizer {type(inner).__name__}")


def _dist_main(inner: DistributedOptimizer, param) -> torch.Tensor | None:
    if param not in inner.model_param_group_index_map:
        return None
    gi, go = inner.model_param_group_index_map[param]
    return inner.optimizer.param_groups[gi]["params"][go]


def optimizer_step_count(opt) -> int:
    for inner in inner_optimizers(opt):
        for state in inner.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def gather_states(opt, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{canonical name: {"param", "exp_avg", "exp_avg_sq"}} (fp32, TP-local shape, CPU).

    Collective under the distributed optimizer: every rank calls it."""
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for inner in inner_optimizers(opt):
        if isinstance(inner, DistributedOptimizer):
            group = inner.data_parallel_group
            mine = set().union(*(set(buf.param_index_map) for buf in inner.buffers))
            # Same parameters in the same order on every rank (the model's order): a rank that
            # owns no range of a parameter still joins its all-reduce with zeros.
            for param, name in names.items():
                if param not in mine:
                    continue
                flat = {k: torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                        for k in ("param",) + KEYS}
                main = _dist_main(inner, param)
                if main is not None:
                    rng = inner._get_model_param_range_map(param)["param"]
                    state = inner.optimizer.state.get(main, {})
                    flat["param"][rng.start:rng.end] = main.detach().float()
                    for k in KEYS:
                        if k in state:
                            flat[k][rng.start:rng.end] = state[k].float()
                for t in flat.values():
                    torch.distributed.all_reduce(t, group=group)
                out[name] = {k: v.view(param.shape).cpu() for k, v in flat.items()}
        else:
            for param, main in _pairs(inner):
                state = inner.optimizer.state.get(main, {})
                entry = {"param": main.detach().float().cpu().clone()}
                for k in KEYS:
                    entry[k] = (state[k].float().cpu().clone() if k in state
                                else torch.zeros(main.shape, dtype=torch.float32))
                out[names[param]] = entry
    return out


@torch.no_grad()
def scatter_states(opt, model: torch.nn.Module, states: dict[str, dict[str, torch.Tensor]],
                   step: int) -> None:
    """Inverse of `gather_states`: set main params, Adam moments and step; model params follow."""
    names = {p: n for n, p in model.named_parameters()}
    step_t = torch.tensor(float(step))
    for inner in inner_optimizers(opt):
        if isinstance(inner, DistributedOptimizer):
            for param, name in names.items():
                main = _dist_main(inner, param)
                if main is None:
                    continue
                rng = inner._get_model_param_range_map(param)["param"]
                src = states[name]
                main.copy_(src["param"].reshape(-1)[rng.start:rng.end].to(main))
                inner.optimizer.state[main] = {"step": step_t.clone(), **{
                    k: src[k].reshape(-1)[rng.start:rng.end].to(main).clone() for k in KEYS}}
        else:
            for param, main in _pairs(inner):
                src = states[names[param]]
                main.copy_(src["param"].to(main))
                inner.optimizer.state[main] = {"step": step_t.clone(), **{
                    k: src[k].to(main).clone() for k in KEYS}}
        for param, name in names.items():   # the (maybe bf16) model copy of the main values
            if name in states:
                param.copy_(states[name]["param"].to(param))
