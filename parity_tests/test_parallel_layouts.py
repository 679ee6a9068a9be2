"""Parallel layouts through `torch_backend/training/parallelize.py` and `torch_backend/parallel/launch.py` (CPU, gloo,
real processes).

One launch of 2 "nodes" of 1 process each on loopback, through the launcher's c10d rendezvous,
runs every 2-process layout of the tiny DiT (parity_tests/parallel_worker.py): TP=2 + SP (the
launcher's own layout), TP=2, PP=2 (Megatron's 1F1B schedule), PP=2 x 2 virtual stages
(interleaved 1F1B, a 4-layer variant, 2 micro-batches), DP=2 (Megatron DDP + distributed
optimizer, one sample per rank), each through Megatron DDP and `finalize_grads`, for a T2V and an
I2V batch with padded text. The loss and the gathered global gradients equal this (single)
process's run within the ("sharded", "float32") row. It also writes a checkpoint at TP=2
(`save_torch`), which loads here at TP=1 and gives the TP=2 outputs.

How "equal" is judged (tolerances.assert_sharded_vs_float64): this process also runs each model in
float64 (the same fp32 parameters and inputs); per tensor, the layout's error against float64 is
at most 4x the one process's fp32 error against float64 (or a floor of 16 fp32 ulps of the
tensor's largest value), and the one process is itself within 256 ulps of float64. The bound
follows the arithmetic of each machine's kernels instead of one machine's spread.

Context parallel (Ulysses, torch_backend/models/context_parallel.py): CP=2 in the same 2-process launch
(with the distributed optimizer, sharded over DP x CP), TP=2 + SP x CP=2 (a 4-head variant of the
tiny DiT) and PP=2 x CP=2 in the 4-process launch, each on T2V and I2V batches with padded text
whose sequence (27 video tokens + start/end = 29) divides neither by 2 nor by 4: the padding is
masked out of attention and dropped from the output. Every CP rank returns the whole output.

A 4-process launch (one node) runs TP=2 + SP x PP=2 the same way.

Failures: bad layouts exit before any process starts, naming the sizes; a rank that exits, or one
that hangs, ends the job within the layout's timeout with a message naming the rank and the
collective.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(REPO / "parity_tests" / "parallel_worker.py")
LAUNCH = [sys.executable, "-m", "mugv.torch_backend.parallel.launch"]
KINDS = ("t2v", "i2v")
LAYOUTS = ("tp2sp", "tp2", "pp2", "dp2")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


pytestmark = pytest.mark.skipif(_has_cuda(), reason="tests Megatron-Core on CPU/gloo (no CUDA present)")


def _env() -> dict:
    # one intra-op thread (tiny shapes, loaded 2-core machine); reproducible MKL across processes
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="COMPATIBLE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two launcher processes (nodes 0 and 1, one rank each) meeting at a c10d rendezvous."""
    out = tmp_path_factory.mktemp("layouts")
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        LAUNCH + ["--size", "tiny", "--tp", "2", "--sp", "--timeout-s", "120", "--nnodes", "2",
                  "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-endpoint", endpoint,
                  "--rdzv-id", "mugv-test", WORKER, "layouts", str(out)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode:
            raise AssertionError(f"node {rank} launcher exited {p.returncode}:\n{log[-4000:]}")
    return dict(np.load(out / "layouts.npz")), out


def _single_and_float64(cfg, inputs_by_kind, weights) -> dict:
    """One process (TP=1) on each batch kind, in fp32 and in float64 (the same fp32 parameters and
    inputs, model and loss weights in float64): {kind: {"out", "loss", "grads"} per precision}."""
    import torch

    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.parity_tests.test_dit import random_params, torch_run
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.models.dit import build_dit, transformer_config
    as64 = lambda a: a.astype(np.float64) if a.dtype == np.float32 else a  # noqa: E731
    runs = {}
    megatron_compat.initialize_parallel(tp=1)
    try:
        model = build_dit(cfg, transformer_config(cfg), seed=None)
        load_canonical(model, cfg, random_params(cfg))
        model64 = build_dit(cfg, transformer_config(cfg), seed=None)
        load_canonical(model64, cfg, random_params(cfg))
        model64.double()
        for kind, inputs in inputs_by_kind.items():
            out, grads = torch_run(model, inputs, weights)
            out64, grads64 = torch_run(model64, {k: as64(v) for k, v in inputs.items()}, as64(weights))
            # the loss as the layouts compute it: an fp32 sum in torch (float64 for the reference)
            loss = float((torch.from_numpy(out) * torch.from_numpy(weights)).sum())
            runs[kind] = {"out": out, "loss": np.float32(loss), "grads": grads,
                          "out64": out64, "loss64": np.sum(out64 * as64(weights)), "grads64": grads64}
    finally:
        megatron_compat.destroy_parallel()
    return runs


@pytest.fixture(scope="module")
def reference():
    """Single process (TP=1), fp32 and float64: output, loss and gradients for each batch kind."""
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs
    return _single_and_float64(CFG, {kind: make_inputs(kind) for kind in KINDS}, loss_weights())


@pytest.fixture(scope="module")
def reference_odd():
    """Single process on the context-parallel batches (29 tokens), fp32 and float64: the tiny DiT
    ("tiny") and its 4-head variant ("4heads"), output, loss and gradients for each batch kind."""
    from mugv.parity_tests.parallel_worker import ODD_W, four_head_config
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs
    weights = np.ascontiguousarray(loss_weights()[..., :ODD_W])
    inputs = {}
    for kind in KINDS:
        inputs[kind] = make_inputs(kind)
        inputs[kind]["x"] = np.ascontiguousarray(inputs[kind]["x"][..., :ODD_W])
    return {(name, kind): run for name, cfg in (("tiny", CFG), ("4heads", four_head_config()))
            for kind, run in _single_and_float64(cfg, inputs, weights).items()}


def _assert_layout(results, tag, kind, ref, what):
    """The layout's loss and every global gradient against the one process's, both against float64."""
    from mugv.parity_tests.tolerances import assert_sharded_vs_float64
    assert_sharded_vs_float64(results[f"{tag}.{kind}.loss"].reshape(()), ref["loss"], ref["loss64"],
                              name=f"{what} {kind} loss")
    params = [k for k in ref["grads"] if not k.startswith("input.")]
    for name in params:
        assert_sharded_vs_float64(results[f"{tag}.{kind}.{name}"], ref["grads"][name], ref["grads64"][name],
                                  name=f"{what} {kind} grad {name}")
    return len(params)


@pytest.mark.parametrize("kind", KINDS)
def test_one_process_fp32_is_near_float64(reference, reference_odd, reference_depth4, kind):
    """The baseline of every comparison here: the one-process fp32 run is within the row's
    single_ulps of float64, per tensor (outputs, losses, gradients w.r.t. parameters and inputs)."""
    from mugv.parity_tests.tolerances import assert_single_vs_float64
    runs = {"tiny": reference[kind], "tiny 29 tokens": reference_odd["tiny", kind],
            "4 heads 29 tokens": reference_odd["4heads", kind], "4 layers": reference_depth4[kind]}
    for what, ref in runs.items():
        assert_single_vs_float64(ref["out"], ref["out64"], name=f"{what} {kind} output")
        assert_single_vs_float64(np.array(ref["loss"]), np.array(ref["loss64"]), name=f"{what} {kind} loss")
        for name, g in ref["grads"].items():
            assert_single_vs_float64(g, ref["grads64"][name], name=f"{what} {kind} grad {name}")


@pytest.mark.parametrize("tag", ["cp2_full", "cp2_selective"])
@pytest.mark.parametrize("kind", KINDS)
def test_context_parallel_with_recompute_equals_single_process(two_nodes, reference_odd, tag, kind):
    """CP=2 under full (uniform, every layer) and selective (attention core) recomputation: the
    all-to-alls run again in backward, the padding mask passes through the checkpoints."""
    _assert_layout(two_nodes[0], tag, kind, reference_odd["tiny", kind], tag)


@pytest.mark.parametrize("kind", KINDS)
def test_context_parallel_equals_single_process(two_nodes, reference_odd, kind):
    """CP=2 (Ulysses) with the distributed optimizer over DP x CP, 29 tokens (padded to 30): the
    loss and every global gradient equal one process; both CP ranks return the whole output."""
    from mugv.parity_tests.tolerances import assert_sharded_vs_float64
    results, _ = two_nodes
    ref = reference_odd["tiny", kind]
    n = _assert_layout(results, "cp2", kind, ref, "CP=2")
    if kind == "i2v":
        for rank, rank_out in enumerate(results["cp2.i2v.out"]):
            assert_sharded_vs_float64(rank_out, ref["out"], ref["out64"], name=f"CP=2 output on CP rank {rank}")
    print(f"cp2 {kind}: loss {results[f'cp2.{kind}.loss'][0]:.6f} vs {ref['loss']:.6f}, {n} gradients, "
          f"layout took {float(results['cp2.seconds']):.1f} s")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_layout_equals_single_process(two_nodes, reference, layout, kind):
    results, _ = two_nodes
    ref = reference[kind]
    n = _assert_layout(results, layout, kind, ref, layout)
    print(f"{layout} {kind}: loss {results[f'{layout}.{kind}.loss'][0]:.6f} vs {ref['loss']:.6f}, "
          f"{n} gradients, layout took {float(results[f'{layout}.seconds']):.1f} s")


def test_dp2_distributed_adam_step(two_nodes):
    """parallelize.megatron_optimizer (distributed Adam, state sharded over DP=2) after the DP=2
    backward: every parameter moved by Adam's first step lr * g / (|g| + eps), g the averaged
    gradient (3 orders below a wrong sign or a missing shard, which would be off by 1 to 2 lr)."""
    results, _ = two_nodes
    assert bool(results["dp2.adam_step_ok"])
    assert results["dp2.adam_maxdiff_over_lr"] < 1e-3, results["dp2.adam_maxdiff_over_lr"]


@pytest.fixture(scope="module")
def reference_depth4():
    """Single process, fp32 and float64, for the 4-layer variant used by the interleaved (virtual
    stage) case."""
    import dataclasses

    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs
    return _single_and_float64(dataclasses.replace(CFG, depth=4), {kind: make_inputs(kind) for kind in KINDS},
                               loss_weights())


@pytest.mark.parametrize("kind", KINDS)
def test_interleaved_virtual_stages_equal_single_process(two_nodes, reference_depth4, kind):
    """PP=2 x 2 virtual stages (interleaved 1F1B), 2 micro-batches: rank 0 holds layers 0 and 2,
    rank 1 layers 1 and 3 (Megatron's interleaved order)."""
    results, _ = two_nodes
    assert results["pp2vpp2.layers"].tolist() == [[0], [2]]  # rank 0's chunks (rank 0 saves)
    _assert_layout(results, "pp2vpp2", kind, reference_depth4[kind], "pp2vpp2")


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    """TP=2 + SP x PP=2 on 4 processes of one node (the launcher's layout)."""
    out = tmp_path_factory.mktemp("mixed")
    proc = subprocess.run(LAUNCH + ["--size", "tiny", "--tp", "2", "--sp", "--pp", "2", "--timeout-s", "120",
                                    "--nproc-per-node", "4", WORKER, "mixed", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    if proc.returncode:
        raise AssertionError(f"4-process launch exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return dict(np.load(out / "layouts.npz"))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_tp2sp_pp2_four_processes_equal_single_process(four_processes, reference, kind):
    """Sequence parallel inside pipeline stages: the packed stage tensor holds each TP rank's
    sequence chunk (seq_length passed to the schedule as tp x the local length)."""
    _assert_layout(four_processes, "mixed", kind, reference[kind], "TP2+SP x PP2")


@pytest.mark.parametrize("tag, model, what", [
    ("tp2sp_cp2", "4heads", "TP=2+SP x CP=2"),  # 29 tokens padded to 32, 1 head per rank
    ("pp2_cp2", "tiny", "PP=2 x CP=2"),  # the packed stage tensor holds each CP rank's chunk
])
@pytest.mark.parametrize("kind", KINDS)
def test_context_parallel_four_processes_equal_single_process(four_processes, reference_odd, tag, model,
                                                              what, kind):
    _assert_layout(four_processes, tag, kind, reference_odd[model, kind], what)


def test_tp2_checkpoint_loads_at_tp1(two_nodes, reference):
    """Written at TP=2 (each rank its slices, save_torch), read at TP=1: same parameters, same output."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.checkpoints.torch_io import load_torch
    from mugv.core.dit import dit_schema
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs, random_params, torch_run
    from mugv.parity_tests.tolerances import assert_close, assert_sharded_vs_float64
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.models.dit import build_dit, transformer_config
    results, out_dir = two_nodes
    megatron_compat.initialize_parallel(tp=1)
    try:
        state = load_torch(latest_checkpoint(out_dir / "ckpt"), dit_schema(CFG))
        model = build_dit(CFG, transformer_config(CFG), seed=None)
        model.load_state_dict(state, strict=True)  # the canonical names, nothing missing or extra
        out, _ = torch_run(model, make_inputs("t2v"), loss_weights())
    finally:
        megatron_compat.destroy_parallel()
    for name, arr in random_params(CFG).items():  # the checkpoint holds the global parameters
        assert np.array_equal(state[name].numpy(), arr), name
    assert_close(out, reference["t2v"]["out"], "exact", "float32", name="TP=1 from checkpoint vs reference")
    assert_sharded_vs_float64(results["tp2sp.t2v.out"], out, reference["t2v"]["out64"],
                              name="TP=2 output vs TP=1 from the TP=2 checkpoint")


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "4", "--nproc-per-node", "4"], "num_heads 2 is not divisible by tensor_parallel 4"),
    (["--pp", "3", "--nproc-per-node", "3"], "depth 2 layers do not divide into pipeline_parallel 3"),
    (["--tp", "2", "--nproc-per-node", "3"], "world size 3 is not a multiple of tensor_parallel 2"),
    (["--pp", "2", "--vpp", "2", "--nproc-per-node", "2"], "virtual_pipeline 2 = 4 model chunks"),
    (["--cp", "4", "--nproc-per-node", "4"],
     "num_heads 2 is not divisible by tensor_parallel 1 x context_parallel 4 = 4"),
    (["--tp", "2", "--cp", "2", "--nproc-per-node", "4"],
     "num_heads 2 is not divisible by tensor_parallel 2 x context_parallel 2 = 4"),
    (["--cp", "2", "--nproc-per-node", "3"], "world size 3 is not a multiple of tensor_parallel 1"),
    (["--sp"], "sequence_parallel"),
    (["--nnodes", "2"], "--rdzv-endpoint"),
])
def test_bad_layout_fails_before_any_process(argv, needle, capsys):
    from mugv.torch_backend.parallel import launch
    rc = launch.main(["--size", "tiny", *argv, WORKER, "layouts", "/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and "invalid layout" in err and needle in err, err


def test_bad_layout_at_10b_names_heads():
    from mugv.core.dit import dit_config
    from mugv.core.parallel import LayoutError, ParallelConfig, check_layout
    with pytest.raises(LayoutError, match="num_heads 48 is not divisible by tensor_parallel 5"):
        check_layout(ParallelConfig(tensor_parallel=5), dit_config("10B"), 10)
    with pytest.raises(LayoutError, match="num_heads 48 is not divisible by tensor_parallel 8 x "
                                          "context_parallel 4 = 32"):
        check_layout(ParallelConfig(tensor_parallel=8, context_parallel=4), dit_config("10B"), 32)
    assert check_layout(ParallelConfig(tensor_parallel=8, context_parallel=2), dit_config("10B"), 32) == 2


@pytest.mark.parametrize("mode, rank_named, reason", [
    ("die", "rank 1", "exit code 7"),
    ("hang", "rank(s) [1] hung or died", "timed out (timeout 15 s)"),
])
def test_failed_rank_ends_the_job_naming_rank_and_collective(mode, rank_named, reason):
    # The timeout covers the start-up barrier too: on a loaded machine the two ranks can start
    # more than 5 s apart, and the barrier (not the planted hang) timed out first.
    timeout = 15
    start = time.monotonic()
    proc = subprocess.run(LAUNCH + ["--size", "tiny", "--nproc-per-node", "2", "--timeout-s", str(timeout),
                                    WORKER, mode], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    report = proc.stderr[proc.stderr.find("mugv launch:"):]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert rank_named in report and reason in report, report
    if mode == "hang":
        assert "collective all_reduce" in report, report
    # process start-up (~3-4 s idle; 30 s seen on the shared 2-core machine at load 14) + the
    # timeout + torchrun's stop; never a silent hang (that would run into the 120 s limit)
    assert elapsed < timeout + 55, f"job took {elapsed:.1f} s"
    print(f"{mode}: ended in {elapsed:.1f} s\n{report}")
