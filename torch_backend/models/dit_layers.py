"""The MUG-DiT transformer layer on Megatron-Core, built from a layer spec.

One block (mugv-forward-notes.md 1.10-1.12), hidden states sequence-first [s, b, h] as Megatron's:
    u = LN0(x) * (1 + scale_msa) + shift_msa;  x = x + gate_msa * SelfAttn(u)      (QK-RMSNorm, 3D RoPE)
    x = x + CrossAttn(LN1(x), text)                                               (QK-RMSNorm, text mask)
    u = LN0(x) * (1 + scale_mlp) + shift_mlp;  x = x + gate_mlp * MLP(u)           (GELU tanh)
Every shift/scale/gate is picked per token: from the t branch where the token mask is True, from the
t = 0 branch elsewhere (clean conditioning frames, start/end tokens).

What is configurable, and where:
- the linears come from the spec (ColumnParallelLinear / RowParallelLinear: tensor parallelism and
  sequence parallelism are Megatron's, driven by the TransformerConfig);
- `DiTOps` (spec param `ops`): the elementwise pieces a Triton kernel may fuse (AdaLN norm+modulate,
  gated residual, the ungated cross-attention residual fused into the MLP's AdaLN, QK-RMSNorm+RoPE),
  in the conventions and signatures of `mugv.kernels`. `REFERENCE_OPS` is plain torch and always
  available; `kernel_ops(device)` takes what `mugv.kernels.registry` selects for the device;
- `core_attention` (spec submodule): softmax attention, `DotProductAttention(backend=...)`, see
  `mugv.torch_backend.models.attention`;
- selective recomputation of the attention core (config.recompute_granularity == "selective").

Module names equal the canonical parameter names of `core/dit.py::dit_schema`.
Under tensor parallelism q_norm/k_norm weights are replicated but each rank's gradient covers only its
own heads: they are tagged `partial_grad_over_tp = True` and must be sum-reduced over the TP group.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mugv.core.recipe import KernelConfig
from mugv.kernels.adaln_modulate import adaln_modulate_reference
from mugv.kernels.gated_residual_modulate import gated_residual_modulate_reference, gated_residual_reference
from mugv.kernels.qk_rmsnorm_rope import qk_rmsnorm_reference, qk_rmsnorm_rope_reference
from mugv.torch_backend.models.attention import DotProductAttention

# ---------------------------------------------------------------------------------------------
# Elementwise ops (the kernel slot)
#
# Conventions shared with mugv.kernels (same signatures as the Triton kernels and their
# references): batch-first x (B, L, h); modulation tables (B, K, h) with K = 2 rows
# [t branch, t = 0 branch]; index (B, L) integers picking a row per token (0 = t, 1 = t = 0).


# The plain-torch references are the kernels' own (mugv.kernels.*_reference): the CPU, the tests
# and a GPU without verified kernels run the very code each Triton kernel is checked against.
reference_adaln_modulate = adaln_modulate_reference                    # LN(x) * (1 + scale) + shift
reference_gated_residual = gated_residual_reference                    # x + gate * y
reference_gated_residual_modulate = gated_residual_modulate_reference  # (x', AdaLN(x')), x' = x + gate * y
reference_qk_rmsnorm = qk_rmsnorm_reference                            # per-head RMSNorm, fp32 inside
reference_qk_rmsnorm_rope = qk_rmsnorm_rope_reference                  # RMSNorm, then interleaved RoPE


@dataclasses.dataclass(frozen=True)
class DiTOps:
    """The elementwise operations of a block; a kernel set replaces any of them (same signature).
    `kernel_ops(device)` fills the slots from mugv.kernels' registry."""

    adaln_modulate: Callable = reference_adaln_modulate
    gated_residual: Callable = reference_gated_residual
    gated_residual_modulate: Callable = reference_gated_residual_modulate
    qk_rmsnorm_rope: Callable = reference_qk_rmsnorm_rope
    qk_rmsnorm: Callable = reference_qk_rmsnorm


