"""GroupNorm + SiLU kernel (`kernels/groupnorm_silu.py`) vs its torch reference and the JAX
oracle: output and the gradients of x, weight and bias, fp32 and fp16 (bf16 on a GPU), for video
(B, C, T, H, W) and image (B, C, H, W) feature maps."""
import pytest
import torch

from mugv.jax_reference import ops as jops
from mugv.kernels.groupnorm_silu import groupnorm_silu, groupnorm_silu_reference
from mugv.parity_tests.kernels.harness import check_against_jax, check_every_config, check_kernel

NAMES = ["y", "dx", "dweight", "dbias"]
# (shape, groups): odd spatial sizes, a channel span longer than one interpreter block (2 x 33 x
# 35 = 2310 > 1024), and image-shaped input.
CASES = [((2, 8, 3, 5, 7), 4), ((1, 6, 9, 11), 3), ((1, 4, 2, 33, 35), 2), ((2, 6, 1, 3, 3), 6)]


def _inputs(shape, offset=3.0):
    c = shape[1]
    # An offset mean (|mean| > std) exercises the shifted-data variance of the split reduction.
    x = torch.randn(*shape) * 2.0 + offset
    return [x, 1.0 + 0.5 * torch.randn(c), 0.5 * torch.randn(c)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_groupnorm_silu_matches_reference(case, dtype, device):
    if dtype == "bfloat16" and device.type != "cuda":
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; checked on the GPU")
    shape, groups = case
    check_kernel(groupnorm_silu, groupnorm_silu_reference, _inputs(shape), dtype, device, NAMES,
                 groups=groups, eps=1e-6)


# SiLU's exp(-z) overflows to inf for very negative z (then y = z / inf = -0, as it should); the
# interpreter's numpy reports the overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_groupnorm_silu_large_mean(device):
    """|mean| = 100 std: a naive fp32 sum-of-squares variance would lose most digits here. The
    reference runs in float64: at this conditioning torch's own fp32 GroupNorm on the H100 is
    1e-5 off (its dweight differed from the kernel's by 1.06e-5 relative in the first GPU run)."""
    check_kernel(groupnorm_silu, groupnorm_silu_reference, _inputs((1, 4, 3, 7, 9), offset=200.0),
                 "float32", device, NAMES, reference_dtype=torch.float64, groups=2, eps=1e-5)


def test_groupnorm_silu_more_rows_than_a_grid_axis_holds(device):
    """B x C channel rows beyond 65,535, the most programs CUDA allows on a grid's second axis
    (`mugv cache` batches 16 clips x 49 frames through 512-channel layers): the launch failed with
    "invalid argument" on the H100 (2026-12-05) before the rows moved to the first axis."""
    if device.type != "cuda":
        pytest.skip("CUDA's grid limit; the interpreter has none (and ~66k programs would take minutes)")
    check_kernel(groupnorm_silu, groupnorm_silu_reference, _inputs((1030, 64, 1, 2, 2)), "float32", device,
                 NAMES, groups=32, eps=1e-6)


def test_groupnorm_silu_matches_jax(device):
    check_against_jax(groupnorm_silu, jops.groupnorm_silu, _inputs((2, 8, 3, 5, 7)), NAMES, device,
                      groups=4, eps=1e-6)


def test_groupnorm_silu_rejects_bad_input(device):
    x, w, b = _inputs((1, 6, 2, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        groupnorm_silu(x, w, b, 4)
    with pytest.raises(ValueError, match="weight"):
        groupnorm_silu(x, w[:5], b, 3)


# ------------------------------------------------------------------- the kernel inside the VAE
def _vae_run(model, video, weights, dtype):
    """encode (posterior mean and logvar) + decode of `video` in `dtype`; outputs and the
    gradients of sum_i <out_i, weights_i> with respect to every parameter and the input."""
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    x = video.detach().to(dtype, copy=True).requires_grad_()
    mean, logvar = model.posterior(x)
    recon = model.decode(mean, x.shape[2], normalized=False)
    outs = [mean, logvar, recon]
    loss = sum((o * w.to(o)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return [o.detach() for o in outs], grads


REDRAWS = 16


def test_vae_with_the_kernel_equals_the_reference_vae(device):
    """The whole VAE (2D and temporal stages, encode and decode, forward and every gradient) with
    the kernel at all its GroupNorm + SiLU sites vs the same VAE on the reference, both judged
    against the reference VAE in float64 (tolerances.py "vae_model" row). The reference side's
    error is the worst of the plain fp32 run and REDRAWS runs with each site's rounding drawn again
    (`harness.rerounded`): one run's error on an ill-conditioned gradient is a single draw, and
    on this VAE another draw lands up to 18x further (docs/tolerances.md, "One draw is not a
    bound"). On the CPU the kernel runs in Triton's interpreter; on a GPU `mugv verify-kernels`
    runs this file, so the kernel is verified for the VAE it serves. One frame at 8x16 (frame
    rule (a): 8 copies in the temporal stage) keeps the interpreter's program count small."""
    import copy

    from mugv.kernels.groupnorm_silu import groupnorm_silu
    from mugv.parity_tests.kernels.harness import rerounded
    from mugv.parity_tests.test_vae import TINY, random_params
    from mugv.parity_tests.tolerances import assert_sharded_vs_float64
    from mugv.torch_backend.models.vae import GroupNormSiLU, VideoVAE, use_kernels

    ref = VideoVAE(TINY)
    ref.load_state_dict({k: torch.from_numpy(a) for k, a in random_params(TINY, 3).items()}, strict=True)
    ref = ref.to(device)
    fused = copy.deepcopy(ref)
    chosen = use_kernels(fused, device, op=groupnorm_silu)
    assert chosen["groupnorm_silu"] == "triton"
    sites = [m for m in fused.modules() if isinstance(m, GroupNormSiLU)]
    assert sites and all(m.op is groupnorm_silu for m in sites)
    g = torch.Generator().manual_seed(5)
    video = (torch.rand(1, 3, 1, 8, 16, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        shapes = [o.shape for o in ref.posterior(video)] + [video.shape]
    weights = [torch.randn(s, generator=g).to(device) for s in shapes]
    out64, grads64 = _vae_run(copy.deepcopy(ref), video, weights, torch.float64)
    draws = []
    noise = torch.Generator().manual_seed(11)
    for _ in range(REDRAWS):
        redrawn = copy.deepcopy(ref)
        use_kernels(redrawn, device, op=rerounded(groupnorm_silu_reference, noise))
        draws.append(_vae_run(redrawn, video, weights, torch.float32))
    out32, grads32 = _vae_run(ref, video, weights, torch.float32)
    outk, gradsk = _vae_run(fused, video, weights, torch.float32)
    assert set(gradsk) == set(grads32) == set(grads64)
    for i, (name, a, b, c) in enumerate(zip(("mean", "logvar", "recon"), outk, out32, out64)):
        assert_sharded_vs_float64(a.cpu(), b.cpu(), c.cpu(), op="vae_model", name=name,
                                  redraws=[d[0][i].cpu() for d in draws])
    for name in grads64:
        if name.endswith("attn.k.bias"):   # exactly zero in exact arithmetic (test_vae.py): noise only
            continue
        assert_sharded_vs_float64(gradsk[name].cpu(), grads32[name].cpu(), grads64[name].cpu(),
                                  op="vae_model", name=f"d/d {name}", redraws=[d[1][name].cpu() for d in draws])


def test_groupnorm_silu_every_launch_config(device):
    for shape, groups in CASES[:2]:
        check_every_config(groupnorm_silu, groupnorm_silu_reference, [_inputs(shape)], ["span_loop"], device,
                           NAMES, groups=groups, eps=1e-6)
