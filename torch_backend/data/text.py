"""Text encoders: T5 from a local directory (the anchor's), and an embedded default.

Both are callables `captions -> (embeddings (B, L, D) float32, mask (B, L) bool)` with L fixed
(padded), as the DiT's cross-attention input (notes 2.12: T5 pads/truncates to 300 tokens and
returns last_hidden_state with the attention mask; the DiT packs the valid tokens).

The embedded default needs no download: a byte-level tokenizer (UTF-8 bytes + 3 specials, so any
caption is representable and nothing is out of vocabulary) and a small frozen transformer whose
weights come from a seeded numpy PCG64 stream (the same bytes on every machine and torch version).
It is not a language model; it gives each caption a distinct, deterministic sequence of features
the DiT learns to read through cross-attention, which is all the embedded product dataset needs
(its captions are built from a small attribute vocabulary).
"""
from __future__ import annotations

import logging
import math
import os
import pathlib

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PAD, EOS, UNK = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET


class Truncation:
    """Counts captions an encoder cut to its token limit, and warns once per call that cut any:
    two captions that differ only after the limit get the same embedding (issue 26 saw "pans left"
    and "zooms in" captions encode identically), so a cut is never silent."""

    def __init__(self, what: str, limit: int):
        self.what, self.limit = what, limit
        self.seen = self.cut = 0

    def record(self, captions: list[str], lengths: list[int]) -> None:
        cut = [c for c, n in zip(captions, lengths) if n > self.limit]
        self.seen += len(captions)
        self.cut += len(cut)
        if cut:
            log.warning("%s: %d of %d captions longer than its %d-token limit were cut (%d of %d so "
                        "far), e.g. %r", self.what, len(cut), len(captions), self.limit, self.cut,
                        self.seen, cut[0][:120])


class ByteTokenizer:
    """UTF-8 bytes -> ids (byte + 3), then EOS, padded with PAD to `max_len` (truncated first,
    counted and warned about by `truncation`)."""

    def __init__(self, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len = {max_len}: expected >= 2 (at least one byte and EOS)")
        self.max_len = max_len
        self.truncation = Truncation("embedded text encoder", max_len - 1)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string")
        ids = torch.full((len(captions), self.max_len), PAD, dtype=torch.int64)
        encoded = [text.encode("utf-8") for text in captions]
        self.truncation.record(list(captions), [len(b) for b in encoded])
        for i, raw in enumerate(encoded):
            data = list(raw)[: self.max_len - 1]
            ids[i, : len(data)] = torch.tensor(data, dtype=torch.int64) + BYTE_OFFSET
            ids[i, len(data)] = EOS
        return ids, ids != PAD


class EmbeddedTextEncoder(nn.Module):
    """Frozen, seeded byte-level transformer encoder (pre-LN, bidirectional, masked).

    Arguments:
      dim: output width (the DiT's text_dim).
      max_len: tokens per caption (the DiT's text_max_len).
      layers, heads: depth and attention heads.
      seed: the PCG64 seed all weights are drawn from.
    """

    def __init__(self, dim: int = 64, max_len: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        if dim % heads or dim % 2:
            raise ValueError(f"dim = {dim}: expected an even multiple of heads = {heads}")
        self.dim, self.max_len, self.heads, self.seed = dim, max_len, heads, seed
        self.tokenizer = ByteTokenizer(max_len)
        rng = np.random.Generator(np.random.PCG64(seed))

        def param(*shape, std):
            return nn.Parameter(torch.from_numpy(rng.normal(0.0, std, shape).astype(np.float32)),
                                requires_grad=False)

        self.embed = param(BYTE_VOCAB, dim, std=1.0)
        self.qkv = nn.ParameterList([param(dim, 3 * dim, std=1 / math.sqrt(dim)) for _ in range(layers)])
        self.out = nn.ParameterList([param(dim, dim, std=1 / math.sqrt(dim)) for _ in range(layers)])
        self.up = nn.ParameterList([param(dim, 2 * dim, std=1 / math.sqrt(dim)) for _ in range(layers)])
        self.down = nn.ParameterList([param(2 * dim, dim, std=1 / math.sqrt(2 * dim)) for _ in range(layers)])
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        table = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float()
        self.register_buffer("positions", table, persistent=False)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        x = self.embed[ids] + self.positions
        b, n, d = x.shape
        attn_bias = torch.where(mask[:, None, None, :], 0.0, float("-inf"))
        for qkv, out, up, down in zip(self.qkv, self.out, self.up, self.down):
            h = nn.functional.layer_norm(x, (d,))
            q, k, v = (h @ qkv).view(b, n, 3, self.heads, d // self.heads).unbind(2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + attn_bias, dim=-1)
            x = x + (a @ v).transpose(1, 2).reshape(b, n, d) @ out
            x = x + nn.functional.gelu(nn.functional.layer_norm(x, (d,)) @ up, approximate="none") @ down
        x = nn.functional.layer_norm(x, (d,))
        return x * mask[..., None], mask


class T5TextEncoder:
    """A T5 encoder and its tokenizer from a local directory (`save_pretrained` layout).

    Nothing is downloaded: loading uses local_files_only and HF_HUB_OFFLINE. Captions are padded
    and truncated to `max_len` (300 in the anchor); the output is last_hidden_state in float32
    with the attention mask, as the anchor's `t5.py` returns them.
    """

    def __init__(self, directory: str | pathlib.Path, max_len: int = 300,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        directory = pathlib.Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"T5 directory {directory}: no config.json (expected a "
                                    f"save_pretrained folder with the encoder and tokenizer)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, T5EncoderModel  # heavy import, only on this path
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.max_len, self.device = max_len, torch.device(device)
        self.dim = self.model.config.d_model
        self.truncation = Truncation(f"T5 text encoder {directory}", max_len)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.tokenizer(list(captions), truncation=False)["input_ids"]
        self.truncation.record(list(captions), [len(x) for x in full])
        tokens = self.tokenizer(list(captions), max_length=self.max_len, padding="max_length",
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()


def load_text_encoder(spec: str = "embedded", dim: int = 64, max_len: int = 32, seed: int = 0):
    """"embedded" -> EmbeddedTextEncoder(dim, max_len, seed); otherwise a T5 directory path."""
    if spec == "embedded":
        return EmbeddedTextEncoder(dim=dim, max_len=max_len, seed=seed)
    return T5TextEncoder(spec, max_len=max_len)
