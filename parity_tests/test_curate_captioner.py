"""The VLM captioner of `mugv curate`: a tiny BLIP built here (nothing downloaded), loaded back
from its directory, batched; and clips without caption files captioned inside the pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mugv.core.curation import embedded_curate_config
from mugv.torch_backend.data.curation import run
from mugv.torch_backend.data.manifest import read_manifest
from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources

WORDS = "a red blue cube sphere on the background camera pans left right static".split()


def _tiny_blip(directory, favourite: str):
    """A random 1-layer BLIP whose language head always prefers `favourite`: a known caption."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # a word-level vocabulary as a dict: built from a vocab_file, the tokenizer reloaded from
    # its save_pretrained directory held only the 5 special tokens (transformers 5.25)
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS)})
    processor = transformers.BlipProcessor(transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(specials) + len(WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, bos_token_id=2, sep_token_id=3,
                         eos_token_id=3, pad_token_id=0, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(config).eval()
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
        head.decoder.weight.mul_(0.01)       # the image still reaches the logits, a little
        head.bias.zero_()
        head.bias[len(specials) + WORDS.index(favourite)] = 10.0
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_captioner_loads_from_a_directory_and_batches(tmp_path, monkeypatch):
    from mugv.torch_backend.data.curation.captioner import VLMCaptioner
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # any download attempt would fail
    directory = _tiny_blip(tmp_path / "blip", "cube")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40 + 3 * i, 57, 3), dtype=np.uint8) for i in range(5)]
    captioner = VLMCaptioner(directory, max_new_tokens=4, batch_size=2)
    batched = captioner(frames)
    assert batched == ["cube cube cube cube"] * 5, f"captions {batched}"
    single = VLMCaptioner(directory, max_new_tokens=4, batch_size=1)(frames)
    assert single == batched, "batching must not change captions"


def test_pipeline_captions_clips_without_caption_files(tmp_path):
    directory = _tiny_blip(tmp_path / "blip", "sphere")
    generate_sources(tmp_path / "in", SourcesSpec(sources=1, shots=2, shot_frames=(36, 40), defect_rate=0.0, seed=4))
    (tmp_path / "in" / "captions.jsonl").unlink()                 # raw footage without captions
    without = run(embedded_curate_config(str(tmp_path / "in"), str(tmp_path / "a")))
    assert without["kept"] == 0 and without["rejected_by_filter"].get("caption") == without["clips"], without
    report = run(embedded_curate_config(str(tmp_path / "in"), str(tmp_path / "b"), captioner_dir=str(directory)))
    entries = read_manifest(tmp_path / "b" / "manifest.jsonl")
    assert len(entries) == report["kept"] == report["clips"] > 0, report
    for e in entries:
        assert set(e.caption.split()) == {"sphere"}, f"{e.sample_id}: caption {e.caption!r}"
    rows = [json.loads(line) for line in open(tmp_path / "b" / "curation.jsonl")]
    assert {r["caption_source"] for r in rows} == {"vlm:blip"}, {r["caption_source"] for r in rows}
