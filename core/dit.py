"""MUG-DiT: config, the named sizes, the parameter schema and token arithmetic.

Facts from ../shared/reference/mugv-forward-notes.md section 0-1 (official MUG-V code).
The canonical parameter layout differs from the official state dict in names and in one layout:
fused projections (`self_attn.qkv`, `cross_attn.kv`) store rows head-major, (head, which, dim),
as Megatron-Core does, so that a contiguous split of axis 0 gives each tensor-parallel rank whole
heads. `checkpoints/official_dit.py` converts to and from the official (which, head, dim) order.
"""
from __future__ import annotations

import dataclasses
import math

from mugv.core import validate as v
from mugv.core.schema import Init, ParamSpec, Schema


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of MUG-DiT. Defaults are the 10B model's fixed hyper-parameters.

    hidden_size / num_heads must give a head dim divisible by 6 (RoPE: h, w, t axes of pairs).
    `init_std` is Megatron's --init-method-std of the anchor's training scripts.
    """

    hidden_size: int = 3456
    depth: int = 56
    num_heads: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 24
    out_channels: int = 48
    mlp_ratio: float = 4.0
    text_dim: int = 4096
    text_max_len: int = 300
    freq_dim: int = 256
    rope_theta: float = 10000.0
    rope_space_end: int = 384
    rope_time_end: int = 480
    norm_eps: float = 1e-6
    init_std: float = 0.014

    def __post_init__(self) -> None:
        v.positive_int(self, "hidden_size", "depth", "num_heads", "in_channels", "out_channels",
                       "text_dim", "text_max_len", "freq_dim", "rope_space_end", "rope_time_end")
        v.int_tuple(self, "patch_size", length=3)
        if self.hidden_size % self.num_heads:
            v.fail(self, "num_heads", f"a divisor of hidden_size={self.hidden_size}")
        if self.head_dim % 6:
            v.fail(self, "num_heads", f"a head count giving head_dim divisible by 6 for 3D RoPE "
                                      f"(hidden_size/num_heads = {self.head_dim})")
        if self.freq_dim % 2:
            v.fail(self, "freq_dim", "an even number (cos and sin halves)")
        v.in_range(self, "mlp_ratio", 0, None, lo_open=True)
        if self.mlp_hidden * 1.0 != self.hidden_size * self.mlp_ratio:
            v.fail(self, "mlp_ratio", "a ratio giving an integer MLP width")
        v.in_range(self, "rope_theta", 1, None, lo_open=True)
        v.in_range(self, "norm_eps", 0, 1, lo_open=True)
        v.in_range(self, "init_std", 0, 1, lo_open=True)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @property
    def rope_pairs_per_axis(self) -> int:
        return self.head_dim // 6


# The anchor's named sizes (all 56 layers, head dim 72), plus tiny sizes that run on a CPU.
# "golden" is the configuration of ../shared/reference/goldens/dit_tiny_seed0.
SIZES: dict[str, dict] = {
    "debug": dict(hidden_size=288, num_heads=4),
    "1B": dict(hidden_size=1152, num_heads=16),
    "4B": dict(hidden_size=2304, num_heads=32),
    "10B": dict(hidden_size=3456, num_heads=48),
    "18B": dict(hidden_size=4608, num_heads=64),
    "golden": dict(hidden_size=144, num_heads=2, depth=2, text_dim=32),
    "tiny": dict(hidden_size=144, num_heads=2, depth=2, text_dim=64, text_max_len=32),
    "small": dict(hidden_size=288, num_heads=4, depth=4, text_dim=64, text_max_len=32),
}


def dit_config(size: str = "10B", **overrides) -> DiTConfig:
    """The named size, with field overrides (e.g. depth=4 for a benchmark)."""
    if size not in SIZES:
        raise v.ConfigError(f"DiT size {size!r}: expected one of {sorted(SIZES)}")
    return DiTConfig(**{**SIZES[size], **overrides})


def _linear(prefix: str, out_f: int, in_f: int, tp_axis: int | None, init: Init,
            layer: int | None = None, bias_tp: bool | None = None) -> list[ParamSpec]:
    """Weight (out, in) and bias (out,). Column-parallel (tp_axis 0) also splits the bias;
    row-parallel (tp_axis 1) keeps the bias whole (added after the reduction)."""
    bias_axis = 0 if (tp_axis == 0 if bias_tp is None else bias_tp) else None
    return [ParamSpec(f"{prefix}.weight", (out_f, in_f), tp_axis=tp_axis, layer=layer, init=init),
            ParamSpec(f"{prefix}.bias", (out_f,), tp_axis=bias_axis, layer=layer, init=Init("zeros"))]


def _default_init(fan_in: int) -> Init:
    # PyTorch's default Linear/Conv init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight (the
    # anchor leaves its embedders at the default); biases here start at zero.
    return Init("uniform", std=1.0 / math.sqrt(fan_in))


def dit_schema(cfg: DiTConfig) -> Schema:
    """Every MUG-DiT parameter, in the canonical layout (see module docstring)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    normal = Init("normal", std=cfg.init_std)
    # Megatron's scaled init for the projections that write into the residual stream.
    out_init = Init("normal", std=cfg.init_std / math.sqrt(2.0 * cfg.depth))
    table_init = Init("normal", std=1.0 / math.sqrt(h))
    patch_in = cfg.in_channels * cfg.patch_volume
    p: list[ParamSpec] = [
        ParamSpec("start_token", (h,), init=Init("normal", std=0.02)),
        ParamSpec("end_token", (h,), init=Init("normal", std=0.02)),
        ParamSpec("patch_embed.weight", (h, cfg.in_channels, *cfg.patch_size), init=_default_init(patch_in)),
        ParamSpec("patch_embed.bias", (h,), init=Init("zeros")),
    ]
    for name in ("t_embedder", "fps_embedder"):
        p += _linear(f"{name}.fc1", h, cfg.freq_dim, None, _default_init(cfg.freq_dim))
        p += _linear(f"{name}.fc2", h, h, None, _default_init(h))
    p += _linear("t_block", 6 * h, h, None, _default_init(h))
    p += _linear("text_embedder.fc1", h, cfg.text_dim, None, _default_init(cfg.text_dim))
    p += _linear("text_embedder.fc2", h, h, None, _default_init(h))
    for i in range(cfg.depth):
        pre = f"layers.{i}"
        p.append(ParamSpec(f"{pre}.scale_shift_table", (6, h), layer=i, sequence_parallel=True,
                           init=table_init))
        p += _linear(f"{pre}.self_attn.qkv", 3 * h, h, 0, normal, layer=i)
        p.append(ParamSpec(f"{pre}.self_attn.q_norm.weight", (hd,), layer=i, init=Init("ones")))
        p.append(ParamSpec(f"{pre}.self_attn.k_norm.weight", (hd,), layer=i, init=Init("ones")))
        p += _linear(f"{pre}.self_attn.proj", h, h, 1, out_init, layer=i)
        p.append(ParamSpec(f"{pre}.cross_attn_norm.weight", (h,), layer=i, sequence_parallel=True,
                           init=Init("ones")))
        p.append(ParamSpec(f"{pre}.cross_attn_norm.bias", (h,), layer=i, sequence_parallel=True,
                           init=Init("zeros")))
        p += _linear(f"{pre}.cross_attn.q", h, h, 0, normal, layer=i)
        p += _linear(f"{pre}.cross_attn.kv", 2 * h, h, 0, normal, layer=i)
        p.append(ParamSpec(f"{pre}.cross_attn.q_norm.weight", (hd,), layer=i, init=Init("ones")))
        p.append(ParamSpec(f"{pre}.cross_attn.k_norm.weight", (hd,), layer=i, init=Init("ones")))
        p += _linear(f"{pre}.cross_attn.proj", h, h, 1, out_init, layer=i)
        p += _linear(f"{pre}.mlp.fc1", cfg.mlp_hidden, h, 0, normal, layer=i)
        p += _linear(f"{pre}.mlp.fc2", h, cfg.mlp_hidden, 1, out_init, layer=i)
    p.append(ParamSpec("final_layer.scale_shift_table", (2, h), init=table_init))
    p += _linear("final_layer.linear", cfg.patch_volume * cfg.out_channels, h, None, normal)
    return Schema(tuple(p))


