"""Where and in what precision the VAE runs: one decision for `train-vae`, `eval-vae`, `cache`,
`sample` and the demo, so every job takes the same code path on a GPU and on the CPU.

    device     cuda:<LOCAL_RANK> when torch sees a GPU, else cpu (MUGV_VAE_DEVICE overrides)
    precision  "fp32", or "bf16": autocast (fp32 weights, bf16 convolutions and matmuls; on
               CUDA GroupNorm stays fp32). "auto" = GPU_DEFAULT on a GPU (fp32, measured below),
               fp32 on the CPU (MUGV_VAE_PRECISION overrides "auto").
    kernels    the GroupNorm + SiLU slot (`models/vae.py::use_kernels`): the Triton kernel where
               verified on this GPU, else the reference.

`place_vae` applies the decision to a model and returns a `VAERuntime`, whose `record()` goes into
the run's log / metadata and whose `autocast()` wraps every VAE call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# Chosen from benchmarks/vae_bf16_error.py on the four real clips of ../shared/data/clips (CPU,
# seeded weights; benchmarks/results/vae_bf16_error_cpu.json, docs/vae.md "Device and
# precision"): bf16 moved the posterior mean by 3.1-5.2 % (relative L2) and changed 79-87 % of the
# uint8 pixels of an encode + decode (roundtrip PSNR against fp32 29.9-34.9 dB), far above the
# uint8 step a written clip can show. So fp32 stays the default on the GPU as well, and bf16 is
# opt-in (`precision="bf16"`, MUGV_VAE_PRECISION=bf16) until the GPU re-measurement with trained
# weights (pending; CUDA autocast keeps GroupNorm in fp32, CPU autocast does not) says otherwise.
GPU_DEFAULT = "fp32"


@dataclasses.dataclass(frozen=True)
class VAERuntime:
    device: torch.device
    precision: str                   # "fp32" | "bf16"
    kernels: dict = dataclasses.field(default_factory=dict)

    def autocast(self):
        """The context every VAE call runs in: bf16 autocast, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def record(self) -> dict:
        """What a run logs and stores in its metadata."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "kernels": dict(self.kernels)}


def vae_device(device: str | torch.device | None = None) -> torch.device:
    """The VAE's device: `device`, else MUGV_VAE_DEVICE, else this process's GPU (LOCAL_RANK under
    torchrun) when there is one, else the CPU."""
    device = device or os.environ.get("MUGV_VAE_DEVICE") or None
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def vae_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `precision` (one of PRECISIONS) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"VAE precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        precision = os.environ.get("MUGV_VAE_PRECISION") or (GPU_DEFAULT if device.type == "cuda" else "fp32")
        if precision not in PRECISIONS[1:]:
            raise ValueError(f"MUGV_VAE_PRECISION={precision!r}: expected one of {PRECISIONS[1:]}")
    return precision


def place_vae(model: torch.nn.Module, precision: str = "auto", device: str | torch.device | None = None,
              kernels: str | None = None) -> VAERuntime:
    """Move `model` (fp32 weights stay fp32) to its device, choose its kernels there, and return
    the runtime to run it under. `kernels`: a KernelConfig's `kernel_choice` (None = auto)."""
    from mugv.torch_backend.models.vae import use_kernels
    dev = vae_device(device)
    model.to(dev)
    chosen = use_kernels(model, dev, kernels)
    return VAERuntime(dev, vae_precision(precision, dev), chosen)
