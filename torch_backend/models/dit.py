"""MUG-DiT, the production model on Megatron-Core.

The forward contract is the one of `jax_reference/dit.py::dit_forward` (docs: mugv-forward-notes.md
section 1): latents (B, 24, T, H, W) of any size, timestep (B,) on the 0..1000 scale, text (B, L, D)
with a per-sample bool mask, x_mask (B, T) (False = clean conditioning frame, modulated with t = 0),
fps (B,), frame_indice (B, T'+2) -> float32 (B, 48, T, H, W).

Parameter names equal `core/dit.py::dit_schema` (the state dict is canonical; under tensor
parallelism each rank holds its contiguous slice along the schema's `tp_axis`). Parameters are drawn
from the schema's `Init` rules (`init_parameters`): the same seed gives the same global model at every
tensor-parallel size.

Parallelism and kernels are configured, never written here: the blocks come from a layer spec
(`dit_layers.mugdit_layer_spec`), the TransformerConfig carries sequence parallelism and activation
recomputation (`recompute_granularity` None / "selective" (attention core) / "full" with
`recompute_method` "block" (the first `recompute_num_layers` layers) or "uniform" (every layer, in
groups of `recompute_num_layers`)).

Pipeline parallelism: `build_dit(..., pre_process, post_process, layers)` builds one stage; stages
exchange one packed tensor (see `MUGDiT`), which Megatron's schedules send and receive.

Context parallelism (Ulysses, `torch_backend/models/context_parallel.py`), when Megatron's CP size > 1:
every CP rank takes the same whole batch; the sequence [start; video; end] (S = N + 2 tokens) is
zero-padded at its end to a multiple of CP x TP (TP only under sequence parallelism) and each
CP rank keeps its contiguous chunk of the hidden states, of the per-token modulation index
(token mask: I2V clean frames, start/end and padding use the t = 0 branch) and of the 3D RoPE
angles (positions stay global: the start token sits on CP rank 0, the end token where index
S - 1 falls). Self-attention (the layer spec's core wrapped in `UlyssesAttention`) sees every
rank's tokens with the padding masked out of its keys; cross-attention needs nothing (the text is
replicated, only queries are sharded). The final layer runs on the rank's tokens, the output is
gathered over CP and the start/end/padding rows dropped: the whole output on every CP rank.
Sequence parallelism alone pads the same way when S does not divide by TP.

Text with padding: masks (per-sample key mask in cross-attention; padded tokens never reach the
output). A sample with no real token gets a zero cross-attention output before `proj`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mugv.core.dit import DiTConfig, check_forward_inputs, dit_schema, patch_grid
from mugv.core.schema import Schema
from mugv.core.rope import rope_angles, sinusoidal_embedding
from mugv.torch_backend.models import context_parallel
from mugv.torch_backend.parallel import megatron_compat
from mugv.torch_backend.models.dit_layers import mugdit_layer_spec


def transformer_config(cfg: DiTConfig, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> TransformerConfig:
    """Megatron's TransformerConfig for `cfg`; overrides set parallel/recompute fields, e.g.
    `sequence_parallel=True`, `recompute_granularity="full", recompute_method="block",
    recompute_num_layers=4`. Tensor-parallel size is read from Megatron's parallel state."""
    tp = (parallel_state.get_tensor_model_parallel_world_size()
          if parallel_state.model_parallel_is_initialized() else 1)
    fields = dict(
        num_layers=cfg.depth, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.mlp_hidden, kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.norm_eps, init_method_std=cfg.init_std,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=True, add_qkv_bias=True,
        qk_layernorm=True, gated_linear_unit=False, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp, use_cpu_initialization=megatron_compat.cuda_absent(),
        perform_initialization=False,  # drawn from the schema instead (init_parameters)
    )
    return TransformerConfig(**{**fields, **overrides})


class _TwoLayerMLP(torch.nn.Module):
    """fc2(act(fc1(x))): the timestep/fps (SiLU) and text (GELU tanh) embedders (replicated)."""

    def __init__(self, in_f: int, hidden: int, act):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_f, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(torch.nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.scale_shift_table = torch.nn.Parameter(torch.zeros(2, cfg.hidden_size))
        self.linear = torch.nn.Linear(cfg.hidden_size, cfg.patch_volume * cfg.out_channels)

    def forward(self, x, c, c0, video_mask):
        """x (b, N, h); c, c0 (b, h) RAW conditioning vectors (no SiLU/linear, notes 1.14);
        video_mask (b, N) bool -> (b, N, p * out)."""
        table = self.scale_shift_table.to(x.dtype)
        pair_t = table[None] + c[:, None]  # (b, 2, h): row 0 shift, row 1 scale
        pair_0 = table[None] + c0[:, None]
        shift, scale = torch.where(video_mask[:, None, :, None], pair_t[:, :, None], pair_0[:, :, None]).unbind(1)
        x = F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale) + shift
        return self.linear(x)


