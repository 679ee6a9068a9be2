"""Softmax attention for MUG-DiT through one slot: torch scaled_dot_product_attention with a chosen
backend.

Backends (`BACKENDS`): "math" (torch reference, the CPU path), "cudnn", "flash", "efficient", and
"auto": on a GPU the order measured fastest at head dim 72 (cuDNN, then flash, then
memory-efficient; see docs/megatron-on-cpu.md for the numbers), on a CPU plain SDPA. torch falls
through the priority list when a backend cannot take the inputs (e.g. flash with a mask).
The scale is head_dim^-1/2 (SDPA's default, the official one).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BY_NAME = {
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}
# Measured order on an H100 (head dim 72, bf16): cuDNN fastest, then flash, then efficient.
GPU_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BACKENDS = ("auto", *_BY_NAME)


def sdpa_context(backend: str, device: torch.device):
    """The torch context that restricts/prioritises SDPA backends for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(GPU_PRIORITY, set_priority=True)
    return sdpa_kernel(_BY_NAME[backend])


class DotProductAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v over sequence-first tensors; no parameters.

    forward(q (Sq, b, n, d), k (Sk, b, n, d), v (Sk, b, n, d), key_mask (b, Sk) bool or None)
    -> (Sq, b, n * d). key_mask True = attend; every row must have at least one True.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
        self.backend = backend

    def forward(self, q, k, v, key_mask=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, n, S, d)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        with sdpa_context(self.backend, q.device):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.permute(2, 0, 1, 3).flatten(2)
