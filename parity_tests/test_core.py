"""core/: framework-free, the named sizes, validated configs, shape and FLOP arithmetic."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from mugv.core import dit as dit_mod
from mugv.core.dit import DiTConfig, dit_config, dit_schema, sequence_length, video_tokens
from mugv.core.flops import step_flops
from mugv.core.parallel import LayoutError, ParallelConfig, check_layout
from mugv.core.train import OptimizerConfig, TrainConfig
from mugv.core.validate import ConfigError, from_dict, to_dict
from mugv.core.vae import front_padding, latent_frames, latent_shape

CORE = pathlib.Path(dit_mod.__file__).parent


def test_core_imports_neither_torch_nor_jax():
    modules = sorted(f"mugv.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'jax', 'jaxlib', 'equinox', 'megatron', 'triton'))\n"
            "assert not bad, bad\nprint(len(sys.argv))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(modules) >= 6


@pytest.mark.parametrize("size,hidden,heads", [("debug", 288, 4), ("1B", 1152, 16), ("4B", 2304, 32),
                                               ("10B", 3456, 48), ("18B", 4608, 64)])
def test_named_sizes(size, hidden, heads):
    cfg = dit_config(size)
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.head_dim) == (hidden, heads, 56, 72)
    assert cfg.patch_size == (1, 2, 2) and cfg.in_channels == 24 and cfg.out_channels == 48
    assert cfg.mlp_hidden == 4 * hidden


def test_10b_parameter_count_matches_official_total():
    schema = dit_schema(dit_config("10B"))
    assert len(schema) == 1197
    assert schema.numel == 10_830_321_984


def test_token_arithmetic_720p():
    cfg = dit_config("10B")
    lat = latent_shape(105, 720, 1280)
    assert lat == (14, 90, 160)
    assert video_tokens(cfg, lat) == 50_400 and sequence_length(cfg, lat) == 50_402
    assert video_tokens(cfg, latent_shape(105, 256, 256)) == 14 * 16 * 16
    # odd latent sizes pad at the end of each axis (notes 1.2)
    assert video_tokens(cfg, (3, 7, 11)) == 3 * 4 * 6


@pytest.mark.parametrize("frames,latent,pad", [(1, 1, (7, "repeat_first")), (8, 1, (0, "zeros")),
                                               (9, 2, (7, "repeat_first")), (12, 2, (4, "zeros")),
                                               (17, 3, (7, "repeat_first")), (57, 8, (7, "repeat_first")),
                                               (73, 10, (7, "repeat_first")), (105, 14, (7, "repeat_first"))])
def test_frame_rules(frames, latent, pad):
    assert latent_frames(frames) == latent
    assert front_padding(frames) == pad


def test_latent_shape_rejects_non_multiple_of_8():
    with pytest.raises(ValueError, match="video height = 100: expected a positive multiple of 8"):
        latent_shape(9, 100, 64)


def test_flops_count():
    cfg = dit_config("10B")
    f = step_flops(cfg, (14, 90, 160), text_tokens=300)
    seq = 50_402
    h = 3456
    per_layer = 28 * seq * h * h + 4 * seq * seq * h + 4 * 300 * h * h + 4 * seq * 300 * h
    assert abs(f.forward - 56 * per_layer) / f.forward < 0.002    # embedders are < 0.2%
    assert f.backward == 2 * f.forward and f.recompute == 0
    assert 0.66 < f.attention_fraction < 0.69      # "attention is 67% of the FLOPs" at 720p
    g = step_flops(cfg, (14, 90, 160), 300, layers=4, recompute_layers=4)
    assert g.recompute == 4 * per_layer and g.hardware == g.model + g.recompute


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2250e12)])
def test_mfu_divides_by_the_running_devices_peak(name, peak):
    from mugv.core.flops import bf16_peak
    assert bf16_peak(name)[0] == peak
    assert bf16_peak(name, "500")[0] == 500e12            # MUGV_PEAK_TFLOPS wins


def test_unknown_device_gets_no_peak_and_bad_override_is_named():
    from mugv.core.flops import benchmark_peak, bf16_peak
    peak, why = bf16_peak("NVIDIA GeForce RTX 3060")
    assert peak is None and "MUGV_PEAK_TFLOPS" in why and "RTX 3060" in why
    assert "unknown" in benchmark_peak("NVIDIA GeForce RTX 3060")[1]
    for bad in ("fast", "0", "-3"):
        with pytest.raises(ValueError, match="MUGV_PEAK_TFLOPS"):
            bf16_peak("NVIDIA H100", bad)


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=100, num_heads=3), "num_heads"),     # not a divisor
    (dict(hidden_size=100, num_heads=4), "num_heads"),     # head dim 25: not divisible by 6
    (dict(depth=0), "depth"),
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(mlp_ratio=-1.0), "mlp_ratio"),
])
def test_invalid_dit_config(kwargs, field):
    with pytest.raises(ConfigError, match=rf"DiTConfig\.{field} = .*: expected"):
        DiTConfig(**kwargs)


def test_unknown_size_and_field():
    with pytest.raises(ConfigError, match="DiT size '7B': expected one of"):
        dit_config("7B")
    with pytest.raises(ConfigError, match=r"DiTConfig: unknown field\(s\) \['hiden_size'\]"):
        from_dict(DiTConfig, {"hiden_size": 10})


def test_config_dict_round_trip():
    cfg = TrainConfig(steps=7, optimizer=OptimizerConfig(lr=3e-4, betas=(0.9, 0.95)))
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert from_dict(DiTConfig, to_dict(dit_config("tiny"))) == dit_config("tiny")


def test_invalid_train_configs_name_field():
    with pytest.raises(ConfigError, match=r"OptimizerConfig\.lr = -1: expected a value in \(0, 1\]"):
        OptimizerConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"TrainConfig\.precision = 'fp8': expected one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match=r"ParallelConfig\.sequence_parallel = True"):
        ParallelConfig(sequence_parallel=True)


def test_layout_checks_name_the_sizes():
    cfg = dit_config("10B")
    assert check_layout(ParallelConfig(tensor_parallel=4, sequence_parallel=True), cfg, 8) == 2
    with pytest.raises(LayoutError, match=r"world size 6 is not a multiple of tensor_parallel 4"):
        check_layout(ParallelConfig(tensor_parallel=4), cfg, 6)
    with pytest.raises(LayoutError, match=r"num_heads 48 is not divisible by tensor_parallel 4 x context_parallel 8 = 32"):
        check_layout(ParallelConfig(tensor_parallel=4, context_parallel=8), cfg, 32)
    with pytest.raises(LayoutError, match=r"depth 56 layers do not divide into pipeline_parallel 3"):
        check_layout(ParallelConfig(pipeline_parallel=3), cfg, 3)
