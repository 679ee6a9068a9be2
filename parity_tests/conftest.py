"""Deterministic parity: TF32 off, seeds fixed, strict dtype promotion in JAX, fp32 matmuls exact.

Tests that need ../shared or a GPU skip with a visible reason where those are absent
(see the `shared_dir` fixture and `requires_gpu`). Under `CI=true` the proof cannot be skipped
silently: a missing ../shared, or a locked package that does not import (`pytest.importorskip`),
fails the test instead; only GPU-only and interpreter-limited cases still skip there.
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
# The same MKL code path as the child processes (helpers.child_env): sharded runs are judged by
# the one-process run's error, so both must run the same arithmetic. On a Sapphire Rapids CPU
# (AMX, session 11) MKL's default path in this process and the children's COMPATIBLE path gave
# t_embedder.fc1's weight gradient errors 1.7e-5 and 3.0e-4 against float64: 22 layout tests
# failed there with this process on the default path, and passed with both on COMPATIBLE.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("MUGV_SHARED", REPO.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() == "true"


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
    """../shared, or a visible skip where it is absent (a failure under CI=true: the official
    goldens are the proof of equality with MUG-V and must not be skipped where it lands)."""
    if not (SHARED / "reference").is_dir():
        message = f"needs ../shared (reference goldens and clips); not found at {SHARED}"
        if IN_CI:
            pytest.fail(f"CI=true: {message} (set MUGV_SHARED to its path)", pytrace=False)
        pytest.skip(message)
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a package the lock installs that fails to import is an error, not a skip."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and call.excinfo is not None:
        reason = str(call.excinfo.value)
        if reason.startswith("could not import"):
            report.outcome = "failed"
            report.longrepr = f"CI=true: {reason} (every package of the lock must import here)"


requires_gpu = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (run on the device machine)")
