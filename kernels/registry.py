"""Which fused kernels exist, and whether the model may use one on a given device.

The DiT/VAE spec slots ask `select(name, device)` once, when the model is built, and get either the
Triton function or its plain-torch reference (same signature). The reference is the default: a
kernel is used only on a CUDA device whose name is recorded in `verified.json` as having passed
that kernel's parity tests (the file `benchmarks/kernels.py` writes after its GPU parity run) with
the kernel's current `fingerprint` (so editing a kernel turns it off until the GPU run is
repeated), or when MUGV_KERNELS forces a choice:

    MUGV_KERNELS=reference        always the reference (e.g. to bisect a numerical difference)
    MUGV_KERNELS=all              every kernel on any CUDA device (you ran the parity tests there)
    MUGV_KERNELS=adaln_modulate,qk_rmsnorm_rope    those kernels on any CUDA device

On the CPU the kernels only run in Triton's interpreter (for tests), so the reference is always
chosen there. Kernel modules are imported lazily: importing the registry defines no Triton kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import pathlib

VERIFIED_FILE = pathlib.Path(__file__).with_name("verified.json")


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    name: str
    module: str  # under mugv.kernels
    function: str
    reference: str
    test: str  # the parity test that must pass on a device before the kernel is used there
    used_by: str


KERNELS: dict[str, KernelEntry] = {e.name: e for e in [
    KernelEntry("adaln_modulate", "adaln_modulate", "adaln_modulate", "adaln_modulate_reference",
                "parity_tests/kernels/test_adaln_modulate.py", "DiT block AdaLN sites"),
    KernelEntry("gated_residual_modulate", "gated_residual_modulate", "gated_residual_modulate",
                "gated_residual_modulate_reference",
                "parity_tests/kernels/test_gated_residual_modulate.py",
                "DiT block: gated residual into the next AdaLN site"),
    KernelEntry("qk_rmsnorm_rope", "qk_rmsnorm_rope", "qk_rmsnorm_rope", "qk_rmsnorm_rope_reference",
                "parity_tests/kernels/test_qk_rmsnorm_rope.py", "DiT self-attention q and k"),
    KernelEntry("groupnorm_silu", "groupnorm_silu", "groupnorm_silu", "groupnorm_silu_reference",
                "parity_tests/kernels/test_groupnorm_silu.py", "VAE ResBlocks"),
]}


def _entry(name: str) -> KernelEntry:
    if name not in KERNELS:
        raise KeyError(f"kernel {name!r}: expected one of {sorted(KERNELS)}")
    return KERNELS[name]


@functools.lru_cache(maxsize=None)
def verified_devices() -> dict:
    """{device name: {"kernels": [...], "torch": ..., "triton": ..., ...}} from verified.json."""
    if not VERIFIED_FILE.exists():
        return {}
    return json.loads(VERIFIED_FILE.read_text())


def fingerprint(name: str) -> str:
    """sha256 over what decides a kernel's numerics and launch: the source of its Triton kernels
    (decorators included), its autograd Function, its public wrapper, and kernels/_launch.py.
    References and docs are left out, so editing them keeps a GPU verification valid."""
    entry = _entry(name)
    module = importlib.import_module(f"mugv.kernels.{entry.module}")
    from mugv.kernels import _launch
    import torch
    parts = [inspect.getsource(_launch)]
    for obj in vars(module).values():
        fn = obj
        while not inspect.isfunction(fn) and hasattr(fn, "fn"):  # Autotuner -> JITFunction -> fn
            fn = fn.fn
        is_kernel = fn is not obj and inspect.isfunction(fn)
        is_function = inspect.isclass(obj) and issubclass(obj, torch.autograd.Function)
        if (is_kernel or is_function) and getattr(fn, "__module__", None) == module.__name__:
            parts.append(inspect.getsource(fn))
    parts.append(inspect.getsource(getattr(module, entry.function)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def kernel_enabled(name: str, device, choice: str | None = None) -> bool:
    """Whether the Triton kernel `name` may replace its reference on `device` (see module doc).
    `choice` (a run's `core/recipe.py::KernelConfig.kernels`: "reference", "all" or names) wins
    over MUGV_KERNELS; None reads MUGV_KERNELS, and without it verified.json decides."""
    _entry(name)
    device_type = getattr(device, "type", str(device).split(":")[0])
    if device_type != "cuda":
        return False
    choice = (os.environ.get("MUGV_KERNELS", "") if choice is None else choice).strip()
    if choice == "reference":
        return False
    if choice == "all":
        return True
    if choice:
        wanted = {k.strip() for k in choice.split(",") if k.strip()}
        unknown = wanted - set(KERNELS)
        if unknown:
            raise ValueError(f"MUGV_KERNELS: unknown kernels {sorted(unknown)}; expected names from "
                             f"{sorted(KERNELS)}, 'all' or 'reference'")
        return name in wanted
    import torch
    record = verified_devices().get(torch.cuda.get_device_name(device), {})
    return name in record.get("kernels", []) and record.get("fingerprints", {}).get(name) == fingerprint(name)


def select(name: str, device, choice: str | None = None):
    """The function to call for `name` on `device`: the Triton kernel where enabled (`choice` as
    in `kernel_enabled`), else the plain-torch reference (same arguments and results)."""
    entry = _entry(name)
    module = importlib.import_module(f"mugv.kernels.{entry.module}")
    return getattr(module, entry.function if kernel_enabled(name, device, choice) else entry.reference)
