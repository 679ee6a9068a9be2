"""Fine-tuning MUG-DiT on a user's own videos: LoRA or full, from the official weights or ours.

The path (docs/finetune.md):
1. the base: an official `dit.pt` / `.safetensors` (imported in memory through
   `checkpoints/official_dit.py`; for the 10B model convert it once with
   `python -m mugv.checkpoints.torch_dit dit.pt OUT` and pass OUT, which each rank reads slice by
   slice) or any mugv checkpoint (a step directory or a run root);
2. the data: a manifest of the user's clips and captions (`torch_backend/data/manifest.py`),
   indexed into buckets, encoded once into the resumable latent/text cache (`data/cache.py`) with
   the caller's video encoder (the official VAE: `vae_encoder(load_official_vae(path))`) and text
   encoder (a local T5 directory, `data/text.py`), then read by `CachedLatents`, a resumable
   `BatchSource` for the Trainer;
3. the Trainer (`training/trainer.py`) with a `model_hook` that loads the base weights and, for
   LoRA, attaches the adapters and freezes the rest (`torch_backend/lora.py`); its checkpoints
   resume exactly; at the end the adapters are also written alone (small) under `out/adapters`.

Entry points for the CLI: `finetune(...)`, `prepare_data(...)`, `finetuned_model(...)` (the
model before or after, for sampling), `load_base(...)`, `load_official_vae(...)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from mugv.core import validate as v
from mugv.core.data import BucketSpec, TaskMix
from mugv.core.dit import DiTConfig
from mugv.core.flow import FlowConfig
from mugv.core.lora import LoRAConfig
from mugv.core.parallel import ParallelConfig
from mugv.core.train import TrainConfig
from mugv.torch_backend.training.batch import TrainBatch

OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run adds to the training configs.

    mode: "lora" (adapters only; base frozen) or "full" (every parameter trains).
    lora: the adapters (rank, alpha, targets, base dtype), used when mode == "lora".
    buckets: the batch shapes the user's clips are resized/cropped/resampled to (core/data.py).
    i2v: share of video batches trained as image-to-video (latent frame 0 clean), the rest t2v.
    caption_dropout: captions dropped for classifier-free guidance (the anchor: 0.1).
    data_seed: the sampler's seed (which clips form which batch, in which order).
    """

    mode: str = "lora"
    lora: LoRAConfig = LoRAConfig()
    buckets: tuple[BucketSpec, ...] = (BucketSpec(256, 448, 33, batch_size=1, fps=24.0),)
    i2v: float = 0.0
    caption_dropout: float = 0.1
    data_seed: int = 0

    def __post_init__(self) -> None:
        v.one_of(self, "mode", ("lora", "full"))
        if not self.buckets or not all(isinstance(b, BucketSpec) for b in self.buckets):
            v.fail(self, "buckets", "a non-empty tuple of BucketSpec")
        v.in_range(self, "i2v", 0, 1)
        v.in_range(self, "caption_dropout", 0, 1)
        v.non_negative_int(self, "data_seed")


# ---------------------------------------------------------------------------------------------
# Base weights


def is_official_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and Path(path).suffix in OFFICIAL_SUFFIXES


def load_base(path: str | os.PathLike) -> tuple[DiTConfig, Mapping[str, np.ndarray] | str]:
    """(DiT config, base) of an official weights file or a mugv checkpoint.

    For an official file the base is the canonical arrays (every key checked by the importer);
    for a checkpoint it is the checkpoint path (read later, each rank its slices)."""
    from mugv.checkpoints.official_dit import config_from_official, import_official, load_official_file
    from mugv.torch_backend.lora import open_checkpoint

    if is_official_file(path):
        state = load_official_file(str(path))
        cfg = config_from_official(state)
        return cfg, import_official(state, cfg)
    if not Path(path).exists():
        raise FileNotFoundError(f"base weights {path}: no such file or directory (expected an official "
                                f"{'/'.join(OFFICIAL_SUFFIXES)} file or a mugv checkpoint directory)")
    ckpt = open_checkpoint(path)
    if "dit" not in ckpt.config:
        raise ValueError(f"{ckpt.path}: its config has no 'dit' section; not a DiT checkpoint")
    return v.from_dict(DiTConfig, ckpt.config["dit"]), str(ckpt.path)


