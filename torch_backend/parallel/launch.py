"""Launch a mugv script on one or many nodes with a parallel layout: torchrun with the sizes as options.

    python -m mugv.torch_backend.parallel.launch --tp 2 --sp --pp 2 --nproc-per-node 8 SCRIPT.py [ARGS...]

The layout (`core/parallel.py::ParallelConfig`) is checked against the model size (`--size`) and
the world size (nnodes x nproc-per-node) BEFORE any process starts: a bad combination exits with
status 2 and a message naming the sizes. The workers then run under `torch.distributed.run`
(torchrun) with the layout in the environment (`MUGV_PARALLEL`, read back by `worker_layout()`).

Multi-node (c10d rendezvous): run the same command on every node, with the same
`--rdzv-endpoint HOST:PORT` (a host every node reaches; the c10d store runs there) and
`--rdzv-id`, `--nnodes N` and each node's `--node-rank` (0 on the endpoint host). One node alone
uses `--standalone` (the default when --nnodes is 1 and no endpoint is given).

Failures: `init_distributed(timeout_s)` (called by `parallelize`) gives every collective the
layout's `timeout_s`, and names the collective, this rank and its peers when one fails; torchrun
(no restarts) then stops every other rank, and this launcher prints which rank failed first and
why, and exits non-zero. So a rank that dies ends the job at once, and a rank that hangs ends it
after at most `timeout_s` (its peers' collective times out), not in a silent hang.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

from mugv.core.dit import SIZES, dit_config
from mugv.core.parallel import LayoutError, ParallelConfig, check_layout
from mugv.core.validate import ConfigError

ENV_LAYOUT = "MUGV_PARALLEL"
ENV_SIZE = "MUGV_DIT_SIZE"

# torch.distributed collectives that wait on a peer (wrapped by `init_distributed`). Not isend/irecv:
# P2POp checks their identity, and their wait happens later, on the returned work.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
               "reduce", "barrier", "all_to_all", "all_to_all_single", "all_gather_object",
               "broadcast_object_list", "send", "recv",
               "monitored_barrier")


class CollectiveError(RuntimeError):
    """A collective that failed or timed out: names this rank, the collective and its peers."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mugv.torch_backend.parallel.launch",
        description="Run a mugv training script under torchrun with a parallel layout.")
    lay = p.add_argument_group("layout (core/parallel.py::ParallelConfig)")
    lay.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    lay.add_argument("--sp", action="store_true", help="sequence parallel inside TP groups")
    lay.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    lay.add_argument("--vpp", type=int, default=1, help="virtual (interleaved) chunks per stage")
    lay.add_argument("--cp", type=int, default=1, help="context-parallel size (Ulysses all-to-all; heads must divide TP x CP)")
    lay.add_argument("--distributed-optimizer", action="store_true",
                     help="shard optimizer state over data-parallel ranks")
    lay.add_argument("--timeout-s", type=float, default=600.0,
                     help="a collective waiting longer than this ends the job (seconds)")
    lay.add_argument("--size", default="10B", choices=sorted(SIZES),
                     help="MUG-DiT size the layout must fit (heads, layers)")
    run = p.add_argument_group("processes (torchrun)")
    run.add_argument("--nproc-per-node", type=int, default=1)
    run.add_argument("--nnodes", type=int, default=1)
    run.add_argument("--node-rank", type=int, default=0,
                     help="this node's rank (informational under c10d: the rendezvous assigns ranks)")
    run.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous store")
    run.add_argument("--rdzv-id", default="mugv", help="job id, the same on every node")
    run.add_argument("--log-dir", default=None, help="torchrun's per-rank log directory")
    p.add_argument("script", help="python script each rank runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def layout_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                          virtual_pipeline=args.vpp, context_parallel=args.cp,
                          sequence_parallel=args.sp, distributed_optimizer=args.distributed_optimizer,
                          timeout_s=args.timeout_s)


def check_launch(args: argparse.Namespace) -> ParallelConfig:
    """Every check that needs no process: sizes, layout vs model, world size. Raises LayoutError
    or ConfigError naming the sizes."""
    for name in ("nproc_per_node", "nnodes"):
        if getattr(args, name) < 1:
            raise LayoutError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise LayoutError(f"--node-rank {args.node_rank}: expected 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise LayoutError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the c10d store)")
    par = layout_from_args(args)
    world = args.nnodes * args.nproc_per_node
    check_layout(par, dit_config(args.size), world)
    return par


