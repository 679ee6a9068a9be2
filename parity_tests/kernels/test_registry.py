"""The kernel registry: the reference is the default, kernels only where enabled for CUDA."""
import pytest
import torch

from mugv.kernels import registry


def test_every_registered_kernel_has_function_reference_and_test():
    import importlib
    import pathlib
    repo = pathlib.Path(__file__).resolve().parents[2]
    for entry in registry.KERNELS.values():
        module = importlib.import_module(f"mugv.kernels.{entry.module}")
        assert callable(getattr(module, entry.function)) and callable(getattr(module, entry.reference))
        assert (repo / entry.test).is_file(), entry.test


def test_reference_on_cpu_even_when_forced(monkeypatch):
    monkeypatch.setenv("MUGV_KERNELS", "all")
    for name in registry.KERNELS:
        assert not registry.kernel_enabled(name, torch.device("cpu"))
        assert registry.select(name, torch.device("cpu")).__name__.endswith("_reference")


def test_env_choices_on_cuda(monkeypatch):
    cuda = torch.device("cuda")  # a device object only; no CUDA call is made for forced choices
    monkeypatch.setenv("MUGV_KERNELS", "all")
    assert registry.kernel_enabled("qk_rmsnorm_rope", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "reference")
    assert not registry.kernel_enabled("qk_rmsnorm_rope", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "adaln_modulate")
    assert registry.kernel_enabled("adaln_modulate", cuda)
    assert not registry.kernel_enabled("groupnorm_silu", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "adaln_modulte")
    with pytest.raises(ValueError, match="adaln_modulte"):
        registry.kernel_enabled("adaln_modulate", cuda)
    with pytest.raises(KeyError, match="nope"):
        registry.select("nope", cuda)