class MUGDiT(torch.nn.Module):
    """The MUG-DiT model (see module docstring). Build with `build_dit`.

    Pipeline stages: `pre_process` (the first stage) owns the embedders and start/end tokens,
    `post_process` (the last) the final layer, and `layers` the global indices of this stage's
    blocks (names stay `layers.<global index>`, as in the schema). A stage that is not the last
    returns one packed tensor (S + Lt + 14, b, h) = [hidden; embedded text; mod; mod0; c; c0]: the
    conditioning rides along so later stages need no copy of the embedders, and its gradient
    flows back through the same pipe. A stage that is not the first takes that tensor through
    `set_input_tensor` (Megatron's pipeline schedules call it) and the batch as usual (masks, RoPE
    positions and sizes are recomputed from it).
    """

    def __init__(self, cfg: DiTConfig, config: TransformerConfig, layer_spec: ModuleSpec,
                 pre_process: bool = True, post_process: bool = True, layers: Optional[range] = None):
        super().__init__()
        self.cfg = cfg
        self.config = config
        # Megatron's finalize_model_grads reads this under pipeline parallelism (no tied weights).
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_range = range(cfg.depth) if layers is None else layers
        if self.layer_range.step != 1 or not (0 <= self.layer_range.start <= self.layer_range.stop <= cfg.depth):
            raise ValueError(f"layers={self.layer_range}: expected a contiguous range within 0..{cfg.depth}")
        self.input_tensor = None
        self.model_type = ModelType.encoder_or_decoder  # Megatron's schedules read it
        h = cfg.hidden_size
        if pre_process:
            self.start_token = torch.nn.Parameter(torch.zeros(h))
            self.end_token = torch.nn.Parameter(torch.zeros(h))
            self.patch_embed = torch.nn.Conv3d(cfg.in_channels, h, cfg.patch_size, stride=cfg.patch_size)
            self.t_embedder = _TwoLayerMLP(cfg.freq_dim, h, F.silu)
            self.fps_embedder = _TwoLayerMLP(cfg.freq_dim, h, F.silu)
            self.t_block = torch.nn.Linear(h, 6 * h)
            self.text_embedder = _TwoLayerMLP(cfg.text_dim, h, lambda y: F.gelu(y, approximate="tanh"))
        self.layers = torch.nn.ModuleDict(
            {str(i): build_module(layer_spec, config=config, layer_number=i) for i in self.layer_range})
        if post_process:
            self.final_layer = FinalLayer(cfg)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron pipeline API: the packed tensor received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- pieces -----------------------------------------------------------------------------

    def conditioning(self, timestep, fps):
        """c = t_emb(t) + fps_emb, c0 = t_emb(0) + fps_emb (B, h); mod = t_block(SiLU(c)) (B, 6, h),
        mod0 likewise. Sinusoids in fp32 (as the official code), then the model dtype."""
        dtype = self.t_block.weight.dtype
        b = timestep.shape[0]
        # The official model (inference and training) casts t to the model dtype first (notes 1.1):
        # in bf16 it sees 996 for 994.08. A no-op in fp32.
        timestep = timestep.to(dtype).float()
        freq = lambda v: sinusoidal_embedding(torch, v.float(), self.cfg.freq_dim).to(dtype)
        t_emb = self.t_embedder(freq(torch.cat([timestep, torch.zeros_like(timestep)])))
        fps_emb = self.fps_embedder(freq(fps))
        c, c0 = t_emb[:b] + fps_emb, t_emb[b:] + fps_emb
        mod = self.t_block(F.silu(torch.cat([c, c0]))).unflatten(-1, (6, self.cfg.hidden_size))
        return c, c0, mod[:b], mod[b:]

    def embed_text(self, text):
        """LN (no affine) -> fc1 -> GELU tanh -> fc2 -> LN (no affine), per token (notes 1.7)."""
        eps = self.cfg.norm_eps
        y = F.layer_norm(text.to(self.t_block.weight.dtype), (text.shape[-1],), eps=eps)
        y = self.text_embedder(y)
        return F.layer_norm(y, (y.shape[-1],), eps=eps)

    def _run_layers(self, hidden, *args):
        c = self.config
        layers = list(self.layers.values())
        n = len(layers)
        if c.recompute_granularity != "full":
            for layer in layers:
                hidden = layer(hidden, *args)
            return hidden
        k = c.recompute_num_layers
        if c.recompute_method == "block":  # the first k layers recomputed, one at a time
            for i, layer in enumerate(layers):
                hidden = (tensor_parallel.checkpoint(layer, False, hidden, *args) if i < k
                          else layer(hidden, *args))
            return hidden
        for start in range(0, n, k):  # uniform: every layer, in chunks of k
            chunk = layers[start:start + k]

            def run(x, *a, chunk=chunk):
                for layer in chunk:
                    x = layer(x, *a)
                return x
            hidden = tensor_parallel.checkpoint(run, False, hidden, *args)
        return hidden

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x, timestep, text, text_mask, x_mask, fps, frame_indice):
        """See the module docstring for shapes; returns float32 (B, out_channels, T, H, W) on the
        last pipeline stage (under context parallelism: the whole output, on every CP rank), the
        packed stage output elsewhere (see the class docstring)."""
        cfg = self.cfg
        check_inputs(cfg, x, timestep, text, text_mask, x_mask, fps, frame_indice)
        b, _, t, hh, ww = x.shape
        grid = patch_grid(cfg, (t, hh, ww))
        # Token mask: patch frame f uses latent frame f * pt's mask; start/end are always t = 0.
        video_mask = x_mask[:, ::cfg.patch_size[0]].bool().repeat_interleave(grid[1] * grid[2], dim=1)
        never = torch.zeros(b, 1, dtype=torch.bool, device=x.device)
        token_mask = torch.cat([never, video_mask, never], dim=1).t()  # (L, b)
        with torch.device(x.device):  # core.rope allocates with the namespace's defaults
            angles = rope_angles(torch, cfg, grid, frame_indice)  # (b, L, head_dim / 2) fp32
        seq = SequenceShards.current(self.config, token_mask.shape[0])
        # Per-token inputs of this CP rank: [start; video; end] padded at its end (no modulation,
        # angle 0), this rank's chunk. Self-attention sees every rank's tokens: it masks the padding.
        token_mask, angles = seq.local(token_mask, 0), seq.local(angles, 1)
        self_attn_mask = seq.key_mask(b, x.device)
        cp_token_mask = token_mask  # (Lp / cp, b): the final layer's rows
        sp = self.config.sequence_parallel
        if sp:
            token_mask = _local_chunk(token_mask)

        if self.pre_process:
            hidden, text_h, mod, mod0, c, c0 = self._embed(x, timestep, text, text_mask, fps, grid)
            hidden = seq.local(hidden, 0)
            if sp:
                hidden = _scatter_sequence(hidden)
        else:
            if self.input_tensor is None:
                raise RuntimeError("MUGDiT stage without pre_process: call set_input_tensor first")
            hidden, text_h, mod, mod0, c, c0 = _unpack(self.input_tensor, token_mask.shape[0],
                                                       text.shape[1])
        # Each rank modulates only its own tokens under SP, so the gradient reaching the
        # (replicated) conditioning is partial: identity forward, all-reduce over TP backward.
        # (Over CP the same holds; Megatron's DDP reduces over DP x CP, see context_parallel.py.)
        mod_used, mod0_used = (_SumGradOverTP.apply(mod), _SumGradOverTP.apply(mod0)) if sp else (mod, mod0)
        extra = () if self_attn_mask is None else (self_attn_mask,)
        hidden = self._run_layers(hidden, mod_used, mod0_used, token_mask, text_h, text_mask.bool(), angles,
                                  *extra)
        if not self.post_process:
            return torch.cat([hidden, text_h, mod.transpose(0, 1), mod0.transpose(0, 1), c[None], c0[None]])

        if sp:
            # The final layer is replicated (every rank sees the whole output gradient): the
            # backward of this gather keeps the rank's own chunk instead of reduce-scattering.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        if seq.cp == 1 and not seq.padding:  # the final layer on the video tokens only
            out = self.final_layer(hidden[1:-1].transpose(0, 1), c, c0, video_mask)  # (b, N, p*co)
        else:  # this rank's tokens, then every CP rank's; start, end and padding dropped
            out = self.final_layer(hidden.transpose(0, 1), c, c0, cp_token_mask.t())
            if seq.cp > 1:
                out = context_parallel.gather_sequence(out, dim=1)
            out = out[:, 1:seq.length - 1]
        return unpatchify(cfg, out, grid, (t, hh, ww))

    def _embed(self, x, timestep, text, text_mask, fps, grid):
        """First stage: (hidden (L, b, h), text (Lt, b, h), mod, mod0 (b, 6, h), c, c0 (b, h))."""
        cfg = self.cfg
        b, _, t, hh, ww = x.shape
        dtype = self.patch_embed.weight.dtype
        # Zero-pad the end of each axis to whole patches (notes 1.2); unpatchify crops.
        pad = [n * p - s for n, p, s in zip(grid, cfg.patch_size, (t, hh, ww))]
        x = F.pad(x.to(dtype), (0, pad[2], 0, pad[1], 0, pad[0]))
        video = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, N, h), f-major, w fastest
        with torch.device(x.device):
            c, c0, mod, mod0 = self.conditioning(timestep, fps)
        start = self.start_token.to(dtype).expand(b, 1, -1)
        end = self.end_token.to(dtype).expand(b, 1, -1)
        hidden = torch.cat([start, video, end], dim=1).transpose(0, 1).contiguous()  # (L, b, h)
        # Padded positions are zeroed first so that nothing (not even inf/nan) can leak from them.
        text = torch.where(text_mask[..., None], text, torch.zeros((), dtype=text.dtype, device=text.device))
        text_h = self.embed_text(text).transpose(0, 1).contiguous()  # (Lt, b, h)
        return hidden, text_h, mod, mod0, c, c0


