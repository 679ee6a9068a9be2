"""JAX oracle (jax_reference/dit.py) vs torch production (torch_backend/models/dit.py, Megatron-Core)
at a debug width: the whole block structure ("tiny": hidden 144, 2 heads of 72, 2 layers), the same
random canonical parameters loaded into both. Outputs AND gradients w.r.t. every parameter, the
latents and the text agree, for text-to-video, image-to-video and padded text (one sample without
any real token), at odd sizes.

How "agree" is judged (issue 20, item 3; docs/tolerances.md): both fp32 runs against the torch
model run in float64 (the same fp32 parameters and inputs; the JAX oracle is fp32-first), per
tensor by tolerances.assert_sharded_vs_float64 with the ("jax", "float32") row of VS_FLOAT64: JAX
within 4 x max(torch fp32's error against float64, 16 ulps of max|ref64|), torch within 256 ulps.
For that the two must compute the same thing: XLA's float32 `exp` puts some sinusoid frequencies
one ulp from torch's (test_dit_official_jax asserts at most one), and at t ~ 400-900 one ulp of a
frequency moves cos/sin by ~1e-5..5e-5, a gap no rounding argument covers. So the oracle here takes
torch's frequency table (the production code's and the official code's own), as the golden gap test
does; everything else in the oracle stays XLA's.

Also here (torch only): activation recomputation (selective, full block, full uniform) changes
neither outputs nor gradients, the state dict is canonical, and bad inputs fail naming the argument.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mugv.core.dit import dit_config, dit_schema, patch_grid
from mugv.parity_tests.helpers import random_params  # noqa: F401  (other tests import it from here)
from mugv.parity_tests.tolerances import assert_close, assert_sharded_vs_float64, assert_tree_close
from mugv.parity_tests.fixtures import megatron_world  # noqa: F401  (a fixture)

CFG = dit_config("tiny")
B, T, H, W, LT = 2, 3, 5, 7, 6  # odd latent sizes: patch padding and crop on H and W




def make_inputs(kind: str, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tp = patch_grid(CFG, (T, H, W))[0]
    text_mask = np.ones((B, LT), bool)
    x_mask = np.ones((B, T), bool)
    if kind == "i2v":
        x_mask[:, 0] = False
    text_mask[1, 4:] = False  # sample 1: 4 real tokens of 6
    if kind == "padded_text":
        text_mask[0, 2:] = False
        text_mask[1, :] = False  # no real token at all: cross-attention adds nothing
        x_mask[1, 1] = False
    return dict(
        x=rng.standard_normal((B, CFG.in_channels, T, H, W)).astype(np.float32),
        timestep=np.array([437.5, 81.25], np.float32),
        text=rng.standard_normal((B, LT, CFG.text_dim)).astype(np.float32),
        text_mask=text_mask,
        x_mask=x_mask,
        fps=np.array([24.0, 30.0], np.float32),
        frame_indice=(np.arange(tp + 2)[None] + np.array([[0], [3]])).astype(np.int32),
    )


def loss_weights(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, CFG.out_channels, T, H, W)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# torch side


def torch_model(params, layer_spec=None, **config_overrides):
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.torch_backend.models.dit import build_dit, transformer_config
    model = build_dit(CFG, transformer_config(CFG, **config_overrides), layer_spec, seed=None)
    load_canonical(model, CFG, params)
    return model


def torch_run(model, inputs, weights):
    """Output and the gradients of sum(out * weights) w.r.t. every parameter, x and text."""
    device = next(model.parameters()).device
    t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in inputs.items()}
    t["x"].requires_grad_(True)
    t["text"].requires_grad_(True)
    t["frame_indice"] = t["frame_indice"].long()
    model.zero_grad(set_to_none=True)
    out = model(**t)
    (out * torch.from_numpy(weights).to(device)).sum().backward()
    grads = {name: p.grad.detach().cpu().numpy() for name, p in model.named_parameters()}
    grads["input.x"] = t["x"].grad.cpu().numpy()
    grads["input.text"] = t["text"].grad.cpu().numpy()
    return out.detach().cpu().numpy(), grads


# ---------------------------------------------------------------------------------------------
# JAX side (one jit for all cases: they share shapes)


def _torch_table_sinusoid(xp, values, dim: int = 256, max_period: float = 10000.0):
    """core.rope.sinusoidal_embedding with the frequencies from torch's float32 exp (what the torch
    model uses), the rest in `xp`."""
    import math
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(max_period) / half)).numpy()
    args = xp.reshape(values, (-1, 1)) * xp.reshape(xp.asarray(freqs), (1, half))
    return xp.concatenate([xp.cos(args), xp.sin(args)], axis=-1)


@pytest.fixture(scope="module")
def jax_run():
    """The JAX oracle's output and gradients, with torch's sinusoid frequency table (module doc)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    dit = pytest.importorskip("mugv.jax_reference.dit")
    patch = pytest.MonkeyPatch()
    patch.setattr(dit, "sinusoidal_embedding", _torch_table_sinusoid)  # read when jit traces

    def loss(params, x, text, rest, weights):
        out = dit.dit_apply(CFG, params, x, rest["timestep"], text, rest["text_mask"],
                            rest["x_mask"], rest["fps"], rest["frame_indice"])
        return jnp.sum(out * weights), out

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(params, inputs, weights):
        rest = {k: jnp.asarray(v) for k, v in inputs.items() if k not in ("x", "text")}
        (gp, gx, gt), out = grad_fn({k: jnp.asarray(v) for k, v in params.items()},
                                    jnp.asarray(inputs["x"]), jnp.asarray(inputs["text"]), rest,
                                    jnp.asarray(weights))
        grads = {k: np.asarray(v) for k, v in gp.items()}
        grads["input.x"], grads["input.text"] = np.asarray(gx), np.asarray(gt)
        return np.asarray(out), grads
    yield run
    patch.undo()