# ---------------------------------------------------------------------------------------------
# Token arithmetic


def patch_grid(cfg: DiTConfig, latent_thw: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patch-grid size (T', H', W') of a latent (T, H_l, W_l); the patch embed pads the end of
    each axis up to a multiple of the patch (notes 1.2)."""
    return tuple(-(-n // p) for n, p in zip(latent_thw, cfg.patch_size))  # type: ignore[return-value]


def video_tokens(cfg: DiTConfig, latent_thw: tuple[int, int, int]) -> int:
    """Video tokens of one sample: 720p 5 s = (14, 90, 160) latent -> 14 x 45 x 80 = 50,400."""
    return math.prod(patch_grid(cfg, latent_thw))


def sequence_length(cfg: DiTConfig, latent_thw: tuple[int, int, int]) -> int:
    """Self-attention length: video tokens plus the learned start and end tokens."""
    return video_tokens(cfg, latent_thw) + 2


def check_forward_inputs(cfg: DiTConfig, shapes: dict, kinds: dict, where: str = "MUG-DiT input") -> None:
    """Shape and dtype checks of the forward contract (docs/dit.md), shared by both backends.

    shapes: {argument: shape tuple}; kinds: {argument: "float" | "bool" | "int"} for x, timestep,
    text, text_mask, x_mask, fps, frame_indice. Raises ValueError naming the argument, what it
    got and what was expected.
    """
    def fail(name: str, expected: str) -> None:
        raise ValueError(f"{where} {name} has shape {shapes[name]} ({kinds[name]}), expected {expected}")

    x = shapes["x"]
    if len(x) != 5 or x[1] != cfg.in_channels or kinds["x"] != "float":
        fail("x", f"float (B, {cfg.in_channels}, T, H, W)")
    b, _, t, hh, ww = x
    tp = patch_grid(cfg, (t, hh, ww))[0]
    text = shapes["text"]
    expected = {
        "timestep": ((b,), "float", f"({b},)"),
        "fps": ((b,), "float", f"({b},)"),
        "x_mask": ((b, t), "bool", f"bool ({b}, {t})"),
        "frame_indice": ((b, tp + 2), "int", f"integer ({b}, {tp + 2}) (patch frames + start + end)"),
    }
    if len(text) != 3 or text[0] != b or text[2] != cfg.text_dim or kinds["text"] != "float":
        fail("text", f"float ({b}, L, {cfg.text_dim})")
    if text[1] > cfg.text_max_len:
        fail("text", f"at most text_max_len = {cfg.text_max_len} tokens")
    expected["text_mask"] = (tuple(text[:2]), "bool", f"bool {tuple(text[:2])}")
    for name, (shape, kind, say) in expected.items():
        if tuple(shapes[name]) != shape or (kinds[name] != kind and not (kind == "float" and kinds[name] == "int")):
            fail(name, say)
