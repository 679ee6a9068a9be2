"""VAE parity: torch production vs the JAX oracle (encoder, decoder, end to end, forward and
gradients, fp32, odd sizes), frame-count rules, chunked == unchunked, bounded working set, and
bad-input errors. Official equality lives in test_vae_official.py.

Sizes are tiny (widths 4-16, 24x40 frames) so the whole file stays within the CI budget; every
parameter is random (biases and norm affines included) so that every path reaches the output.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mugv.core import vae as spec
from mugv.parity_tests.tolerances import assert_close
from mugv.torch_backend.models.vae import VideoVAE

# Odd on purpose: 4 latent channels, 16-wide features, 2 groups of 2 temporal channels.
TINY = spec.VAEConfig(spatial_channels=(8, 8, 16, 16), spatial_layers_per_block=1, spatial_norm_groups=4,
                      temporal_filters=4, temporal_channel_mult=(1, 2, 2, 4), temporal_res_blocks=1,
                      temporal_norm_groups=2, latent_channels=4)


def random_params(cfg: spec.VAEConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Like the goldens' init: weights N/sqrt(fan_in), biases 0.05 N, norms 1 + 0.1 N, latent
    stats random (std positive), so no parameter is a no-op."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in spec.vae_schema(cfg):
        n = rng.standard_normal(p.shape).astype(np.float32)
        if p.name == "latent_std":
            out[p.name] = (1.0 + 0.5 * np.abs(n)).astype(np.float32)
        elif p.name in ("latent_mean", "logvar") or p.name.endswith(".bias"):
            out[p.name] = np.asarray(0.05 * n, dtype=np.float32)
        elif len(p.shape) == 1:
            out[p.name] = (1.0 + 0.1 * n).astype(np.float32)
        else:
            out[p.name] = (n / np.sqrt(np.prod(p.shape[1:]))).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def params():
    return random_params(TINY)


@pytest.fixture(scope="module")
def tvae(params):
    model = VideoVAE(TINY)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def jvae(params):
    import jax
    from mugv.jax_reference.vae import VideoVAE as JaxVAE
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)   # one-shot compiles: skip XLA passes
    yield JaxVAE.from_params(params, TINY)
    jax.config.update("jax_disable_most_optimizations", old)


def rand(*shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def torch_grads(model, fn, inputs: list[np.ndarray], weights: list[np.ndarray]):
    """Outputs of fn(model, *inputs) and grads of sum_i <out_i, weights_i> wrt params and inputs."""
    model.zero_grad(set_to_none=True)
    xs = [torch.tensor(x, requires_grad=True) for x in inputs]
    outs = fn(model, *xs)
    loss = sum((o * torch.from_numpy(w)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads, [x.grad for x in xs]


def jax_grads(model, fn, inputs, weights):
    import equinox as eqx
    import jax.numpy as jnp
    from mugv.jax_reference.vae import to_params

    def loss(args):
        m, xs = args
        outs = fn(m, *xs)
        return sum(jnp.sum(o * w) for o, w in zip(outs, weights)), outs

    # one compile: differentiate with respect to the model's arrays and the inputs together
    (_, outs), (grads, in_grads) = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(
        (model, [jnp.asarray(x) for x in inputs]))
    return outs, to_params(grads), in_grads


def compare(t_out, t_grads, t_in, j_out, j_grads, j_in, what):
    for i, (a, b) in enumerate(zip(t_out, j_out)):
        assert_close(a, b, "vae", "float32", f"{what} output {i}")
    assert t_grads, "no parameter received a gradient"
    scale = max(float(g.abs().max()) for g in t_grads.values())
    for name, g in t_grads.items():
        if name.endswith("attn.k.bias"):
            # softmax ignores a per-query constant, and q . b_k is one: this gradient is exactly
            # zero in exact arithmetic, so both sides must only be rounding noise.
            for side, x in (("torch", g), ("jax", j_grads[name])):
                assert float(np.abs(np.asarray(x)).max()) <= 1e-5 * scale, f"{what} {side} d/d {name} not ~0"
            continue
        assert_close(g, j_grads[name], "vae_grad", "float32", f"{what} d/d {name}")
    for i, (a, b) in enumerate(zip(t_in, j_in)):
        assert_close(a, b, "vae_grad", "float32", f"{what} d/d input {i}")


# ------------------------------------------------------------------- JAX vs torch, stage by stage
def test_spatial_encoder_decoder(tvae, jvae):
    frames = rand(3, 3, 24, 40)
    feats = rand(3, 16, 3, 5, seed=2)
    w_enc, w_dec = rand(3, 16, 3, 5, seed=3), rand(3, 3, 24, 40, seed=4)
    fn = lambda m, f, z: (m.encode_spatial(f), m.decode_spatial(z))  # noqa: E731
    t = torch_grads(tvae, fn, [frames, feats], [w_enc, w_dec])
    j = jax_grads(jvae, fn, [frames, feats], [w_enc, w_dec])
    assert any(n.startswith("spatial.encoder.") for n in t[1]) and any(n.startswith("spatial.decoder.") for n in t[1])
    compare(*t, *j, "spatial")


def test_temporal_encoder_decoder(tvae, jvae):
    groups = rand(2, 16, 8, 3, 5)
    z = rand(1, 4, 3, 3, 5, seed=2)                      # 3 latents decoded jointly -> 24 frames
    ws = [rand(2, 4, 1, 3, 5, seed=3), rand(2, 4, 1, 3, 5, seed=4), rand(1, 16, 24, 3, 5, seed=5)]
    fn = lambda m, g, zz: (*m.encode_temporal(g), m.decode_temporal(zz))  # noqa: E731
    t = torch_grads(tvae, fn, [groups, z], ws)
    j = jax_grads(jvae, fn, [groups, z], ws)
    assert t[0][2].shape == (1, 16, 24, 3, 5)
    compare(*t, *j, "temporal")


def test_end_to_end_forward_and_gradients(tvae, jvae):
    """T = 9 (rule a), 24x40: reparameterised sample with shared noise, grads of every parameter."""
    video = rand(1, 3, 9, 24, 40)
    noise = rand(1, 4, 2, 3, 5, seed=2)
    ws = [rand(1, 3, 9, 24, 40, seed=3), rand(1, 4, 2, 3, 5, seed=4), rand(1, 4, 2, 3, 5, seed=5)]

    def torch_fn(m, v, n):
        mean, logvar = m.posterior(v)
        return m.decode(mean + torch.exp(0.5 * logvar) * n, 9, normalized=False), mean, logvar

    t = torch_grads(tvae, torch_fn, [video, noise], ws)
    j = jax_grads(jvae, lambda m, v, n: m(v, n), [video, noise], ws)
    trainable = {p.name for p in spec.vae_schema(TINY) if p.trainable} - {"logvar"}
    assert set(t[1]) == trainable, sorted(trainable ^ set(t[1]))   # every path reaches the loss
    compare(*t, *j, "end to end")


# Each frame count is one ~10-20 s XLA compile on the CI machines: T = 1 (the image path) runs by
# default, T = 9 is covered with gradients above, T = 17 and 24 run with the slow set.
@pytest.mark.parametrize("frames", [1, pytest.param(17, marks=pytest.mark.slow), pytest.param(24, marks=pytest.mark.slow)])
def test_end_to_end_odd_frame_counts(tvae, jvae, frames):
    import equinox as eqx
    import jax.numpy as jnp
    video = rand(1, 3, frames, 24, 40, seed=frames)
    with torch.no_grad():
        latent = tvae.encode(torch.from_numpy(video), sample=False)
        recon = tvae.decode(latent, frames)

    def jax_encode_decode(m, v, z):
        return m.normalize(m.posterior(v)[0]), m.decode(z, frames)

    j_latent, j_recon = eqx.filter_jit(jax_encode_decode)(jvae, jnp.asarray(video), jnp.asarray(latent.numpy()))
    assert latent.shape == (1, 4, spec.latent_frames(frames), 3, 5) and recon.shape == video.shape
    assert_close(latent, j_latent, "vae", "float32", f"T={frames} latent")
    assert_close(recon, j_recon, "vae", "float32", f"T={frames} recon")


# --------------------------------------------------------------------------- frame-count rules
@pytest.mark.parametrize("frames,latents,positions", [
    (1, 1, [7]),                                  # an image: 8 copies of frame 0, keep the last
    (8, 1, list(range(8))),
    (9, 2, list(range(7, 16))),                   # rule (a): 7 copies in front
    (17, 3, list(range(7, 24))),
    (12, 2, list(range(4, 16))),                  # rule (c): 4 zero frames in front
    (50, 7, list(range(48)) + [54, 55]),          # rule (c) in the last 48-frame chunk only
    (105, 14, list(range(7, 112))),               # rule (a) over three decode chunks
])
def test_frame_rules(tvae, frames, latents, positions):
    assert spec.latent_frames(frames) == latents
    assert list(spec.output_positions(frames)) == positions
    video = torch.from_numpy(rand(1, 3, frames, 8, 8, seed=frames))
    with torch.no_grad():
        latent = tvae.encode(video, sample=False, chunk_latents=4)
        assert latent.shape == (1, 4, latents, 1, 1)
        recon = tvae.decode(latent, frames)
        assert recon.shape == video.shape
        # decode trims exactly: it equals the full 8 * T_l decode at the positions listed above
        z = tvae.denormalize(latent)
        full = torch.cat([tvae.decode_temporal(z[:, :, c.start:c.stop]) for c in spec.decode_chunks(latents)], 2)
        assert full.shape[2] == 8 * latents
        pix = tvae.decode_spatial(full[0].transpose(0, 1)).transpose(0, 1)[None]
    assert_close(recon, pix[:, :, positions], "vae", "float32", f"T={frames} trimmed decode")


@pytest.mark.parametrize("frames,perturbed,changed", [(9, 0, [0]), (9, 5, [1]), (12, 3, [0]), (12, 4, [1]),
                                                     (50, 47, [5]), (50, 48, [6])])
def test_latent_depends_only_on_its_frames(tvae, frames, perturbed, changed):
    """Rule (a) encodes frame 0 alone; rule (c) pads in front: a latent sees only its 8 frames."""
    video = torch.from_numpy(rand(1, 3, frames, 8, 8))
    other = video.clone()
    other[:, :, perturbed] += 0.5
    with torch.no_grad():
        diff = (tvae.encode(video, sample=False) - tvae.encode(other, sample=False)).abs().amax(dim=(0, 1, 3, 4))
    assert [i for i, d in enumerate(diff.tolist()) if d > 0] == changed


# ------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("frames", [17, 50])
def test_chunked_equals_unchunked(tvae, frames):
    video = torch.from_numpy(rand(1, 3, frames, 8, 16, seed=frames))
    with torch.no_grad():
        whole = tvae.posterior(video, chunk_latents=None, frame_batch=None)
        for chunk, fb in [(1, 3), (2, None), (6, 5)]:
            part = tvae.posterior(video, chunk_latents=chunk, frame_batch=fb)
            for a, b, name in zip(part, whole, ("mean", "logvar")):
                assert_close(a, b, "*", "float32", f"{name} chunk_latents={chunk} frame_batch={fb}")
        latent = tvae.normalize(whole[0])
        ref = tvae.decode(latent, frames, frame_batch=None)
        assert_close(tvae.decode(latent, frames, frame_batch=3), ref, "*", "float32", "decode frame_batch=3")


def test_working_set_independent_of_length(tvae):
    """With chunk_latents and frame_batch set, no sub-module ever sees more frames for a 105-frame
    clip than for a 57-frame one: peak activation memory does not grow with clip length. (The
    temporal decoder always takes up to 6 latents jointly: that chunk is part of the model.)"""
    largest: dict[str, int] = {}

    def hook(name):
        def record(_module, args):
            largest[name] = max(largest.get(name, 0), args[0].shape[0] * (args[0].shape[2] if args[0].dim() == 5 else 1))
        return record

    mods = {"spatial.encoder": tvae.spatial.encoder, "spatial.decoder": tvae.spatial.decoder,
            "temporal.encoder": tvae.temporal.encoder, "temporal.decoder": tvae.temporal.decoder}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        sizes = {}
        for frames in (57, 105):
            largest.clear()
            with torch.no_grad():
                z = tvae.encode(torch.from_numpy(rand(1, 3, frames, 8, 8)), sample=False, chunk_latents=2, frame_batch=4)
                tvae.decode(z, frames, frame_batch=4)
            sizes[frames] = dict(largest)
    finally:
        for h in handles:
            h.remove()
    assert sizes[57] == sizes[105], sizes
    # the temporal encoder takes whole groups of 8 source frames: one per call when frame_batch < 8
    assert sizes[105] == {"spatial.encoder": 4, "spatial.decoder": 4, "temporal.encoder": 8,
                          "temporal.decoder": spec.DECODE_CHUNK_LATENTS}, sizes


def test_default_frame_batch_bounds_every_call(tvae, monkeypatch):
    """Without a frame_batch, each stage call takes at most core/vae.py::frames_per_call frames
    over all clips of the batch (`mugv cache` encodes 16 clips at once: in one call they ran out of
    an H100's memory), with the same result as one call for everything."""
    video = torch.from_numpy(rand(3, 3, 17, 8, 8))
    with torch.no_grad():
        whole = tvae.posterior(video, frame_batch=10 ** 6)
        whole_pix = tvae.decode(whole[0], 17, frame_batch=10 ** 6, normalized=False)
    seen: dict[str, int] = {}
    mods = {"spatial.encoder": tvae.spatial.encoder, "spatial.decoder": tvae.spatial.decoder,
            "temporal.encoder": tvae.temporal.encoder}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, max(seen.get(n, 0), args[0].shape[0] * (
            args[0].shape[2] if args[0].dim() == 5 else 1)))) for n, m in mods.items()]
    monkeypatch.setattr(spec, "frames_per_call", lambda h, w: 16 if (h, w) == (8, 8) else None)
    try:
        with torch.no_grad():
            mean, logvar = tvae.posterior(video)
            pix = tvae.decode(mean, 17, normalized=False)
    finally:
        for h in handles:
            h.remove()
    assert seen == {"spatial.encoder": 16, "spatial.decoder": 16, "temporal.encoder": 16}, seen
    # convolutions at another batch size block their sums differently: the "vae" row
    for name, a, b in (("mean", mean, whole[0]), ("logvar", logvar, whole[1]), ("pixels", pix, whole_pix)):
        assert_close(a, b, "vae", "float32", f"default frame_batch vs one call: {name}")


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape,why", [((1, 3, 9, 20, 40), "H = 20"), ((1, 3, 9, 24, 36), "W = 36"),
                                       ((1, 4, 9, 24, 40), "4 channels"), ((1, 3, 0, 24, 40), "no frames"),
                                       ((0, 3, 9, 24, 40), "empty"), ((3, 9, 24, 40), "4 dimensions")])
