"""Parallel layouts for MUG-DiT on Megatron-Core, declared apart from the model code.

`parallelize(dit, par)` turns a `core/parallel.py::ParallelConfig` into a running layout, using only
what the model already supports (torch_backend/models/dit.py):
- tensor parallel (+ sequence parallel): Megatron's Column/Row parallel linears from the layer
  spec, `sequence_parallel` on the TransformerConfig;
- pipeline parallel (+ virtual stages): one MUG-DiT stage per model chunk (`pre_process` on the
  first chunk of the first stage, `post_process` on the last chunk of the last stage, a contiguous
  layer range each, in Megatron's interleaved order), run by Megatron's schedules (1F1B, or
  interleaved 1F1B when `virtual_pipeline > 1`);
- context parallel (Ulysses, `torch_backend/models/context_parallel.py`): the model shards its sequence
  over Megatron's context-parallel group, self-attention exchanges sequence for heads with two
  all-to-alls, the output is gathered: every CP rank takes the same batch and returns the whole
  output. The loss is computed as without CP; gradients equal the single-process ones because
  Megatron's schedule multiplies a 2-tuple `loss_fn`'s loss by the CP size and its DDP averages
  over data-parallel x context-parallel ranks (each CP rank's gradient covers its own tokens);
- data parallel: Megatron's DDP (bucketed, overlapped grad reduce) and, with
  `distributed_optimizer`, the optimizer state sharded over data-parallel (x context-parallel)
  ranks.

The layout is checked by `check_layout` against the model and the world size BEFORE any model is
built (messages name the sizes; heads must divide TP x CP).

Gradients: `finalize_grads` is Megatron's `finalize_model_grads` (DP reduce, SP norm sums) plus
the one sum Megatron does not know about: the per-head q/k RMSNorm weights are replicated while
each TP rank's gradient covers only its own heads (tagged `partial_grad_over_tp` by the model;
Megatron sums such weights only when their names contain "q_layernorm"/"k_layernorm").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from mugv.core.dit import DiTConfig, sequence_length
from mugv.core.parallel import ParallelConfig, check_layout
from mugv.core.recipe import KernelConfig
from mugv.torch_backend.parallel import megatron_compat
from mugv.torch_backend.models.context_parallel import padded_length
from mugv.torch_backend.parallel.launch import init_distributed


@dataclasses.dataclass
class ParallelDiT:
    """A MUG-DiT laid out on this rank.

    chunks: this rank's model chunks (one, or `virtual_pipeline` with interleaving), each wrapped
        in Megatron's DDP when `wrap_ddp` (then `.module` is the MUGDiT stage).
    config: the Megatron TransformerConfig they share.
    par: the layout; data_parallel: the data-parallel size it left.
    layer_spec: the layer spec they were built from (kernels, attention), for copies of the model.
    """

    chunks: list
    config: object
    par: ParallelConfig
    data_parallel: int
    dit: DiTConfig
    layer_spec: object = None   # the MUG-DiT layer spec the chunks were built with
    compiled: tuple = (False, "not compiled")   # (layers torch.compile'd, why): KernelConfig.compile_layers

    @property
    def stages(self) -> list:
        """The bare MUGDiT modules (without DDP)."""
        return [getattr(c, "module", c) for c in self.chunks]


def chunk_layers(depth: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global layer indices of model chunk `chunk` on pipeline rank `pp_rank`, in Megatron's
    interleaved order: the depth is cut into pp x vpp equal pieces, piece v * pp + p lives on
    pipeline rank p as its chunk v (with vpp = 1: rank p holds the p-th block of depth / pp)."""
    per = depth // (pp * vpp)
    start = (chunk * pp + pp_rank) * per
    return range(start, start + per)