def _unpack(packed, n_hidden: int, n_text: int):
    """Inverse of the packed stage output [hidden; text; mod (6); mod0 (6); c; c0] along dim 0."""
    hidden, text_h, mod, mod0, c, c0 = packed.split([n_hidden, n_text, 6, 6, 1, 1])
    return hidden, text_h, mod.transpose(0, 1), mod0.transpose(0, 1), c[0], c0[0]


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the tensor-parallel group.
    (Megatron's copy_to_tensor_model_parallel_region reduces in place, which silently does nothing
    on gloo when the gradient arrives non-contiguous, as it does here: hence contiguous first.)"""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


class SequenceShards:
    """How the sequence [start; video; end] of `length` tokens is split over ranks: zero-padded at
    its end to `padded`, a multiple of CP x (TP under sequence parallelism), each CP rank holding
    the contiguous chunk `rank` of `cp` (then split over TP by sequence parallelism)."""

    def __init__(self, length: int, cp: int, cp_rank: int, tp_sp: int):
        self.length, self.cp, self.cp_rank = length, cp, cp_rank
        self.padded = context_parallel.padded_length(length, cp * tp_sp)
        self.padding = self.padded - length

    @classmethod
    def current(cls, config: TransformerConfig, length: int) -> "SequenceShards":
        cp, cp_rank = context_parallel.cp_size_rank()
        tp_sp = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        return cls(length, cp, cp_rank, tp_sp)

    def local(self, x, dim: int):
        """Pad `x` along `dim` (length -> padded, zeros / False) and keep this CP rank's chunk."""
        if self.padding:
            shape = list(x.shape)
            shape[dim] = self.padding
            x = torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=dim)
        if self.cp == 1:
            return x
        part = context_parallel.local_range(self.padded, self.cp, self.cp_rank)
        return x[(slice(None),) * dim + (part,)]

    def key_mask(self, batch: int, device):
        """(b, padded) bool self-attention key mask (False on padding), None without padding."""
        if not self.padding:
            return None
        return (torch.arange(self.padded, device=device) < self.length)[None].expand(batch, -1)