def test_bad_video_names_expected_shape(tvae, jvae, shape, why):
    import jax.numpy as jnp
    expected = "expected a video of shape (B, 3, T, H, W)"
    with pytest.raises(ValueError, match=r"expected a video of shape \(B, 3, T, H, W\)") as e:
        tvae.encode(torch.zeros(shape), sample=False)
    assert why in str(e.value) and str(tuple(shape)) in str(e.value)
    with pytest.raises(ValueError) as e:
        jvae.posterior(jnp.zeros(shape))
    assert expected in str(e.value)


def test_bad_latent_names_expected_shape(tvae):
    with pytest.raises(ValueError, match=r"expected a latent of shape \(B, 4, 2, h, w\) for num_frames = 9"):
        tvae.decode(torch.zeros(1, 4, 3, 1, 1), 9)
    with pytest.raises(ValueError, match="latent of shape"):
        tvae.decode(torch.zeros(1, 24, 2, 1, 1), 9)


# ------------------------------------------------------------------------- training and evaluation
def test_loss_formulas_match_closed_forms():
    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((2, 4, 3, 2, 2)), rng.standard_normal((2, 4, 3, 2, 2))
    ref_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar))),
        torch.distributions.Normal(0.0, 1.0)).sum() / 2
    for xp, wrap in ((np, np.asarray), (torch, torch.from_numpy)):
        assert_close(spec.gaussian_kl(wrap(mean), wrap(logvar), xp), ref_kl, "*", "float64", f"kl {xp.__name__}")
    x, y = rng.uniform(-1, 1, (2, 3, 5)), rng.uniform(-1, 1, (2, 3, 5))
    nll = spec.reconstruction_nll(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(0.7, dtype=torch.float64), torch)
    assert_close(nll, (np.abs(x - y) / np.exp(0.7) + 0.7).sum() / 2, "*", "float64", "nll")
    real, fake = rng.standard_normal(7), rng.standard_normal(7)
    hinge = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
    assert_close(spec.hinge_d_loss(torch.from_numpy(real), torch.from_numpy(fake), torch), hinge, "*", "float64", "hinge")
    assert spec.adaptive_weight(2.0, 1.0 - 1e-4, 0.5) == pytest.approx(1.0)
    assert spec.adaptive_weight(1.0, 0.0, 1.0) == 1e4      # clipped


