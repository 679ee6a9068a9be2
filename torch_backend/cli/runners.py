"""What each `mugv` subcommand does once its config is built and checked (cli/commands.py)."""
from __future__ import annotations

import json
import pathlib


def _threads() -> None:
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(1)   # small models on a shared CPU: one intra-op thread is faster


def generate_data(cfg) -> int:
    from mugv.torch_backend import demo
    data, out = cfg
    demo.generate(data, out)
    return 0


def train_vae(cfg) -> int:
    from mugv.torch_backend import vae_train
    _threads()
    result = vae_train.train(cfg, log=lambda s: print(s, flush=True))
    print(f"PSNR {result['before']['mean_psnr']:.2f} -> {result['after']['mean_psnr']:.2f} dB; "
          f"checkpoint {result['checkpoint']}")
    return 0


def eval_vae(ns) -> int:
    import sys

    from mugv.torch_backend import vae_eval
    from mugv.torch_backend.cli import pipeline
    _threads()
    model = pipeline.load_vae(ns.size, ns.checkpoint, ns.official)
    result = vae_eval.evaluate(model, ns.data, ns.height, ns.width, ns.frames, ns.fps, ns.out)
    sys.stdout.write(vae_eval.format_table(result))
    return 0


def cache(cfg) -> int:
    from mugv.torch_backend.cli import pipeline
    recipe, only = cfg
    _threads()
    vae = pipeline.load_vae(recipe.vae_size, recipe.vae_checkpoint)
    text = pipeline.text_encoder(recipe.text_encoder, recipe.dit)
    for stage in recipe.stages:
        if only is None or stage.name == only:
            print(pipeline.cache_stage(recipe, stage, vae, text))
    return 0


def train(cfg) -> int:
    import os

    from mugv.torch_backend import report
    from mugv.torch_backend.cli import pipeline
    recipe, only = cfg
    _threads()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    bars = []

    def progress(stage):
        bars.append(report.Progress(stage.steps, stage.name, disable=not rank0))
        return bars[-1]

    last = pipeline.train_stages(recipe, progress, log=lambda s: None, only=only)
    for bar in bars:
        bar.close()
    if rank0:
        runs = {s.name: report.read_metrics(pathlib.Path(recipe.out) / "stages" / s.name / "metrics.jsonl")
                for s in recipe.stages}
        png = report.loss_curve(runs, pathlib.Path(recipe.out) / "loss_curve.png")
        print(f"trained; last stage {last}; loss curve {png}")
    return 0


def sample(ns) -> int:
    import torch

    from mugv.core.vae import latent_shape
    from mugv.torch_backend import megatron_compat, report
    from mugv.torch_backend.cli import pipeline
    from mugv.torch_backend.data.decode import decode_clip, to_model_range
    _threads()
    vae = pipeline.load_vae(ns.vae_size, ns.vae_checkpoint, ns.vae_official)
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=ns.seed)
    try:
        dit, model = pipeline.load_dit(ns.dit, ns.checkpoint, ns.official, ns.group)
        text, mask = pipeline.text_encoder(ns.text_encoder, dit)(list(ns.prompt))
        if text.shape[-1] != dit.text_dim:
            raise ValueError(f"text encoder gives {text.shape[-1]}-d states; the DiT expects text_dim {dit.text_dim}")
        cond = None
        if ns.image:
            ref = to_model_range(decode_clip(ns.image, 1, ns.size, ns.size, ns.fps))
            with torch.no_grad():
                cond = vae.encode(torch.from_numpy(ref)[None], sample=False).repeat(len(ns.prompt), 1, 1, 1, 1)
        z = pipeline.sample_latents(model, dit, text, mask, latent_shape(ns.frames, ns.size, ns.size), ns.fps,
                                    ns.sampler, ns.seed, cond)
    finally:
        megatron_compat.destroy_parallel()
    with torch.no_grad():
        videos = [pipeline.to_uint8(x) for x in vae.decode(z, ns.frames)]
    out = pathlib.Path(ns.out)
    for i, video in enumerate(videos):
        report.write_mp4(out / f"sample_{i}.mp4", video, ns.fps)
    report.write_png(out / "grid.png", report.frame_grid(videos))
    (out / "prompts.json").write_text(json.dumps(list(ns.prompt), indent=1))
    print(f"{len(videos)} clips ({'i2v' if ns.image else 't2v'}) -> {out}")
    return 0


def evaluate(ns) -> int:
    from mugv.torch_backend.cli import pipeline
    from mugv.torch_backend.data.analyzer import _read
    from mugv.torch_backend.data.manifest import read_manifest
    entries = read_manifest(ns.manifest)
    acc, rows = pipeline.analyzer_accuracy([_read(e.path) for e in entries], [e.caption for e in entries])
    print(json.dumps({"accuracy": acc, "clips": len(entries)}, indent=1))
    return 0


def convert_official(ns) -> int:
    if ns.kind == "dit":
        from mugv.checkpoints.official_dit import write_dit_checkpoint
        from mugv.torch_backend.cli.pipeline import read_official_dit
        cfg, params = read_official_dit(ns.src)
        write_dit_checkpoint(cfg, params, ns.dst)
        print(f"DiT: {len(params)} tensors (hidden {cfg.hidden_size}, depth {cfg.depth}) -> {ns.dst}")
    else:
        from mugv.checkpoints import official_vae
        path = official_vae.import_to_checkpoint(ns.src, ns.dst, size=ns.size)
        print(f"VAE -> {path}")
    return 0


def demo(cfg) -> int:
    from mugv.torch_backend import demo as demo_module
    demo_module.run(cfg)
    return 0


__all__ = ["generate_data", "train_vae", "eval_vae", "cache", "train", "sample", "evaluate",
           "convert_official", "demo"]
