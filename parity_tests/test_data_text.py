"""Text encoders never cut a caption silently: the embedded byte encoder and T5 count and warn."""
from __future__ import annotations

import logging

import torch

from mugv.torch_backend.data import text


def test_embedded_encoder_warns_with_counts_when_it_cuts(caplog):
    enc = text.EmbeddedTextEncoder(dim=16, max_len=12, layers=1, heads=2)
    short, long_a, long_b = "red cube", "a red cube pans left slowly", "a red cube zooms in slowly"
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        emb, mask = enc([short, long_a, long_b])
    assert enc.tokenizer.truncation.cut == 2 and enc.tokenizer.truncation.seen == 3
    assert "2 of 3 captions longer than its 11-token limit were cut" in caplog.text
    # what the warning is for: cut after 11 bytes, the two long captions encode identically
    assert torch.equal(emb[1], emb[2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        enc([short])
    assert caplog.text == "" and enc.tokenizer.truncation.cut == 2