def test_psnr_ssim_known_values():
    from mugv.torch_backend.jobs import vae_eval
    x = torch.from_numpy(rand(3, 4, 16, 16)) * 0.8
    assert vae_eval.psnr(x, x) == float("inf") and vae_eval.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    # +0.1 in [-1, 1] is +0.05 on [0, 1] pixels: MSE 0.0025 -> 26.02 dB
    assert vae_eval.psnr(x + 0.1, x) == pytest.approx(10 * np.log10(1 / 0.0025), abs=1e-3)
    assert vae_eval.ssim(-x, x) < 0.5


def write_gradient_clips(folder, frames: int, count: int = 2, height: int = 24, width: int = 40):
    """`count` mp4 clips of moving gradients + noise (uint8, 8 fps) in `folder`; returns it."""
    from mugv.torch_backend.data import media
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        t, yy, xx = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
        base = 127 + 100 * np.sin(0.3 * xx + 0.2 * yy + 0.5 * t + i)
        video = np.clip(base[..., None] + rng.integers(-20, 20, (frames, height, width, 3)), 0, 255).astype(np.uint8)
        media.write_mp4(folder / f"clip{i}.mp4", video, fps=8)
    return folder


def test_train_then_reload_and_evaluate(tmp_path):
    """A few steps with the discriminator switched on at step 3, on clips written with PyAV; the
    saved checkpoint reloads to the same evaluation numbers."""
    from mugv.torch_backend.jobs import vae_eval, vae_train
    data = write_gradient_clips(tmp_path / "clips", frames=12)
    cfg = vae_train.VAETrainConfig(data=str(data), size="golden", height=24, width=40, num_frames=9, fps=8,
                                   steps=5, log_every=1, eval_frames=9, out=str(tmp_path / "run"),
                                   loss=spec.VAELossConfig(disc_start=3), disc_channels=8)
    logs = []
    result = vae_train.train(cfg, log=logs.append)
    steps = [json.loads(s) for s in logs if '"step"' in s]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    assert all("d_loss" in s for s in steps[3:]) and not any("d_loss" in s for s in steps[:3])
    assert all(np.isfinite(s["loss"]) for s in steps)
    from mugv.torch_backend.jobs.loaders import vae_model
    model = vae_model("golden", checkpoint=str(result["checkpoint"]))
    again = vae_eval.evaluate(model, data, 24, 40, 9, 8.0, out_dir=tmp_path / "eval")
    assert again["mean_psnr"] == pytest.approx(result["after"]["mean_psnr"], abs=1e-4)
    assert (tmp_path / "eval" / "clip0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "eval" / "clip0.mp4").stat().st_size > 0
    assert "| **mean** |" in (tmp_path / "eval" / "metrics.md").read_text()