def torchrun_args(args: argparse.Namespace) -> list[str]:
    out = ["--nproc-per-node", str(args.nproc_per_node), "--max-restarts", "0"]
    if args.nnodes == 1 and not args.rdzv_endpoint:
        out += ["--standalone"]
    else:
        out += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    if args.log_dir:
        out += ["--log-dir", args.log_dir]
    return out + [args.script, *args.script_args]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        par = check_launch(args)
    except (LayoutError, ConfigError) as e:
        print(f"mugv launch: invalid layout: {e}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ[ENV_LAYOUT] = json.dumps(dataclasses.asdict(par))
    os.environ[ENV_SIZE] = args.size
    start = time.monotonic()
    try:
        run(get_args_parser().parse_args(torchrun_args(args)))
    except ChildFailedError as e:
        print(failure_report(e, time.monotonic() - start), file=sys.stderr)
        return 1
    return 0


def failure_report(error, elapsed_s: float) -> str:
    """Which rank failed first, how, and the rest, from torchrun's ChildFailedError."""
    failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
    lines = [f"mugv launch: job ended after {elapsed_s:.1f} s: {len(failures)} rank(s) failed"]
    for i, (rank, f) in enumerate(failures):
        how = f"exit code {f.exitcode}" if f.exitcode >= 0 else f"signal {f.signal_name()}"
        message = f.message if isinstance(f.message, str) else json.dumps(f.message)
        if isinstance(f.message, dict):
            message = f.message.get("message", message)
        if not message or message.startswith("To enable traceback"):
            message = "(no Python error recorded: the process exited or was killed)"
        tag = "first failure" if i == 0 else "also failed"
        lines.append(f"  {tag}: rank {rank} (local rank {f.local_rank}, pid {f.pid}): {how}: "
                     f"{message.strip().splitlines()[-1] if message.strip() else message}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side


def worker_layout() -> ParallelConfig:
    """The layout this launcher passed to the workers (default ParallelConfig() outside it)."""
    raw = os.environ.get(ENV_LAYOUT)
    return ParallelConfig(**json.loads(raw)) if raw else ParallelConfig()


def init_distributed(timeout_s: float) -> None:
    """Join the torchrun world (gloo on a CPU, nccl on a GPU) with `timeout_s` on every collective,
    and make failures say where: a collective that raises (a peer died: connection closed; a peer
    hung: timeout) is re-raised as CollectiveError naming this rank, the collective, the group's
    other ranks and the time waited; and the error is recorded for torchrun's failure summary.
    No-op when the process group exists or outside torchrun."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() or "RANK" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_mugv_named", False):
            setattr(dist, name, _named_collective(fn, name, timeout_s))
    _record_uncaught_errors()


def _group_ranks(kwargs, args, dist) -> list[int]:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    try:
        return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    except Exception:  # a group this rank is not part of, or a destroyed one
        return []


def _named_collective(fn, name: str, timeout_s: float):
    import torch.distributed as dist

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except CollectiveError:
            raise
        except RuntimeError as e:
            me = dist.get_rank()
            peers = [r for r in _group_ranks(kwargs, args, dist) if r != me]
            waited = time.monotonic() - start
            why = (f"timed out (timeout {timeout_s:g} s): rank(s) {peers} hung or died"
                   if waited >= 0.9 * timeout_s or "imeout" in str(e) or "imed out" in str(e)
                   else f"failed: rank(s) {peers} died or left")
            raise CollectiveError(f"rank {me}: collective {name} over ranks {[me] + peers} {why} "
                                  f"after {waited:.1f} s [{str(e).strip().splitlines()[0][:200]}]") from e
    wrapper._mugv_named = True
    return wrapper


def _record_uncaught_errors() -> None:
    """Write an uncaught exception to torchrun's error file, so the launcher's summary shows it
    (what torch's `@record` decorator does, without decorating the user's main)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
            ErrorHandler().record_exception(value)
        finally:
            previous(kind, value, tb)
    sys.excepthook = hook


if __name__ == "__main__":
    sys.exit(main())
