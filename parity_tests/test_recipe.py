"""core/recipe.py: the pre-training recipe and the KernelConfig a run carries.

- Bad recipe and kernel values fail naming the field.
- A KernelConfig reaches the model: parallelize builds the self-attention with the asked
  attention backend and head-dim padding (cross-attention unpadded), and kernel names map onto the
  registry (references on a CPU).
- The Trainer records it in its checkpoints: config["kernels"] holds the choice, what each DiT
  kernel slot resolved to on the device, and the device (one 2-step run in a child process).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from mugv.core import validate as v
from mugv.core.recipe import ATTENTION_BACKENDS, KERNEL_NAMES, KernelConfig, PretrainConfig, StageConfig
from mugv.parity_tests.helpers import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_recipe_and_kernel_values_are_validated():
    with pytest.raises(v.ConfigError, match=r"StageConfig.frames = 0"):
        StageConfig(frames=0)
    with pytest.raises(v.ConfigError, match=r"PretrainConfig.stages.*distinct stage names"):
        PretrainConfig(stages=(StageConfig("a"), StageConfig("a")))
    with pytest.raises(v.ConfigError, match=r"KernelConfig.attention_backend = 'fast'"):
        KernelConfig(attention_backend="fast")
    with pytest.raises(v.ConfigError, match=r"KernelConfig.pad_head_dim = 75: expected null or a positive multiple of 8"):
        KernelConfig(pad_head_dim=75)
    with pytest.raises(v.ConfigError, match=r"KernelConfig.kernels = 'adaln'"):
        KernelConfig(kernels="adaln")
    assert KernelConfig(kernels="adaln_modulate,qk_rmsnorm_rope").kernel_choice == "adaln_modulate,qk_rmsnorm_rope"
    assert KernelConfig().kernel_choice is None and PretrainConfig().kernels == KernelConfig()


def test_names_in_core_are_the_backends_and_kernels():
    from mugv.kernels.registry import KERNELS
    from mugv.torch_backend.models import attention
    assert set(KERNEL_NAMES) == set(KERNELS)
    assert attention.BACKENDS == ATTENTION_BACKENDS


def test_kernel_config_reaches_the_layer_spec():
    import torch

    from mugv.kernels.registry import KERNELS
    from mugv.torch_backend.models.dit_layers import REFERENCE_OPS, kernels_selected, layer_spec_for
    spec = layer_spec_for(KernelConfig(attention_backend="math", pad_head_dim=80, kernels="all"), torch.device("cpu"))
    self_core = spec.submodules.self_attn.submodules.core_attention
    cross_core = spec.submodules.cross_attn.submodules.core_attention
    assert self_core.params == {"backend": "math", "pad_head_dim": 80}
    assert cross_core.params == {"backend": "math"}
    assert spec.params["ops"] is REFERENCE_OPS                       # a CPU runs the references
    assert kernels_selected(KernelConfig(kernels="all"), torch.device("cpu")) == {
        k: "reference" for k in ("adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope")}
    assert {"adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope"} <= set(KERNELS)


_WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from mugv.checkpoints.format import Checkpoint, latest_checkpoint
from mugv.core.dit import dit_config
from mugv.core.flow import FlowConfig
from mugv.core.recipe import KernelConfig
from mugv.core.train import OptimizerConfig, TrainConfig
from mugv.torch_backend.data.batch import SyntheticLatents
from mugv.torch_backend.training.trainer import Trainer

cfg = dit_config("tiny")
train = TrainConfig(steps=2, micro_batch=2, precision="fp32", checkpoint_every=2, log_every=1,
                    optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0))
source = SyntheticLatents(2, (2, 4, 4), text_len=8, text_dim=cfg.text_dim, seed=0)
kernels = KernelConfig(attention_backend="math", pad_head_dim=cfg.head_dim + 8 - cfg.head_dim % 8)
trainer = Trainer(cfg, train, FlowConfig(), source, sys.argv[1], log=lambda s: None, kernels=kernels)
core = next(iter(trainer.model.layers.values())).self_attn.core_attention
trainer.run()
trainer.close()
print(json.dumps({"config": Checkpoint(latest_checkpoint(sys.argv[1] + "/checkpoints")).config["kernels"],
                  "pad": core.pad_head_dim, "backend": core.backend, "head_dim": cfg.head_dim}))
"""


def test_trainer_applies_and_records_the_kernel_config(tmp_path):
    proc = subprocess.run([sys.executable, "-P", "-c", _WORKER, str(tmp_path / "run")], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pad = got["head_dim"] + 8 - got["head_dim"] % 8
    assert (got["backend"], got["pad"]) == ("math", pad)
    assert got["config"] == {"attention_backend": "math", "pad_head_dim": pad, "kernels": "auto", "device": "cpu",
                             "compile_layers": "auto",
                             "selected": {"adaln_modulate": "reference", "gated_residual_modulate": "reference",
                                          "qk_rmsnorm_rope": "reference"}}
