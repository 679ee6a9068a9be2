"""LoRA on the Megatron-Core MUG-DiT: attach, freeze, merge/unmerge, save and load adapters.

The maths and the parameter schema live in `core/lora.py`. Here each targeted linear (Megatron's
ColumnParallelLinear / RowParallelLinear, or a replicated torch Linear) keeps its own parameters
and names and gains two submodules, `lora_a` and `lora_b`, so the adapter parameters are named
`<base>.lora_a.weight` / `<base>.lora_b.weight` as in the schema. Its forward becomes

    base(x) + (alpha / r) * B(A(x))

with the tensor-parallel collectives on the r-wide activation only (never on a full-size one):

| base layer          | A             | B             | collective on a = A x (r wide)                   |
|---------------------|---------------|---------------|--------------------------------------------------|
| column (tp_axis 0)  | replicated    | split, axis 0 | identity fwd / all-reduce bwd; with sequence     |
|                     |               |               | parallelism all-gather fwd / reduce-scatter bwd  |
| row (tp_axis 1)     | split, axis 1 | replicated    | all-reduce fwd / identity bwd; with sequence     |
|                     |               |               | parallelism reduce-scatter fwd / all-gather bwd  |

Under sequence parallelism each rank sees only its chunk of tokens in A (column) or B (row), so
that weight's gradient is partial: it is tagged `sequence_parallel = True` and Megatron's
`finalize_model_grads` sums it over the tensor-parallel group, as for the norms.

The wrapper is the module's own `forward` attribute (no hooks), so activation recomputation
(`tensor_parallel.checkpoint` around whole layers) simply re-runs it.

Use `apply_lora` directly, or `lora_model_hook(...)` as the Trainer's `model_hook` (it returns the
adapter schema, so the trainer checkpoints the adapters with the model).
"""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from mugv.checkpoints.format import Checkpoint, CheckpointError, CheckpointWriter, latest_checkpoint
from mugv.checkpoints.torch_io import load_torch, save_torch
from mugv.torch_backend.models.dit_layers import mark_tensor_parallel
from mugv.core.dit import DiTConfig
from mugv.core.lora import LoRAConfig, LoRATarget, is_adapter_name, lora_schema, lora_targets, merge_arrays
from mugv.core.schema import Schema
from mugv.core.validate import ConfigError, from_dict, to_dict

ADAPTER_GROUP = "lora"


def _tp() -> tuple[int, int]:
    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return 0, 1


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel group (a replicated
    activation read by split weights). Contiguous first: an in-place all-reduce of a
    non-contiguous gradient does nothing on gloo (see models/dit.py::_SumGradOverTP)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


class _ReduceFromTP(torch.autograd.Function):
    """Forward sums partial products over the tensor-parallel group; identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _lora_branch(module, x: torch.Tensor) -> torch.Tensor:
    """(alpha / r) B(A(x)) with this rank's shards and the collectives of the module docstring."""
    kind, tp = module.lora_kind, module.lora_tp
    sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
    x = x.to(module.lora_a.weight.dtype)
    if module.lora_dropout > 0:
        x = torch.nn.functional.dropout(x, module.lora_dropout, module.training)
    a = module.lora_a(x)
    if kind == "column" and tp > 1:
        a = (tensor_parallel.gather_from_sequence_parallel_region(a, tensor_parallel_output_grad=True)
             if sp else _CopyToTP.apply(a))
    elif kind == "row" and tp > 1:
        a = tensor_parallel.reduce_scatter_to_sequence_parallel_region(a) if sp else _ReduceFromTP.apply(a)
    return module.lora_b(a) * module.lora_scale


def _lora_forward(module, x, *args, **kwargs):
    """The adapted module's forward: base output (dtype of x) plus the LoRA branch."""
    base_dtype = module.weight.dtype
    out = type(module).forward(module, x.to(base_dtype), *args, **kwargs)
    if isinstance(out, tuple):  # Megatron's parallel linears return (output, output_bias)
        y, bias = out
    else:
        y, bias = out, None
    y = y.to(x.dtype)
    if not module.lora_merged:
        y = y + _lora_branch(module, x).to(y.dtype)
    return (y, bias) if isinstance(out, tuple) else y