@pytest.mark.parametrize("kind", ["t2v", "i2v", "padded_text"])
def test_torch_equals_jax_oracle(megatron_world, jax_run, kind):
    params, inputs, weights = random_params(CFG), make_inputs(kind), loss_weights()
    as64 = lambda a: a.astype(np.float64) if a.dtype == np.float32 else a  # noqa: E731
    out_t, grads_t = torch_run(torch_model(params), inputs, weights)
    out64, grads64 = torch_run(torch_model(params).double(), {k: as64(v) for k, v in inputs.items()},
                               as64(weights))
    out_j, grads_j = jax_run(params, inputs, weights)
    assert sorted(grads_j) == sorted(grads64)
    ratio = {f"{kind} output": assert_sharded_vs_float64(out_j, out_t, out64, "jax", name=f"{kind} output")}
    for k in grads64:
        ratio[f"{kind} grad {k}"] = assert_sharded_vs_float64(grads_j[k], grads_t[k], grads64[k], "jax",
                                                              name=f"{kind} grad {k}")
    worst = max(ratio, key=ratio.get)
    print(f"{kind}: worst {worst} at {ratio[worst]:.2f} of its bound")
    # every parameter reaches the output (else its gradient test above would be vacuous)
    dead = [k for k, g in grads_t.items() if not np.any(g)]
    assert not dead, f"parameters without gradient: {dead}"


# ---------------------------------------------------------------------------------------------
# torch only


@pytest.mark.parametrize("overrides", [
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
], ids=["selective", "full-block-1", "full-uniform-2"])
def test_recompute_changes_nothing(megatron_world, overrides):
    params, inputs, weights = random_params(CFG), make_inputs("i2v"), loss_weights()
    out_ref, grads_ref = torch_run(torch_model(params), inputs, weights)
    out, grads = torch_run(torch_model(params, **overrides), inputs, weights)
    assert_close(out, out_ref, "exact", "float32", name="output with recompute")  # same ops, same order
    # backward accumulates parameter gradients in another order: rounding only
    assert_tree_close(grads, grads_ref, "*", "float32")