def _local_chunk(token_mask):
    """This TP rank's contiguous chunk of the (padded, CP-local) sequence (sequence parallelism)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    part = token_mask.shape[0] // tp
    rank = parallel_state.get_tensor_model_parallel_rank()
    return token_mask[rank * part:(rank + 1) * part]


def _scatter_sequence(hidden):
    return tensor_parallel.scatter_to_sequence_parallel_region(hidden)


def unpatchify(cfg: DiTConfig, out, grid, thw):
    """(B, N, prod(patch) * C) with features (pt, ph, pw, C), C fastest -> float32 (B, C, T, H, W),
    cropped to the input size (notes 1.15); float64 stays float64 (the parity tests' reference)."""
    b = out.shape[0]
    (tp_, hp_, wp_), (pt, ph, pw) = grid, cfg.patch_size
    y = out.reshape(b, tp_, hp_, wp_, pt, ph, pw, cfg.out_channels)
    y = y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_channels, tp_ * pt, hp_ * ph, wp_ * pw)
    t, hh, ww = thw
    y = y[:, :, :t, :hh, :ww]
    return y if y.dtype == torch.float64 else y.float()


def check_inputs(cfg: DiTConfig, x, timestep, text, text_mask, x_mask, fps, frame_indice) -> None:
    """The forward contract's shape/dtype checks (core/dit.py::check_forward_inputs)."""
    args = dict(x=x, timestep=timestep, text=text, text_mask=text_mask, x_mask=x_mask, fps=fps,
                frame_indice=frame_indice)
    kind = lambda t: "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else "int"  # noqa: E731
    check_forward_inputs(cfg, {k: tuple(t.shape) for k, t in args.items()},
                         {k: kind(t) for k, t in args.items()}, where="MUGDiT input")


