"""Capture and restore every random number generator a training process uses (Python, numpy,
torch CPU, torch CUDA, Megatron's model-parallel tracker) as bytes for the checkpoint."""
from __future__ import annotations

import pickle
import random

import numpy as np
import torch


def capture() -> bytes:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch_cpu": torch.get_rng_state(),
             "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no Megatron parallel state)
        state["megatron_tracker"] = None
    return pickle.dumps(state)


def restore(blob: bytes) -> None:
    state = pickle.loads(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state.get("megatron_tracker") is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
