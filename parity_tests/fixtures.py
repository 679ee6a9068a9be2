"""Fixtures shared by several test files (conftest.py stays the place for session-wide settings):
a test module imports the ones it uses, e.g.

    from mugv.parity_tests.fixtures import megatron_world  # noqa: F401  (a fixture)
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def megatron_world():
    """Megatron-Core's parallel state for one process (TP = PP = CP = 1) over the module's tests."""
    from mugv.torch_backend.parallel import megatron_compat
    megatron_compat.initialize_parallel(tp=1)
    yield
    megatron_compat.destroy_parallel()