def _kind(module: torch.nn.Module, target: LoRATarget) -> str:
    if isinstance(module, tensor_parallel.ColumnParallelLinear):
        return "column"
    if isinstance(module, tensor_parallel.RowParallelLinear):
        return "row"
    if isinstance(module, torch.nn.Linear):
        return "replicated"
    raise TypeError(f"LoRA target {target.name}: a {type(module).__name__}, expected a Column/Row "
                    f"parallel linear or a torch Linear")


def adapted_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{canonical base name: module} of every linear carrying an adapter."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "lora_kind")}


def apply_lora(model: torch.nn.Module, cfg: DiTConfig, lora: LoRAConfig,
               seed: Optional[int] = 0) -> Schema:
    """Attach adapters to `model` (a `build_dit` model or pipeline stage), freeze every base
    parameter and, if `lora.base_dtype` is "bfloat16", hold the adapted base weights in bf16.

    Adapters are drawn from the schema's Init rules (A uniform, B = 0) with a generator seeded by
    `seed`, each rank keeping its slice of the GLOBAL tensors, so every tensor-parallel layout
    starts from the same adapters; `seed=None` leaves them to be loaded. Adapter dtype = the
    model's parameter dtype (bf16 training keeps fp32 main copies in the optimizer).

    Returns the schema of the adapters this stage holds (the Trainer's `model_hook` contract).
    """
    if adapted_modules(model):
        raise ValueError("apply_lora: the model already carries LoRA adapters")
    rank, tp = _tp()
    if lora.dropout > 0 and tp > 1:
        raise NotImplementedError(f"LoRAConfig.dropout = {lora.dropout} with tensor-parallel size {tp}: "
                                  "replicated activations would draw different masks per rank; use 0")
    schema = lora_schema(cfg, lora).as_dict()
    named = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    held: list[str] = []
    gen_device = next(model.parameters()).device
    gen = None if seed is None else torch.Generator(device=gen_device).manual_seed(seed)
    for target in lora_targets(cfg, lora):  # schema order: every stage draws every tensor
        a_spec, b_spec = schema[target.a_name], schema[target.b_name]
        fulls = []
        if gen is not None:
            std = a_spec.init.std
            fulls = [(torch.rand(a_spec.shape, generator=gen, device=gen_device) * 2 - 1) * std,
                     torch.zeros(b_spec.shape, device=gen_device)]
        module = named.get(target.name)
        if module is None:  # another pipeline stage's layer
            continue
        kind = _kind(module, target)
        dtype, device = module.weight.dtype, module.weight.device
        a_shape, b_shape = a_spec.shard_shape(tp), b_spec.shard_shape(tp)
        module.lora_a = torch.nn.Linear(a_shape[1], a_shape[0], bias=False, device=device, dtype=dtype)
        module.lora_b = torch.nn.Linear(b_shape[1], b_shape[0], bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            if fulls:
                module.lora_a.weight.copy_(fulls[0][a_spec.shard_index(rank, tp)])
                module.lora_b.weight.copy_(fulls[1][b_spec.shard_index(rank, tp)])
        sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
        # Under sequence parallelism the weight that sees only this rank's tokens has a partial
        # gradient: Megatron's finalize_model_grads sums `sequence_parallel` parameters over TP.
        module.lora_a.weight.sequence_parallel = sp and kind == "column"
        module.lora_b.weight.sequence_parallel = sp and kind == "row"
        for spec, weight in ((a_spec, module.lora_a.weight), (b_spec, module.lora_b.weight)):
            if spec.tp_axis is not None:   # the split factor counts on every rank in the grad norm
                mark_tensor_parallel(weight, spec.tp_axis)
        module.lora_kind, module.lora_tp = kind, tp
        module.lora_scale, module.lora_dropout = lora.scale, lora.dropout
        module.lora_merged = False
        module.lora_config = lora
        if lora.base_dtype == "bfloat16":
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if getattr(module, "bias", None) is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)
        module.forward = types.MethodType(_lora_forward, module)
        held += [target.a_name, target.b_name]
    model.lora_config = lora
    return lora_schema(cfg, lora).select(held)


