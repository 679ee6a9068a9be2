"""What produced a run: the resolved versions of the main packages and the machine's dispatch
settings, recorded in each run's environment log, its checkpoints and its report.

Framework-free on purpose (importlib.metadata reads the installed distributions' metadata without
importing torch or jax), so every backend and the CLI record the same fields.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# The packages whose versions decide numerics and behaviour; the rest follow from the lock.
MAIN_PACKAGES = ("mugv", "torch", "megatron-core", "jax", "jaxlib", "equinox", "triton", "numpy",
                 "tensorstore", "orbax-checkpoint", "transformers", "av")

# Environment variables that change which kernels (and so which summation order) run.
DISPATCH_VARIABLES = ("ATEN_CPU_CAPABILITY", "XLA_FLAGS", "MKL_CBWR", "OMP_NUM_THREADS",
                      "TRITON_INTERPRET")


def package_versions(names: tuple[str, ...] = MAIN_PACKAGES) -> dict[str, str]:
    """{distribution name: installed version}, "not installed" for an absent one."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict:
    """Python, platform, main package versions and the dispatch-relevant environment variables."""
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "machine": platform.machine(), "versions": package_versions(),
            "dispatch": {k: os.environ[k] for k in DISPATCH_VARIABLES if k in os.environ}}


def versions_line(env: dict | None = None) -> str:
    """One log line: `torch 2.13.0+cpu, megatron-core 0.16.1, ...` (installed packages only)."""
    env = env or environment()
    return ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v != "not installed")
