"""Ulysses context parallelism for MUG-DiT: all-to-all over Megatron's context-parallel group.

Megatron-Core's own context parallelism (ring attention) needs Transformer Engine's attention,
which mugv does not ship. Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509) needs only two
all-to-alls per self-attention and any softmax attention inside:

    q, k, v (S / cp, b, n, d)   each CP rank: its own tokens, every head of its TP rank
      -- all-to-all -->   (S, b, n / cp, d)   the whole sequence, n / cp of those heads
      -- DotProductAttention (torch_backend/models/attention.py), optional key mask over the S keys -->
    out (S, b, n / cp * d)
      -- all-to-all back --> (S / cp, b, n * d)

So the heads of a TP rank must divide by CP: num_heads % (TP x CP) == 0 (48 heads at 10B;
`core/parallel.py::check_layout`). Everything outside self-attention is per token (AdaLN,
MLP, cross-attention to the replicated text, the final layer) and runs on the rank's tokens
without communication.

What the model does with it (torch_backend/models/dit.py): the sequence [start; video; end]
is zero-padded at the end to a multiple of CP (x TP under sequence parallelism), each CP rank
takes its contiguous chunk (`local_range`), the padded keys are masked out of self-attention and
the padded rows are dropped from the output, which is gathered over CP (`gather_sequence`).

Gradients: each CP rank's parameter gradients are the contribution of its own tokens; the
single-process gradient is their SUM over CP. Megatron's DDP AVERAGES over the data-parallel x
context-parallel group, and Megatron's schedules multiply the loss by the CP size (a 2-tuple
`loss_fn`, see `parallelize.forward_backward`): together, the sum. The all-to-alls are their own
adjoints (chunk j of rank i goes to chunk i of rank j), so their backward is the same exchange.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from mugv.torch_backend.models.attention import DotProductAttention


def cp_group():
    from megatron.core import parallel_state
    return parallel_state.get_context_parallel_group()


def cp_size_rank() -> tuple[int, int]:
    """(context-parallel size, this rank's index); (1, 0) when Megatron's state is not set up."""
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def padded_length(length: int, shards: int) -> int:
    """The smallest multiple of `shards` >= `length` (the sequence is zero-padded at its end)."""
    return -(-length // shards) * shards


def local_range(padded: int, size: int, rank: int) -> slice:
    """Rank `rank`'s contiguous chunk of a sequence of `padded` (a multiple of `size`) tokens."""
    part = padded // size
    return slice(rank * part, (rank + 1) * part)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (cp equal chunks): chunk j of this rank goes to rank j, chunk
    i arriving from rank i lands at position i. The exchange is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group), None


def _exchange(x, group):
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x, group, size: int):
    """(S / cp, b, n, d) -> (S, b, n / cp, d): gather the sequence, scatter the heads."""
    s, b, n, d = x.shape
    chunks = x.reshape(s, b, size, n // size, d).permute(2, 0, 1, 3, 4)  # (cp, S/cp, b, n/cp, d)
    return _AllToAll.apply(chunks, group).reshape(size * s, b, n // size, d)


def heads_to_sequence(x, group, size: int):
    """(S, b, n / cp, d) -> (S / cp, b, n, d): the inverse of `sequence_to_heads`."""
    s_full, b, n_local, d = x.shape
    chunks = _AllToAll.apply(x.reshape(size, s_full // size, b, n_local, d), group)
    return chunks.permute(1, 2, 0, 3, 4).reshape(s_full // size, b, size * n_local, d)


class UlyssesAttention(torch.nn.Module):
    """Context-parallel core attention: the `core_attention` slot of the self-attention spec.

    forward(q, k, v (S / cp, b, n, d) this rank's tokens, key_mask (b, S) bool over the WHOLE
    (gathered) sequence or None) -> (S / cp, b, n * d). `inner` is the attention run on the
    whole sequence with n / cp heads (default `DotProductAttention`).
    """

    def __init__(self, inner: ModuleSpec | type = DotProductAttention):
        super().__init__()
        self.inner = build_module(inner)

    def forward(self, q, k, v, key_mask=None):
        group = cp_group()
        size = dist.get_world_size(group)
        n = q.shape[2]
        if n % size:
            raise ValueError(f"Ulysses attention: {n} heads on this tensor-parallel rank are not "
                             f"divisible by context-parallel size {size}")
        q, k, v = (sequence_to_heads(t, group, size) for t in (q, k, v))
        if key_mask is not None and key_mask.shape[1] != q.shape[0]:
            raise ValueError(f"Ulysses attention: key_mask covers {key_mask.shape[1]} keys, the "
                             f"gathered sequence has {q.shape[0]}")
        out = self.inner(q, k, v, key_mask)  # (S, b, n / cp * d)
        out = heads_to_sequence(out.unflatten(-1, (n // size, -1)), group, size)
        return out.flatten(2)


def ulysses_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of the MUG-DiT layer spec whose self-attention core is `UlyssesAttention` around
    the spec's own core (cross-attention is untouched: its queries are the rank's tokens, its keys
    the replicated text). Idempotent."""
    import dataclasses

    self_attn = spec.submodules.self_attn
    core = self_attn.submodules.core_attention
    if _module_of(core) is UlyssesAttention:
        return spec
    wrapped = ModuleSpec(module=UlyssesAttention, params={"inner": core})
    self_attn = dataclasses.replace(
        self_attn, submodules=dataclasses.replace(self_attn.submodules, core_attention=wrapped))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attn=self_attn))


def _module_of(spec):
    return spec.module if isinstance(spec, ModuleSpec) else spec


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` over CP; backward keeps this rank's chunk of the gradient (every CP
    rank computes the same loss from the same gathered tensor: see the module docstring)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


def gather_sequence(x, dim: int):
    """This CP rank's sequence chunk -> the whole sequence along `dim`, on every CP rank."""
    return _GatherSequence.apply(x, dim, cp_group())