def load_official_vae(path: str | os.PathLike, size: Optional[str] = None,
                      device: str | torch.device = "cpu"):
    """The official VAE (`vae.pt` / `.safetensors`) as our VideoVAE, eval mode, fp32. `size` names
    a `core/vae.py` size; None infers it from the shapes (GroupNorm groups: the official 32)."""
    from mugv.checkpoints import official_vae
    from mugv.core.vae import vae_config
    from mugv.torch_backend.models.vae import VideoVAE

    state = official_vae.load_official_file(str(path))
    cfg = official_vae.config_from_official(state) if size is None else vae_config(size)
    params = official_vae.import_official(state, cfg)
    vae = VideoVAE(cfg)
    vae.load_state_dict({k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in params.items()})
    return vae.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Data: manifest -> index -> cache -> batches


class CachedLatents:
    """A resumable `BatchSource` over a dataset index and its latent/text cache (or online
    encoders): the data sampler picks each global batch (one bucket), latents are drawn from the
    cached posterior, z = mean + std * eps, with eps from a generator seeded by (seed, step), so a
    resumed run sees exactly the batches of the uninterrupted one. The state is the sampler's."""

    def __init__(self, index, source, task_mix: TaskMix = TaskMix(t2v=1.0), seed: int = 0,
                 sample_posterior: bool = True):
        from mugv.torch_backend.data import sampler
        self.index, self.source, self.seed = index, source, seed
        self.sample_posterior = sample_posterior   # False: train on the posterior means (demo VAE)
        self.plan = sampler.SamplerPlan(index.buckets, index.members(), task_mix, seed)
        self.state = sampler.init(seed)

    def next_batch(self) -> TrainBatch:
        from mugv.torch_backend.data import sampler
        from mugv.torch_backend.data.cache import sample_latents
        batch, self.state = sampler.step(self.plan, self.state)
        mean, std, emb, mask = self.source.get(list(batch.positions))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + batch.step)
        spec = self.index.buckets[batch.bucket]
        latents = sample_latents(mean.float(), std.float(), gen) if self.sample_posterior else mean.float()
        return TrainBatch(latents, emb.float(), mask.bool(), torch.full((latents.shape[0],), float(spec.fps)),
                          (spec.height, spec.width), list(batch.positions))

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data state seed {state.get('seed')} != this source's seed {self.seed}")
        self.state = dict(state)


def prepare_data(manifest: str | os.PathLike, buckets: tuple[BucketSpec, ...],
                 encode_video: Callable, encode_text: Callable, video_name: str, text_name: str,
                 cache_dir: Optional[str | os.PathLike] = None, seed: int = 0,
                 log: Callable[[str], None] = print, sample_posterior: bool = True) -> CachedLatents:
    """Index the manifest's clips into `buckets` (unusable files skipped and counted), encode them
    into the cache under `cache_dir` (resumable; already-done rows are kept), and return the batch
    source. Without `cache_dir` the clips are encoded at every step (online)."""
    from mugv.torch_backend.data.cache import CachedSource, OnlineSource, build_cache
    from mugv.torch_backend.data.dataset import build_index

    index = build_index(manifest, tuple(buckets))
    log(f"[mugv] finetune data: {index.report()}")
    if not index.items:
        raise ValueError(f"manifest {manifest}: no usable clip for buckets {[b.name for b in buckets]} "
                         f"(skipped: {index.skip_counts})")
    if cache_dir is not None:
        counts = build_cache(index, cache_dir, encode_video, encode_text, video_name, text_name)
        log(f"[mugv] finetune cache {cache_dir}: {counts['encoded']} encoded, {counts['skipped_done']} already done")
        source = CachedSource(index, cache_dir)
    else:
        source = OnlineSource(index, encode_video, encode_text)
    images = any(b.frames == 1 for b in buckets)
    videos = any(b.frames > 1 for b in buckets)
    mix = TaskMix(t2i=1.0, t2v=0.0) if images and not videos else TaskMix(t2v=1.0)
    return CachedLatents(index, source, mix, seed, sample_posterior)


# ---------------------------------------------------------------------------------------------
# The run


