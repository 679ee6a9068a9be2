"""Megatron-Core 0.16.1 on a CPU (gloo), for development machines and CI; never active on a GPU.

Megatron-Core builds on a CPU (`use_cpu_initialization=True`) but assumes CUDA when it runs. These
are the places (line numbers of 0.16.1, measured in ../shared/notes/platform.md) and how `enable()`
answers each of them. The idea is one: on a machine without CUDA, "the current CUDA device" IS the
CPU, its RNG is the CPU generator, its streams/events are no-ops.

| # | Megatron-Core 0.16.1 site                                  | answered by                        |
|---|------------------------------------------------------------|------------------------------------|
| 1 | tensor_parallel/random.py:235 `torch.cuda.get_rng_state()`, | CUDA RNG functions -> CPU generator|
|   | RNG tracker fork / activation checkpointing                 | (torch.cuda.* and random.py's own  |
|   |                                                             | `_get/_set_cuda_rng_state`)        |
| 2 | utils.py:631 GlobalMemoryBuffer `torch.cuda.current_device()`| `torch.cuda.current_device()` ->   |
| 4 | distributed/param_and_grad_buffer.py:806 (DDP buffer)       |   `torch.device("cpu")`             |
| 7 | tensor_parallel/mappings.py:141 (SP gather, in backward)    |                                    |
| 3 | transformer/utils.py:35 causal mask `device="cuda"`          | `_CudaAsCpuMode`: factory calls    |
| 5 | optimizer/optimizer.py:907 FP32Optimizer `device='cuda'`     |   with device "cuda" get "cpu"     |
| 8 | pipeline_parallel/schedules.py:2138 `device="cuda"`          |                                    |
| 6 | optimizer/clip_grads.py:167 asserts `torch.cuda.FloatTensor` | `_CudaAsCpuMode`: `t.type()` names |
| 9 | optimizer/distrib_optimizer.py:431 `torch.cuda.*` type names |   the CUDA type of a CPU tensor    |

Why `current_device` itself is patched rather than only a TorchFunctionMode: a mode is not active
inside autograd's backward, where the sequence-parallel gather (7) allocates its output.
The mode is pushed once, for the process (thread-local, like every torch function mode). It
rewrites calls that would otherwise fail on this machine ("cuda" devices, `.cuda()`) and one answer
that works but would make Megatron refuse: `t.type()` of a CPU float tensor names its CUDA type.

Also here: `initialize_parallel` / `destroy_parallel`, Megatron's parallel state for one process
or under torchrun (gloo on CPU, nccl on GPU), with explicit tp/pp/cp sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"enabled": False, "mode": None, "saved": {}, "owns_process_group": False}


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def is_enabled() -> bool:
    return _STATE["enabled"]


class _CpuStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return _CpuStream()

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end) -> float:
        return 0.0


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an int device means a GPU


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
                    "torch.DoubleTensor": "torch.cuda.DoubleTensor"}


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` to the CPU, `.cuda()` to a no-op, and lets `t.type()` of a CPU
    tensor answer its CUDA type name (Megatron checks those strings, sites 6 and 9)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(device=None, clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _drop_cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable() -> bool:
    """Make Megatron-Core run on this CPU-only machine. Idempotent.

    Returns True when the layer is active, False on a machine with CUDA (where it never activates).
    Call it before building Megatron modules (build_model / initialize_parallel call it).
    """
    if not cuda_absent():
        return False
    if _STATE["enabled"]:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    patches = {
        # sites 2, 4, 7: "the current CUDA device" is the CPU
        (torch.cuda, "current_device"): lambda: torch.device("cpu"),
        (torch.cuda, "synchronize"): lambda device=None: None,
        (torch.cuda, "current_stream"): lambda device=None: _CpuStream(),
        (torch.cuda, "default_stream"): lambda device=None: _CpuStream(),
        (torch.cuda, "Stream"): _CpuStream,
        (torch.cuda, "Event"): _CpuStream,
        (torch.cuda, "stream"): lambda stream=None: contextlib.nullcontext(),
        # site 1: the CUDA RNG is the CPU generator (the tracker forks and restores it)
        (torch.cuda, "get_rng_state"): _cpu_rng_get,
        (torch.cuda.random, "get_rng_state"): _cpu_rng_get,
        (torch.cuda, "set_rng_state"): _cpu_rng_set,
        # (not torch.manual_seed: it calls torch.cuda.manual_seed_all itself)
        (torch.cuda, "manual_seed"): lambda seed: torch.default_generator.manual_seed(seed) and None,
        (torch.cuda, "manual_seed_all"): lambda seed: None,
        (mrandom, "_get_cuda_rng_state"): _cpu_rng_get,
        (mrandom, "_set_cuda_rng_state"): _cpu_rng_set,
    }
    for (owner, name), replacement in patches.items():
        _STATE["saved"][(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)
    # The tracker's fork warns when the CPU RNG moved inside it; here the CPU RNG IS the forked one.
    logging.getLogger(mrandom.__name__).addFilter(_drop_cpu_rng_warning)
    mode = _CudaAsCpuMode()  # sites 3, 5, 6, 8, 9
    mode.__enter__()
    _STATE["mode"] = mode
    _STATE["enabled"] = True
    return True


def disable() -> None:
    """Undo `enable()` (for tests that check the layer itself)."""
    if not _STATE["enabled"]:
        return
    _STATE["mode"].__exit__(None, None, None)
    for (owner, name), original in _STATE["saved"].items():
        setattr(owner, name, original)
    _STATE.update(enabled=False, mode=None, saved={})


# ---------------------------------------------------------------------------------------------
# Parallel state


@dataclasses.dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes; data parallelism takes the rest of the world."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "cp"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelSizes.{field} = {value!r}: expected an integer >= 1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, *,
                        vpp: int | None = None, timeout_s: float | None = None) -> None:
    """Initialise torch.distributed and Megatron's parallel state.

    Under torchrun (RANK/WORLD_SIZE set) it joins that world; otherwise it starts a world of one
    process. Backend: gloo without CUDA (with `enable()` applied), nccl with CUDA (device = local
    rank). Seeds Megatron's RNG tracker (`model_parallel_cuda_manual_seed`).

    vpp: virtual pipeline chunks per stage (interleaved 1F1B reads it from the parallel state);
        None or 1 for none.
    timeout_s: the timeout of every collective, on the world this creates (a world that already
        exists keeps its own) and on Megatron's subgroups (TP, PP, CP, DP, ...). None: 5 minutes
        for a world created here, Megatron's default (30 minutes) for the subgroups.
    """
    sizes = ParallelSizes(tp, pp, cp)
    if vpp is not None and (not isinstance(vpp, int) or vpp < 1 or (vpp > 1 and pp == 1)):
        raise ValueError(f"vpp = {vpp!r}: expected None or an integer >= 1, and 1 unless pp > 1 (pp = {pp})")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s = {timeout_s!r}: expected a positive number of seconds")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    on_cpu = enable()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # a world of one: the variables are set for init_process_group and removed again by
            # destroy_parallel, so a child process started later does not try to join this world
            # (it would inherit RANK=0 and this world's port: EADDRINUSE while the store lives)
            added = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                     "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
            added = {k: v for k, v in added.items() if k not in os.environ}
            os.environ.update(added)
            _STATE["env_added"] = sorted(added)
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="gloo" if on_cpu else "nccl",
                                timeout=datetime.timedelta(seconds=300 if timeout_s is None else timeout_s))
        _STATE["owns_process_group"] = True
    world = dist.get_world_size()
    if world % (sizes.tp * sizes.pp * sizes.cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = "
                         f"{sizes.tp}*{sizes.pp}*{sizes.cp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    timeouts = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=sizes.tp,
                                             pipeline_model_parallel_size=sizes.pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
                                             context_parallel_size=sizes.cp, **timeouts)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state (and the process group if `initialize_parallel`
    created it). For tests."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _STATE["owns_process_group"] and dist.is_initialized():
        dist.destroy_process_group()
        _STATE["owns_process_group"] = False
    for k in _STATE.pop("env_added", []):
        os.environ.pop(k, None)