# ---------------------------------------------------------------------------------------------
# Building and initialising


def build_dit(cfg: DiTConfig, config: Optional[TransformerConfig] = None,
              layer_spec: Optional[ModuleSpec] = None, seed: Optional[int] = 0,
              device: Optional[torch.device] = None, pre_process: bool = True,
              post_process: bool = True, layers: Optional[range] = None) -> MUGDiT:
    """Build MUG-DiT on `device` (default: the current GPU, else the CPU). Megatron's parallel
    state must be initialised (`megatron_compat.initialize_parallel`). `seed=None` leaves parameters
    undrawn (to be loaded). pre_process / post_process / layers select a pipeline stage."""
    megatron_compat.enable()  # no-op on a GPU
    config = config or transformer_config(cfg)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    layer_spec = layer_spec or mugdit_layer_spec()
    cp, _ = context_parallel.cp_size_rank()
    if cp > 1:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if cfg.num_heads % (tp * cp):
            raise ValueError(f"num_heads {cfg.num_heads} is not divisible by tensor_parallel {tp} x "
                             f"context_parallel {cp} = {tp * cp} (Ulysses gives each rank "
                             "num_heads / (TP x CP) heads)")
        layer_spec = context_parallel.ulysses_layer_spec(layer_spec)
    model = MUGDiT(cfg, config, layer_spec, pre_process, post_process, layers)
    model.to(device=device, dtype=config.params_dtype)
    check_against_schema(model, cfg)
    if seed is not None:
        init_parameters(model, cfg, seed)
    return model


def _tp() -> tuple[int, int]:
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def stage_schema(model: MUGDiT) -> Schema:
    """The schema entries this pipeline stage holds."""
    def owned(spec) -> bool:
        if spec.layer is not None:
            return spec.layer in model.layer_range
        return model.post_process if spec.name.startswith("final_layer.") else model.pre_process
    return Schema(tuple(p for p in dit_schema(model.cfg) if owned(p)))


def check_against_schema(model: MUGDiT, cfg: DiTConfig) -> None:
    """Every schema parameter of this stage exists with its TP-local shape, and nothing else does."""
    _, tp = _tp()
    schema = stage_schema(model).as_dict()
    mine = dict(model.named_parameters())
    extra, missing = sorted(set(mine) - set(schema)), sorted(set(schema) - set(mine))
    if extra or missing:
        raise AssertionError(f"torch MUG-DiT vs schema: extra {extra[:8]}, missing {missing[:8]}")
    for name, spec in schema.items():
        if tuple(mine[name].shape) != spec.shard_shape(tp):
            raise AssertionError(f"{name}: torch shape {tuple(mine[name].shape)}, schema shard "
                                 f"{spec.shard_shape(tp)} (global {spec.shape}, tp {tp})")


@torch.no_grad()
def init_parameters(model: MUGDiT, cfg: DiTConfig, seed: int) -> None:
    """Draw every parameter from the schema's Init rule. Each rank draws every GLOBAL tensor with one
    generator in schema order and keeps what it holds (its stage, its TP slice), so the model is
    the same in every parallel layout."""
    rank, tp = _tp()
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for spec in dit_schema(cfg):  # every stage draws everything: the same model at any layout
        rule = spec.init
        if rule.kind in ("zeros", "ones"):
            full = torch.full(spec.shape, 0.0 if rule.kind == "zeros" else 1.0, device=device)
        elif rule.kind == "normal":
            full = torch.randn(spec.shape, generator=gen, device=device) * rule.std + rule.mean
        else:  # uniform U(-std, std)
            full = (torch.rand(spec.shape, generator=gen, device=device) * 2 - 1) * rule.std
        if spec.name in params:
            params[spec.name].copy_(full[spec.shard_index(rank, tp)])
