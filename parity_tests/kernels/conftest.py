"""Kernel parity tests run under Triton's CPU interpreter where no GPU is visible.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the kernel
modules are imported (../shared/notes/platform.md); `mugv.kernels._launch` does the same on import,
this makes the choice explicit for the test session.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