REFERENCE_OPS = DiTOps()


def _contiguous_args(fn):
    """Kernels take dense tensors; the block passes batch-first views of sequence-first tensors
    (free when B = 1, MUG-V's micro-batch)."""
    def call(*args, **kwargs):
        return fn(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    call.__name__ = getattr(fn, "__name__", "kernel")
    return call


DIT_KERNELS = ("adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope")


def _rmsnorm_through_rope(kernel):
    """The cross-attention's q/k RMSNorm (no RoPE) through the QK-RMSNorm+RoPE kernel with zero
    angles: cos 0 = 1 and sin 0 = 0 exactly, so the rotation is the identity in every rounding (and
    its transpose in the backward). q/k arrive sequence-first (L, B, heads, d); the kernel takes
    any token/batch/head strides. The zero table, (1, L, d/2) fp32, is ~1/(4 heads) of q's bytes."""
    if kernel is reference_qk_rmsnorm_rope:
        return reference_qk_rmsnorm

    def call(q, weight, eps: float = 1e-6):
        qb = q.transpose(0, 1)
        zeros = torch.zeros((1, qb.shape[1], q.shape[-1] // 2), dtype=torch.float32, device=q.device)
        return kernel(qb, weight, zeros, eps).transpose(0, 1)
    call.__name__ = "qk_rmsnorm_via_rope_kernel"
    return call


def _ops(pick) -> DiTOps:
    """DiTOps with each kernel slot filled by pick(kernel name) (a Triton function or its reference)."""
    qk = pick("qk_rmsnorm_rope")
    return DiTOps(
        adaln_modulate=_contiguous_args(pick("adaln_modulate")),
        gated_residual_modulate=_contiguous_args(pick("gated_residual_modulate")),
        # reads q/k as strided views of the fused qkv output (head stride 3 d): no copy first
        qk_rmsnorm_rope=qk,
        qk_rmsnorm=_rmsnorm_through_rope(qk),
    )


# Kernels inside compiled layers. torch.compile does not trace into the Triton kernels'
# autograd Functions (their host code picks tiles and launch configs); as torch.library custom ops
# they are opaque nodes of the compiled graph, and Inductor fuses the code around them. Only the
# QK-RMSNorm + RoPE kernel is offered there: the H100 profile of the compiled 720p step
# (docs/benchmarks.md, session 9) spends 30 ms in Inductor's RMSNorm + RoPE kernels against 9 ms
# for this kernel, while Inductor's fusions of the AdaLN and residual ops beat the other kernels.
COMPILED_KERNELS = ("qk_rmsnorm_rope",)


@torch.library.custom_op("mugv::qk_rmsnorm_rope_fwd", mutates_args=())
def _qk_rmsnorm_rope_fwd(q: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mugv.kernels.qk_rmsnorm_rope import _QKRMSNormRoPE
    return _QKRMSNormRoPE.launch_forward(q, weight, angles, eps)


@_qk_rmsnorm_rope_fwd.register_fake
def _(q, weight, angles, eps):
    b, length, nh, d = q.shape
    table = angles.new_empty((angles.shape[0], length, d // 2), dtype=torch.float32)
    return (q.new_empty((b, length, nh, d)), q.new_empty((b * length * nh,), dtype=torch.float32),
            table, torch.empty_like(table))


@torch.library.custom_op("mugv::qk_rmsnorm_rope_bwd", mutates_args=())
def _qk_rmsnorm_rope_bwd(q: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rstd: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from mugv.kernels.qk_rmsnorm_rope import _QKRMSNormRoPE
    return _QKRMSNormRoPE.launch_backward(q, weight, cos, sin, rstd, dout)


@_qk_rmsnorm_rope_bwd.register_fake
def _(q, weight, cos, sin, rstd, dout):
    return q.new_empty(q.shape), torch.empty_like(weight)


def _qk_setup_context(ctx, inputs, output):
    q, weight, _, _ = inputs
    _, rstd, cos, sin = output
    ctx.save_for_backward(q, weight, cos, sin, rstd)


def _qk_backward(ctx, dout, _drstd, _dcos, _dsin):
    q, weight, cos, sin, rstd = ctx.saved_tensors
    dq, dw = _qk_rmsnorm_rope_bwd(q, weight, cos, sin, rstd, dout)
    return dq, dw, None, None


_qk_rmsnorm_rope_fwd.register_autograd(_qk_backward, setup_context=_qk_setup_context)


def qk_rmsnorm_rope_op(q, weight, angles, eps: float = 1e-6):
    """The QK-RMSNorm + RoPE kernel as the custom op (same signature and result as
    `mugv.kernels.qk_rmsnorm_rope`)."""
    return _qk_rmsnorm_rope_fwd(q, weight, angles, eps)[0]


def compiled_ops(device, choice: str | None = None, force: bool = False) -> DiTOps:
    """DiTOps for compiled layers on `device`: the references (Inductor fuses them), with the QK
    slots on the custom op where the registry enables that kernel there (`force`: whatever the
    device and records say, for the parity test that verifies this configuration)."""
    from mugv.kernels.registry import kernel_enabled
    if not (force or kernel_enabled("qk_rmsnorm_rope", device, choice)):
        return REFERENCE_OPS
    return dataclasses.replace(REFERENCE_OPS, qk_rmsnorm_rope=qk_rmsnorm_rope_op,
                               qk_rmsnorm=_rmsnorm_through_rope(qk_rmsnorm_rope_op))


def kernel_ops(device, choice: str | None = None) -> DiTOps:
    """DiTOps with each slot chosen by `mugv.kernels.registry.select` on `device` (the Triton
    kernel where verified there, else its plain-torch reference; `choice`: a KernelConfig's
    `kernel_choice`, None = verified.json / MUGV_KERNELS)."""
    from mugv.kernels.registry import select
    return _ops(lambda name: select(name, device, choice))


def triton_ops() -> DiTOps:
    """Every kernel slot on its Triton kernel, whatever the device and records say: for the parity
    test that verifies them in the whole model (parity_tests/kernels/test_dit_kernels.py; on the
    CPU they run in Triton's interpreter)."""
    from mugv.kernels.registry import kernel_function
    return _ops(kernel_function)


def kernels_selected(kernels: KernelConfig, device, compiled: bool = False) -> dict[str, str]:
    """Which code each DiT kernel slot runs under `kernels` on `device`: "triton", "reference",
    "compiled" (the reference, fused by Inductor inside compiled layers) or "triton op" (the
    kernel as a custom op inside compiled layers): what a checkpoint records next to the
    KernelConfig."""
    from mugv.kernels.registry import kernel_enabled
    enabled = {name: kernel_enabled(name, device, kernels.kernel_choice) for name in DIT_KERNELS}
    if compiled:
        return {name: "triton op" if name in COMPILED_KERNELS and enabled[name] else "compiled"
                for name in DIT_KERNELS}
    return {name: "triton" if enabled[name] else "reference" for name in DIT_KERNELS}


COMPILED_TEST = "parity_tests/kernels/test_dit_compiled.py"


def compiled_fingerprint() -> str:
    """What a verification of the compiled layers binds to: torch's version (Inductor writes the
    kernels) and the source of this module and of models/dit.py (what is compiled)."""
    import hashlib
    import inspect
    import sys
    from mugv.torch_backend.models import dit
    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(dit) + COMPILED_TEST
    return f"torch {torch.__version__}|{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def compile_status(kernels: KernelConfig, device, recompute: bool = False, context_parallel: int = 1,
                   hooked: bool = False) -> tuple[bool, str]:
    """(whether to torch.compile each transformer layer, why) under `kernels.compile_layers`.
    `hooked`: a model hook (LoRA) changes the layers after they are built, which the verification
    did not cover, so "auto" does not compile them."""
    choice = kernels.compile_layers
    if choice in ("on", "off"):
        return choice == "on", f"compile_layers={choice}"
    if getattr(device, "type", str(device)) != "cuda":
        return False, "not compiled: not a CUDA device"
    if hooked:
        return False, "not compiled: a model hook (e.g. LoRA) changes the layers the verification compiled"
    if recompute or context_parallel > 1:
        return False, "not compiled: activation recompute or context parallelism (not measured compiled)"
    from mugv.kernels.registry import verified_devices
    gpu = torch.cuda.get_device_name(device)
    record = verified_devices().get(gpu, {}).get("compiled_layers")
    if record is None:
        return False, f"not compiled: compiled layers not verified on {gpu} (run `mugv verify-kernels`)"
    if record.get("fingerprint") != compiled_fingerprint():
        return False, (f"not compiled: verified on {gpu} as {record.get('fingerprint')!r}, this torch and "
                       f"layer code are {compiled_fingerprint()!r} (run `mugv verify-kernels`)")
    return True, f"compiled: verified on {gpu} ({record.get('date', '?')})"


def layer_spec_for(kernels: KernelConfig, device, compiled: bool = False) -> ModuleSpec:
    """The layer spec a run's KernelConfig asks for on `device`: the kernel slots (references on a
    CPU, and inside compiled layers, where Inductor fuses them), the attention backend, and
    head-dim padding of the self-attention."""
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    if not on_gpu:
        ops = REFERENCE_OPS
    else:
        ops = (compiled_ops if compiled else kernel_ops)(device, kernels.kernel_choice)
    return mugdit_layer_spec(ops=ops, attention_backend=kernels.attention_backend,
                             pad_head_dim=kernels.pad_head_dim)


# ---------------------------------------------------------------------------------------------
# Submodules


class HeadRMSNorm(torch.nn.Module):
    """The (head_dim,) weight of a per-head RMSNorm; the math lives in `DiTOps.qk_rmsnorm(_rope)`."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(head_dim))
        self.weight.partial_grad_over_tp = True


def _drop_empty_extra_state(state_dict, prefix, *args, **kwargs) -> None:
    """Load pre-hook: Megatron's linears register a hook that adds `<prefix>_extra_state: None` to
    every state dict they load (for Transformer Engine checkpoints); ours keep no extra state, so
    `load_state_dict(strict=True)` would report it unexpected. Drop that empty entry (registered
    after Megatron's hook, so it runs after it); a non-empty one stays and is reported."""
    if f"{prefix}_extra_state" in state_dict and state_dict[f"{prefix}_extra_state"] is None:
        del state_dict[f"{prefix}_extra_state"]


def mark_tensor_parallel(param: torch.Tensor, axis: int) -> None:
    """Tag `param` as split over tensor-parallel ranks along `axis`. Megatron's linears set these
    attributes only when they initialise their weights themselves (`perform_initialization`); ours
    are drawn from the schema, and without the tag Megatron's gradient norm (hence clipping)
    counts the parameter once, on TP rank 0, as if it were replicated: the other ranks' slices went
    missing from the norm."""
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, axis, 1


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """Megatron's column-parallel linear without its empty `_extra_state` state-dict entry (kept
    there for Transformer Engine checkpoints), so that the model's state dict is canonical and
    loads with `strict=True`."""

    get_extra_state = torch.nn.Module.get_extra_state
    set_extra_state = torch.nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(_drop_empty_extra_state)
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """Megatron's row-parallel linear without its empty `_extra_state` entry (see above)."""

    get_extra_state = torch.nn.Module.get_extra_state
    set_extra_state = torch.nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(_drop_empty_extra_state)
        mark_tensor_parallel(self.weight, 1)   # its bias is replicated


@dataclasses.dataclass
class SelfAttentionSubmodules:
    qkv: type | ModuleSpec = ColumnParallelLinear
    proj: type | ModuleSpec = RowParallelLinear
    core_attention: type | ModuleSpec = DotProductAttention


@dataclasses.dataclass
class CrossAttentionSubmodules:
    q: type | ModuleSpec = ColumnParallelLinear
    kv: type | ModuleSpec = ColumnParallelLinear
    proj: type | ModuleSpec = RowParallelLinear
    core_attention: type | ModuleSpec = DotProductAttention


@dataclasses.dataclass
class MLPSubmodules:
    fc1: type | ModuleSpec = ColumnParallelLinear
    fc2: type | ModuleSpec = RowParallelLinear


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's init_method slot: parameters are drawn afterwards from the schema's Init rules."""


def _column(spec, config, in_f, out_f, **kw):
    return build_module(spec, in_f, out_f, config=config, init_method=_no_init, bias=True,
                        gather_output=False, skip_bias_add=False, tp_group=_tp_group(), **kw)


def _row(spec, config, in_f, out_f):
    return build_module(spec, in_f, out_f, config=config, init_method=_no_init, bias=True,
                        input_is_parallel=True, skip_bias_add=False, tp_group=_tp_group())


class _AttentionBase(torch.nn.Module):
    def __init__(self, config: TransformerConfig, ops: DiTOps, core_attention):
        super().__init__()
        tp = _tp_size()
        if config.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                             f"tensor-parallel size {tp}")
        self.heads = config.num_attention_heads // tp  # heads on this rank
        self.head_dim = config.kv_channels
        self.eps = config.layernorm_epsilon
        self.ops = ops
        self.selective_recompute = (config.recompute_granularity == "selective"
                                    and "core_attn" in (config.recompute_modules or []))
        self.q_norm = HeadRMSNorm(self.head_dim)
        self.k_norm = HeadRMSNorm(self.head_dim)
        self.core_attention = build_module(core_attention)

    def _attend(self, q, k, v, key_mask=None):
        if not self.selective_recompute:
            return self.core_attention(q, k, v, key_mask)
        args = (q, k, v) if key_mask is None else (q, k, v, key_mask)
        return tensor_parallel.checkpoint(self.core_attention, False, *args)


class SelfAttention(_AttentionBase):
    """Fused qkv (rows (head, q|k|v, dim): a contiguous TP split gives whole heads) -> per-head
    RMSNorm -> 3D RoPE -> softmax attention over all tokens -> proj."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 ops: DiTOps = REFERENCE_OPS):
        super().__init__(config, ops, submodules.core_attention)
        h = config.hidden_size
        self.qkv = _column(submodules.qkv, config, h, 3 * h)
        self.proj = _row(submodules.proj, config, h, h)

    def forward(self, x, angles, key_mask=None):
        """x (s, b, h) (the local sequence chunk under sequence parallelism); angles (b, S, d/2)
        RoPE angles of the full sequence S (this context-parallel rank's S under CP); key_mask
        None or (b, keys) bool, True = attend, passed to the core attention (under context
        parallelism: the padding mask of the whole gathered sequence)."""
        qkv, _ = self.qkv(x)  # (S, b, 3 h / tp), full sequence
        qkv = qkv.unflatten(-1, (self.heads, 3, self.head_dim))
        q, k, v = qkv.unbind(dim=-2)
        # norms and rotation batch-first (the kernels' layout), views only
        q = self.ops.qk_rmsnorm_rope(q.transpose(0, 1), self.q_norm.weight, angles, self.eps).transpose(0, 1)
        k = self.ops.qk_rmsnorm_rope(k.transpose(0, 1), self.k_norm.weight, angles, self.eps).transpose(0, 1)
        out = self._attend(q, k, v, key_mask)
        out, _ = self.proj(out.contiguous())  # see MUGDiTLayer.forward: one matmul path
        return out


class CrossAttention(_AttentionBase):
    """q from video tokens, fused kv (rows (head, k|v, dim)) from text, per-head RMSNorm on q and k,
    no RoPE, key padding mask per sample."""

    def __init__(self, config: TransformerConfig, submodules: CrossAttentionSubmodules,
                 ops: DiTOps = REFERENCE_OPS):
        super().__init__(config, ops, submodules.core_attention)
        h = config.hidden_size
        self.q = _column(submodules.q, config, h, h)
        # Text is never split along the sequence: its kv projection must not all-gather it.
        text_config = dataclasses.replace(config, sequence_parallel=False)
        self.kv = _column(submodules.kv, text_config, h, 2 * h)
        self.proj = _row(submodules.proj, config, h, h)

    def forward(self, x, text, text_mask):
        """x (s, b, h); text (Lt, b, h) embedded text; text_mask (b, Lt) bool, True = real token."""
        q, _ = self.q(x)
        q = q.unflatten(-1, (self.heads, self.head_dim))
        kv, _ = self.kv(text)
        k, v = kv.unflatten(-1, (self.heads, 2, self.head_dim)).unbind(dim=-2)
        q = self.ops.qk_rmsnorm(q, self.q_norm.weight, self.eps)
        k = self.ops.qk_rmsnorm(k, self.k_norm.weight, self.eps)
        # A sample without any real token would softmax over nothing: let it attend to its
        # (padded) keys and zero its output instead, as an empty key block contributes nothing.
        has_text = text_mask.any(dim=1)
        key_mask = text_mask | ~has_text[:, None]
        out = self._attend(q, k, v, key_mask)
        out = out * has_text[None, :, None].to(out.dtype)
        out, _ = self.proj(out.contiguous())  # see MUGDiTLayer.forward: one matmul path
        return out


class MLP(torch.nn.Module):
    """fc2(GELU_tanh(fc1(x))), h -> 4h -> h (official and Megatron's fused bias-GELU use tanh)."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules):
        super().__init__()
        self.fc1 = _column(submodules.fc1, config, config.hidden_size, config.ffn_hidden_size)
        self.fc2 = _row(submodules.fc2, config, config.ffn_hidden_size, config.hidden_size)

    def forward(self, x):
        y, _ = self.fc1(x)
        y, _ = self.fc2(F.gelu(y, approximate="tanh"))
        return y


class AffineLayerNorm(torch.nn.LayerNorm):
    """LN1 before cross-attention (weight and bias). Its parameters are tagged sequence_parallel so
    Megatron all-reduces their gradients over TP when sequence parallelism is on."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


@dataclasses.dataclass
class MUGDiTLayerSubmodules:
    self_attn: ModuleSpec | type = None
    cross_attn_norm: ModuleSpec | type = AffineLayerNorm
    cross_attn: ModuleSpec | type = None
    mlp: ModuleSpec | type = None


class MUGDiTLayer(torch.nn.Module):
    """One MUG-DiT block (see module docstring)."""

    def __init__(self, config: TransformerConfig, submodules: MUGDiTLayerSubmodules,
                 layer_number: int = 0, ops: DiTOps = REFERENCE_OPS):
        super().__init__()
        self.layer_number = layer_number
        self.eps = config.layernorm_epsilon
        self.ops = ops
        self.scale_shift_table = torch.nn.Parameter(torch.zeros(6, config.hidden_size))
        self.scale_shift_table.sequence_parallel = config.sequence_parallel
        self.sequence_parallel = config.sequence_parallel
        self.self_attn = build_module(submodules.self_attn, config=config, ops=ops)
        self.cross_attn_norm = build_module(submodules.cross_attn_norm, config=config)
        self.cross_attn = build_module(submodules.cross_attn, config=config, ops=ops)
        self.mlp = build_module(submodules.mlp, config=config)

    def forward(self, x, mod, mod0, token_mask, text, text_mask, angles, self_attn_mask=None):
        """
        Arguments:
            x: (s, b, h) hidden states (local chunk under sequence parallelism).
            mod, mod0: (b, 6, h) t_block outputs of the t and t=0 branches (before the table).
            token_mask: (s, b) bool, True = modulate with t (same chunk as x).
            text: (Lt, b, h) embedded text; text_mask: (b, Lt) bool.
            angles: (b, S, head_dim / 2) RoPE angles of the full sequence.
            self_attn_mask: None, or (b, keys) bool key mask of self-attention (context
                parallelism masks the padding of the sequence with it).
        Returns (s, b, h).
        """
        table = self.scale_shift_table.to(mod.dtype)
        # (6, b, 2, h): rows shift/scale/gate (msa, mlp), each a (b, K=2, h) table [t, t = 0].
        tables = torch.stack([table[None] + mod, table[None] + mod0], dim=2).transpose(0, 1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = tables
        index = (~token_mask).long().t()  # (b, s): row 0 = t branch, row 1 = t = 0 branch
        ops, eps = self.ops, self.eps
        xb = x.transpose(0, 1)  # batch-first views for the elementwise ops
        u = ops.adaln_modulate(xb, shift_msa, scale_msa, index, eps)
        # The batch-first -> sequence-first views are materialised: sequence parallelism all-gathers
        # the linears' inputs and NCCL takes contiguous tensors only (gloo copies silently); and
        # torch.matmul multiplies a non-contiguous (s, b, h) input as one folded mm when a weight
        # requires grad but as a bmm when none does (a frozen copy, inference), which rounds
        # differently. Contiguous, both are the same mm (the copy matmul made anyway in training).
        seq_first = lambda t: t.transpose(0, 1).contiguous()  # noqa: E731
        attn = self.self_attn(seq_first(u), angles, self_attn_mask)
        xb = ops.gated_residual(xb, attn.transpose(0, 1), gate_msa, index)
        cross = self.cross_attn(self.cross_attn_norm(xb.transpose(0, 1)), text, text_mask)
        # The cross-attention residual is ungated: gate 1, fused into the MLP's AdaLN site.
        xb, u = ops.gated_residual_modulate(xb, cross.transpose(0, 1), torch.ones_like(gate_mlp),
                                            shift_mlp, scale_mlp, index, eps)
        xb = ops.gated_residual(xb, self.mlp(seq_first(u)).transpose(0, 1), gate_mlp, index)
        return xb.transpose(0, 1)


def mugdit_layer_spec(ops: DiTOps = REFERENCE_OPS, attention_backend: str = "auto",
                      column: type = ColumnParallelLinear,
                      row: type = RowParallelLinear, pad_head_dim: int | None = None) -> ModuleSpec:
    """The MUG-DiT layer spec: Megatron's parallel linears, the kernel slot `ops` and the attention
    backend (see `mugv.torch_backend.models.attention.BACKENDS`); `pad_head_dim` zero-pads the
    self-attention's heads (exact; cross-attention is not padded)."""
    core = ModuleSpec(module=DotProductAttention, params={"backend": attention_backend})
    self_core = core if pad_head_dim is None else ModuleSpec(
        module=DotProductAttention, params={"backend": attention_backend, "pad_head_dim": pad_head_dim})
    return ModuleSpec(
        module=MUGDiTLayer,
        params={"ops": ops},
        submodules=MUGDiTLayerSubmodules(
            self_attn=ModuleSpec(module=SelfAttention,
                                 submodules=SelfAttentionSubmodules(qkv=column, proj=row,
                                                                    core_attention=self_core)),
            cross_attn_norm=AffineLayerNorm,
            cross_attn=ModuleSpec(module=CrossAttention,
                                  submodules=CrossAttentionSubmodules(q=column, kv=column, proj=row,
                                                                      core_attention=core)),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(fc1=column, fc2=row)),
        ),
    )
