"""Deterministic parity: TF32 off, seeds fixed, strict dtype promotion in JAX, fp32 matmuls exact.

Tests that need ../shared or a GPU skip with a visible reason where those are absent
(see the `shared_dir` fixture and `requires_gpu`).
"""
from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pytest

# Before jax/torch import anywhere: CPU-only JAX, full-precision matmuls, no preallocation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_ENABLE_X64", "0")
# One intra-op thread: test shapes are tiny, and on a loaded 2-core machine OpenMP's spinning
# threads made a 80x144x576 matmul 40x slower (28 ms vs 0.7 ms). Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("MUGV_SHARED", REPO.parent / "shared"))


def _configure_frameworks() -> None:
    try:
        import torch
        # Triton decides at import time whether kernels run in its CPU interpreter, and
        # use_deterministic_algorithms below imports it: choose before (kernels/_launch.py).
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        torch.use_deterministic_algorithms(True, warn_only=True)
    except ImportError:
        pass
    try:
        import jax
        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_default_matmul_precision", "highest")
    except ImportError:
        pass


_configure_frameworks()


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
        torch.manual_seed(0)
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared, or a visible skip where it is absent."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"needs ../shared (reference goldens and clips); not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def goldens_dir(shared_dir) -> pathlib.Path:
    return shared_dir / "reference" / "goldens"


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


requires_gpu = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (run on the device machine)")
