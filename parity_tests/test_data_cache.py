"""Latent/text cache: a job SIGKILLed mid-way and restarted ends complete and equal to a one-shot
run; cached and online sources give the same batches; text encoders (embedded and a tiny random
T5 from a local directory)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorstore as ts
import torch

from mugv.core.data import BucketSpec
from mugv.core.vae import latent_shape
from mugv.torch_backend.data import cache, dataset, text
from mugv.torch_backend.data.product_videos import generate_dataset

BUCKETS = (BucketSpec(32, 32, 1, 2, 16.0), BucketSpec(32, 32, 9, 2, 16.0), BucketSpec(64, 64, 17, 2, 16.0))

_JOB = textwrap.dedent("""
    import sys, time
    from mugv.core.data import BucketSpec
    from mugv.torch_backend.data import cache, dataset, text
    manifest, out, progress, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    buckets = (BucketSpec(32, 32, 1, 2, 16.0), BucketSpec(32, 32, 9, 2, 16.0), BucketSpec(64, 64, 17, 2, 16.0))
    index = dataset.build_index(manifest, buckets)
    def slow_encoder(pixels):
        time.sleep(delay)
        return cache.pool_encoder(pixels)
    log = open(progress, "a")
    def on_row(name, row):
        log.write(f"{name} {row}\\n"); log.flush()
    counts = cache.build_cache(index, out, slow_encoder, text.EmbeddedTextEncoder(32, 48, seed=3),
                               "pool", "embedded-32-48-seed3", batch=2, on_row=on_row)
    print(counts["encoded"], counts["skipped_done"])