def lora_model_hook(cfg: DiTConfig, lora: LoRAConfig, seed: int = 0,
                    base: Optional[Mapping[str, np.ndarray] | str | os.PathLike] = None):
    """A Trainer `model_hook`: load the base weights (canonical arrays, or a mugv checkpoint path
    whose "model" group is read slice by slice), then `apply_lora`. Returns the hook."""
    def hook(model):
        if base is not None:
            load_base_weights(model, cfg, base)
        return apply_lora(model, cfg, lora, seed=seed)
    return hook


def load_base_weights(model: torch.nn.Module, cfg: DiTConfig,
                      base: Mapping[str, np.ndarray] | str | os.PathLike) -> None:
    """Copy base DiT weights into `model` (this rank's TP slices): from global canonical arrays, or
    from a mugv checkpoint (a step directory or a run root; its newest step), reading only the
    slices this rank holds. Adapter arrays stored beside the model are ignored."""
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.core.dit import dit_schema

    if isinstance(base, Mapping):
        load_canonical(model, cfg, {k: v for k, v in base.items() if not is_adapter_name(k)})
        return
    ckpt = open_checkpoint(base)
    schema = dit_schema(cfg)
    rank, tp = _tp()
    names = set(ckpt.names("model"))
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise CheckpointError(f"{ckpt.path}: group 'model' lacks {len(missing)} DiT parameter(s), "
                              f"e.g. {missing[:4]}")
    mine = dict(model.named_parameters())
    with torch.no_grad():
        for spec in schema:
            if spec.name in mine:
                index = spec.shard_index(rank, tp) if spec.tp_axis is not None else None
                arr = ckpt.read("model", spec.name, index)
                mine[spec.name].copy_(torch.from_numpy(np.asarray(arr, dtype=np.float32)))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint from a step directory, or the newest one under a run root."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return Checkpoint(path)
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a directory holding one")
    return Checkpoint(latest)


# ---------------------------------------------------------------------------------------------
# Merge / unmerge


@torch.no_grad()
def _fold(model: torch.nn.Module, sign: float, merged: bool) -> int:
    count = 0
    for name, m in adapted_modules(model).items():
        if m.lora_merged == merged:
            raise ValueError(f"LoRA on {name} is already {'merged' if merged else 'unmerged'}")
        # this rank's block of B A: column (out/tp, r)(r, in), row (out, r)(r, in/tp); no collective
        delta = (m.lora_b.weight.double() @ m.lora_a.weight.double()) * (sign * m.lora_scale)
        m.weight.copy_((m.weight.double() + delta).to(m.weight.dtype))
        m.lora_merged = merged
        count += 1
    return count


def merge_lora(model: torch.nn.Module) -> int:
    """W <- W + (alpha / r) B A on every adapted linear (this rank's slices); the adapters are then
    skipped in forward. Returns the number of merged linears. With bf16 base weights the merged
    weights are rounded to bf16."""
    return _fold(model, 1.0, True)


def unmerge_lora(model: torch.nn.Module) -> int:
    """Inverse of `merge_lora` (up to rounding): W <- W - (alpha / r) B A."""
    return _fold(model, -1.0, False)


# ---------------------------------------------------------------------------------------------
# Adapters alone, in the checkpoint format


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors by canonical name (TP-local slices)."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


