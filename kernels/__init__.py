"""Triton kernels, each with its autograd wrapper and the reference it must equal."""
