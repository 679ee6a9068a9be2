"""The Triton kernels in the whole DiT, the configuration that runs: the tiny MUG-DiT (hidden 144,
2 heads of 72, 2 layers, Megatron-Core linears) with every kernel slot on its Triton kernel
(`dit_layers.triton_ops`: AdaLN modulate, gated residual + AdaLN, QK-RMSNorm + RoPE on the
self-attention, QK-RMSNorm through the same kernel on the cross-attention) against the same DiT on
the plain-torch references, both judged against that DiT in float64: output and the gradient of
every parameter, of the latents and of the text (tolerances.py "kernel_model" row), for
text-to-video, image-to-video (the t = 0 modulation rows) and padded text.

On the CPU the kernels run in Triton's interpreter; on a GPU `mugv verify-kernels` runs this file
and the three DiT kernels are used there only when it passes (kernels/registry.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mugv.parity_tests.fixtures import megatron_world  # noqa: F401  (a fixture)
from mugv.parity_tests.helpers import random_params
from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs, torch_model, torch_run
from mugv.parity_tests.tolerances import assert_sharded_vs_float64


def _as64(a):
    return a.astype(np.float64) if a.dtype == np.float32 else a


@pytest.mark.parametrize("kind", ["t2v", "i2v", "padded_text"])
def test_dit_with_the_kernels_equals_the_reference_dit(megatron_world, device, kind):
    from mugv.torch_backend.models.dit_layers import mugdit_layer_spec, triton_ops
    ops = triton_ops()
    assert all("reference" not in getattr(f, "__name__", "") for f in
               (ops.adaln_modulate, ops.gated_residual_modulate, ops.qk_rmsnorm_rope, ops.qk_rmsnorm))
    params, inputs, weights = random_params(CFG), make_inputs(kind), loss_weights()

    def run(model, ins, w):
        return torch_run(model.to(device), ins, w)
    out64, grads64 = run(torch_model(params).double(), {k: _as64(v) for k, v in inputs.items()}, _as64(weights))
    out32, grads32 = run(torch_model(params), inputs, weights)
    outk, gradsk = run(torch_model(params, layer_spec=mugdit_layer_spec(ops=ops)), inputs, weights)
    assert_dit_vs_float64(f"{kind} on {device}", (outk, gradsk), (out32, grads32), (out64, grads64))


def assert_dit_vs_float64(what: str, got, fp32, fp64) -> None:
    """Another fp32 evaluation of the tiny DiT, (output, {name: gradient}), against the plain fp32
    run and the float64 run: the "kernel_model" row on the output and every gradient."""
    (outk, gradsk), (out32, grads32), (out64, grads64) = got, fp32, fp64
    assert sorted(gradsk) == sorted(grads32) == sorted(grads64)
    ratio = {"output": assert_sharded_vs_float64(outk, out32, out64, "kernel_model", name=f"{what} output")}
    for k in grads64:
        ratio[k] = assert_sharded_vs_float64(gradsk[k], grads32[k], grads64[k], "kernel_model",
                                             name=f"{what} grad {k}")
    worst = max(ratio, key=ratio.get)
    print(f"{what}: worst {worst} at {ratio[worst]:.2f} of its bound")
    # every parameter reaches the output, so no gradient comparison above is vacuous
    assert not [k for k, g in gradsk.items() if not np.any(g)]
