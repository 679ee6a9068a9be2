"""Megatron-Core optimizer state <-> canonical, parameter-shaped tensors (for the checkpoint format).

The checkpoint stores, per canonical parameter, its fp32 main value and Adam's `exp_avg` and
`exp_avg_sq`, shaped like the (tensor-parallel-local) parameter. Megatron keeps them in three ways:
- FP32Optimizer: the model parameters themselves are the main parameters;
- Float16OptimizerWithFloat16Params (bf16 training): fp32 copies beside bf16 model parameters;
- DistributedOptimizer: each data-parallel rank owns a contiguous range of every flattened
  parameter; saving assembles each whole tensor on ONE rank of the data-parallel group, its
  writer (a reduce of the zero-padded ranges; writers chosen to balance the bytes), so a rank
  holds about 1/DP of the state on the host, as in training, and every rank writes its share;
  loading keeps the rank's range.
Adam's scalar `step` is the same for every parameter and travels as one integer.

`model` arguments are anything with `named_parameters()` yielding canonical names (one MUG-DiT
stage, or the trainer's view over all of a rank's pipeline chunks).

Sharded extra state (the trainer's EMA): `main_shards` gives, per trainable parameter, the fp32
main values THIS rank's optimizer holds - the whole (TP-local) tensor, or the distributed
optimizer's flat range of it. State kept per shard (`ema[name]` shaped like the shard) is
assembled by `gather_states(..., extra=...)` like the Adam moments and cut back into shards by
`shard_like`.
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


def main_shards(opt, model) -> dict[str, torch.Tensor]:
    """{canonical name: this rank's fp32 main values of the parameter} (a live view: the optimizer
    updates it in place). Under the distributed optimizer it is the rank's flat range (1-D, maybe
    absent when the rank owns none of the parameter), else the whole TP-local tensor."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for inner in inner_optimizers(opt):
        if isinstance(inner, DistributedOptimizer):
            for param, name in names.items():
                main = _dist_main(inner, param)
                if main is not None:
                    out[name] = main
        else:
            for param, main in _pairs(inner):
                out[names[param]] = main
    return out


@torch.no_grad()
def shard_like(opt, model, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut whole (TP-local) fp32 tensors into this rank's shards, as `main_shards` lays them out."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for inner in inner_optimizers(opt):
        if isinstance(inner, DistributedOptimizer):
            for param, name in names.items():
                main = _dist_main(inner, param)
                if main is not None and name in full:
                    rng = inner._get_model_param_range_map(param)["param"]
                    out[name] = full[name].reshape(-1)[rng.start:rng.end].to(main).clone()
        else:
            for param, main in _pairs(inner):
                name = names[param]
                if name in full:
                    out[name] = full[name].to(main).reshape(main.shape).clone()
    return out


def shards_state(opt) -> bool:
    """True when the optimizer state is sharded over the data-parallel group (Megatron's
    distributed optimizer): `gather_states` then gives each rank only the tensors it writes."""
    return any(isinstance(inner, DistributedOptimizer) for inner in inner_optimizers(opt))


def gather_states(opt, model, extra: dict[str, dict[str, torch.Tensor]] | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """{canonical name: {"param", "exp_avg", "exp_avg_sq", *extra}} (fp32, TP-local shape, fresh
    CPU copies). `extra` = {key: {name: shard}}: more per-shard state (EMA) assembled the same way.

    Under the distributed optimizer (collective: every rank calls it) each whole tensor is
    assembled on one rank of the data-parallel group only, and only that rank's tensors are
    returned; otherwise every trainable tensor of this rank."""
    extra = extra or {}
    keys = KEYS + tuple(extra)
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for inner in inner_optimizers(opt):
        if isinstance(inner, DistributedOptimizer):
            group = inner.data_parallel_group
            size, me = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
            loads = [0] * size   # elements assembled per rank so far: the next goes to the least
            mine = set().union(*(set(buf.param_index_map) for buf in inner.buffers))
            # Same parameters in the same order on every rank (the model's order): a rank that
            # owns no range of a parameter still joins its reduce with zeros.
            for param, name in names.items():
                if param not in mine:
                    continue
                writer = min(range(size), key=loads.__getitem__)
                loads[writer] += param.numel()
                flat = {k: torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                        for k in ("param",) + keys}
                main = _dist_main(inner, param)
                if main is not None:
                    rng = inner._get_model_param_range_map(param)["param"]
                    state = inner.optimizer.state.get(main, {})
                    flat["param"][rng.start:rng.end] = main.detach().float()
                    for k in KEYS:
                        if k in state:
                            flat[k][rng.start:rng.end] = state[k].float()
                    for k, shards in extra.items():
                        if name in shards:
                            flat[k][rng.start:rng.end] = shards[name].float()
                dst = torch.distributed.get_global_rank(group, writer)
                for t in flat.values():
                    torch.distributed.reduce(t, dst=dst, group=group)
                if writer == me:  # .cpu() of a CPU tensor is the same tensor: fresh, no clone needed
                    out[name] = {k: v.view(param.shape).cpu() for k, v in flat.items()}
        else:
            for param, main in _pairs(inner):
                state = inner.optimizer.state.get(main, {})
                entry = {"param": main.detach().float().cpu().clone()}
                for k in KEYS:
                    entry[k] = (state[k].float().cpu().clone() if k in state
                                else torch.zeros(main.shape, dtype=torch.float32))
                for k, shards in extra.items():
                    entry[k] = shards[names[param]].float().cpu().clone()
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
        for group in inner.optimizer.param_groups:
            if group.get("fused"):   # torch's fused Adam keeps `step` on the parameter's device
                for main in group["params"]:
                    if main in inner.optimizer.state:
                        st = inner.optimizer.state[main]
                        st["step"] = st["step"].to(main.device, torch.float32)
        for param, name in names.items():   # the (maybe bf16) model copy of the main values
            if name in states:
                param.copy_(states[name]["param"].to(param))