def parallelize(dit: DiTConfig, par: ParallelConfig, *, seed: Optional[int] = 0,
                params_dtype: torch.dtype = torch.float32, wrap_ddp: bool = True,
                bucket_size: Optional[int] = None, layer_spec=None, kernels: KernelConfig = KernelConfig(),
                hooked: bool = False, **config_overrides) -> ParallelDiT:
    """Initialise Megatron's parallel state for `par` and build this rank's part of MUG-DiT.

    Validates the layout first (`check_layout`, then no work: `LayoutError` names the sizes).
    Joins the torchrun world if there is one (see `mugv.torch_backend.parallel.launch`), else a world of
    one process. `seed` draws the same global model at any layout (None: leave undrawn, to load).
    `config_overrides` go to the TransformerConfig (e.g. recompute settings). `layer_spec`: the
    MUG-DiT layer spec (default: the one `kernels` asks for, `dit_layers.layer_spec_for`: the
    verified Triton kernels on a GPU, the plain-torch ops on a CPU, the attention backend and
    head-dim padding); under context parallelism its
    self-attention core is wrapped in Ulysses attention (`context_parallel.ulysses_layer_spec`).
    The layers are torch.compile'd where `kernels.compile_layers` and `dit_layers.compile_status`
    say (`hooked`: the caller changes the layers afterwards, as LoRA does).
    """
    from megatron.core import parallel_state as ps

    from mugv.torch_backend.models.dit import build_dit, transformer_config

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    dp = check_layout(par, dit, world)
    init_distributed(par.timeout_s)  # under torchrun: the layout's timeout on every collective
    megatron_compat.initialize_parallel(tp=par.tensor_parallel, pp=par.pipeline_parallel,
                                        cp=par.context_parallel, vpp=par.virtual_pipeline,
                                        seed=0 if seed is None else seed, timeout_s=par.timeout_s)
    pp, vpp = par.pipeline_parallel, par.virtual_pipeline
    fields = dict(sequence_parallel=par.sequence_parallel, **config_overrides)
    if pp > 1:
        fields.update(pipeline_model_parallel_size=pp, pipeline_dtype=params_dtype)
        if vpp > 1:
            fields.update(virtual_pipeline_model_parallel_size=vpp)
    config = transformer_config(dit, params_dtype=params_dtype, **fields)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    from mugv.torch_backend.models.dit_layers import compile_status, layer_spec_for
    recompute = bool(config_overrides.get("recompute_granularity"))
    compiled, compile_why = compile_status(kernels, device, recompute, par.context_parallel, hooked)
    if layer_spec is None:
        # The Triton kernels wherever kernels/verified.json records their parity on this GPU
        # (kernels/registry.py; or as `kernels.kernels` says), else their plain-torch references;
        # inside compiled layers the references (Inductor fuses them).
        layer_spec = layer_spec_for(kernels, device, compiled)
    chunks = []
    for v in range(vpp):
        layers = chunk_layers(dit.depth, pp, vpp, pp_rank, v)
        model = build_dit(dit, config, layer_spec, seed=seed, device=device,
                          pre_process=pp_rank == 0 and v == 0,
                          post_process=pp_rank == pp - 1 and v == vpp - 1, layers=layers)
        # finalize_model_grads asks every first/last stage whether it ties embeddings (GPT does).
        model.share_embeddings_and_output_weights = False
        if compiled:   # KernelConfig.compile_layers: each layer's forward and backward through Inductor
            for layer in model.layers.values():
                layer.compile(dynamic=False)
        chunks.append(model)
    if wrap_ddp:
        chunks = wrap_in_ddp(chunks, config, par, dp, bucket_size)
    return ParallelDiT(chunks, config, par, dp, dit, layer_spec, (compiled, compile_why))


def wrap_in_ddp(stages: Sequence[torch.nn.Module], config, par: ParallelConfig, data_parallel: int,
                bucket_size: Optional[int] = None) -> list:
    """Megatron's DDP around each model chunk (fp32 grad buffers, bucketed; the grad reduce
    overlaps backward only when there is data parallelism, and only the first chunk's buckets),
    with the distributed optimizer's layout when `par` asks for it, and the TransformerConfig's
    no-sync and finalize-grads hooks set for Megatron's schedules. The one place that wraps DDP:
    `parallelize(wrap_ddp=True)`, the Trainer (after its model_hook) and benchmarks/dit_step.py."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce and data_parallel > 1,
        use_distributed_optimizer=par.distributed_optimizer, bucket_size=bucket_size)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                      # only the first chunk's buckets overlap with backward
                                      disable_bucketing=i > 0)
              for i, m in enumerate(stages)]
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_grads
    return chunks


def recompute_overrides(recompute: str, recompute_layers: int = 0) -> dict:
    """TransformerConfig fields for `TrainConfig.recompute` (none | selective | full): full
    recomputes `recompute_layers` layers per uniform chunk (0 -> 1, every layer's input kept)."""
    return {"none": {}, "selective": dict(recompute_granularity="selective"),
            "full": dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=recompute_layers or 1)}[recompute]


