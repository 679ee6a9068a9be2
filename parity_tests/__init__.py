"""Parity tests: jax_reference vs torch_backend, kernels vs reference, sharded vs unsharded."""
