"""Megatron's gradient norm (what its optimizer clips with) equals the true global norm under
tensor parallelism, for the DiT and for LoRA adapters (CPU, gloo, 2 processes).

Regression: Megatron tags a parallel linear's weight as split only when it initialises the weight
itself; ours are drawn from the schema, so every TP slice but rank 0's was missing from the norm
and clipping differed from the single-process run (`dit_layers.mark_tensor_parallel`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mugv.parity_tests.tolerances import assert_close

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("grad_norm_worker.py"))


def _norms(tmp_path, tp: int, *extra: str) -> dict:
    out = tmp_path / f"norm_tp{tp}{'_'.join(extra)}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="COMPATIBLE")
    proc = subprocess.run([sys.executable, "-m", "mugv.torch_backend.parallel.launch", "--size", "tiny", "--tp", str(tp),
                           "--nproc-per-node", str(tp), "--timeout-s", "120", WORKER, str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"launch exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("lora", [False, True], ids=["dit", "lora"])
def test_megatron_grad_norm_counts_every_tp_slice(tmp_path, lora):
    extra = ("--lora",) if lora else ()
    tp2, tp1 = _norms(tmp_path, 2, *extra), _norms(tmp_path, 1, *extra)
    # the norm Megatron clips with is the true one at TP=2 ...
    assert_close(tp2["megatron"], tp2["true"], "sharded", "float32", name="TP=2 norm vs true")
    # ... and the single-process one
    assert_close(tp2["megatron"], tp1["megatron"], "sharded", "float32", name="TP=2 vs TP=1 norm")


def test_device_l2_norm_is_megatrons_norm_without_a_sync_per_tensor():
    """The trainer's replacement of Megatron's Apex-less gradient-norm op (one host sync per
    tensor) computes the same norm, judged against float64, and is what clipping then calls."""
    import torch
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.training.parallelize import device_l2_norm, use_device_optimizer_fallbacks
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) * s for shape, s in
             [((64, 48), 1.0), ((48,), 3e-3), ((7, 5, 3), 40.0), ((1,), 0.5), ((1000,), 1e-4)]]
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = device_l2_norm(2048 * 32, flag, [grads], False)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in grads]))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert_close(ours[0], want, "*", "float32", name="device_l2_norm vs float64")
    megatron_compat.enable()                 # the fallback allocates on "cuda": the CPU here
    theirs, _ = local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
    assert_close(theirs.cpu()[0], want, "*", "float32", name="Megatron's fallback vs float64")
    assert float(device_l2_norm(1, flag, [[]], False)[0][0]) == 0.0
    saved = clip_grads.l2_norm_impl
    try:
        clip_grads.l2_norm_impl = local_multi_tensor_l2_norm
        assert use_device_optimizer_fallbacks() and clip_grads.l2_norm_impl is device_l2_norm
    finally:
        clip_grads.l2_norm_impl = saved



def test_foreach_scale_is_megatrons_scale_and_copy():
    """The drop-in for Megatron's Apex-less `multi_tensor_scale` (clipping's in-place gradient
    scaling, and the fp32 main -> bf16 model weight copy) writes exactly what the fallback's
    per-tensor loop writes, bit for bit: the same rounding in the same order."""
    import torch
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    from mugv.torch_backend.training.parallelize import foreach_multi_tensor_scale, use_device_optimizer_fallbacks
    g = torch.Generator().manual_seed(1)
    shapes = [(64, 48), (48,), (7, 5, 3), (1,)]
    flag = torch.zeros(1, dtype=torch.int)
    for scale in (0.37, 1.0):
        grads = [torch.randn(s, generator=g) * 10 for s in shapes]
        ours, theirs = [t.clone() for t in grads], [t.clone() for t in grads]
        foreach_multi_tensor_scale(0, flag, [ours, ours], scale)            # in place (clipping)
        local_multi_tensor_scale(0, flag, [theirs, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        assert scale == 1.0 or not torch.equal(ours[0], grads[0])
        main = [torch.randn(s, generator=g) for s in shapes]                # main -> model weights
        ours = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
        theirs = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
        foreach_multi_tensor_scale(0, flag, [main, ours], scale)
        local_multi_tensor_scale(0, flag, [main, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    foreach_multi_tensor_scale(0, flag, [[], []], 0.5)
    saved = clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl
    try:
        clip_grads.l2_norm_impl = local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = local_multi_tensor_scale
        assert use_device_optimizer_fallbacks()
        assert clip_grads.multi_tensor_scale_impl is foreach_multi_tensor_scale
        assert optimizer.multi_tensor_scale_impl is foreach_multi_tensor_scale
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = saved
