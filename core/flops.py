"""FLOP count of a MUG-DiT training step, the one every MFU number in mugv uses.

Counted: every matmul (2 FLOPs per multiply-add) in the embedders, the blocks and the final layer,
and the two attention matmuls (QK^T and PV: 4 * Lq * Lk * hidden per self- or cross-attention, no
causal halving since attention is bidirectional). Not counted: norms, activations, softmax, RoPE,
elementwise modulation (memory-bound, < 1% of the FLOPs at the sizes that matter).
Backward = 2 x forward. Recomputation re-runs the forward of the recomputed layers; it is reported
apart: model FLOPs (what MFU divides by) exclude it, hardware FLOPs include it.
"""
from __future__ import annotations

import dataclasses

from mugv.core.dit import DiTConfig, sequence_length, video_tokens


@dataclasses.dataclass(frozen=True)
class StepFlops:
    forward: float          # one forward pass of the whole model, FLOPs
    backward: float         # its backward (2 x forward)
    recompute: float        # extra forward FLOPs spent on activation recomputation
    attention_fraction: float  # share of the forward in the attention matmuls

    @property
    def model(self) -> float:
        """FLOPs that MFU counts: forward + backward, recompute excluded."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def layer_forward_flops(cfg: DiTConfig, seq: int, text_tokens: int) -> tuple[float, float]:
    """(all, attention-matmul-only) forward FLOPs of one block for one sample."""
    h, f = cfg.hidden_size, cfg.mlp_hidden
    self_linear = 2 * seq * h * (3 * h) + 2 * seq * h * h
    self_attn = 4 * seq * seq * h
    cross_linear = 2 * seq * h * h + 2 * text_tokens * h * (2 * h) + 2 * seq * h * h
    cross_attn = 4 * seq * text_tokens * h
    mlp = 2 * seq * h * f * 2
    attn = self_attn + cross_attn
    return self_linear + cross_linear + mlp + attn, attn


def step_flops(cfg: DiTConfig, latent_thw: tuple[int, int, int], text_tokens: int,
               batch: int = 1, layers: int | None = None, recompute_layers: int = 0) -> StepFlops:
    """FLOPs of one training step (forward + backward) on `batch` samples of one latent size.

    layers: blocks actually run (defaults to cfg.depth; benchmarks run fewer).
    recompute_layers: blocks whose forward is recomputed in backward (full recompute).
    """
    layers = cfg.depth if layers is None else layers
    h = cfg.hidden_size
    n = video_tokens(cfg, latent_thw)
    seq = sequence_length(cfg, latent_thw)
    per_layer, per_layer_attn = layer_forward_flops(cfg, seq, text_tokens)
    embed = (2 * n * (cfg.in_channels * cfg.patch_volume) * h           # patch embed
             + 2 * text_tokens * (cfg.text_dim * h + h * h)              # text projection MLP
             + 2 * 2 * (cfg.freq_dim * h + h * h)                        # t and fps MLPs
             + 2 * 2 * h * 6 * h                                         # t_block for t and t=0
             + 2 * n * h * cfg.patch_volume * cfg.out_channels)          # final linear
    forward = batch * (layers * per_layer + embed)
    recompute = batch * recompute_layers * per_layer
    return StepFlops(forward=float(forward), backward=2.0 * forward, recompute=float(recompute),
                     attention_fraction=batch * layers * per_layer_attn / forward)


def mfu(flops: StepFlops, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a step that took `seconds` on hardware of `peak_flops`/s."""
    return flops.model / seconds / peak_flops


H100_BF16_PEAK = 989e12  # dense bf16 datasheet peak of the H100 SXM (and the H200, same tensor cores)

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, matched in order
# against the CUDA device name (`torch.cuda.get_device_name()`): the more specific names first.
BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
)


def bf16_peak(device_name: str, override: str | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s of the named device, where it came from). `override` (the value of
    MUGV_PEAK_TFLOPS, TFLOP/s) wins; a device missing from BF16_PEAKS gives (None, why) and MFU is
    not reported rather than divided by another device's peak."""
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"MUGV_PEAK_TFLOPS={override!r}: expected a number of TFLOP/s") from None
        if not value > 0:
            raise ValueError(f"MUGV_PEAK_TFLOPS={override!r}: expected a positive number of TFLOP/s")
        return value * 1e12, f"MUGV_PEAK_TFLOPS={override}"
    for key, peak in BF16_PEAKS:
        if key in device_name.replace("-", " "):
            return peak, f"datasheet dense bf16 of {key}"
    return None, (f"no bf16 peak known for {device_name!r} (core/flops.py BF16_PEAKS): MFU not reported; "
                  "set MUGV_PEAK_TFLOPS")


def benchmark_peak(device_name: str | None, override: str | None = None) -> tuple[float, str]:
    """The MFU denominator of a benchmark: `bf16_peak`, or the H100's where the device is unknown
    (or a CPU smoke run), saying so in the source string the benchmark records."""
    peak, source = bf16_peak(device_name or "cpu", override)
    return (peak, source) if peak else (H100_BF16_PEAK, f"{device_name or 'cpu'} unknown: the H100's peak")