""")


def _arrays(root):
    out = {}
    for zarr_json in sorted(root.rglob("zarr.json")):
        key = str(zarr_json.parent.relative_to(root))
        out[key] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(zarr_json.parent)}}
                           ).result().read().result()
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    manifest = generate_dataset(root / "data", 7, seed=12, size=64, frames=17)
    # one clip too short for 17 frames at 64 px: it goes to the 9-frame bucket
    generate_dataset(root / "short", 1, seed=13, size=32, frames=9)
    rows = (root / "data" / "manifest.jsonl").read_text().splitlines()
    short = json.loads((root / "short" / "manifest.jsonl").read_text())
    short.update(id="short", path=str(root / "short" / short["path"]))
    (root / "data" / "manifest.jsonl").write_text("\n".join(rows + [json.dumps(short)]) + "\n")
    return manifest


def test_killed_cache_job_restarts_to_the_one_shot_result(tmp_path, clips):
    run = lambda out, progress, delay: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", _JOB, str(clips), str(out), str(progress), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    one_shot = run(tmp_path / "one", tmp_path / "p_one", 0.0)
    assert one_shot.wait(timeout=180) == 0, one_shot.stderr.read().decode()[-2000:]
    total = len((tmp_path / "p_one").read_text().splitlines())
    index = dataset.build_index(clips, BUCKETS)
    assert total == 2 * len(index.items)          # one latent row and one text row per item
    proc = run(tmp_path / "two", tmp_path / "p_two", 0.3)
    kill_after = int(np.random.default_rng(5).integers(3, len(index.items) - 2))
    deadline = time.time() + 180
    while time.time() < deadline:
        if (tmp_path / "p_two").exists() and len((tmp_path / "p_two").read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not cache.cache_complete(tmp_path / "two")
    restart = run(tmp_path / "two", tmp_path / "p_restart", 0.0)
    assert restart.wait(timeout=180) == 0, restart.stderr.read().decode()[-2000:]
    encoded, skipped = map(int, restart.stdout.read().split())
    assert skipped >= kill_after and encoded + skipped == len(index.items), (encoded, skipped)
    assert cache.cache_complete(tmp_path / "two")
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 3 * 3 + 3
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    # each latent row has the VAE geometry: (C, ceil(T/8), H/8, W/8), not zeros
    for spec in BUCKETS:
        mean = a[f"latents/{spec.name}/mean"]
        assert mean.shape[2:] == latent_shape(spec.frames, spec.height, spec.width)
        assert np.abs(mean).min(axis=(1, 2, 3, 4)).shape[0] == mean.shape[0] and np.all(np.abs(mean).sum((1, 2, 3, 4)) > 0)
    # a cache built with another encoder is refused, not mixed
    with pytest.raises(ValueError, match="video_encoder"):
        cache.build_cache(index, tmp_path / "two", cache.pool_encoder, text.EmbeddedTextEncoder(32, 48, seed=3),
                          "another-vae", "embedded-32-48-seed3")


def test_cached_and_online_sources_give_the_same_batches(tmp_path, clips):
    index = dataset.build_index(clips, BUCKETS)
    encoder = text.EmbeddedTextEncoder(32, 48, seed=3)
    cache.build_cache(index, tmp_path / "c", cache.pool_encoder, encoder, "pool", "e", batch=3)
    cached = cache.CachedSource(index, tmp_path / "c", "pool", "e")
    online = cache.OnlineSource(index, cache.pool_encoder, encoder)
    for positions in index.members().values():
        for chunk in (positions[:2], positions[2:5]):
            if not chunk:
                continue
            for x, y, name in zip(cached.get(chunk), online.get(chunk), ("mean", "std", "text", "mask")):
                assert x.dtype == y.dtype and x.shape == y.shape, name
                # per-sample computations: batching must not change a bit
                assert torch.equal(x, y), (name, (x.float() - y.float()).abs().max())
    assert isinstance(cache.latent_source(index, tmp_path / "c", cache.pool_encoder, encoder, "pool", "e"), cache.CachedSource)
    assert isinstance(cache.latent_source(index, tmp_path / "none", cache.pool_encoder, encoder), cache.OnlineSource)
    mean, std, _, _ = cached.get(index.members()[2][:2])
    z1 = cache.sample_latents(mean, std, torch.Generator().manual_seed(1))
    z2 = cache.sample_latents(mean, std, torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, mean)


def test_pool_encoder_follows_the_vae_frame_rule():
    rng = np.random.default_rng(0)
    for frames in (1, 9, 12, 17):
        x = rng.uniform(-1, 1, (2, 3, frames, 16, 24)).astype(np.float32)
        mean, std = cache.pool_encoder(x)
        assert mean.shape == (2, 3, *latent_shape(frames, 16, 24))
        if frames % 8 == 1:   # frame 0 is encoded alone: 7 front copies + itself
            np.testing.assert_allclose(mean[:, :, 0], x[:, :, 0].reshape(2, 3, 2, 8, 3, 8).mean((3, 5)), rtol=1e-5)
        assert np.all(std >= 0)


def test_vae_encoder_moments_reproduce_the_official_normalised_sample():
    """Cached (mean_n, std_n) + the same eps == VideoVAE.encode(sample=True): z is normalised once."""
    from mugv.core.vae import vae_config
    from mugv.torch_backend.models.vae import init_vae
    from mugv.parity_tests.tolerances import assert_close
    vae = init_vae(vae_config("golden"), seed=3).eval()
    rng = np.random.default_rng(1)
    pixels = rng.uniform(-1, 1, (2, 3, 9, 16, 24)).astype(np.float32)
    mean_n, std_n = cache.vae_encoder(vae)(pixels)
    assert mean_n.shape == (2, vae.cfg.latent_channels, *latent_shape(9, 16, 24)) and np.all(std_n > 0)
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(pixels), sample=True, generator=torch.Generator().manual_seed(4))
        want_mean = vae.encode(torch.from_numpy(pixels), sample=False)
    got = cache.sample_latents(torch.from_numpy(mean_n), torch.from_numpy(std_n), torch.Generator().manual_seed(4))
    assert_close(got, want, "vae", name="normalised sample")
    assert_close(torch.from_numpy(mean_n), want_mean, "vae", name="normalised mean")


def test_embedded_text_encoder_is_deterministic_and_distinguishes_captions():
    enc = text.EmbeddedTextEncoder(dim=48, max_len=64, layers=2, heads=4, seed=0)
    captions = ["A matte red cube on a beige background, static shot.",
                "A matte blue cube on a beige background, static shot.",
                "ünïcödé ✓ " * 10]
    emb, mask = enc(captions)
    assert emb.shape == (3, 64, 48) and mask.dtype == torch.bool
    assert mask[0].sum() == len(captions[0]) + 1 and mask[2].all()      # bytes + EOS; truncated
    assert torch.all(emb[~mask] == 0) and torch.isfinite(emb).all()
    again, _ = text.EmbeddedTextEncoder(dim=48, max_len=64, layers=2, heads=4, seed=0)(captions)
    assert torch.equal(emb, again)
    # one word differs -> the features differ across the caption (bidirectional attention)
    assert (emb[0] - emb[1]).abs().sum(-1)[mask[0]].min() > 1e-3
    single, _ = enc(captions[:1])
    assert torch.equal(single[0], emb[0])            # batching changes nothing
    assert not torch.equal(text.EmbeddedTextEncoder(48, 64, seed=1)(captions)[0], emb)
    assert not any(p.requires_grad for p in enc.parameters())


def test_t5_encoder_from_a_local_directory(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = "a red blue green cube sphere on background the camera pans left right , .".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    config = transformers.T5Config(vocab_size=len(vocab), d_model=24, d_kv=6, d_ff=40, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    model.save_pretrained(tmp_path / "t5")
    fast.save_pretrained(tmp_path / "t5")
    # nothing may be fetched: point the hub at an unreachable address
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = text.load_text_encoder(str(tmp_path / "t5"), max_len=12)
    captions = ["a red cube on the background .", "the camera pans left , a blue sphere"]
    emb, mask = enc(captions)
    assert emb.shape == (2, 12, 24) and emb.dtype == torch.float32
    assert mask.tolist()[0] == [True] * 8 + [False] * 4              # 7 words + </s>, padded
    ids = fast(captions, max_length=12, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert torch.equal(emb, want)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        text.T5TextEncoder(tmp_path / "missing")


def test_a_cache_is_checked_on_every_use_naming_what_changed(tmp_path, clips):
    """Another VAE, another text encoder setting or changed captions on a finished cache used to
    train on the old latents and text in silence (issue 26); now each is an error that names it."""
    import dataclasses as dc
    index = dataset.build_index(clips, (BucketSpec(16, 16, 5, 2, 8.0),))
    encoder = text.EmbeddedTextEncoder(32, 48, seed=3)
    cache.build_cache(index, tmp_path / "c", cache.pool_encoder, encoder, "vae:A#1", "text:e:48", batch=3)
    cache.CachedSource(index, tmp_path / "c", "vae:A#1", "text:e:48")   # same inputs: fine
    with pytest.raises(cache.CacheMismatch, match=r"video_encoder 'vae:A#1', now 'vae:A#2'"):
        cache.CachedSource(index, tmp_path / "c", "vae:A#2", "text:e:48")
    with pytest.raises(cache.CacheMismatch, match=r"text_encoder 'text:e:48', now 'text:e:96'"):
        cache.latent_source(index, tmp_path / "c", cache.pool_encoder, encoder, "vae:A#1", "text:e:96")
    edited = dc.replace(index, items=[dc.replace(it, entry=dc.replace(it.entry, caption=it.entry.caption + " again"))
                                      if i == 1 else it for i, it in enumerate(index.items)])
    with pytest.raises(cache.CacheMismatch, match=r"captions of 1 items changed"):
        cache.CachedSource(edited, tmp_path / "c", "vae:A#1", "text:e:48")
    with pytest.raises(cache.CacheMismatch, match=r"captions of 1 items changed"):   # building too
        cache.build_cache(edited, tmp_path / "c", cache.pool_encoder, encoder, "vae:A#1", "text:e:48")


def test_weights_identity_follows_the_checkpoint_not_its_path(tmp_path):
    import torch

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.schema import ParamSpec, Schema
    from mugv.torch_backend.jobs.loaders import weights_identity
    schema = Schema((ParamSpec("w", (2, 3), "float32", None),))
    save_torch(tmp_path / "vae", 1, {"model": (schema, {"w": torch.zeros(2, 3)})})
    first = weights_identity(tmp_path / "vae")
    save_torch(tmp_path / "vae", 2, {"model": (schema, {"w": torch.ones(2, 3)})})
    assert weights_identity(tmp_path / "vae") != first   # retrained at the same path
    assert weights_identity(tmp_path / "vae" / "step_000000001") == first
