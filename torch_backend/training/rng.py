"""Capture and restore every random number generator a training process uses (Python, numpy,
torch CPU, torch CUDA, Megatron's model-parallel tracker) as bytes for the checkpoint.

The bytes are JSON (generator states are integers and byte strings, base64), never pickle: a
checkpoint is a shared file, and loading one must not run code from it. `restore` checks every
field's type and length before it touches a generator, and names the field it rejects.
"""
from __future__ import annotations

import base64
import json
import random
import sys

import numpy as np
import torch

FORMAT = "mugv-rng-v1"
MT_WORDS = 624          # Mersenne Twister state length (Python's random and numpy's legacy RandomState)


class RngStateError(ValueError):
    """A checkpoint's RNG blob is not a valid mugv RNG state (corrupt, foreign or an old pickle)."""


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def capture() -> bytes:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "format": FORMAT,
        "python": {"version": version, "words": list(words), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": ([_b64(s) for s in torch.cuda.get_rng_state_all()]
                       if torch.cuda.is_available() else None),
        "megatron_tracker": None,
    }
    # Only where Megatron is loaded (its tracker cannot hold states otherwise): importing it costs
    # 5-8 s, which a process that never used it (the VAE trainer) need not pay at every save.
    if "megatron.core" in sys.modules:
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
            state["megatron_tracker"] = {k: _b64(v) for k, v in get_cuda_rng_tracker().get_states().items()}
        except Exception:  # tracker not initialised (no Megatron parallel state)
            pass
    return json.dumps(state).encode()


def _fail(field: str, expected: str) -> None:
    raise RngStateError(f"RNG state field {field!r}: expected {expected}")


def _int_list(x, field: str, n: int, bound: int) -> tuple[int, ...]:
    if not (isinstance(x, list) and len(x) == n and all(type(v) is int and 0 <= v < bound for v in x)):
        _fail(field, f"a list of {n} integers in [0, {bound})")
    return tuple(x)


def _bytes_tensor(x, field: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(x, str):
        _fail(field, "a base64 string")
    try:
        raw = base64.b64decode(x.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        _fail(field, "a base64 string")
    if like is not None and len(raw) != like.numel():
        _fail(field, f"{like.numel()} bytes (this torch's generator state), got {len(raw)}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode(blob: bytes) -> dict:
    """Parse and check a captured blob; returns the states, touching no generator."""
    if blob[:1] != b"{":
        raise RngStateError("not a mugv RNG state (JSON expected; a checkpoint written by mugv before "
                            "2026-12 stored it as a pickle, which is never loaded: resume from a newer one)")
    try:
        s = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RngStateError(f"RNG state is not valid JSON: {err}") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        _fail("format", repr(FORMAT))
    py, npy = s.get("python"), s.get("numpy")
    if not isinstance(py, dict) or type(py.get("version")) is not int:
        _fail("python.version", "an integer")
    words = _int_list(py.get("words"), "python.words", MT_WORDS + 1, 2 ** 32)  # 624 words + position
    gauss = py.get("gauss_next")
    if gauss is not None and not isinstance(gauss, float):
        _fail("python.gauss_next", "a float or null")
    if not isinstance(npy, dict) or npy.get("kind") != "MT19937":
        _fail("numpy.kind", "'MT19937'")
    keys = np.array(_int_list(npy.get("keys"), "numpy.keys", MT_WORDS, 2 ** 32), dtype=np.uint32)
    for field, kind in (("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
        if type(npy.get(field)) is not kind:
            _fail(f"numpy.{field}", kind.__name__)
    cuda = s.get("torch_cuda")
    if cuda is not None and not isinstance(cuda, list):
        _fail("torch_cuda", "a list of base64 strings or null")
    tracker = s.get("megatron_tracker")
    if tracker is not None and not (isinstance(tracker, dict) and all(isinstance(k, str) for k in tracker)):
        _fail("megatron_tracker", "an object of base64 strings or null")
    return {
        "python": (py["version"], words, gauss),
        "numpy": ("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]),
        "torch_cpu": _bytes_tensor(s.get("torch_cpu"), "torch_cpu", torch.get_rng_state()),
        "torch_cuda": None if cuda is None else [_bytes_tensor(c, f"torch_cuda[{i}]") for i, c in enumerate(cuda)],
        "megatron_tracker": None if tracker is None else {
            k: _bytes_tensor(v, f"megatron_tracker.{k}") for k, v in tracker.items()},
    }


def restore(blob: bytes) -> None:
    """Set every generator from a blob written by `capture` (all fields checked first)."""
    state = decode(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state["megatron_tracker"] is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