def save_adapters(model: torch.nn.Module, cfg: DiTConfig, root: str | os.PathLike, step: int = 0,
                  meta: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Save the adapters alone (group "lora", plus the DiT and LoRA configs) as checkpoint `step`
    under `root`. Collective over all ranks, like `save_torch`; data-parallel replicas other than
    the first write nothing. Returns the committed directory."""
    lora = getattr(model, "lora_config", None)
    if lora is None:
        raise ValueError("save_adapters: the model carries no LoRA adapters (apply_lora first)")
    tensors = adapter_tensors(model)
    schema = lora_schema(cfg, lora)
    rank, tp = _tp()
    dp_first = (not parallel_state.model_parallel_is_initialized()
                or parallel_state.get_data_parallel_rank() == 0)
    return save_torch(root, step, {ADAPTER_GROUP: (schema, tensors)}, tp_rank=rank, tp_size=tp,
                      write_replica=dp_first, config={"dit": to_dict(cfg), "lora": to_dict(lora)},
                      schema_hash=schema.hash(), meta=meta or {}, overwrite=overwrite)


def adapter_config(path: str | os.PathLike | Checkpoint) -> tuple[Checkpoint, LoRAConfig]:
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    if ADAPTER_GROUP not in ckpt.groups() or "lora" not in ckpt.config:
        raise CheckpointError(f"{ckpt.path}: not a LoRA adapter checkpoint (group {ADAPTER_GROUP!r} "
                              f"and config 'lora' expected; groups {ckpt.groups()})")
    return ckpt, from_dict(LoRAConfig, ckpt.config["lora"])


def load_adapters(model: torch.nn.Module, cfg: DiTConfig, path: str | os.PathLike) -> LoRAConfig:
    """Load saved adapters onto a base model, at any tensor-parallel size (each rank reads its
    slices). A model without adapters gets them attached first (`apply_lora` with the saved
    config); one with adapters must carry the same config. The DiT config must match."""
    ckpt, lora = adapter_config(path)
    ckpt.check_config(to_dict(cfg), section="dit")
    have = getattr(model, "lora_config", None)
    if have is None:
        apply_lora(model, cfg, lora, seed=None)
    elif have != lora:
        raise ConfigError(f"load_adapters: the model carries {have}, the checkpoint {lora}")
    rank, tp = _tp()
    mine = adapter_tensors(model)
    schema = lora_schema(cfg, lora).select(list(mine))
    arrays = load_torch(ckpt, schema, ADAPTER_GROUP, tp_rank=rank, tp_size=tp)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in arrays.items():
            params[name].copy_(t.to(params[name]))
    return lora


def extract_adapters(train_checkpoint: str | os.PathLike, cfg: DiTConfig, lora: LoRAConfig,
                     root: str | os.PathLike, group: str = "model", step: Optional[int] = None) -> Path:
    """Copy the adapters out of a Trainer checkpoint (group "model" = fp32 main values, or "ema")
    into a small adapter-only checkpoint under `root`. Numpy only: no model, no process group."""
    ckpt = open_checkpoint(train_checkpoint)
    schema = lora_schema(cfg, lora)
    have = set(ckpt.names(group))
    missing = [n for n in schema.names if n not in have]
    if missing:
        raise CheckpointError(f"{ckpt.path}: group {group!r} lacks {len(missing)} adapter array(s) of "
                              f"{lora}, e.g. {missing[:3]}")
    writer = CheckpointWriter(root, ckpt.step if step is None else step)
    writer.create({ADAPTER_GROUP: schema})
    for spec in schema:
        writer.write(ADAPTER_GROUP, spec.name, ckpt.read(group, spec.name).astype(np.float32))
    return writer.commit(config={"dit": to_dict(cfg), "lora": to_dict(lora)}, schema_hash=schema.hash(),
                         meta={"source": str(ckpt.path), "group": group})


def read_adapters(path: str | os.PathLike) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """(LoRA config, global adapter arrays) of an adapter checkpoint."""
    ckpt, lora = adapter_config(path)
    return lora, {n: ckpt.read(ADAPTER_GROUP, n) for n in ckpt.names(ADAPTER_GROUP)}


def export_merged_official(base: Mapping[str, np.ndarray] | str | os.PathLike, cfg: DiTConfig,
                           adapters: str | os.PathLike, out_file: str | os.PathLike,
                           dtype: Optional[str] = None) -> Path:
    """Merge saved adapters into base weights (canonical arrays, or a mugv checkpoint's "model"
    group) and write the official layout (`dit.pt` torch pickle or `.safetensors`), loadable by
    the official MUG-V code. `dtype` ("bfloat16", "float32") casts the export; default: the base's."""
    from mugv.checkpoints.official_dit import export_official
    from mugv.checkpoints.torch_io import from_numpy
    from mugv.core.dit import dit_schema
    import ml_dtypes

    if not isinstance(base, Mapping):
        ckpt = open_checkpoint(base)
        base = {n: ckpt.read("model", n) for n in dit_schema(cfg).names}
    lora, arrays = read_adapters(adapters)
    merged = merge_arrays({k: v for k, v in base.items() if not is_adapter_name(k)}, arrays, cfg, lora)
    official = export_official(merged, cfg)
    if dtype is not None:
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        official = {k: np.asarray(v).astype(np_dtype) for k, v in official.items()}
    tensors = {k: from_numpy(np.asarray(v)) for k, v in official.items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(out_file))
    else:
        torch.save(tensors, str(out_file))
    return out_file