def model_hook(cfg: DiTConfig, base, ft: FinetuneConfig, seed: int = 0):
    """The Trainer's model_hook: load the base weights; for LoRA attach adapters and freeze the rest."""
    from mugv.torch_backend.lora import apply_lora, load_base_weights

    def hook(model):
        load_base_weights(model, cfg, base)
        return apply_lora(model, cfg, ft.lora, seed=seed) if ft.mode == "lora" else None
    return hook


def finetune(base: str | os.PathLike, source, out_dir: str | os.PathLike, ft: FinetuneConfig,
             train: TrainConfig, flow: FlowConfig = FlowConfig(),
             parallel: ParallelConfig = ParallelConfig(), log: Callable[[str], None] = print,
             on_metrics: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune from `base` (official file or mugv checkpoint) on `source` (a BatchSource, e.g.
    `prepare_data(...)`), writing checkpoints, metrics.jsonl and TensorBoard events under
    `out_dir` (a rerun resumes from its newest checkpoint). LoRA runs also write the adapters
    alone under `out_dir/adapters` (from the fp32 values and from the EMA, `adapters_ema`).
    Every rank calls it (under torchrun for several). Returns a small report dict."""
    from mugv.torch_backend.lora import extract_adapters
    from mugv.torch_backend.training.trainer import StageSettings, Trainer

    import torch.distributed as dist

    cfg, base_weights = load_base(base)
    out_dir = Path(out_dir)
    stage = StageSettings(task_mix=(("t2v", 1.0 - ft.i2v), ("i2v", ft.i2v)), caption_dropout=ft.caption_dropout)
    # LoRA checkpoints keep the adapters and their state; the frozen base is reloaded from the
    # official file or the very checkpoint step the run started from (a run root's newest step
    # may move on)
    frozen_from = str(Path(base_weights if isinstance(base_weights, str) else base).resolve())
    trainer = Trainer(cfg, train, flow, source, out_dir, parallel=parallel, stage=stage,
                      model_hook=model_hook(cfg, frozen_from if isinstance(base_weights, str) else base_weights,
                                            ft, seed=train.seed),
                      log=log, on_metrics=on_metrics, frozen_from=frozen_from if ft.mode == "lora" else None)
    rank = dist.get_rank()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if rank == 0:
        (out_dir / "finetune.json").write_text(json.dumps(
            {"base": str(base), "finetune": v.to_dict(ft), "dit": v.to_dict(cfg)}, indent=1))
        log(f"[mugv] finetune ({ft.mode}) from {base}: {trainable:,} of {total:,} parameters train "
            f"on this rank ({100 * trainable / max(total, 1):.2f}%)")
    try:
        last = trainer.run()
        ckpt = trainer.ckpt_dir
    finally:
        trainer.close()
    report = {"out_dir": str(out_dir), "mode": ft.mode, "trainable_params": trainable,
              "total_params": total, "last": {k: val for k, val in last.items() if k != "samples"}}
    if ft.mode == "lora" and rank == 0:
        report["adapters"] = str(extract_adapters(ckpt, cfg, ft.lora, out_dir / "adapters", group="model"))
        report["adapters_ema"] = str(extract_adapters(ckpt, cfg, ft.lora, out_dir / "adapters_ema", group="ema"))
        log(f"[mugv] adapters written to {report['adapters']} (EMA: {report['adapters_ema']})")
    return report


def finetuned_model(base: str | os.PathLike, adapters: Optional[str | os.PathLike] = None,
                    merge: bool = True, device: Optional[torch.device] = None, **config_overrides):
    """The DiT for sampling before (`adapters=None`) or after fine-tuning: base weights loaded,
    adapters (an adapter checkpoint, e.g. `out/adapters`) loaded and, with `merge`, folded into
    the weights so sampling costs nothing extra. For a full fine-tune pass its checkpoint as
    `base`. Megatron's parallel state must be initialised (any TP size). Returns (config, model)."""
    from mugv.torch_backend.lora import load_adapters, load_base_weights, merge_lora
    from mugv.torch_backend.models.dit import build_dit, transformer_config

    cfg, weights = load_base(base)
    model = build_dit(cfg, transformer_config(cfg, **config_overrides), seed=None, device=device)
    load_base_weights(model, cfg, weights)
    if adapters is not None:
        load_adapters(model, cfg, adapters)
        if merge:
            merge_lora(model)
    model.eval()
    return cfg, model


# ---------------------------------------------------------------------------------------------
# The held-out-attribute experiment (docs/finetune.md): pretrain without a value, LoRA on it


def held_out_experiment(out_dir: str | os.PathLike, attribute: str = "colour", value: str = "blue",
                        vae_checkpoint: Optional[str] = None, pretrain=None, steps: int = 300,
                        lora: LoRAConfig = LoRAConfig(rank=8, alpha=8.0), lr: float = 1e-3,
                        seeds: tuple[int, ...] = (1234, 4321), replay: bool = True,
                        log: Callable[[str], None] = print) -> dict:
    """Does LoRA teach a pretrained DiT an attribute value it never saw?

    1. The demo's clips (`demo.generate`, all values) are split: clips WITHOUT `value` of
       `attribute` pretrain the DiT (the demo's curriculum, `pretrain` or the demo default);
       the clips WITH it are the fine-tuning set, with `replay` together with the pretraining
       clips (without replay LoRA learns "always `value`": measured, docs/finetune.md).
    2. Before: text-to-video samples of every caption naming `value` (each colour/shape/motion
       combination with it, both caption variants, one sample per seed) are scored by the analyzer.
    3. LoRA (`lora`, base frozen) trains on the fine-tuning set for `steps` steps; the same
       prompts and noise are sampled again with the adapters merged.
    `vae_checkpoint`: a trained demo VAE (e.g. runs/demo/vae/ckpt/step_N); None trains one as
    the demo does. Writes out_dir/held_out.json and before/after PNG grids; returns the numbers.
    """
    from mugv.core.data import BucketSpec
    from mugv.core.sampler import FlowSamplerConfig
    from mugv.core.train import OptimizerConfig
    from mugv.core.vae import latent_shape
    from mugv.torch_backend import demo, megatron_compat, report as rp
    from mugv.torch_backend.cli import pipeline
    from mugv.torch_backend.data.cache import vae_encoder

    torch.set_num_threads(1)
    out = Path(out_dir)
    d = demo.DemoData()
    values = {"colour": d.colours, "shape": d.shapes, "motion": d.motions}
    if attribute not in values or value not in values[attribute]:
        raise ValueError(f"held-out {attribute}={value!r}: expected one of {values.get(attribute, values)}")
    manifests = demo.generate(d, out / "data", log)
    rows = [json.loads(x) for x in manifests["train"].read_text().splitlines()]
    attrs = [json.loads(x) for x in (out / "data" / "train_attributes.jsonl").read_text().splitlines()]
    split = {"pretrain": [r for r, a in zip(rows, attrs) if a[attribute] != value],
             "finetune": [r for r, a in zip(rows, attrs) if a[attribute] == value or replay]}
    tag = "_replay" if replay else ""
    for name, part in split.items():
        (out / "data" / f"{name}{tag if name == 'finetune' else ''}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    log(f"[mugv] held-out {attribute}={value}: {len(split['pretrain'])} pretraining clips without it, "
        f"{len(split['finetune'])} fine-tuning clips ({'all' if replay else 'only those with it'})")

    cfg = demo.DemoConfig(out=str(out / "demo_vae"))
    if vae_checkpoint is None:
        _, vae_checkpoint, _ = demo.train_vae(cfg, manifests["train"], log)
    vae = pipeline.load_vae(cfg.vae.size, str(vae_checkpoint))
    pre = dataclasses.replace(pretrain or cfg.pretrain, manifest=str(out / "data" / "pretrain.jsonl"),
                              vae_checkpoint=str(vae_checkpoint), out=str(out / "pretrain"), sample_every=0)
    base_run = pipeline.train_stages(pre, log=log)
    base = base_run / "checkpoints"

    others = [dict(zip([k for k in values if k != attribute], combo)) for combo in
              __import__("itertools").product(*[values[k] for k in values if k != attribute])]
    def captions_for(val):
        out = []
        for o in others:
            pick = {**o, attribute: val}
            out += [demo.caption(pick["colour"], pick["shape"], pick["motion"], variant) for variant in (0, 1)]
        return out

    prompts = captions_for(value)
    # control: the values pretraining did see; LoRA on `value` alone must not turn them into it
    controls = [c for other in values[attribute] if other != value for c in captions_for(other)]
    text_enc = pipeline.text_encoder(pre.text_encoder, pre.dit)
    frames = max(s.frames for s in pre.stages)
    thw = latent_shape(frames, d.size, d.size)
    sampler_cfg = FlowSamplerConfig(num_steps=20, guidance_scale=3.0)

    def score(adapters, name_):
        megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=0)
        try:
            _, model = finetuned_model(base, adapters)
            videos = {}
            for name, caps in (("held_out", prompts), ("control", controls)):
                text, mask = text_enc(caps)
                videos[name] = []
                for seed in seeds:
                    z = pipeline.sample_latents(model, pre.dit, text, mask, thw, d.fps, sampler_cfg, seed)
                    with torch.no_grad():
                        videos[name] += [pipeline.to_uint8(x) for x in vae.decode(z, frames)]
        finally:
            megatron_compat.destroy_parallel()
        acc, per = pipeline.analyzer_accuracy(videos["held_out"], prompts * len(seeds))
        control, _ = pipeline.analyzer_accuracy(videos["control"], controls * len(seeds))
        rp.write_png(out / f"{name_}_grid.png", rp.frame_grid(videos["held_out"][:8]))
        got = [r.get(attribute) for r in per]
        log(f"[mugv] {name_}: {attribute} accuracy on '{value}' prompts {acc[attribute]:.1%} (read "
            f"{ {g: got.count(g) for g in sorted(set(map(str, got)))} }); on the other {attribute} prompts "
            f"{control[attribute]:.1%}")
        return {**acc, "control": control}, got

    before, got_before = score(None, "before")
    bucket = BucketSpec(d.size, d.size, frames, batch_size=16, fps=d.fps)
    source = prepare_data(out / "data" / f"finetune{tag}.jsonl", (bucket,), vae_encoder(vae), text_enc,
                          video_name=f"vae:{vae_checkpoint}", text_name=f"text:{pre.text_encoder}",
                          cache_dir=out / f"finetune_cache{tag}", log=log, sample_posterior=pre.sample_posterior)
    ft = FinetuneConfig(mode="lora", lora=lora, buckets=(bucket,), i2v=0.0)
    train = dataclasses.replace(pre.train, steps=steps, seed=0,
                                optimizer=OptimizerConfig(lr=lr, min_lr=lr, warmup_steps=10))
    result = finetune(base, source, out / f"lora{tag}", ft, train, flow=pre.flow, log=log)
    after, got_after = score(result["adapters"], f"after{tag}")
    numbers = {"attribute": attribute, "value": value, "prompts": len(prompts), "control_prompts": len(controls),
               "seeds": list(seeds),
               "samples": len(prompts) * len(seeds), "chance": 1 / len(values[attribute]),
               "before": before, "after": after, "read_before": got_before, "read_after": got_after,
               "lora": v.to_dict(lora), "steps": steps, "lr": lr,
               "trainable_params": result["trainable_params"], "total_params": result["total_params"],
               "pretrain_clips": len(split["pretrain"]), "finetune_clips": len(split["finetune"]), "replay": replay}
    (out / f"held_out{tag}.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mugv.torch_backend.finetune",
                                 description="held-out-attribute LoRA experiment (docs/finetune.md)")
    ap.add_argument("--out", default="runs/held_out")
    ap.add_argument("--held_out", default="colour=blue", help="attribute=value kept out of pretraining")
    ap.add_argument("--vae_checkpoint", default=None, help="a trained demo VAE (default: train one)")
    ap.add_argument("--steps", type=int, default=300, help="LoRA steps")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321], help="sampling seeds")
    ap.add_argument("--no_replay", action="store_true", help="fine-tune on the held-out value's clips only")
    a = ap.parse_args(argv)
    attribute, _, value = a.held_out.partition("=")
    numbers = held_out_experiment(a.out, attribute, value.replace("_", " "), a.vae_checkpoint, steps=a.steps,
                                  lora=LoRAConfig(rank=a.rank, alpha=float(a.rank)), lr=a.lr, seeds=tuple(a.seeds),
                                  replay=not a.no_replay)
    print(json.dumps({k: numbers[k] for k in ("attribute", "value", "samples", "chance", "before", "after")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
