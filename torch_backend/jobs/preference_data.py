"""Make preference data from a checkpoint: sample K candidates per prompt, decode them with the VAE,
score them with the analyzer against their caption, and write DPO pairs and KTO labels.

    mugv make-preferences --checkpoint RUN --vae_checkpoint VAE --prompts train.jsonl --out DIR

Per prompt (each distinct caption of the prompt manifest, in order), candidate k is sampled
text-to-video with noise seed (seed, prompt, k): a prompt's candidates differ only by their noise.
Reward (`data/analyzer.py`): `correct` = number of caption attributes (colour, shape, motion) the
analyzer reads as named; `soft` = mean probability of the named values; candidates rank by
(correct, soft). Written to `out`:
  latents/<prompt>_<k>.npy   the sampled latent (C, T, h, w): what the stage trains on
  videos/<prompt>_<k>.mp4    the decoded clip (what was scored; for inspection or a video manifest)
  candidates.jsonl           every candidate with its reading and scores
  dpo.jsonl                  per prompt, best vs worst candidate where their scores differ
  kto.jsonl                  every candidate, desirable = "yes" iff every named attribute is correct
Both manifests follow `data/preference.py` and point at the latents.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mugv.core import validate as v
from mugv.core.dit import DiTConfig
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.recipe import demo_dit


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    """Sampling, scoring and writing preference data.

    checkpoint: DiT run folder or step_* checkpoint to sample from (group `group`: model | ema).
    vae_checkpoint: mugv VAE checkpoint that decodes the samples (vae_size: its size name).
    prompts: manifest whose distinct captions are the prompts (the TRAINING manifest).
    out: output folder. candidates: K samples per prompt. max_prompts: use the first N distinct
    captions (0 = all). frames / size / fps: clip shape. seed: noise seed of the candidates.
    min_gap: a DPO pair needs best and worst to differ by more than this in soft score when
    their correct counts tie. desirable_attributes: the attributes a KTO sample must get right to
    be desirable (empty = every attribute its caption names); e.g. ["shape", "motion"] when the
    decoder cannot show colour, so that "desirable" does not just mean "a yellow prompt".
    """

    checkpoint: str = ""
    vae_checkpoint: str = ""
    prompts: str = ""
    out: str = "runs/preferences"
    candidates: int = 8
    max_prompts: int = 0
    frames: int = 17
    size: int = 32
    fps: float = 16.0
    seed: int = 0
    min_gap: float = 0.05
    group: str = "model"
    vae_size: str = "tiny"
    text_encoder: str = "embedded"
    batch: int = 64
    desirable_attributes: tuple[str, ...] = ()
    dit: DiTConfig = demo_dit()
    sampler: FlowSamplerConfig = FlowSamplerConfig(num_steps=20, guidance_scale=3.0)

    def __post_init__(self) -> None:
        v.positive_int(self, "candidates", "frames", "size", "batch")
        v.non_negative_int(self, "max_prompts", "seed")
        if self.candidates < 2:
            v.fail(self, "candidates", "at least 2 (a pair needs two candidates)")
        v.in_range(self, "fps", 0, 240, lo_open=True)
        v.in_range(self, "min_gap", 0, 1)
        v.one_of(self, "group", ("model", "ema"))
        if any(a not in ("colour", "shape", "motion") for a in self.desirable_attributes):
            v.fail(self, "desirable_attributes", "names from ['colour', 'shape', 'motion']")


def distinct_captions(manifest: str | pathlib.Path, limit: int = 0) -> list[str]:
    from mugv.torch_backend.data.manifest import read_manifest
    seen: dict[str, None] = {}
    for e in read_manifest(manifest):
        seen.setdefault(e.caption, None)
    captions = list(seen)
    return captions[:limit] if limit else captions


def reward(video: np.ndarray, caption: str) -> dict:
    """The analyzer's reading of a uint8 (T, H, W, 3) clip against its caption: the values read,
    `correct` (attributes read as named), `named` (attributes the caption names) and `soft` (mean
    probability of the named values)."""
    from mugv.torch_backend.data.analyzer import analyze, parse_caption
    wanted = {k: x for k, x in parse_caption(caption).items() if x is not None}
    result = analyze(video)
    read = {k: result.best(k) for k in wanted}
    probs = [getattr(result, k)[x] for k, x in wanted.items()]
    return {"read": read, "correct": sum(read[k] == x for k, x in wanted.items()), "named": len(wanted),
            "soft": float(np.mean(probs)) if probs else 0.0}


def sample_candidates(cfg: PreferenceDataConfig, captions: list[str], log=print) -> tuple[list[dict], np.ndarray]:
    """K candidates per caption: (rows with caption/prompt index/k/scores, uint8 videos), latents
    written under cfg.out. Rows are in (prompt, k) order."""
    import torch

    from mugv.core.vae import latent_shape
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.data import media
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.jobs.loaders import load_dit, load_vae, text_encoder
    from mugv.torch_backend.jobs.sample import sample_latents

    out = pathlib.Path(cfg.out)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    vae = load_vae(cfg.vae_size, cfg.vae_checkpoint)
    text, mask = text_encoder(cfg.text_encoder, cfg.dit)(captions)
    thw = latent_shape(cfg.frames, cfg.size, cfg.size)
    rows, videos = [], []
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=cfg.seed)
    try:
        _, model = load_dit(cfg.dit, cfg.checkpoint, group=cfg.group)
        # one sampler call per (candidate k, block of prompts): seed (seed, k, block) for the noise
        for k in range(cfg.candidates):
            for start in range(0, len(captions), cfg.batch):
                sl = slice(start, start + cfg.batch)
                z = sample_latents(model, cfg.dit, text[sl], mask[sl], thw, cfg.fps, cfg.sampler,
                                            seed=(cfg.seed * 1000 + k) * 1000 + start // cfg.batch)
                with torch.no_grad():
                    clips = [to_uint8(x) for x in vae.decode(z, cfg.frames)]
                for j, (lat, clip) in enumerate(zip(z, clips)):
                    p = start + j
                    name = f"p{p:04d}_k{k:02d}"
                    np.save(out / "latents" / f"{name}.npy", lat.numpy().astype(np.float32))
                    media.write_mp4(out / "videos" / f"{name}.mp4", clip, cfg.fps)
                    rows.append({"id": name, "prompt": p, "k": k, "caption": captions[p],
                                 "latent": f"latents/{name}.npy", "video": f"videos/{name}.mp4",
                                 **reward(clip, captions[p])})
                    videos.append(clip)
            log(f"[mugv] make-preferences: candidate {k + 1}/{cfg.candidates} for {len(captions)} prompts")
    finally:
        megatron_compat.destroy_parallel()
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["prompt"], rows[i]["k"]))
    return [rows[i] for i in order], np.stack([videos[i] for i in order])


def pairs_and_labels(rows: list[dict], min_gap: float = 0.05,
                     desirable_attributes: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """DPO rows (best vs worst of each prompt, ranked by (correct, soft); kept when the correct
    counts differ, or tie with soft scores more than `min_gap` apart) and KTO rows (every
    candidate; desirable iff all named attributes, or all of `desirable_attributes`, are correct)."""
    from mugv.torch_backend.data.analyzer import parse_caption

    def desirable(r) -> bool:
        wanted = parse_caption(r["caption"])
        names = desirable_attributes or [a for a, x in wanted.items() if x is not None]
        return all(r["read"].get(a) == wanted[a] for a in names)

    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    dpo = []
    for p, cands in by_prompt.items():
        ranked = sorted(cands, key=lambda r: (r["correct"], r["soft"], -r["k"]))
        worst, best = ranked[0], ranked[-1]
        if best["correct"] > worst["correct"] or best["soft"] - worst["soft"] > min_gap:
            dpo.append({"id": f"pair{p:04d}", "caption": best["caption"], "preferred": best["latent"],
                        "rejected": worst["latent"], "scores": [best["correct"] + best["soft"],
                                                                worst["correct"] + worst["soft"]]})
    kto = [{"id": r["id"], "caption": r["caption"], "path": r["latent"],
            "desirable": "yes" if desirable(r) else "no",
            "score": r["correct"] + r["soft"]} for r in rows]
    return dpo, kto


def make_preferences(cfg: PreferenceDataConfig, log=print) -> dict:
    """Sample, score and write (module docstring). Returns a summary with the manifest paths."""
    from mugv.torch_backend.jobs.loaders import require_path
    from mugv.torch_backend.data.preference import write_manifest

    for field in ("checkpoint", "vae_checkpoint", "prompts"):
        require_path(field, getattr(cfg, field))
    captions = distinct_captions(cfg.prompts, cfg.max_prompts)
    rows, _ = sample_candidates(cfg, captions, log)
    dpo, kto = pairs_and_labels(rows, cfg.min_gap, cfg.desirable_attributes)
    out = pathlib.Path(cfg.out)
    with open(out / "candidates.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = {"prompts": len(captions), "candidates": len(rows), "pairs": len(dpo),
               "desirable": sum(r["desirable"] == "yes" for r in kto), "undesirable": sum(r["desirable"] == "no" for r in kto),
               "mean_correct": float(np.mean([r["correct"] / r["named"] for r in rows])),
               "dpo": str(write_manifest(out / "dpo.jsonl", dpo)) if dpo else None,
               "kto": str(write_manifest(out / "kto.jsonl", kto))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"[mugv] make-preferences: {summary['prompts']} prompts x {cfg.candidates} -> {summary['pairs']} DPO pairs, "
        f"{summary['desirable']} desirable / {summary['undesirable']} undesirable KTO samples -> {out}")
    return summary


def _make_preferences(cfg: PreferenceDataConfig) -> int:
    summary = make_preferences(cfg, log=lambda s: print(s, flush=True))
    print(json.dumps(summary, indent=1))
    return 0


def make_preferences_command(cfg: PreferenceDataConfig) -> int:
    """`mugv make-preferences` (a bad prompt manifest: one line, exit status 2)."""
    from mugv.torch_backend.jobs.preference import reporting_bad_manifests
    return reporting_bad_manifests(_make_preferences)(cfg)