def test_kernel_slot_takes_the_kernels_ops(megatron_world):
    """The spec's ops slot filled from mugv.kernels' registry (on a CPU: the kernels' own
    references; on a GPU: the Triton kernels verified there, or all with MUGV_KERNELS=all) gives
    the same model."""
    pytest.importorskip("triton")
    from mugv.torch_backend.models.dit_layers import kernel_ops, mugdit_layer_spec
    params, inputs, weights = random_params(CFG), make_inputs("i2v"), loss_weights()
    out_ref, grads_ref = torch_run(torch_model(params), inputs, weights)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    spec = mugdit_layer_spec(ops=kernel_ops(device))
    out, grads = torch_run(torch_model(params, layer_spec=spec), inputs, weights)
    assert_close(out, out_ref, "dit", "float32", name="output with kernel ops")
    assert_tree_close(grads, grads_ref, "dit_grad", "float32")


def test_pipeline_stages_chain_to_the_whole_model(megatron_world):
    """Two stages (embedders + layer 0 | layer 1 + final layer) joined by the packed tensor, as
    Megatron's pipeline schedule would (send the output, receive the input gradient), give the
    whole model's output and gradients; each stage holds exactly its part of the schema."""
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.torch_backend.models.dit import build_dit, stage_schema
    params, inputs, weights = random_params(CFG), make_inputs("padded_text"), loss_weights()
    out_ref, grads_ref = torch_run(torch_model(params), inputs, weights)

    first = build_dit(CFG, seed=None, post_process=False, layers=range(0, 1))
    last = build_dit(CFG, seed=None, pre_process=False, layers=range(1, 2))
    for stage in (first, last):
        load_canonical(stage, CFG, params)
    assert sorted(stage_schema(first).names + stage_schema(last).names) == sorted(dit_schema(CFG).names)
    device = next(first.parameters()).device
    t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in inputs.items()}
    t["frame_indice"] = t["frame_indice"].long()
    t["x"].requires_grad_(True)
    t["text"].requires_grad_(True)
    sent = first(**t)
    received = sent.detach().requires_grad_(True)
    last.set_input_tensor(received)
    out = last(**t)
    (out * torch.from_numpy(weights).to(device)).sum().backward()
    sent.backward(received.grad)
    assert_close(out.detach().cpu(), out_ref, "exact", "float32", name="pipelined output")
    grads = {n: p.grad.cpu().numpy() for stage in (first, last) for n, p in stage.named_parameters()}
    grads["input.x"], grads["input.text"] = t["x"].grad.cpu().numpy(), t["text"].grad.cpu().numpy()
    assert_tree_close(grads, grads_ref, "*", "float32")


def test_state_dict_is_canonical_and_init_follows_schema(megatron_world):
    from mugv.torch_backend.models.dit import build_dit
    model = build_dit(CFG, seed=7)
    schema = dit_schema(CFG)
    state = model.state_dict()
    assert list(state) == [n for n in dict(model.named_parameters())]
    assert sorted(state) == sorted(schema.names)
    for spec in schema:
        value = state[spec.name]
        assert tuple(value.shape) == spec.shape, spec.name
        if spec.init.kind == "zeros":
            assert not value.any(), spec.name
        elif spec.init.kind == "ones":
            assert (value == 1).all(), spec.name
        elif spec.init.kind == "uniform":
            assert value.abs().max() <= spec.init.std and value.std() > 0.3 * spec.init.std, spec.name
        elif value.numel() > 100:
            assert abs(value.std().item() / spec.init.std - 1) < 0.2, (spec.name, value.std(), spec.init.std)
    again = build_dit(CFG, seed=7).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state), "same seed, same parameters"


def test_bad_inputs_name_the_argument(megatron_world):
    model = torch_model(random_params(CFG))
    device = next(model.parameters()).device
    good = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in make_inputs("t2v").items()}
    bad = dict(good, text_mask=good["text_mask"].float())
    with pytest.raises(ValueError, match="text_mask"):
        model(**bad)
    bad = dict(good, frame_indice=good["frame_indice"][:, :-1])
    with pytest.raises(ValueError, match="frame_indice"):
        model(**bad)