def finalize_grads(chunks: Sequence, num_tokens=None, pg_collection=None, force_all_reduce: bool = False) -> None:
    """Megatron's `finalize_model_grads` (data-parallel reduce or reduce-scatter, SP norm sums),
    then the TP sum of the per-head q/k norm weights' partial gradients (see the module docstring).
    Its signature is Megatron's `finalize_model_grads_func`, so the schedules call it."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(list(chunks), num_tokens, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.main_grad for c in chunks for p in c.parameters()
             if p.requires_grad and getattr(p, "partial_grad_over_tp", False)]
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def forward_backward(pm: ParallelDiT, batches: Iterator[dict], loss_fn: Callable, num_microbatches: int,
                     forward_only: bool = False) -> list:
    """Run `num_microbatches` micro-batches through Megatron's schedule for this layout (no
    pipelining, 1F1B, or interleaved 1F1B) and, with DDP, finalize the gradients.

    batches: yields the model's keyword inputs (x, timestep, text, text_mask, x_mask, fps,
        frame_indice) for each micro-batch; every pipeline stage draws the same micro-batches
        (the conditioning masks and sizes are needed on every stage).
    loss_fn(output, batch) -> (scalar loss, dict of metrics), on the last stage. Megatron divides
        the returned loss by num_microbatches (and multiplies it by the context-parallel size) IN
        PLACE: metrics must be clones, not `.detach()`. Under CP the output is the whole (gathered)
        output on every CP rank: compute the same loss as without CP (no scaling); return a
        2-tuple (Megatron's 3-tuple per-token form would skip the CP factor).
    Returns the metrics dicts of the last stage (empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(**batch)
        return out, lambda output: loss_fn(output, batch)

    peek = next(batches)
    b = peek["x"].shape[0]
    # Stages exchange one packed tensor [hidden; text; 14 conditioning rows] (models/dit.py). Each
    # rank sends its own hidden rows (the sequence padded to a multiple of CP x TP_sp, divided by
    # CP and by TP under SP) with the whole text and conditioning; Megatron divides seq_length by
    # CP and (SP) TP: pass CP x TP_sp times the local length.
    shards = pm.par.context_parallel * (pm.par.tensor_parallel if pm.config.sequence_parallel else 1)
    seq = padded_length(sequence_length(pm.dit, tuple(peek["x"].shape[2:])), shards)
    packed = shards * (seq // shards + peek["text"].shape[1] + 14)
    if len(pm.chunks) == 1:
        data = _prepend(peek, batches)
    else:  # interleaved: one iterator per model chunk, each yielding the same micro-batches
        items = [peek] + [next(batches) for _ in range(num_microbatches - 1)]
        data = [iter(list(items)) for _ in pm.chunks]
    pp, vpp = pm.par.pipeline_parallel, pm.par.virtual_pipeline
    return get_forward_backward_func(pp_size=pp, vp_size=vpp if vpp > 1 else None)(
        forward_step_func=forward_step, data_iterator=data, model=pm.chunks,
        num_microbatches=num_microbatches, seq_length=packed, micro_batch_size=b,
        forward_only=forward_only)


def _prepend(first, rest):
    yield first
    yield from rest


def gather_full_grads(pm: ParallelDiT) -> dict[str, torch.Tensor]:
    """Every parameter's GLOBAL gradient (canonical names), on every rank: distributed-optimizer
    shards all-gathered over DP, TP slices concatenated along the schema's `tp_axis`, pipeline
    stages exchanged. For tests and debugging (it moves the whole gradient)."""
    from megatron.core import parallel_state as ps

    from mugv.core.dit import dit_schema

    specs = dit_schema(pm.dit).as_dict()
    # the distributed optimizer shards gradients over data-parallel x context-parallel ranks
    dp_cp = pm.data_parallel * pm.par.context_parallel
    if pm.par.distributed_optimizer and dp_cp > 1:
        group = ps.get_data_parallel_group(with_context_parallel=True)
        rank = ps.get_data_parallel_rank(with_context_parallel=True)
        for chunk in pm.chunks:
            for buffer in chunk.buffers:
                for bucket in buffer.buckets:
                    shards = list(bucket.grad_data.chunk(dp_cp))
                    mine = shards[rank].clone()
                    dist.all_gather(shards, mine, group=group)
    tp_group, tp = ps.get_tensor_model_parallel_group(), pm.par.tensor_parallel
    mine = {}
    for stage in pm.stages:
        for name, p in stage.named_parameters():
            g = (p.main_grad if hasattr(p, "main_grad") else p.grad).detach().float().clone()
            if specs[name].tp_axis is not None and tp > 1:
                parts = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(parts, g.contiguous(), group=tp_group)
                g = torch.cat(parts, dim=specs[name].tp_axis)
            mine[name] = g
    if pm.par.pipeline_parallel == 1:
        return mine
    stages = [None] * pm.par.pipeline_parallel
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return {k: v for part in stages for k, v in part.items()}


def device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor=False, *args):
    """The 2-norm of all tensors of `tensor_lists[0]` as a (1,) float32 tensor on their device:
    a drop-in for Megatron's gradient-norm op where neither Apex nor Transformer Engine is installed
    (`megatron.core.utils.local_multi_tensor_l2_norm`). That fallback builds the total from a
    Python list of per-tensor norms, i.e. one host sync per parameter tensor: 105 per step of the
    4-block 10B benchmark, each stalling the GPU (benchmarks/dit_step.py's profile counts them).
    Here the per-tensor norms stay on the device (`torch._foreach_norm`), so clipping costs one sync
    (Megatron's own `.item()` of the total)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """`dst = src * scale` for each pair of `tensor_lists[0]`, `tensor_lists[1]`: a drop-in for
    Megatron's local fallback of Apex's `multi_tensor_scale` (`megatron.core.utils.
    local_multi_tensor_scale`), which runs one multiply and one copy kernel per tensor from a Python
    loop. Megatron calls it to scale the gradients when clipping (dst is src) and to copy the fp32
    main weights into the bf16 model weights (scale 1). Here each is one foreach op; the arithmetic
    is the fallback's: the product rounded in src's dtype, then converted to dst's."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_device_optimizer_fallbacks() -> bool:
    """Route Megatron's gradient norm through `device_l2_norm` and its gradient scaling and
    main-to-model weight copy through `foreach_multi_tensor_scale` where they run on the local
    fallbacks (no Apex/TE); Apex's or TE's fused kernels are left alone. Returns whether the
    fallbacks were replaced."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale
    if clip_grads.l2_norm_impl not in (local_multi_tensor_l2_norm, device_l2_norm):
        return False
    clip_grads.l2_norm_impl = device_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl in (local_multi_tensor_scale, foreach_multi_tensor_scale):
            module.multi_tensor_scale_impl = foreach_multi_tensor_scale
    return True


def megatron_optimizer(pm: ParallelDiT, opt, fused: Optional[bool] = None):
    """Megatron's Adam over this rank's chunks, sharded over data-parallel ranks when the layout
    asks for the distributed optimizer. `opt` is `core/train.py::OptimizerConfig` (its learning-
    rate schedule is the caller's: set `param_groups[...]["lr"]` per step).

    fused (default: on when the parameters live on a GPU): torch's fused Adam kernel. Without Apex
    or Transformer Engine Megatron falls back to torch's multi-tensor AdamW, which measured 12-14 ms
    slower per step for 0.89B parameters on an H100 (benchmarks/dit_step.py, docs/benchmarks.md)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    dtype = pm.config.params_dtype
    use_device_optimizer_fallbacks()
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                                adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps,
                                clip_grad=opt.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                use_distributed_optimizer=pm.par.distributed_optimizer),
        pm.chunks)
    if fused is None:
        fused = all(q.is_cuda for c in pm.chunks for q in c.parameters())
    if fused:
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in inner.optimizer.param_groups:
                group["fused"], group["foreach"] = True, False
    return optimizer
